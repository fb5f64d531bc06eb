"""Files: the safetensors header, reader and writer (atomic, resumable), pickled checkpoints, hashes.

Modules:
- ``header``: dtype tables, size limits, TensorInfo / Header and the strict ``read_header``;
- ``reader``: SafetensorsReader (tensors or row ranges read with preadv);
- ``writer``: SafetensorsWriter (atomic, no-clobber, synced while it writes), OutputEntry, tensor_bytes;
- ``resume``: the ``--resume`` journal and the fixed partial file's name;
- ``checkpoints``: opening any input (``open_checkpoint``, ``read_header_any``, legacy .ckpt / .pt pickles);
- ``hashing``: sha256, AutoV2 and legacy hashes, and their cache.
Within the package: reader -> header; writer -> header, resume; checkpoints -> header, reader.

Knows nothing of architectures or methods; every other package reads and writes through it.
"""
