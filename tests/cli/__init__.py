"""Tests of merge_lab/cli."""
