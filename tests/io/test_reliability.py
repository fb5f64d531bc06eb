"""Nothing lost, nothing executed: malicious pickles, interrupted merges (exception, disk full, SIGINT and
SIGTERM), writing over an input, NaN/inf in an input. Each interruption test checks that no output and no
temporary file is left and that the inputs are byte-for-byte unchanged (sha256 before and after)."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_lab.cli import main
from merge_lab.engine import Recipe, merge_to_file, merge_to_state_dict
from merge_lab.errors import CheckpointError, MergeLabError
from merge_lab.io.resume import PARTIAL_SUFFIX
from merge_lab.io.writer import SafetensorsWriter

ROOT = Path(__file__).resolve().parents[2]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def error_line(err: str) -> str:
    """The one `error:` line of a command's stderr (the progress bar writes there too)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f.endswith(PARTIAL_SUFFIX)]


def assert_nothing_left(out: Path, inputs, before: dict[str, str]) -> None:
    assert not out.exists()
    assert leftovers(out.parent) == []
    assert {str(p): sha256(p) for p in inputs} == before


# ---------------------------------------------------------------------------------------------------
# malicious pickles

class CreatesAFile:
    """Unpickling this calls Path.touch on `marker`: the stand-in for any code a pickle may run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("form", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(sd1_family, tmp_path, capsys, form):
    _, (a, _, _) = sd1_family
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": CreatesAFile(marker)}
    if form == "plain-pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil, _use_new_zipfile_serialization=form == "torch-zip")
    assert not marker.exists()
    out = tmp_path / "out.safetensors"

    code = main(["merge", "--models", str(a), str(evil), "--out", str(out)])
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert "\n" not in err and str(evil) in err and "refused" in err, err
    assert not marker.exists(), "the pickle ran code"
    assert not out.exists() and leftovers(tmp_path) == []

    # control: the payload is live, an unrestricted unpickler would have created the file
    if form == "plain-pickle":
        pickle.loads(evil.read_bytes())
    else:
        torch.load(evil, weights_only=False)
    assert marker.exists()


def test_pickles_are_refused_on_a_torch_with_known_unpickler_bugs(sd1_family, tmp_path, monkeypatch):
    plain = tmp_path / "plain.ckpt"
    torch.save({"w": torch.zeros(3)}, plain)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(CheckpointError, match=r"needs torch >= 2\.10 \(this is torch 2\.5\.1") as info:
        merge_to_file(Recipe(models=[str(sd1_family[1][0]), str(plain)], out=str(tmp_path / "o.safetensors")))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# interrupted merges

def test_exception_mid_merge_leaves_no_output_and_inputs_unchanged(sd1_family, tmp_path, monkeypatch):
    _, (a, b, _) = sd1_family
    before = {str(p): sha256(p) for p in (a, b)}
    real = SafetensorsWriter.write
    calls = {"n": 0}

    def failing(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 50:
            raise RuntimeError("boom mid-merge")
        return real(self, key, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", failing)
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        merge_to_file(Recipe(models=[str(a), str(b)], out=str(out)))
    assert calls["n"] == 50  # it really stopped half-way
    assert_nothing_left(out, (a, b), before)


class FullDisk:
    """A file whose disk fills after `room` bytes: the write that crosses it stores part, then ENOSPC."""

    def __init__(self, real, room: int):
        self.real, self.room = real, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.real.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_disk_full_leaves_no_output_and_inputs_unchanged(sd1_family, tmp_path, monkeypatch, capsys):
    _, (a, b, _) = sd1_family
    before = {str(p): sha256(p) for p in (a, b)}
    real_init = SafetensorsWriter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._file = FullDisk(self._file, room=os.path.getsize(a) // 2)

    monkeypatch.setattr(SafetensorsWriter, "__init__", init)
    out = tmp_path / "out.safetensors"
    code = main(["merge", "--models", str(a), str(b), "--out", str(out)])
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert "\n" not in err and str(out) in err and "No space left on device" in err, err
    assert_nothing_left(out, (a, b), before)


def test_output_is_synced_while_merging_and_a_failed_sync_stops_the_merge(sd1_family, tmp_path, monkeypatch,
                                                                           capsys):
    """The output goes to disk during the merge (the final fsync used to wait seconds with the CPU idle);
    a sync that fails (EIO) is the merge's one-line error, with no output left."""
    import merge_lab.io.writer as writer_io

    _, (a, b, _) = sd1_family
    monkeypatch.setattr(writer_io, "SYNC_BYTES", 64 << 10)  # the test models are ~1.9 MB: many syncs
    synced = []
    real_sync = getattr(os, "fdatasync", os.fsync)

    def counting_sync(fd):
        synced.append(os.fstat(fd).st_size)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_sync, raising=False)
    monkeypatch.setattr(os, "fsync", counting_sync)
    out = tmp_path / "synced.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], out=str(out)))
    size = os.path.getsize(out)
    during = [n for n in synced if n < size]  # syncs before the file was complete: the background ones
    assert len(during) >= 3, synced
    A, O = load_file(a), load_file(out)  # the synced file is whole: every key, every shape
    assert set(O) == set(A) and all(O[k].shape == A[k].shape for k in O)

    before = {str(p): sha256(p) for p in (a, b)}

    failed_at = []

    def failing_sync(fd):
        failed_at.append(os.fstat(fd).st_size)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", failing_sync, raising=False)
    monkeypatch.setattr(os, "fsync", failing_sync)
    out = tmp_path / "failed.safetensors"
    code = main(["merge", "--models", str(a), str(b), "--out", str(out)])
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert str(out) in err and "Input/output error" in err, err
    assert failed_at and failed_at[0] < size  # the background sync failed, not the last fsync
    assert_nothing_left(out, (a, b), before)


