"""The tab builder and the host adapter on the gradio versions the web UIs pin, each in its own venv (SPEC §6):
gradio 3.41.2 (AUTOMATIC1111 1.10, reForge) in .venv-gradio3 with the A1111 stand-in, gradio 4.40.0 (Forge)
in .venv-gradio4 with the Forge stand-in. `make test` creates both venvs (once, stamped) before pytest runs;
this suite itself runs on the newest gradio."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

VENVS = {
    # venv: (gradio version it must hold, the hosts that ship it)
    ".venv-gradio3": ("3.41.2", "a1111,reforge"),
    ".venv-gradio4": ("4.40.0", "forge"),
}


@pytest.mark.slow
@pytest.mark.parametrize("venv", sorted(VENVS))
def test_tab_and_host_adapter_on_the_hosts_gradio(venv, tmp_path):
    version, hosts = VENVS[venv]
    python = ROOT / venv / "bin" / "python"
    assert python.exists(), f"{venv} is missing: run `make setup-{venv.split('-')[-1]}` (make test does)"
    found = subprocess.run([str(python), "-c", "import gradio; print(gradio.__version__)"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert found.stdout.strip() == version, found.stdout + found.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "MERGE_LAB_HOST_FLAVOURS": hosts}
    runs = [["tests/test_webui_tab.py"], ["tests/test_webui_host.py"]]
    for args in runs:
        run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              f"--basetemp={tmp_path / args[0].split('/')[-1]}", *args],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
        tail = "\n".join(run.stdout.splitlines()[-15:])
        assert run.returncode == 0, f"{venv} {' '.join(args)}:\n{tail}\n{run.stderr[-2000:]}"
        assert " passed" in tail and "skipped" not in tail, tail
