"""Builds ``cryogs_emu``: the CUDA extension's own sources compiled by g++ to run on the CPU, for the
tests marked ``emulated`` (tests/test_emulated.py).

What goes in is what setup.py compiles into ``cryogs.render._C``, with the CUDA parts swapped for
``csrc/emu/``:

- every ``csrc/*.cu``, unchanged except that each launch ``k<<<grid, block, smem, stream>>>(`` is
  rewritten to ``EMU_LAUNCH(k, grid, block, smem, stream)(`` on the same lines (a ``#line`` makes
  compiler, sanitizer and gcov reports point at the ``.cu``), with ``csrc/emu/device.h``
  force-included: each CUDA thread a fiber under a deterministic scheduler (see that header);
- every ``csrc/*.cpp``: the real host wrappers, CPU twins and pybind11 bindings, against the
  ``csrc/emu/`` stubs of ``cuda_runtime.h``, ``c10/cuda`` and CUB, and ``-DCRYOGS_EMULATED``, their
  one switch (the ops take CPU tensors); the ``cpu`` backend's sources come along (the bindings
  name them), compiled without OpenMP and without their ISA clones;
- ``csrc/emu/runtime.cpp``, the block scheduler.

The kernels and the CPU twins are built with FMA contraction on (``-ffp-contract=fast``, ``-mfma``
where the CPU has it, and ``-fexpensive-optimizations``, without which GCC does not contract at
``-O1``), as nvcc contracts by default: the twins of this module are the contracted twin build
(``cryogs.render._C``'s are not contracted).

Variants (each a directory holding ``cryogs_emu*.so``, loaded by tests/emu_worker.py, and
``objects.txt``, the objects linked into it):

    asan  AddressSanitizer + UBSan, aborting on the first error
    tsan  ThreadSanitizer
    cov   gcov line counts of the kernels (-O0, so not contracted): ``python tests/emu_build.py
          coverage`` runs the emulated tests on it and prints which lines of each kernel ran

Only the kernels and the runtime are instrumented: the host wrappers, twins and bindings run on one
thread and reach tensor memory only through torch or the kernels, so they are compiled once (``-O0``,
the twins ``-O1`` for contraction) and linked into every variant; the bindings alone take ~20 s,
the rest a few seconds per file, and two cores compile in parallel.

Objects are cached under ``build/emu/`` by a hash of their source, every csrc header, the flags,
the compiler and torch, so a rebuild after a change recompiles only what it touches, and an
unchanged tree links nothing new. ``python tests/emu_build.py asan tsan`` builds from the shell and
prints the module directories.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
BUILD = ROOT / "build" / "emu"
MODULE = "cryogs_emu"
CXX = os.environ.get("CXX", "g++")

VARIANTS = {
    "asan": ["-O1", "-fexpensive-optimizations", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=undefined"],
    "tsan": ["-O1", "-fexpensive-optimizations", "-g", "-fsanitize=thread"],
    "cov": ["-O0", "-g", "--coverage"],
}
#: The shared runtime each variant's module needs first in the process (LD_PRELOAD), or None.
RUNTIMES = {"asan": "libasan.so", "tsan": "libtsan.so", "cov": None}

_LAUNCH = re.compile(r"(\w+(?:<[^<>()]*>)?)<<<(.*?)>>>\(", re.S)


def cpu_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def _torch_flags() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension

    inc = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    libs = []
    for d in cpp_extension.library_paths():
        libs += [f"-L{d}", f"-Wl,-rpath,{d}"]
    return [abi, *inc], [*libs, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def _contract_flags() -> list[str]:
    return ["-ffp-contract=fast", *(["-mfma"] if cpu_has_fma() else [])]


def convert(source: str) -> str:
    """A .cu file's text with every launch rewritten for the emulator, line numbers unchanged."""
    out, n = _LAUNCH.subn(r"EMU_LAUNCH(\1, \2)(", source)
    if n != source.count("<<<"):
        raise RuntimeError(f"emu_build: rewrote {n} of {source.count('<<<')} kernel launches")
    return out


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() if not isinstance(p, bytes) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _headers_digest() -> str:
    files = sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in (".h", ".cuh"))
    return _digest(*[(str(p.relative_to(CSRC)), p.read_bytes()) for p in files])


