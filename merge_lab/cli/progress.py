"""Progress reporting for the CLI: a tqdm bar over the bytes read, with keys/s in the postfix."""

from __future__ import annotations

import os
import time

from tqdm import tqdm


class TqdmProgress:
    """Callable `(bytes_done, bytes_total, key)` -> updates a tqdm bar (GB/s and ETA from tqdm)."""

    def __init__(self, label: str, *, disable: bool = False, position: int | None = None, leave: bool = True):
        self.label = os.path.basename(str(label))
        self.disable = disable
        self.position = position
        self.leave = leave
        self.bar: tqdm | None = None
        self.keys = 0
        self.last_key = None
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, key: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=self.label,
                            disable=self.disable, position=self.position, leave=self.leave, dynamic_ncols=True)
        if key != self.last_key:
            self.keys += 1
            self.last_key = key
        self.bar.update(done - self.bar.n)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self.keys % 32 == 0 or done == total:
            self.bar.set_postfix(keys=self.keys, keys_s=f"{self.keys / elapsed:.0f}", refresh=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def write_with_progress(recipe, *, no_progress: bool, overwrite: bool):
    """merge_to_file with a progress bar and the engine's notes on stderr (the one-model commands)."""
    import sys

    from merge_lab.engine import merge_to_file  # torch and friends only for the commands that write

    with TqdmProgress(recipe.out, disable=no_progress) as progress:
        return merge_to_file(recipe, progress=progress, overwrite=overwrite,
                             notify=lambda note: print(note, file=sys.stderr))


def print_written(result, summary: str) -> None:
    """What every writing command prints: the file, a summary line, its sha256 and AutoV2 hash."""
    print(f"wrote {result.out}")
    print(f"  {summary}")
    print(f"  sha256 {result.sha256}")
    print(f"  AutoV2 {result.autov2}")

