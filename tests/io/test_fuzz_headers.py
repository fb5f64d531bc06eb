"""Header fuzzing: every malformed safetensors file gives our one-line CheckpointError, quickly, without
allocating memory from the sizes it claims; every file we accept is one the safetensors library reads
identically. Deterministic (derandomize, no example database): the same cases run everywhere.

Cases per run (settings below; CASES seeded cases per hypothesis example): valid 500 + malformed 4000 +
JSON 2000 + hypothesis JSON 300 + prefixed garbage 1500 + random bytes 1000 + byte edits 1500 = 10 800
header cases, and 300 through the whole merge entry.
"""

from __future__ import annotations

import os
import random
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import CheckpointError, MergeLabError
from merge_lab.io.header import MAX_HEADER_BYTES, read_header
from merge_lab.io.reader import SafetensorsReader
from tests.io.fuzz_safetensors import (
    MUTATIONS,
    byte_edited_file,
    dumps,
    encode,
    json_header_file,
    malformed_file,
    prefixed_garbage,
    valid_file,
)


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


# Peak Python memory of one read_header call, beyond what it returns: the header's bytes, their decoded
# text and the parsed JSON objects (a constant factor of the header, at worst ~30x for `[{}, {}, ...]`).
# Anything sized from a claimed length or shape would be gigabytes.
MEMORY_FACTOR = 48
MEMORY_SLACK = 256 << 10
SECONDS_PER_FILE = 10.0  # generous for a loaded 2-core machine; a fuzz case takes milliseconds


class Scratch:
    """One file rewritten for every case. On Linux an in-memory file (memfd), reached by its /proc path:
    rewriting a file on disk cost ~3 ms a case here, more than the rest of the case."""

    def __init__(self, folder):
        self.fd = os.memfd_create("fuzz-case") if hasattr(os, "memfd_create") else None
        self.path = Path(f"/proc/self/fd/{self.fd}") if self.fd is not None else folder / "case.safetensors"

    def write(self, data: bytes) -> None:
        if self.fd is None:
            self.path.write_bytes(data)
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    s = Scratch(tmp_path_factory.mktemp("fuzz"))
    yield s
    if s.fd is not None:
        os.close(s.fd)


def read(scratch, data: bytes):
    """read_header of a file holding `data`: the Header or our CheckpointError (time and memory checked)."""
    scratch.write(data)
    path = scratch.path
    tracemalloc.start()  # traced only during the call: hypothesis's own work stays at full speed
    start = time.perf_counter()
    try:
        result = read_header(path)
    except CheckpointError as e:
        result = e
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < SECONDS_PER_FILE, f"read_header took {seconds:.1f} s"
    assert peak <= MEMORY_FACTOR * len(data) + MEMORY_SLACK, f"{peak} bytes for a {len(data)}-byte file"
    return result


def assert_refused(scratch, data: bytes, what: str = ""):
    result = read(scratch, data)
    path = scratch.path
    assert isinstance(result, CheckpointError), f"accepted a malformed file ({what})"
    message = str(result)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert "not a valid safetensors file: " in message, message
    assert len(message) < 1500, len(message)


def assert_consistent(scratch, data: bytes):
    """Either our one-line error, or a header that the safetensors library reads the same way."""
    result = read(scratch, data)
    path = scratch.path
    if isinstance(result, CheckpointError):
        assert "\n" not in str(result)
        return
    with safe_open(path, "pt") as theirs, SafetensorsReader(path) as ours:
        assert set(theirs.keys()) == set(result.tensors)
        for key, info in result.tensors.items():
            tensor = theirs.get_tensor(key)
            assert (tuple(tensor.shape), tensor.dtype) == (info.shape, info.torch_dtype)
            assert torch.equal(ours.read(key).reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


# Every hypothesis example runs CASES seeded cases (see fuzz_safetensors: drawing each value through
# hypothesis cost ~7 ms a case); the example's number and the case's index reproduce a failure.
CASES = 10
seeds = st.integers(0, (1 << 64) - 1)


def cases(seed: int):
    r = random.Random(seed)
    return ((i, r) for i in range(CASES))


@fuzz(50)
@given(seed=seeds)
def test_valid_files_are_read_like_safetensors_reads_them(scratch, seed):
    for _, r in cases(seed):
        data, header, _ = valid_file(r)
        result = read(scratch, data)
        assert not isinstance(result, CheckpointError), result
        assert set(result.tensors) == {k for k in header if k != "__metadata__"}
        assert_consistent(scratch, data)


@fuzz(400)
@given(kind=st.sampled_from(MUTATIONS), seed=seeds)
def test_malformed_files_give_one_line_error(scratch, kind, seed):
    for i, r in cases(seed):
        assert_refused(scratch, malformed_file(r, kind), f"{kind}, case {i}")


@fuzz(200)
@given(seed=seeds)
def test_arbitrary_json_headers(scratch, seed):
    for _, r in cases(seed):
        assert_consistent(scratch, json_header_file(r))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


@fuzz(300)
@given(doc=json_values, data=st.binary(max_size=32))
def test_json_documents_from_hypothesis(scratch, doc, data):
    """A few cases with hypothesis's own JSON (its edge cases for text and numbers), one per example."""
    assert_consistent(scratch, encode(dumps(doc), data))


@fuzz(150)
@given(seed=seeds)
def test_garbage_after_a_length_prefix(scratch, seed):
    for _, r in cases(seed):
        assert_consistent(scratch, prefixed_garbage(r))


@fuzz(1000)
@given(data=st.binary(max_size=300))
def test_random_bytes(scratch, data):
    assert_consistent(scratch, data)


@fuzz(150)
@given(seed=seeds)
def test_random_byte_edits_of_valid_files(scratch, seed):
    for _, r in cases(seed):
        assert_consistent(scratch, byte_edited_file(r))


# ---------------------------------------------------------------------------------------------------
# explicit worst cases for memory and time

def test_claimed_sizes_allocate_nothing(scratch):
    cases = [
        (MAX_HEADER_BYTES - 8).to_bytes(8, "little") + b"{}",  # within the limit, far beyond the file
        ((1 << 64) - 1).to_bytes(8, "little") + b"{}",
        _file(b'{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}', 4),
        _file(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 18446744073709551615]}}', 4),
        _file(b'{"w": {"dtype": "F32", "shape": [0, 9223372036854775808], "data_offsets": [0, 0]}}', 0),
    ]
    for data in cases:
        assert_refused(scratch, data)


