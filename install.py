"""Run by the web UI when the extension is installed or the web UI starts (``python install.py``, with the web
UI's root on PYTHONPATH so that its ``launch`` module is importable).

Installs only what the web UI's environment lacks, and never changes the versions of what it has: every pip
call is constrained to the installed versions of torch, gradio, diffusers and their closest neighbours, so pip
fails rather than up- or downgrading them (SuperMerger's pinned diffusers broke users' installs; we do not pin).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile

# import name -> pip requirement: what merge_lab needs beyond torch (which every web UI brings)
REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "PIL": "pillow",
    "numpy": "numpy",
}
# Never changed by us: pip may only install a requirement that works with these exact versions.
PROTECTED = ("torch", "torchvision", "xformers", "gradio", "gradio_client", "diffusers", "transformers",
             "numpy", "pillow", "safetensors", "huggingface_hub", "fastapi", "pydantic", "accelerate")


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing_requirements() -> list[str]:
    return [req for module, req in REQUIREMENTS.items() if not importable(module)]


def protected_versions() -> dict[str, str]:
    found = {}
    for name in PROTECTED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def constraints_file(versions: dict[str, str]) -> str:
    fd, path = tempfile.mkstemp(prefix="merge-lab-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{name}=={version}\n" for name, version in sorted(versions.items()))
    return path


def _host_launch():
    try:
        import launch
    except ImportError:
        return None
    return launch if callable(getattr(launch, "run_pip", None)) else None


def main() -> int:
    missing = missing_requirements()
    if not missing:
        return 0
    constraints = constraints_file(protected_versions())
    try:
        args = " ".join(f'"{req}"' for req in missing) + f' -c "{constraints}"'
        launch = _host_launch()
        if launch is not None:
            launch.run_pip(f"install {args}", f"Merge Lab requirements: {', '.join(missing)}")
        else:
            subprocess.check_call([sys.executable, "-m", "pip", "install", *missing, "-c", constraints])
    finally:
        os.remove(constraints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
