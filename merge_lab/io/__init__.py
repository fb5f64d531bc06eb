"""Files: the safetensors header, reader and writer (atomic, resumable), pickled checkpoints, hashes.

Knows nothing of architectures or methods; every other package reads and writes through it.
"""
