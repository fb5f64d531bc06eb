"""Tests of merge_lab/analysis.py."""
