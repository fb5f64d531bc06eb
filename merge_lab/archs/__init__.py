"""Architectures: detection from a header, key layouts, the block map and block-weight presets."""
