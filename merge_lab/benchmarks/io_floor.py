"""`merge-lab bench`: full-size synthetic checkpoints, and timings of the I/O floor, ours and sd-mecha.

Every measured run is a separate process (so its peak RSS is its own), the variants alternate within each
repetition (so page-cache and thermal drift hit all of them alike), and we report the median and the
spread. The checkpoints have the real SD1.5 / SDXL / Flux.1-dev key sets and shapes, random values; the
fine-tunes are base + a shared direction + their own noise, made once into a cache folder, streamed key by key.
SD1.5 and SDXL are fp16 all-in-one files; Flux is a transformer-only fp8 file as the common downloads are
(bare BFL names, 2-D weights F8_E4M3, biases and norm scales BF16: 11.9 GB).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_lab.archs import layout_for
from merge_lab.io.hashing import cache_dir
from merge_lab.io.header import DTYPES, ITEMSIZE
from merge_lab.io.reader import SafetensorsReader
from merge_lab.io.writer import OutputEntry, SafetensorsWriter


@dataclass(frozen=True)
class BenchArch:
    arch: str  # registry name
    transformer_only: bool = False  # the transformer alone, under bare names (as BFL and fp8 re-uploads ship it)
    fp8: bool = False  # 2-D+ weights F8_E4M3, the rest BF16 (else every float key F16)

    @property
    def spread(self) -> float:
        # fp8 e4m3 keeps 3 mantissa bits (≈ 6 % steps): a 5 % change would mostly round back to the base
        return 0.25 if self.fp8 else 0.05


ARCHS = {"sd15": BenchArch("sd1"), "sdxl": BenchArch("sdxl"),
         "flux": BenchArch("flux-dev", transformer_only=True, fp8=True)}


def bench_shapes(arch: str, width: int | None = None) -> dict[str, tuple[int, ...]]:
    spec = ARCHS[arch]
    layout = layout_for(spec.arch, width=width)
    if not spec.transformer_only:
        return layout.shapes()
    prefix = "model.diffusion_model."
    return {k.removeprefix(prefix): s for k, s in layout.transformer_shapes().items()}


def bench_dtype(arch: str, key: str, shape: tuple[int, ...]) -> str:
    if key.endswith("position_ids"):
        return "I64"
    if ARCHS[arch].fp8:
        return "F8_E4M3" if len(shape) >= 2 else "BF16"
    return "F16"


def bench_dir() -> Path:
    return Path(os.environ.get("MERGE_LAB_BENCH_DIR") or cache_dir() / "bench")


def _value(key: str, shape: tuple[int, ...], role: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic synthetic values per (key, role): cheap to regenerate, no whole model in memory."""
    import hashlib

    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{role}/{key}".encode()).digest()[:8],
                                                    "little") & ((1 << 63) - 1))
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else max(shape[0] if shape else 1, 1)
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def checkpoint_paths(arch: str, n_models: int, folder: Path | None = None, width: int | None = None) -> list[Path]:
    """Where the base and the n fine-tunes are kept (base first)."""
    folder = Path(folder or bench_dir()) / (arch if width is None else f"{arch}-w{width}")
    return [folder / f"{arch}-{n}.safetensors" for n in ["base", *(f"ft{i}" for i in range(1, n_models + 1))]]


def model_bytes(arch: str, width: int | None = None) -> int:
    return sum(math.prod(s) * ITEMSIZE[bench_dtype(arch, k, s)] for k, s in bench_shapes(arch, width).items())


def ensure_checkpoints(arch: str, n_models: int, folder: Path | None = None, *, verbose: bool = True,
                       width: int | None = None) -> tuple[Path, list[Path]]:
    """base + n fine-tunes of full size, or of base width `width`, made once into `folder`, reused."""
    paths = checkpoint_paths(arch, n_models, folder, width)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    shapes = bench_shapes(arch, width)
    dtypes = {k: bench_dtype(arch, k, s) for k, s in shapes.items()}
    spread = ARCHS[arch].spread
    names = ["base", *(f"ft{i}" for i in range(1, n_models + 1))]
    for index, (name, path) in enumerate(zip(names, paths)):
        if path.exists():
            continue
        if verbose:
            print(f"generating {path} ...", file=sys.stderr, flush=True)
        entries = [OutputEntry(k, dtypes[k], s) for k, s in shapes.items()]
        with SafetensorsWriter(path, entries, {"format": "pt", "merge_lab.bench": name}, overwrite=True) as w:
            for key, shape in shapes.items():
                base = _value(key, shape, "base", 0, torch.float32)
                if index and base.is_floating_point() and base.numel() > 1:
                    # base + 5 % (fp8: 25 %) of its spread along a shared direction and the model's own noise
                    # (the three are drawn with the same spread)
                    shared = _value(key, shape, "shared", 0, torch.float32)
                    own = _value(key, shape, f"own{index}", 0, torch.float32)
                    base = base + spread * (0.6 * shared + 0.8 * own)
                w.write(key, base if not base.is_floating_point() else base.to(DTYPES[dtypes[key]]))
            w.finish()
    return paths[0], paths[1:]


