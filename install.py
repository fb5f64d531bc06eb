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
# Installed when missing, but merges run without them: numba compiles the per-element kernels
# (merge_methods/kernels.py). A host whose pinned numpy no numba release supports keeps the torch form.
OPTIONAL = {
    "numba": "numba>=0.59",
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


def missing_requirements(requirements: dict[str, str] = REQUIREMENTS) -> list[str]:
    return [req for module, req in requirements.items() if not importable(module)]


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


def pip_install(requirements: list[str], constraints: str) -> None:
    launch = _host_launch()
    if launch is not None:
        args = " ".join(f'"{req}"' for req in requirements) + f' -c "{constraints}"'
        launch.run_pip(f"install {args}", f"Merge Lab requirements: {', '.join(requirements)}")
    else:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *requirements, "-c", constraints])


def main() -> int:
    missing, optional = missing_requirements(), missing_requirements(OPTIONAL)
    if not missing and not optional:
        return 0
    constraints = constraints_file(protected_versions())
    try:
        if missing:
            pip_install(missing, constraints)
        if optional:
            try:
                pip_install(optional, constraints)
            except Exception as e:  # the host's run_pip raises RuntimeError, pip itself CalledProcessError
                print(f"Merge Lab: {', '.join(optional)} not installed ({str(e).splitlines()[0] if str(e) else e!r}); "
                      "merges run without the compiled kernels, slower", file=sys.stderr)
    finally:
        os.remove(constraints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
