"""Shared fixtures: tiny checkpoints with the real key sets, built once per test session; `run_cli` (the CLI
in-process, with its exit code and output) and `call` (one merge method on tensors). Plain functions that
need no fixture (the reference block map, the drop-mask draws, pixels) live in tests/helpers.py."""

from __future__ import annotations

import os

# Before torch loads: spinning OpenMP threads make renders 20-50x slower on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from merge_lab.archs.layouts import TINY_WIDTH
from merge_lab.demo.models import make_family
from merge_lab.io.hashing import cache_dir

# The CLIP tokenizer is built once at set-up (`make setup` -> `merge-lab setup-tokenizer`) into the user's
# cache; the per-test cache folder below must not hide it.
os.environ.setdefault("MERGE_LAB_TOKENIZER_DIR", str(cache_dir() / "clip-tokenizer"))
os.environ.setdefault("MERGE_LAB_T5_TOKENIZER_DIR", str(cache_dir() / "t5-tokenizer"))

# Merge tests use width 8 and a 256-token vocabulary: the real key set, ~1-2 M parameters per model.
TEST_WIDTH = 8
TEST_VOCAB = 256


@pytest.fixture(autouse=True)
def _isolated_hash_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "merge-lab-cache"))


def _family(tmp_path_factory, arch, dtype=torch.float16, finetunes=3):
    folder = tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}")
    return make_family(arch, folder, finetunes=finetunes, width=TEST_WIDTH, vocab=TEST_VOCAB, dtype=dtype,
                       prefix=arch)


@pytest.fixture(scope="session")
def sd1_family(tmp_path_factory):
    """(base, [ft1, ft2, ft3]) tiny SD1.5 fp16 checkpoints."""
    return _family(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def sdxl_family(tmp_path_factory):
    return _family(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def sd2_family(tmp_path_factory):
    return _family(tmp_path_factory, "sd2", finetunes=2)


@pytest.fixture(scope="session")
def sd1_fp32_family(tmp_path_factory):
    return _family(tmp_path_factory, "sd1", dtype=torch.float32, finetunes=2)


# Preview tests render: width 32 (GroupNorm(32)) and CLIP's 49408-token vocabulary.
RENDER_VOCAB = 49408


def _render_family(tmp_path_factory, arch, finetunes):
    folder = tmp_path_factory.mktemp(f"render-{arch}")
    return make_family(arch, folder, finetunes=finetunes, width=TINY_WIDTH, vocab=RENDER_VOCAB, prefix=arch)


@pytest.fixture(scope="session")
def render_sd1_family(tmp_path_factory):
    """(base, [ft1, ft2]) renderable tiny SD1.5 fp16 checkpoints."""
    return _render_family(tmp_path_factory, "sd1", 2)


@pytest.fixture(scope="session")
def render_sd2_family(tmp_path_factory):
    """(base, [ft1]) renderable tiny SD2 fp16 checkpoints."""
    return _render_family(tmp_path_factory, "sd2", 1)


@pytest.fixture(scope="session")
def render_sdxl_family(tmp_path_factory):
    """(base, [ft1]) renderable tiny SDXL fp16 checkpoints."""
    return _render_family(tmp_path_factory, "sdxl", 1)


# ---- running things ------------------------------------------------------------------------------------


@pytest.fixture
def run_cli(capsys):
    """run_cli(*argv) -> (exit code, stdout, stderr) of `merge-lab argv…` run in-process; arguments may be
    paths or numbers (passed as str)."""
    from merge_lab.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def call():
    """call(name, models, base, ratio=1.0, ctx=None, *, seed=0, weights=None, **params): merge method `name`
    on tensors. Without ctx, the key context is key "key" with the models' shape, `seed` and `weights`.
    Session-scoped (it holds no state), so hypothesis tests may take it."""
    import merge_lab_methods as methods

    def call_method(name, models, base, ratio=1.0, ctx=None, *, seed=0, weights=None, **params):
        if ctx is None:
            ctx = methods.KeyContext(key="key", seed=seed, shape=tuple(models[0].shape), weights=weights)
        return methods.get_method(name)(models, base, ratio, ctx, **params)

    return call_method
