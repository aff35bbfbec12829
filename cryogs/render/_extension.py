"""Loads the compiled CUDA extension ``cryogs.render._C`` if it was built, and says why not otherwise."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _load():
    import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)

    try:
        from . import _C  # noqa: F401  (built by setup.py when a CUDA toolkit is found)
    except ImportError as exc:
        reason = str(exc)
        if "No module named" in reason or "cannot import name '_C'" in reason:
            reason = "the package was installed without it (no CUDA toolkit, CPU-only torch, or CRYOGS_BUILD_CUDA=0)"
        return None, reason
    return _C, None


def module():
    """The extension module; raises ``ImportError`` with the reason if it is not built."""
    mod, reason = _load()
    if mod is None:
        raise ImportError(f"cryogs CUDA extension not built: {reason}")
    return mod


def built() -> bool:
    """Whether the extension was compiled and imports."""
    return _load()[0] is not None


def available() -> bool:
    """Whether the CUDA backend can run now: the extension is built and a GPU is visible."""
    import torch

    return built() and torch.cuda.is_available()


def status() -> str:
    """``built`` or ``not built (<reason>)``, for ``cryogs info``."""
    mod, reason = _load()
    return "built" if mod is not None else f"not built ({reason})"
