"""Builds cryogs with its extension ``cryogs.render._C`` whenever torch and a C++ compiler are present.

Two configurations:

* with nvcc and a CUDA build of torch: a CUDAExtension holding the CUDA ops (``csrc/*.cu`` and their
  host wrappers) and the CPU ops (the ``cpu`` backend, OpenMP, and the CPU twins);
* otherwise (no CUDA toolkit, a CPU-only torch, or ``CRYOGS_BUILD_CUDA=0``): a CppExtension with the
  CPU ops only, compiled with ``-DCRYOGS_CPU_ONLY``.

``CRYOGS_BUILD_CUDA=1`` forces the CUDA configuration (a build failure is an error), ``=0`` builds
the CPU-only one; unset, the CUDA one is built when it can be, the CPU-only one otherwise, with one
line saying why. ``CRYOGS_BUILD_CPU=0`` (with the CUDA configuration unavailable or off) builds no
extension at all: cryogs then uses the ``torch`` backend.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

#: Host wrappers of the CUDA kernels (they include kernels.h and c10/cuda): left out of the CPU-only build.
CUDA_HOST_SOURCES = ("csrc/bin.cpp", "csrc/preprocess.cpp", "csrc/rasterize.cpp", "csrc/voxelize.cpp")
# -fno-trapping-math lets GCC if-convert (and so vectorise) the masked loops of the cpu backend; cryogs
# never reads the floating-point exception flags.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]


def _say(msg):
    print(f"cryogs: {msg}", file=sys.stderr)


def _off(name):
    return os.environ.get(name, "auto").strip().lower() in ("0", "false", "no", "off")


def _cuda_reason(torch, cuda_home):
    """Why the CUDA configuration cannot be built, or None."""
    if _off("CRYOGS_BUILD_CUDA"):
        return "CRYOGS_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "no CUDA toolkit found (set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda)"
    return None


def extension():
    """``(ext_modules, cmdclass)`` for the extension, or empty ones with the reason printed."""
    force = os.environ.get("CRYOGS_BUILD_CUDA", "auto").strip().lower() in ("1", "true", "yes", "on")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable at build time (install torch first, then pip install --no-build-isolation)"
        if force:
            raise SystemExit(f"cryogs: CRYOGS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"extension skipped: {reason}; the torch backend will be used")
        return [], {}
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    reason = _cuda_reason(torch, CUDA_HOME)
    if reason is None:
        archs = os.environ.get("CRYOGS_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
        _say(f"building the extension with the CUDA ops for sm_{', sm_'.join(archs)} with {CUDA_HOME}, "
             "and the CPU ops")
        ext = CUDAExtension(
            name="cryogs.render._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS,
                                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", *gencode]},
            extra_link_args=["-fopenmp"],
        )
        return [ext], cmdclass
    if force:
        raise SystemExit(f"cryogs: CRYOGS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    if _off("CRYOGS_BUILD_CPU"):
        _say(f"extension skipped ({reason}, and CRYOGS_BUILD_CPU=0); the torch backend will be used")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _say(f"extension skipped: {reason}, and no C++ compiler ({cxx}) found; the torch backend will be used")
        return [], {}
    sources = [s for s in sorted(glob.glob("csrc/*.cpp")) if s not in CUDA_HOST_SOURCES]
    _say(f"building the extension with the CPU ops only ({reason})")
    ext = CppExtension(
        name="cryogs.render._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("CRYOGS_CPU_ONLY", None)],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-fopenmp"],
    )
    return [ext], cmdclass


ext_modules, cmdclass = extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
