"""Tests of merge_lab/io."""
