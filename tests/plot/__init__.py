"""Tests of merge_lab/plot."""
