"""Preview images of a merge with diffusers, offline: pipeline configs, weight conversion, rendering, infotext."""
