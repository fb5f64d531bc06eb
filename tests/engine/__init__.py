"""Tests of merge_lab/engine."""