class LosesBytes(FullDisk):
    """A file that silently drops the bytes past `room` (a faulty network file system): no error raised."""

    def write(self, data):
        data = memoryview(data).cast("B")
        kept = data[: self.room]
        self.room -= len(kept)
        return self.real.write(kept)


def test_a_silently_short_output_is_caught_before_the_rename(sd1_family, tmp_path, monkeypatch):
    """The finished file is checked (size, header re-read) before it gets the target's name."""
    _, (a, b, _) = sd1_family
    before = {str(p): sha256(p) for p in (a, b)}
    real_init = SafetensorsWriter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._file = LosesBytes(self._file, room=os.path.getsize(a) // 2)

    monkeypatch.setattr(SafetensorsWriter, "__init__", init)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=r"output is \d+ bytes, expected \d+"):
        merge_to_file(Recipe(models=[str(a), str(b)], out=str(out)))
    assert_nothing_left(out, (a, b), before)


SLOW_MERGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from merge_lab import cli
    from merge_lab.io.writer import SafetensorsWriter

    started, real = Path(sys.argv[1]), SafetensorsWriter.write

    def slow(self, key, tensor):  # a merge of minutes, in a test: every tensor written takes 20 ms
        started.touch()
        time.sleep(0.02)
        return real(self, key, tensor)

    SafetensorsWriter.write = slow
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_merge_leaves_no_output_and_inputs_unchanged(sd1_family, tmp_path, sig, code):
    _, (a, b, _) = sd1_family
    before = {str(p): sha256(p) for p in (a, b)}
    out, started = tmp_path / "out.safetensors", tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # A shell starts background jobs (`make test &`, some CI runners) with SIGINT ignored, and Python then
    # leaves it ignored: give the merge the default disposition, as in a terminal.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(started), "merge", "--models", str(a), str(b),
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.02)
        time.sleep(0.3)  # well inside the merge: ~15 tensors written, hundreds to go
        assert leftovers(tmp_path), "expected the temporary file while the merge runs"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "interrupted: no partial output was left behind" in err
    assert "Traceback" not in err, err
    assert_nothing_left(out, (a, b), before)


# ---------------------------------------------------------------------------------------------------
# writing over an input

