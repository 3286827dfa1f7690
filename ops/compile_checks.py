"""Compile checks of the CUDA kernels without a GPU (test tooling, not runtime).

* :func:`nvcc_compile_check`: nvcc compiles every instantiation of a source for given architectures
  and reports register use and spills (``ptxas -v``).
* :func:`nvrtc_compile_check`: NVRTC (the ``nvidia-cuda-nvrtc-cu12`` wheel of the dev extra, or a
  CUDA toolkit) compiles a source exactly as the CuPy path hands it over.

``tests/test_kernel_infra.py`` runs both on every registered source (docs/architecture.md §6).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .kernel_files import CTYPES, expand_includes
from .kernel_loader import KernelSource

# ----------------------------------------------------------------------------- nvcc compile check


def nvcc_compile_check(src: KernelSource, archs: Sequence[str] = ("sm_80", "sm_90")) -> str:
    """Compile every instantiation of ``src`` with nvcc for ``archs``; return nvcc's resource report.

    Raises RuntimeError with nvcc's output on failure. Taking each instantiation's address in host
    code forces nvcc to generate its device code for every architecture.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    body = [expand_includes(src.path)]
    for ctype in CTYPES.values():
        addrs = ", ".join(f"(const void*)&{e}" for e in src.name_expressions(ctype))
        body.append(f"const void* const vmm_instances_{ctype}[] = {{{addrs}}};")
    gencode = []
    for arch in archs:
        num = arch.removeprefix("sm_")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / src.path.name  # never src.filename: it may be an absolute path (test kernels)
        cu.write_text("\n".join(body) + "\n", encoding="utf-8")
        cmd = [nvcc, "-std=c++17", "-Xptxas", "-v", *gencode, "-c", str(cu), "-o", str(Path(tmp) / "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src.filename}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- NVRTC compile check


def find_nvrtc() -> str | None:
    """Path of libnvrtc: $VMM_NVRTC, the nvidia-cuda-nvrtc wheel, or the CUDA toolkit's."""
    env = os.environ.get("VMM_NVRTC")
    if env:
        return env
    candidates: list[Path] = []
    try:
        import nvidia.cuda_nvrtc as wheel  # the nvidia-cuda-nvrtc-cu12 package (a namespace package)

        for base in wheel.__path__:
            candidates += sorted((Path(base) / "lib").glob("libnvrtc.so*"))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates += sorted((Path(home) / "lib64").glob("libnvrtc.so*"))
    for c in candidates:
        if "alt" not in c.name and "builtins" not in c.name:
            return str(c)
    return None


def nvrtc_compile_check(src: KernelSource, arch: str = "compute_80") -> dict[str, str]:
    """Compile ``src`` with NVRTC exactly as the CuPy path hands it over (inlined includes,
    ``-std=c++17``, one name expression per kernel and dtype); no GPU needed.

    Returns {name expression: lowered (mangled) name}; RuntimeError with NVRTC's log on failure.
    """
    path = find_nvrtc()
    if path is None:
        raise RuntimeError("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12, or set VMM_NVRTC)")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(status).decode()}")

    code = expand_includes(src.path).encode()
    exprs = [e for ctype in CTYPES.values() for e in src.name_expressions(ctype)]
    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), code, src.filename.encode(), 0, None, None), "create")
    try:
        for e in exprs:
            check(lib.nvrtcAddNameExpression(prog, e.encode()), f"add name expression {e}")
        opts = [b"-std=c++17", f"--gpu-architecture={arch}".encode()]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if status != 0:
            raise RuntimeError(f"NVRTC failed for {src.filename}:\n{log.value.decode(errors='replace')}")
        lowered = {}
        for e in exprs:
            name = ctypes.c_char_p()
            check(lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(name)), f"lowered name of {e}")
            lowered[e] = name.value.decode()
        return lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
