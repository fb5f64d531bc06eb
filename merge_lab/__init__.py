"""Merge Lab engine: architecture detection, block map, streaming I/O, recipes, analysis, preview, CLI."""

__version__ = "0.1.0"
