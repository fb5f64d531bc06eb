"""Tests of merge_methods/."""
