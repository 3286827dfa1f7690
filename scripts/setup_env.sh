#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and install vmm into it.
#
# torch is installed only when the environment cannot already import it: the venv is created with
# --system-site-packages, so a CUDA build of torch that the user installed into the base
# interpreter is found and kept. Otherwise a pinned release is installed (VMM_TORCH_SPEC, default
# torch==2.13.0): an unpinned `torch` would resolve to a multi-GB CUDA build on PyPI. A kept torch
# must be 2.4 or newer (pyproject.toml's floor: the kernels are torch.library custom ops).
#
# Usage: scripts/setup_env.sh [VENV_DIR]      (default .venv; PYTHON picks the base interpreter)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv}"
python="${PYTHON:-python3}"
torch_spec="${VMM_TORCH_SPEC:-torch==2.13.0}"
extras="${VMM_EXTRAS:-dev}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv (base: $($python --version 2>&1))"
    "$python" -m venv --system-site-packages "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
    if ! "$venv/bin/python" -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 4))"; then
        echo "[setup] installed torch $torch_version is older than 2.4, the floor: upgrade it (pip install 'torch>=2.4', the build for your CUDA)" >&2
        exit 1
    fi
    echo "[setup] keeping installed torch $torch_version"
else
    echo "[setup] torch missing: installing $torch_spec"
    "${pip[@]}" install "$torch_spec"
fi

echo "[setup] installing video-motion-modules[$extras] (editable)"
"${pip[@]}" install -e "$root[$extras]"
"$venv/bin/python" -c "import torch, lightning, av, ops, lightning_modules, datamodules; \
print(f'[setup] ok: torch {torch.__version__}, lightning {lightning.__version__}, av {av.__version__}')"
