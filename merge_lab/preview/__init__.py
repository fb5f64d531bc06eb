"""Preview images of a merge with diffusers, offline: from an in-memory state dict (no need to save) or a file.

Each architecture's pipeline is built ONCE, with empty (meta) weights, from config files (the shipped
``merge_lab/archs/configs/<variant>/`` for the real SD1.5 / SD2.x / SDXL sizes, generated from the layouts for
the tiny demo models); our single-file (LDM) state dict is converted with diffusers' own LDM→diffusers
converters and loaded with ``load_state_dict(strict=True, assign=True)``: exact (a missing or unexpected key is
an error, never silently random weights) and fast (no file written or re-read, no copy of tensors already in
the render dtype, and a second merge only swaps the weights). Weights are held once, in the render dtype:
float16 on CUDA; on CPU float32, or bfloat16 when the float32 weights would exceed 8 GiB (a real SDXL).

Modules (no cycles: :mod:`.pipeline` imports the others; an import-linter contract keeps the layers):

- :mod:`.settings` — :class:`PreviewSettings` (prompt, negative prompt, seed, steps, size, sampler, CFG
  scale, dtype, device), the samplers, the render device and dtype;
- :mod:`.identify` — what a checkpoint is for rendering: architecture, layout, release (:func:`identify`);
- :mod:`.convert` — the LDM → diffusers state-dict conversion and the keys a preview reads;
- :mod:`.infotext` — the PNG text: the web UI's "parameters" infotext and the recipe JSON (:func:`save_png`,
  :func:`read_png_metadata`, :func:`parse_infotext`), image and merge names;
- :mod:`.pipeline` — the public entry points (used by the CLI, the X/Y/Z plot and the web-UI tab):
  :func:`render` ``(state_dict_or_path, arch=None, settings) -> list[PIL.Image]`` and :func:`render_merge` for
  an engine ``MergeResult``, each image carrying its infotext and recipe in ``image.info``; the built pipeline
  and :class:`PipelineCache`;
- :mod:`.diffusers_configs` (the pipelines' config files) and :mod:`.tokenizer` (the offline CLIP tokenizer).
"""
