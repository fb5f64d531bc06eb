"""Architectures: the registry (one record per architecture, one module per record), detection from a
header, key layouts, the block map and block-weight presets.

Importing the package registers the built-in architectures, in the order detection messages list them.
"""

from merge_lab.archs import sd1, sd2, sdxl, sdxl_refiner, flux, chroma, sd3  # noqa: F401, I001  (registered in this order)
from merge_lab.archs.registry import (
    ArchSpec,
    PreviewSupport,
    PreviewVariant,
    all_block_names,
    current_key_name,
    get,
    layout_for,
    names,
    preview_variants,
    register,
    specs,
    supported,
    unregister,
)

__all__ = ["ArchSpec", "PreviewSupport", "PreviewVariant", "all_block_names", "current_key_name", "get",
           "layout_for", "names", "preview_variants", "register", "specs", "supported", "unregister"]
