"""Tests of merge_lab/archs."""