def test_writing_over_an_input_is_refused_under_any_name(sd1_family, tmp_path, capsys):
    _, (a, b, _) = sd1_family
    model = tmp_path / "model.safetensors"
    model.write_bytes(Path(a).read_bytes())
    (tmp_path / "link.safetensors").symlink_to(model)
    os.link(model, tmp_path / "hardlink.safetensors")
    before = {str(p): sha256(p) for p in (model, b)}
    for name in ("model.safetensors", "link.safetensors", "hardlink.safetensors", "sub/../model.safetensors"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        target = tmp_path / name
        code = main(["merge", "--models", str(model), str(b), "--out", str(target)])
        err = error_line(capsys.readouterr().err)
        assert code == 2 and "\n" not in err and "is one of the inputs" in err, (name, err)
        assert leftovers(tmp_path) == []
        assert {str(p): sha256(p) for p in (model, b)} == before


# ---------------------------------------------------------------------------------------------------
# NaN / inf in an input

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


@pytest.fixture
def with_nan(sd1_family, tmp_path):
    """(a, b, b with 2 NaN and 1 inf in KEY, the positions)."""
    _, (a, b, _) = sd1_family
    tensors = load_file(b)
    t = tensors[KEY].clone().reshape(-1)
    positions = [0, 5, 7]
    t[0], t[5], t[7] = float("nan"), float("nan"), float("-inf")
    tensors[KEY] = t.reshape(tensors[KEY].shape)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    return a, b, bad, positions


def test_nonfinite_is_an_error_naming_file_and_key(with_nan, tmp_path, capsys):
    a, _, bad, _ = with_nan
    out = tmp_path / "out.safetensors"
    before = {str(p): sha256(p) for p in (a, bad)}
    code = main(["merge", "--models", str(a), str(bad), "--out", str(out)])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and "\n" not in err, err
    assert str(bad) in err and KEY in err and "2 NaN and 1 inf" in err and "--nonfinite" in err, err
    assert_nothing_left(out, (a, bad), before)
    with pytest.raises(MergeLabError, match="NaN"):  # the same through the library entry
        merge_to_file(Recipe(models=[str(a), str(bad)], out=str(out)))


@pytest.mark.parametrize("policy", ["take-first", "zero"])
def test_nonfinite_take_first_and_zero(with_nan, tmp_path, policy):
    a, b, bad, positions = with_nan
    out, clean = tmp_path / f"{policy}.safetensors", tmp_path / "clean.safetensors"
    assert main(["merge", "--models", str(a), str(bad), "--out", str(out), "--nonfinite", policy]) == 0
    assert main(["merge", "--models", str(a), str(b), "--out", str(clean)]) == 0
    got, ref = load_file(out), load_file(clean)
    first = load_file(a)[KEY].reshape(-1).float()
    merged = got[KEY].reshape(-1).float()
    assert torch.isfinite(merged).all()
    replacement = first if policy == "take-first" else torch.zeros_like(first)
    expected = (0.5 * first[positions] + 0.5 * replacement[positions]).half().float()
    assert torch.equal(merged[positions], expected)
    others = torch.ones_like(merged, dtype=torch.bool)
    others[positions] = False
    assert torch.equal(merged[others], ref[KEY].reshape(-1).float()[others])  # only the bad elements differ
    assert all(torch.equal(got[k], ref[k]) for k in ref if k != KEY)


@pytest.mark.parametrize("policy", ["error", "take-first", "zero"])
def test_nonfinite_in_model_stock_statistics(sd1_family, with_nan, tmp_path, monkeypatch, policy):
    """Model Stock finds NaN/inf through its Gram matrix instead of checking the inputs first: the same
    error, or the same merge as of the input with the policy applied, for a key of several slices."""
    from merge_lab.engine import chunking

    monkeypatch.setattr(chunking, "SLICE_ELEMENTS", 32)  # KEY (8 rows of 8): 2 slices
    monkeypatch.setattr(chunking, "MIN_SLICE_ELEMENTS", 1)
    base, (a, _, c) = sd1_family
    _, _, bad, positions = with_nan
    assert math.prod(load_file(bad)[KEY].shape) > 32

    def stock(second):
        return Recipe(models=[str(a), str(second), str(c)], base=str(base), method="model_stock", alpha=0.9,
                      nonfinite=policy)

    if policy == "error":
        with pytest.raises(MergeLabError, match="NaN") as info:
            merge_to_state_dict(stock(bad))
        assert str(bad) in str(info.value) and KEY in str(info.value)
        return
    tensors = load_file(bad)
    t = tensors[KEY].reshape(-1)
    t[positions] = load_file(a)[KEY].reshape(-1)[positions] if policy == "take-first" else 0
    fixed = tmp_path / "fixed.safetensors"
    save_file(tensors, fixed)
    got, expected = merge_to_state_dict(stock(bad)).state_dict, merge_to_state_dict(stock(fixed)).state_dict
    assert torch.isfinite(got[KEY].float()).all()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_damaged_pickle_is_one_line(tmp_path, sd1_family):
    _, (a, _, _) = sd1_family
    damaged = tmp_path / "damaged.ckpt"
    torch.save({"w": torch.zeros(3)}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:-40])
    with pytest.raises(CheckpointError) as info:
        merge_to_file(Recipe(models=[str(a), str(damaged)], out=str(tmp_path / "o.safetensors")))
    assert "\n" not in str(info.value) and str(damaged) in str(info.value)


# ---------------------------------------------------------------------------------------------------
# every value of a recipe file is checked before anything is read

@pytest.mark.parametrize("fields, message", [
    ({"bogus": 1}, "unknown recipe field(s) bogus (valid: adjust, alpha,"),
    ({"alpha": "high"}, "alpha must be a number, got 'high'"),
    ({"alpha": 3}, "alpha = 3 is outside [-1.0, 2.0]"),
    ({"block": {"IN99": 0.5}}, "unknown block 'IN99' (valid: BASE, IN00,"),
    ({"blocks": "0.1,0.2"}, "26 block ratios"),
    ({"method": "nope"}, "unknown method 'nope' (valid: add_difference,"),
    ({"method": "ties", "base": "A", "params": {"k": 5}}, "k must be <= 1.0, got 5.0"),
    ({"method": "ties", "base": "A", "params": {"election": "x"}}, "election must be one of mass, count"),
    ({"method": "ties", "base": "A", "params": {"density": 0.5}}, "has no parameter 'density' (valid: k,"),
    ({"weights": [1, "x"]}, "weights must be a list of numbers"),
    ({"models": ["A", "missing.safetensors"]}, "missing.safetensors: model file not found"),
])
def test_recipe_file_values_are_checked(sd1_family, tmp_path, capsys, fields, message):
    import yaml

    _, (a, b, _) = sd1_family
    recipe = {"models": [str(a), str(b)], "out": "out.safetensors", **fields}
    recipe = {k: ([str(a) if m == "A" else m for m in v] if k == "models" else str(a) if v == "A" else v)
              for k, v in recipe.items()}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["merge", "--recipe", str(path), "--no-progress"])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out.safetensors").exists() and leftovers(tmp_path) == []
