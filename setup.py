"""Builds cryogs, with the CUDA extension ``cryogs.render._C`` when torch is a CUDA build and nvcc is found.

``CRYOGS_BUILD_CUDA=1`` forces the extension (a build failure is an error), ``=0`` skips it; unset,
it is built when it can be and skipped with one line otherwise (cryogs then uses the torch backend).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"cryogs: {msg}", file=sys.stderr)


def cuda_extension():
    """``(ext_modules, cmdclass)`` for the CUDA extension, or empty ones with the reason printed."""
    want = os.environ.get("CRYOGS_BUILD_CUDA", "auto").strip().lower()
    if want in ("0", "false", "no", "off"):
        _say("CUDA extension skipped (CRYOGS_BUILD_CUDA=0); the torch backend will be used")
        return [], {}
    force = want in ("1", "true", "yes", "on")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable at build time (install torch first, then pip install --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
            reason = "no CUDA toolkit found (set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda)"
        else:
            reason = None
    if reason is not None:
        if force:
            raise SystemExit(f"cryogs: CRYOGS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"CUDA extension skipped: {reason}; the torch backend will be used")
        return [], {}
    archs = os.environ.get("CRYOGS_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    _say(f"building CUDA extension for sm_{', sm_'.join(archs)} with {CUDA_HOME}")
    ext = CUDAExtension(
        name="cryogs.render._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
