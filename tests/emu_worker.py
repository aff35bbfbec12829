"""Runs test code against the emulated ops (tests/emu_build.py) in a sanitized child process.

A sanitizer runtime has to be the first library of its process, so the emulated kernels run in a
child Python started with ``LD_PRELOAD`` of it (``ASAN_OPTIONS=detect_leaks=0``: Python itself
leaks by design). The child switches ``cryogs.render.cuda`` to the emulated module (its ``ops``
injection point), turns on the ops' debug poisoning (every output NaN-filled before each kernel
writes it) and serves calls: :meth:`Emulator.run` pickles a module-level function and its arguments
(tensors included) to it, the child calls the function and sends back its result or exception. The
tests compare results with the float64 dense reference in the parent, outside the sanitizer.

Every sanitizer report is fatal (ASan and UBSan abort, TSan runs with ``halt_on_error=1``), so a
call either returns or raises :class:`SanitizerError` with the report; the next call then starts a
fresh child. Both sanitizers load into Python this way, TSan included, so the project's own host
code runs under them (bindings, wrappers, cuda_backend); a standalone C++ driver would need a copy
of that code. Measured on 2 busy cores: starting a child costs 2-4 s (ASan) and 4-8 s (TSan),
mostly torch's import under the sanitizer; one child per variant serves every test of a session.
"""
from __future__ import annotations

import ctypes
import io
import os
import select
import struct
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import emu_build
import torch

TESTS = Path(__file__).resolve().parent

#: Seconds one call may take before the child is deemed hung (a deadlocked mutant, say) and killed.
CALL_TIMEOUT = 300


class SanitizerError(AssertionError):
    """The child died during a call: a sanitizer report (in the message), a crash or a hang."""


def _send(stream, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv_exact(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _recv(stream):
    (n,) = struct.unpack("<Q", _recv_exact(stream, 8))
    return torch.load(io.BytesIO(_recv_exact(stream, n)), weights_only=False)


class Emulator:
    """One sanitized child serving calls against the module in ``module_dir`` (started lazily)."""

    def __init__(self, variant: str, module_dir: Path):
        self.variant, self.module_dir = variant, Path(module_dir)
        self.proc = None
        self.log = None

    def _start(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
        env["OMP_NUM_THREADS"] = "1"  # torch's own thread pool is not what is being checked
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=86"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1"
        env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:report_signal_unsafe=0"
        env["LD_PRELOAD"] = emu_build.preload(self.variant)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "emu_worker", str(self.module_dir), self.variant], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=TESTS)

    def _report(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-20000:]

    def _died(self, why: str):
        self.proc.kill()
        code = self.proc.wait()
        report = self._report()
        self.proc = None
        raise SanitizerError(f"emulator child ({self.variant}) {why} (exit code {code}):\n{report}")

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) in the child; its exception is re-raised here."""
        if self.proc is None:
            self._start()
        try:
            _send(self.proc.stdin, (fn, args, kwargs))
        except BrokenPipeError:
            self._died("was gone")
        ready, _, _ = select.select([self.proc.stdout], [], [], CALL_TIMEOUT)
        if not ready:
            self._died(f"hung for {CALL_TIMEOUT} s")
        try:
            status, value = _recv(self.proc.stdout)
        except EOFError:
            self._died("died")
        if status == "raise":
            raise value
        return value

    def close(self) -> str:
        """Stops the child; returns what it printed if it exited with an error (e.g. a report at exit)."""
        if self.proc is None:
            return ""
        self.proc.stdin.close()
        code = self.proc.wait(timeout=CALL_TIMEOUT)
        self.proc = None
        return "" if code == 0 else f"exit code {code}:\n{self._report()}"


# ---- in the child --------------------------------------------------------------------------------
def ops():
    """The emulated ops module (in the child)."""
    from cryogs.render import cuda as cuda_backend

    return cuda_backend.ops


def counters(reset: bool = False) -> dict:
    """Launches and blocks per kernel (as named at its launch) and sorts per CUB path since the last
    reset: ``{"launches": {name: n}, "blocks": {name: n}, "sorts": {0: single-tile sorts, k: sorts of
    k onesweep passes}}``."""
    lib = ctypes.CDLL(ops().__file__)
    for fn in (lib.emu_launch_count, lib.emu_block_count, lib.emu_sort_count):
        fn.restype = ctypes.c_long
    names = ("preprocess_fwd_kernel", "preprocess_bwd_gauss_kernel", "preprocess_bwd_pose_kernel",
             "duplicate_kernel", "tile_ranges_kernel", "rasterize_fwd_kernel<TILE_SIZE>",
             "rasterize_bwd_kernel<TILE_SIZE>", "voxelize_fwd_kernel")
    out = {"launches": {n: lib.emu_launch_count(n.encode()) for n in names},
           "blocks": {n: lib.emu_block_count(n.encode()) for n in names},
           "sorts": {k: lib.emu_sort_count(k) for k in range(8)}}
    if reset:
        lib.emu_reset_counts()
    return out


def _serve(module_dir: str, variant: str) -> None:
    sys.path.insert(0, module_dir)
    import cryogs_emu

    from cryogs.render import cuda as cuda_backend

    cuda_backend.ops = cryogs_emu
    cryogs_emu.set_debug_poison(True)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the protocol's channel; anything printed goes to stderr
    os.dup2(2, 1)
    while True:
        try:
            fn, args, kwargs = _recv(inp)
        except EOFError:
            if variant != "cov":  # gcov writes its counts at exit; otherwise skip Python's (slow) teardown
                os._exit(0)
            return
        try:
            reply = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 (sent back to the parent, which re-raises it)
            exc.add_note("in the emulator child:\n" + traceback.format_exc())
            reply = ("raise", exc)
        try:
            _send(out, reply)
        except Exception:  # noqa: BLE001 (an unpicklable result or exception)
            _send(out, ("raise", RuntimeError(traceback.format_exc())))


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
