"""`--resume`: a merge that stops keeps its finished tensors, and the next run continues from there."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
from safetensors import safe_open

from merge_lab import cli
from merge_lab.engine import Recipe, merge_to_file, prepare
from merge_lab.engine import executor as engine
from merge_lab.errors import CheckpointError, MergeCancelled
from merge_lab.io import writer as writer_io
from merge_lab.io.resume import resumable_path_for


@pytest.fixture(autouse=True)
def journal_every_tensor(monkeypatch):
    monkeypatch.setattr(writer_io, "JOURNAL_INTERVAL_S", 0.0)


def recipe_for(sd1_family, out, **changes):
    base, fts = sd1_family
    fields = {"method": "ties", "alpha": 0.7, "threads": 2, **changes}
    return Recipe(models=[str(f) for f in fts], base=str(base), out=str(out), **fields)


def tensors_and_metadata(path):
    with safe_open(path, "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in ("modelspec.date", "modelspec.title")}
        return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open is not iterable)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stop_halfway(recipe):
    """Run `recipe` with resume on and cancel it once about half of its input bytes are merged."""
    cancel = threading.Event()

    def progress(done, total, key):
        if done >= total // 2:
            cancel.set()

    with pytest.raises(MergeCancelled):
        merge_to_file(recipe, progress=progress, cancel=cancel, resume=True)


def count_merged_keys(monkeypatch) -> list[str]:
    merged: list[str] = []
    original = engine.Executor._compute

    def compute(self, unit, stats):
        merged.append(unit.task.key)
        return original(self, unit, stats)

    monkeypatch.setattr(engine.Executor, "_compute", compute)
    return merged


def test_a_stopped_merge_resumes_where_it_stopped_and_gives_the_same_file(sd1_family, tmp_path, monkeypatch):
    reference = merge_to_file(recipe_for(sd1_family, tmp_path / "reference.safetensors"))
    out = tmp_path / "merged.safetensors"
    recipe = recipe_for(sd1_family, out)

    stop_halfway(recipe)
    partial = resumable_path_for(out)
    journal = json.loads(partial.with_name(partial.name + ".json").read_text())
    assert not out.exists() and partial.exists()
    total = len(reference_keys := tensors_and_metadata(reference.out)[0])
    assert 0 < journal["entries"] < total

    merged = count_merged_keys(monkeypatch)
    notes: list[str] = []
    result = merge_to_file(recipe, resume=True, notify=notes.append)
    assert notes and notes[0].startswith(f"resuming at tensor {journal['entries'] + 1} of {total}")
    assert len(merged) <= total - journal["entries"] + 1  # only the rest, not the whole model again
    assert not partial.exists() and not partial.with_name(partial.name + ".json").exists()

    got, got_meta = tensors_and_metadata(out)
    want, want_meta = tensors_and_metadata(reference.out)
    assert got_meta == want_meta and got.keys() == reference_keys.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].equal(want[key]), key
    assert result.sha256 == sha256(out)  # the hash covers the part written before the stop


def test_a_half_written_tensor_after_the_last_journal_entry_is_redone(sd1_family, tmp_path):
    out = tmp_path / "merged.safetensors"
    recipe = recipe_for(sd1_family, out)
    stop_halfway(recipe)
    partial = resumable_path_for(out)
    with open(partial, "ab") as f:
        f.write(b"\xff" * 12345)  # a crash in the middle of a tensor: bytes the journal does not vouch for
    result = merge_to_file(recipe, resume=True)
    reference = merge_to_file(recipe_for(sd1_family, tmp_path / "reference.safetensors"))
    got, want = tensors_and_metadata(out)[0], tensors_and_metadata(reference.out)[0]
    assert all(got[k].equal(want[k]) for k in want)
    assert result.sha256 == sha256(out)


def test_a_different_merge_starts_over(sd1_family, tmp_path, monkeypatch):
    out = tmp_path / "merged.safetensors"
    stop_halfway(recipe_for(sd1_family, out))
    changed = recipe_for(sd1_family, out, alpha=0.3)
    merged = count_merged_keys(monkeypatch)
    notes: list[str] = []
    merge_to_file(changed, resume=True, notify=notes.append)
    assert notes[0].startswith("no earlier partial output of this merge")
    reference = merge_to_file(recipe_for(sd1_family, tmp_path / "reference.safetensors", alpha=0.3))
    got, want = tensors_and_metadata(out)[0], tensors_and_metadata(reference.out)[0]
    assert len(set(merged)) == len(want)
    assert all(got[k].equal(want[k]) for k in want)


def test_without_resume_a_stopped_merge_leaves_nothing(sd1_family, tmp_path):
    out = tmp_path / "merged.safetensors"
    cancel = threading.Event()
    with pytest.raises(MergeCancelled):
        merge_to_file(recipe_for(sd1_family, out), cancel=cancel,
                      progress=lambda done, total, key: cancel.set() if done >= total // 2 else None)
    assert list(tmp_path.iterdir()) == []


def test_cli_resume_after_ctrl_c(sd1_family, tmp_path, monkeypatch, capsys):
    base, fts = sd1_family
    out = tmp_path / "cli.safetensors"
    argv = ["merge", "--models", *map(str, fts), "--base", str(base), "--method", "ties_soup", "--out", str(out),
            "--no-progress", "--resume"]
    original = engine.Executor._drain
    drained = []

    def drain_then_ctrl_c(self, window, sink, done, total):
        drained.append(1)
        if len(drained) == 40:
            raise KeyboardInterrupt
        return original(self, window, sink, done, total)

    with monkeypatch.context() as m:
        m.setattr(engine.Executor, "_drain", drain_then_ctrl_c)
        assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "partial output kept" in err and "--resume" in err and "no partial output" not in err
    assert not out.exists() and resumable_path_for(out).exists()

    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming at tensor" in err
    reference = tmp_path / "reference.safetensors"
    assert cli.main([*argv[:-4], "--out", str(reference), "--no-progress"]) == 0
    got, want = tensors_and_metadata(out), tensors_and_metadata(reference)
    assert got[1] == want[1]
    assert all(got[0][k].equal(want[0][k]) for k in want[0])


def test_a_partial_file_in_use_is_not_shared(sd1_family, tmp_path):
    pytest.importorskip("fcntl")  # the lock is POSIX-only; Windows has no second writer check
    out = tmp_path / "merged.safetensors"
    recipe = recipe_for(sd1_family, out)
    plan = prepare(recipe)
    try:
        first = writer_io.SafetensorsWriter(out, plan.output_entries(), {}, resume=True)
        with pytest.raises(CheckpointError, match="another merge is writing"):
            writer_io.SafetensorsWriter(out, plan.output_entries(), {}, resume=True)
        first.abort()
    finally:
        plan.close()