def test_deep_nesting_and_a_big_header_are_quick(scratch):
    assert_refused(scratch, _file(b"[" * 1_000_000 + b"]" * 1_000_000, 0))
    assert_refused(scratch, _file(b'{"a": ' + b"{" * 100_000 + b"}" * 100_000 + b"}", 0))
    # 2 MB of tiny objects (the worst memory factor, ~20x): linear time, bounded memory
    many = b"{" + b", ".join(b'"%d": {}' % i for i in range(150_000)) + b"}"
    assert_refused(scratch, _file(many, 0))


def test_special_files_are_refused(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening it must not wait for a writer
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(tmp_path)
    with pytest.raises(CheckpointError, match="cannot open"):
        read_header(tmp_path / "missing.safetensors")


def _file(header: bytes, data_size: int) -> bytes:
    return len(header).to_bytes(8, "little") + header + b"\0" * data_size


# ---------------------------------------------------------------------------------------------------
# through the whole merge entry

MERGE_KEYS = [  # enough for an SD1 UNet-only checkpoint, with a key of every kind of block
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.middle_block.1.norm.weight",
    "model.diffusion_model.out.2.bias",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    "first_stage_model.decoder.conv_in.bias",
]


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge-fuzz")
    g = torch.Generator().manual_seed(0)
    path = folder / "good.safetensors"
    save_file({k: torch.randn(3, 2, generator=g).half() for k in MERGE_KEYS}, path)
    return path


def fuzzed_model(r: random.Random) -> bytes:
    """A model with the good one's keys, broken in the header, or valid with odd content (NaN/inf data,
    a dtype swapped for one of the same size, a key dropped or renamed, a shape changed)."""
    specs = [(k, "F16", [3, 2]) for k in MERGE_KEYS]
    if r.random() < 0.5:
        return malformed_file(r, r.choice(MUTATIONS))
    odd = r.choice(["nan", "bf16", "drop", "rename", "shape", "as-is"])
    i = r.randrange(len(specs))
    if odd == "bf16":
        specs[i] = (specs[i][0], "BF16", [3, 2])
    elif odd == "drop":
        del specs[i]
    elif odd == "rename":
        specs[i] = (specs[i][0] + ".x", "F16", [3, 2])
    elif odd == "shape":
        specs[i] = (specs[i][0], "F16", r.choice([[2, 3], [6], [3, 2, 1], [4, 2]]))
    data, _, raw = valid_file(r, specs)
    if odd == "nan":
        at = len(data) - len(raw) + 2 * r.randrange(len(raw) // 2)
        data = data[:at] + r.choice([b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"]) + data[at + 2:]
    return data


@fuzz(300)
@given(seed=seeds)
def test_merging_a_fuzzed_model_gives_our_error_and_no_output(good_model, seed):
    data = fuzzed_model(random.Random(seed))
    folder = good_model.parent
    fuzzed = folder / "fuzzed.safetensors"
    out = folder / "out.safetensors"
    fuzzed.write_bytes(data)
    good_before = good_model.read_bytes()
    try:
        merge_to_file(Recipe(models=[str(good_model), str(fuzzed)], out=str(out)))
    except MergeLabError as e:
        assert "\n" not in str(e)
        assert not out.exists()
    else:  # a valid file with odd but legal content: the output is complete and readable
        assert set(read_header(out).tensors) == set(MERGE_KEYS)
        out.unlink()
    assert not [f for f in os.listdir(folder) if f.endswith(".partial")]
    assert good_model.read_bytes() == good_before and fuzzed.read_bytes() == data
