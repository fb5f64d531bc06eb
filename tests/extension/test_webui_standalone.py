"""`merge-lab ui`: binds 127.0.0.1 unless --listen, serves the tab for the given model folders."""

from __future__ import annotations

import shutil

import gradio as gr
import pytest

from merge_lab.cli import build_parser, main
from merge_lab_extension import standalone


@pytest.fixture
def launched(monkeypatch):
    calls = []

    def fake_launch(self, server_name=None, server_port=None, prevent_thread_lock=False, inbrowser=False,
                    show_error=False, css=None):
        kwargs = dict(server_name=server_name, server_port=server_port)
        calls.append(kwargs)
        return None, "http://fake", None

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    return calls


@pytest.mark.parametrize("flags, host", [([], "127.0.0.1"), (["--listen"], "0.0.0.0")])
def test_binds_localhost_unless_listen(tmp_path, sd1_family, launched, flags, host):
    shutil.copy(sd1_family[1][0], tmp_path / "a.safetensors")
    assert main(["ui", "--models-dir", str(tmp_path), "--port", "7999", *flags]) == 0
    assert launched[0]["server_name"] == host and launched[0]["server_port"] == 7999


def test_needs_an_existing_models_folder(tmp_path, launched, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ui"])
    assert main(["ui", "--models-dir", str(tmp_path / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert not launched


def test_lists_models_and_reports_missing_preview_support(tmp_path, sd1_family, launched, monkeypatch):
    shutil.copy(sd1_family[1][0], tmp_path / "a.safetensors")
    tab, _ = standalone.serve([str(tmp_path)], block=False)
    assert tab.controller.backend.model_names() == ["a.safetensors"]
    monkeypatch.setattr(standalone, "_preview_module", lambda: (None, "previews need the preview extra"))
    out = tab.run("preview", {**tab.values(), "models": ["a.safetensors", "a.safetensors"]})
    assert out["status"] == "preview unavailable: previews need the preview extra"
