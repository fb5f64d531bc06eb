"""install.py as the web UI runs it: `python install.py` with the web UI's root (its `launch` module) on
PYTHONPATH. Here `launch` is a stand-in that records pip calls instead of running them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

LAUNCH = '''
import json, os, re
CALLS = os.environ["LAUNCH_CALLS"]

def is_installed(package):
    raise AssertionError("install.py checks importability itself")

def run_pip(command, desc=None, live=False):
    if os.environ.get("LAUNCH_FAIL") and os.environ["LAUNCH_FAIL"] in command:
        raise RuntimeError(f"Couldn't install {desc}. Command: pip {command}")
    constraints = re.search(r'-c "([^"]+)"', command).group(1)
    with open(constraints) as f:
        pinned = f.read().split()
    with open(CALLS, "a") as f:
        f.write(json.dumps({"command": command, "desc": desc, "constraints": pinned}) + "\\n")
'''

# Runs install.py with some modules made unimportable, as on a web UI that lacks them.
RUNNER = '''
import importlib.abc, runpy, sys
HIDDEN = set(sys.argv[2].split(",")) - {""}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Hide())
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def run_install(tmp_path, hidden: str, fail: str = "", stderr: list | None = None):
    (tmp_path / "launch.py").write_text(LAUNCH)
    calls = tmp_path / "calls.jsonl"
    env = {"PYTHONPATH": str(tmp_path), "LAUNCH_CALLS": str(calls), "PATH": "/usr/bin:/bin", "LAUNCH_FAIL": fail}
    run = subprocess.run([sys.executable, "-c", RUNNER, str(ROOT / "install.py"), hidden], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    if stderr is not None:
        stderr.append(run.stderr)
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_installs_nothing_when_the_web_ui_has_everything(tmp_path):
    assert run_install(tmp_path, "") == []


def test_installs_only_what_is_missing_pinned_to_the_hosts_versions(tmp_path):
    calls = run_install(tmp_path, "tqdm,yaml")
    assert len(calls) == 1
    command = calls[0]["command"]
    assert command.startswith('install "pyyaml" "tqdm" -c ') or command.startswith('install "tqdm" "pyyaml" -c ')
    for protected in ("torch", "gradio", "diffusers", "numpy"):
        assert f'"{protected}' not in command
    pins = dict(line.split("==") for line in calls[0]["constraints"])
    assert pins["torch"] == torch.__version__
    import gradio
    import numpy

    assert pins["gradio"] == gradio.__version__ and pins["numpy"] == numpy.__version__
    assert not list(tmp_path.glob("merge-lab-constraints-*"))  # the constraints file is removed


def test_numba_is_installed_when_missing_and_its_failure_is_only_a_note(tmp_path):
    calls = run_install(tmp_path, "numba,tqdm")
    assert [c["command"].split(" -c ")[0] for c in calls] == ['install "tqdm"', 'install "numba>=0.59"']
    pins = dict(line.split("==") for line in calls[1]["constraints"])
    import numpy

    assert pins["numpy"] == numpy.__version__  # a numba that needs another numpy is not taken
    stderr: list = []
    (tmp_path / "failing").mkdir()
    assert run_install(tmp_path / "failing", "numba", fail="numba", stderr=stderr) == []  # raised: no call recorded
    assert "numba>=0.59 not installed" in stderr[0] and "without the compiled kernels" in stderr[0]
