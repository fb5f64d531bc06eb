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