def io_floor(inputs: list[str], out: str) -> None:
    """Read every input tensor and write an output of the same size as the first input, no math."""
    readers = [SafetensorsReader(p) for p in inputs]
    first = readers[0]
    entries = [OutputEntry(k, t.dtype, t.shape) for k, t in first.tensors.items()]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool, SafetensorsWriter(out, entries, {"format": "pt"}, overwrite=True) as w:
        def read_all(key):
            tensors = [r.read(key) for r in readers]
            return tensors[0]

        window = []
        for key in first.tensors:
            window.append((key, pool.submit(read_all, key)))
            if len(window) >= 4:
                k, f = window.pop(0)
                w.write(k, f.result())
        for k, f in window:
            w.write(k, f.result())
        w.finish()


@dataclass
class Run:
    variant: str
    method: str
    seconds: float
    peak_rss_mb: float
    ok: bool = True
    error: str = ""


@dataclass
class BenchResult:
    arch: str
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> list[dict]:
        rows = []
        for method in dict.fromkeys(r.method for r in self.runs):
            row: dict = {"method": method}
            for variant in ("floor", "ours", "sd-mecha"):
                times = [r.seconds for r in self.runs if r.method == method and r.variant == variant and r.ok]
                rss = [r.peak_rss_mb for r in self.runs if r.method == method and r.variant == variant and r.ok]
                if times:
                    row[variant] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                                    "n": len(times), "peak_rss_mb": max(rss)}
            if "floor" in row and "ours" in row:
                row["ours_over_floor"] = row["ours"]["median_s"] / row["floor"]["median_s"]
            if "sd-mecha" in row and "ours" in row:
                row["mecha_over_ours"] = row["sd-mecha"]["median_s"] / row["ours"]["median_s"]
            rows.append(row)
        return rows


def run_measured(argv: list[str], env: dict | None = None) -> tuple[float, float, int, str]:
    """Run a child process; returns (seconds, peak RSS MB of that child alone, exit code, stderr tail)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr_chunks = []
    # drain stderr without blocking wait4 forever on a full pipe
    import threading

    t = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = (stderr_chunks[0] if stderr_chunks else b"").decode(errors="replace")
    peak = _reported_peak_mb(text)
    tail = "\n".join(line for line in text.splitlines() if not line.startswith(PEAK_RSS_MARK))[-400:]
    return seconds, usage.ru_maxrss / 1024 if peak is None else peak, proc.returncode, tail


def worker_main(argv: list[str]) -> int:
    """Entry of a measured child: `python -m merge_lab.benchmarks.io_floor VARIANT METHOD OUT BASE MODEL...`."""
    variant, method, out, base, *models = argv
    if variant == "floor":
        io_floor([*models, *([base] if base != "-" else [])], out)
    elif variant == "ours":
        from merge_lab.engine import Recipe, merge_to_file

        recipe = Recipe(**json.loads(method))
        merge_to_file(recipe.replace(out=out), overwrite=True)
    elif variant == "sd-mecha":
        from merge_lab.benchmarks.mecha import run_mecha

        run_mecha(json.loads(method), out)
    else:
        raise SystemExit(f"unknown variant {variant}")
    _report_peak_rss()
    return 0


PEAK_RSS_MARK = "merge-lab-bench peak RSS kB: "


def _report_peak_rss() -> None:
    """The child's own high-water mark (Linux VmHWM). wait4's ru_maxrss also counts the memory of the parent
    the child was forked from (Linux keeps the pre-exec high-water mark): a bench process that had just
    generated checkpoints made every child look 1.3 GB big."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return
    print(f"{PEAK_RSS_MARK}{kb}", file=sys.stderr, flush=True)


def _reported_peak_mb(stderr: str) -> float | None:
    for line in reversed(stderr.splitlines()):
        if line.startswith(PEAK_RSS_MARK):
            return int(line[len(PEAK_RSS_MARK):]) / 1024
    return None


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
