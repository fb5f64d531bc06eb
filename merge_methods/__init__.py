"""Pure tensor math of the merge methods: no I/O, no UI. Installed and imported as ``merge_lab_methods``.

Every module here imports its siblings relatively, so the package works under whatever name it is
loaded (see merge_lab/_own.py for why it is never imported as the generic ``merge_methods``).
"""

from . import basic, drop, median, model_stock, sparse, spectral, sphere, supermerger, task_vectors  # noqa: F401  (register the methods)
from .registry import (
    REGISTRY,
    Chunking,
    Compiled,
    KeyContext,
    MergeMethod,
    Param,
    Statistics,
    Variant,
    get_method,
    merge_method,
    method_names,
)

__all__ = ["REGISTRY", "Chunking", "Compiled", "KeyContext", "MergeMethod", "Param", "Statistics", "Variant",
           "get_method", "merge_method", "method_names"]
