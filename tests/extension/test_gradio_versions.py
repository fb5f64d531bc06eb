"""The tab builder and the host adapter on the gradio versions the web UIs pin, each in its own venv:
gradio 3.41.2 (AUTOMATIC1111 1.10, reForge) in .venv-gradio3 with the A1111 and reForge stand-ins, gradio
4.40.0 (Forge) in .venv-gradio4 with the Forge stand-in. `make test` creates both venvs (once, stamped)
before pytest runs; this suite itself runs on the newest gradio. Both venvs run at the same time."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

VENVS = {
    # venv: (gradio version it must hold, the hosts that ship it)
    ".venv-gradio3": ("3.41.2", "a1111,reforge"),
    ".venv-gradio4": ("4.40.0", "forge"),
}
TESTS = ["tests/extension/test_webui_tab.py", "tests/extension/test_webui_host.py"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the test runs in every venv at once; each test below waits for its own."""
    started = {}
    for venv, (_, hosts) in VENVS.items():
        python = ROOT / venv / "bin" / "python"
        if not python.exists():
            started[venv] = None
            continue
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "MERGE_LAB_HOST_FLAVOURS": hosts, "MERGE_LAB_EXPECT_GRADIO": VENVS[venv][0]}
        log = tmp_path_factory.mktemp(venv.strip(".")) / "pytest.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     f"--basetemp={log.parent / 'tmp'}", *TESTS], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        started[venv] = (proc, log)
    yield started
    for entry in started.values():
        if entry is not None and entry[0].poll() is None:
            entry[0].kill()


@pytest.mark.slow
@pytest.mark.parametrize("venv", sorted(VENVS))
def test_tab_and_host_adapter_on_the_hosts_gradio(venv, runs):
    assert runs[venv] is not None, f"{venv} is missing: run `make setup-{venv.split('-')[-1]}` (make test does)"
    proc, log = runs[venv]
    proc.wait(timeout=1200)
    tail = "\n".join(log.read_text().splitlines()[-20:])
    assert proc.returncode == 0, f"{venv}:\n{tail}"
    assert " passed" in tail and "skipped" not in tail and "deselected" not in tail, tail
