"""Tests of merge_lab/preview."""
