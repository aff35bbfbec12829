"""Loads the compiled extension ``cryogs.render._C`` if it was built, says why not otherwise, and what it holds.

The extension has two configurations (see setup.py): with the CUDA ops and the CPU ops (built with
nvcc and a CUDA torch), or with the CPU ops only (a C++ compiler but no nvcc, a CPU-only torch, or
``CRYOGS_BUILD_CUDA=0``). The CPU ops are the ``cpu`` backend and the CPU twins of the kernels.
"""
from __future__ import annotations

import functools


@functools.cache
def _load():
    import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)

    try:
        from . import _C  # built by setup.py when torch and a C++ compiler are found
    except ImportError as exc:
        reason = str(exc)
        if "No module named" in reason or "cannot import name '_C'" in reason:
            reason = "the package was installed without it (no C++ compiler, or torch missing at build time)"
        return None, reason
    return _C, None


def module():
    """The extension module; raises ``ImportError`` with the reason if it is not built."""
    mod, reason = _load()
    if mod is None:
        raise ImportError(f"cryogs extension not built: {reason}")
    return mod


def built() -> bool:
    """Whether the extension was compiled and imports (with or without the CUDA ops)."""
    return _load()[0] is not None


def has_cuda_ops() -> bool:
    """Whether the built extension holds the CUDA kernels (an nvcc build)."""
    mod = _load()[0]
    return mod is not None and bool(getattr(mod, "HAS_CUDA_OPS", True))


def has_cpu_ops() -> bool:
    """Whether the built extension holds the ``cpu`` backend's ops."""
    mod = _load()[0]
    return mod is not None and bool(getattr(mod, "HAS_CPU_OPS", False))


def available() -> bool:
    """Whether the CUDA backend can run now: the CUDA ops are built and a GPU is visible."""
    import torch

    return has_cuda_ops() and torch.cuda.is_available()


def cpu_available() -> bool:
    """Whether the ``cpu`` backend can run: the extension holds the CPU ops."""
    return has_cpu_ops()


def status() -> str:
    """Of the CUDA ops: ``built`` or ``not built (<reason>)``, for ``cryogs info``."""
    mod, reason = _load()
    if mod is None:
        return f"not built ({reason})"
    if not has_cuda_ops():
        return "not built (the extension was compiled without nvcc: CPU ops only)"
    return "built"


def cpu_status() -> str:
    """Of the CPU ops: ``built (OpenMP, <n> threads)`` or ``not built (<reason>)``, for ``cryogs info``."""
    mod, reason = _load()
    if mod is None:
        return f"not built ({reason})"
    if not has_cpu_ops():
        return "not built (the extension predates the cpu backend: rebuild it)"
    threads = f"OpenMP, {mod.cpu_num_threads()} threads" if mod.cpu_has_openmp() else "no OpenMP: 1 thread"
    return f"built ({threads})"


def summary() -> str:
    """One line on what the build holds, for scripts/setup_env.sh."""
    if not built():
        return f"extension {status()}; the torch backend will be used"
    return f"extension built: CUDA ops {status()}, cpu backend {cpu_status()}"
