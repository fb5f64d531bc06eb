"""Merge Lab engine: architecture registry, streaming I/O, the merge engine, analysis, previews, plots, CLI.

Importing it makes ``merge_lab_methods`` and ``merge_lab_extension`` importable from a plain copy of the
repository too (see merge_lab/_own.py).
"""

from merge_lab import _own

__version__ = "0.1.0"

_own.install()