def _compiler_id() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


class _Job:
    """One object file: compile `text` (a file name for messages) with `flags`."""

    def __init__(self, name: str, text: str, flags: list[str], key_extra):
        self.name, self.text, self.flags = name, text, flags
        self.path = BUILD / "obj" / f"{Path(name).stem}-{_digest(text, flags, key_extra)}.o"


def _compile(job: _Job) -> None:
    src = job.path.with_suffix(".cpp")
    src.write_text(job.text)
    tmp = job.path.with_suffix(".tmp.o")  # gcov's notes and counts are named after it (coverage)
    proc = subprocess.run([CXX, *job.flags, "-c", str(src), "-o", str(tmp)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"emu_build: compiling {job.name} failed:\n{proc.stderr[-8000:]}")
    os.replace(tmp, job.path)


def _plan(variant: str, overrides: dict[str, str], base: list[str], key) -> tuple[list[_Job], list[_Job]]:
    """(shared host objects, per-variant objects) of one variant."""
    host = []
    for p in sorted(CSRC.glob("*.cpp")):
        opt = ["-O1", "-fexpensive-optimizations"] if p.name == "cpu_twins.cpp" else ["-O0"]
        host.append(_Job(p.name, f'#line 1 "{p}"\n' + p.read_text(), [*base, *opt], key))
    own = []
    flags = [*base, *VARIANTS[variant]]
    for p in sorted(CSRC.glob("*.cu")):
        text = overrides.get(p.name, p.read_text())
        own.append(_Job(p.name, f'#line 1 "{p}"\n' + convert(text), [*flags, "-include", str(EMU / "device.h")],
                        key))
    runtime = EMU / "runtime.cpp"
    own.append(_Job("emu_runtime.cpp", f'#line 1 "{runtime}"\n' + runtime.read_text(), flags, key))
    return host, own


def build(variants=("asan", "tsan"), overrides: dict[str, str] | None = None, tag: str = "") -> dict[str, Path]:
    """Builds the variants (in parallel, reusing cached objects) and returns variant -> module directory.

    ``overrides`` maps a csrc .cu file name to replacement text (a mutated kernel); ``tag`` names
    such a build's directories.
    """
    overrides = overrides or {}
    cflags, lflags = _torch_flags()
    base = ["-std=c++20", "-fPIC", "-DCRYOGS_EMULATED", f"-DTORCH_EXTENSION_NAME={MODULE}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{EMU}", f"-I{CSRC}", *cflags, *_contract_flags()]
    key = (_headers_digest(), _compiler_id(), sys.version, torch.__version__, lflags)
    (BUILD / "obj").mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        plans = {v: _plan(v, overrides, base, key) for v in variants}
        jobs = {j.path: j for host, own in plans.values() for j in [*host, *own] if not j.path.exists()}
        # Longest first: the bindings (all of torch and pybind11) dominate.
        todo = sorted(jobs.values(), key=lambda j: j.name != "bindings.cpp")
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for f in [pool.submit(_compile, j) for j in todo]:
                f.result()
        out = {}
        for v, (host, own) in plans.items():
            # The variant's objects first: the linker keeps the first copy of each inline function
            # (the header maths not inlined), so that kernels run their instrumented copies.
            objs = [str(j.path) for j in [*own, *host]]
            link = ["-shared", *VARIANTS[v], *lflags]
            d = BUILD / f"{v}{tag}-{_digest(objs, link)}"
            so = d / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
            if not so.exists():
                d.mkdir(parents=True, exist_ok=True)
                proc = subprocess.run([CXX, *objs, *link, "-o", str(so) + ".tmp"], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"emu_build: linking {v} failed:\n{proc.stderr[-8000:]}")
                (d / "objects.txt").write_text("".join(o + "\n" for o in objs))
                os.replace(str(so) + ".tmp", so)
            out[v] = d
        return out


def preload(variant: str) -> str:
    """The LD_PRELOAD value a process needs to load `variant`'s module ("" if nothing): the
    sanitizer runtime first, then libstdc++, without which (Python does not link it) the runtime
    cannot intercept ``__cxa_throw`` and any C++ exception, torch's included, aborts it."""
    name = RUNTIMES[variant]
    if name is None:
        return ""
    paths = []
    for lib in (name, "libstdc++.so.6"):
        path = subprocess.run([CXX, f"-print-file-name={lib}"], capture_output=True, text=True,
                              check=True).stdout.strip()
        if not os.path.isabs(path):
            raise RuntimeError(f"emu_build: {CXX} has no {lib}")
        paths.append(path)
    return " ".join(paths)


def coverage() -> str:
    """Builds the ``cov`` variant, runs the emulated tests on it and returns the line coverage of each
    kernel and launcher of csrc/*.cu (and of the per-Gaussian maths they call), from gcov."""
    d = build(("cov",))["cov"]
    objects = [Path(o) for o in (d / "objects.txt").read_text().split()]
    kernels = [o for o in objects if o.stem.split("-")[0].endswith("_kernel")]
    for o in kernels:
        o.with_suffix(".tmp.gcda").unlink(missing_ok=True)
    env = dict(os.environ, CRYOGS_EMU_VARIANTS="cov")
    # Without the tests that run CPU twins (they share the header maths' copies) or mutants.
    skip = "not caught and not twin and not contraction and not thin"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "emulated", "-k", skip, "-p", "no:cacheprovider",
                    str(ROOT / "tests" / "test_emulated.py")], env=env, cwd=ROOT, check=True)
    per_function, per_file = {}, {}
    for o in kernels:
        out = subprocess.run(["gcov", "-j", "-t", "-o", str(o.with_suffix(".tmp.o")), str(o.with_suffix(".cpp"))],
                             capture_output=True, text=True, check=True, cwd=o.parent).stdout
        for f in json.loads(out)["files"]:
            path = Path(f["file"])
            if path.parent != CSRC:
                continue
            names = {fn["name"]: fn["demangled_name"] for fn in f["functions"]}
            for line in f["lines"]:
                key = (path.name, line["line_number"])
                hit = line["count"] > 0
                per_file[key] = per_file.get(key, False) or hit
                fn = names.get(line.get("function_name"), "?")
                if path.suffix == ".cu":
                    fn = fn.replace("(anonymous namespace)::", "").split("(")[0]
                    per_function.setdefault((path.name, fn), {})[line["line_number"]] = (
                        per_function.get((path.name, fn), {}).get(line["line_number"], False) or hit)
    rows = [f"{'function':58s} lines run"]
    for (file, fn), lines in sorted(per_function.items()):
        missed = sorted(n for n, hit in lines.items() if not hit)
        rows.append(f"{file + ': ' + fn:58s} {sum(lines.values()):3d}/{len(lines):3d}"
                    + (f"  missed {missed}" if missed else ""))
    for file in sorted({f for f, _ in per_file}):
        lines = {n: hit for (f, n), hit in per_file.items() if f == file}
        missed = sorted(n for n, hit in lines.items() if not hit)
        rows.append(f"{file + ' (whole file)':58s} {sum(lines.values()):3d}/{len(lines):3d}"
                    + (f"  missed {missed}" if missed else ""))
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["coverage"]:
        print(coverage())
    else:
        for v, d in build(sys.argv[1:] or ("asan", "tsan")).items():
            print(v, d)
