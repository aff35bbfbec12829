"""A run's output folder: never another run's files overwritten unasked, one run at a time, and a
record of what determines the run, so that ``--resume`` continues the same run.

* A new run refuses a folder that holds anything unless ``--overwrite`` is given.
* While a run writes, the folder holds ``.cryogs.lock`` with its process id and host; a second run
  is refused while that process lives, and the lock of a dead one (a killed run) is taken over.
* ``run.json`` records the command, every option that determines the result (all but
  :data:`RUNTIME`: where and how it runs) and a fingerprint of every input file, and whether the
  run finished. ``--resume`` restores those options from it: an option left out comes from the
  record, one given with another value (or an input file whose content differs) is refused, naming
  the option. A finished run is not redone.
* ``command.txt`` gets every command line that wrote into the folder, one per line.

Every command that writes a folder uses it (:meth:`RunFolder.prepare` before any expensive step,
then ``with folder.claimed(): ...``).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
from pathlib import Path

from cryogs.errors import CryogsError
from cryogs.io.atomic import write_json

RECORD = "run.json"
LOCK = ".cryogs.lock"
COMMAND_LOG = "command.txt"
#: Options that say where and how a run computes, not what: a resume may change them.
RUNTIME = {"out", "resume", "overwrite", "device", "backend", "no_progress", "gpus"}
#: Files up to this size are hashed whole; larger ones (image stacks) by their size, head and tail.
WHOLE_HASH_BYTES = 256 << 20
_PART_BYTES = 16 << 20


def fingerprint(path: Path) -> dict:
    """``{"path", "bytes", "sha256"}`` of a file: the content hash of the whole file, or for a file
    over :data:`WHOLE_HASH_BYTES` of its first and last 16 MiB (a stack's header and some images)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= WHOLE_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(fh.read(_PART_BYTES))
            fh.seek(size - _PART_BYTES)
            h.update(fh.read(_PART_BYTES))
    return {"path": str(path.resolve()), "bytes": size, "sha256": h.hexdigest()}


def _files(value) -> list[Path]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, Path) and v.is_file()]


def _to_json(value):
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _from_json(value, action):
    if action.type is Path and value is not None:
        return [Path(v) for v in value] if isinstance(value, list) else Path(value)
    return value


def _spell(action) -> str:
    return action.option_strings[0] if action.option_strings else (action.metavar or action.dest)


def _setting(action, value) -> str:
    """How the command line would say ``value`` (JSON) of ``action``: ``--epochs 3``, ``--invert``,
    ``no --invert``, ``no --reference``."""
    if action.nargs == 0:  # a flag
        return _spell(action) if value else f"no {_spell(action)}"
    if value is None:
        return f"no {_spell(action)}"
    return f"{_spell(action)} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def _options(args) -> dict:
    """The parser's actions that determine the run, by dest (each once)."""
    found = {}
    for action in args.parser._actions:
        if action.dest not in found and action.dest not in RUNTIME and action.dest != "help" \
                and action.help != "==SUPPRESS==":
            found[action.dest] = action
    return found


class RunFolder:
    """The output folder of one command (``args.out``), see the module notes."""

    def __init__(self, args, *, main: bool = True):
        self.args, self.out, self.main = args, Path(args.out), main
        self.resume = bool(getattr(args, "resume", False))
        self.finished_before = False
        self.restored: list[str] = []  # the recorded settings a resume took from run.json, as options
        self._lock: Path | None = None
        self._hashes: dict[str, str] = {}

    # ------------------------------------------------------------------ before any work
    @classmethod
    def prepare(cls, args, *, main: bool = True) -> RunFolder:
        """Check ``--out`` and, with ``--resume``, restore ``args`` from the run record. Writes nothing.
        ``main``: the process that will write (under torchrun every process restores, one checks)."""
        folder = cls(args, main=main)
        out = folder.out
        if out.exists() and not out.is_dir():
            raise CryogsError(f"--out {out} is a file; give a folder")
        if folder.resume:
            folder._restore()
        elif main and out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not args.overwrite:
            resume = ", --resume to continue that run," if hasattr(args, "resume") else ""
            raise CryogsError(f"--out {out} already holds files (an earlier run?): give a new folder{resume} or "
                              "--overwrite to write over it")
        if main:
            folder._check_lock()
            folder._check_writable()
        return folder

    def finished_already(self) -> bool:
        """Whether ``--resume`` found the run finished (said once, by the main process); otherwise the
        particle file must have been given or recorded."""
        if self.finished_before:
            if self.main:
                print(f"the run in {self.out} has finished; nothing to resume, its outputs are left as they are")
            return True
        if self.args.particles is None:
            raise CryogsError("give the particle file (a STAR, .cs, .mrcs or .txt file), or --resume to continue the "
                              "run in --out")
        return False

    def resume_line(self) -> str:
        """What a resumed run says it took from its run record."""
        return (f"resuming the run in {self.out} with its recorded settings: "
                f"{', '.join(self.restored) or 'all options at their defaults'}")

    def _restore(self) -> None:
        record_path = self.out / RECORD
        if not record_path.is_file():
            raise CryogsError(f"--resume: {self.out} holds no cryogs run to continue (no {RECORD})")
        try:
            record = json.loads(record_path.read_text())
            options, inputs = record["options"], record["inputs"]
        except (ValueError, KeyError, TypeError):
            raise CryogsError(f"--resume: {record_path} is damaged; start a new run with --overwrite") from None
        if record.get("command") != self.args.command:
            raise CryogsError(f"--resume: {self.out} holds a '{record.get('command')}' run, not '{self.args.command}'")
        actions = _options(self.args)
        for dest, action in actions.items():
            if dest not in options:
                continue
            now, default = getattr(self.args, dest), action.default
            if now != default and now is not None and not self._same(now, options[dest], inputs.get(dest)):
                raise CryogsError(
                    f"--resume: {_setting(action, _to_json(now))} conflicts with the run in {self.out}, which has "
                    f"{_setting(action, options[dest])}; leave {_spell(action)} out to continue that run")
            if now == default or now is None:
                setattr(self.args, dest, _from_json(options[dest], action))
                if options[dest] != _to_json(default):
                    self.restored.append(_setting(action, options[dest]))
        for dest, prints in inputs.items():
            for recorded, path in zip(prints, _files(getattr(self.args, dest, None)) or [None] * len(prints)):
                self._check_unchanged(dest, recorded, path, actions.get(dest))
        self.finished_before = record.get("status") == "finished"

    def _same(self, now, recorded, prints) -> bool:
        """Whether a value given again agrees with the record (JSON): input files by content, wherever they
        are now, the rest by value."""
        if _to_json(now) == recorded:
            return True
        if not prints or not _files(now):
            return False
        paths = {p["path"] for p in prints}

        def words(v):
            return ["<file>" if isinstance(w, Path) or w in paths else w for w in (v if isinstance(v, list) else [v])]
        return words(now) == words(recorded) and \
            [self._hash(p) for p in _files(now)] == [p["sha256"] for p in prints]

    def _hash(self, path: Path) -> str:
        key = str(path.resolve())
        if key not in self._hashes:
            self._hashes[key] = fingerprint(path)["sha256"]
        return self._hashes[key]

    def _check_unchanged(self, dest, recorded: dict, path, action) -> None:
        name = _spell(action) if action is not None else dest
        path = Path(recorded["path"]) if path is None else path
        if not path.is_file():
            raise CryogsError(f"--resume: {name} {path}, an input of the run in {self.out}, is gone; give its "
                              f"new place with {name}" if action and action.option_strings else
                              f"--resume: {path}, an input of the run in {self.out}, is gone; give its new path")
        if self._hash(path) != recorded["sha256"]:
            raise CryogsError(f"--resume: {path} ({name}) changed since the run in {self.out} started "
                              "(its content differs); start a new run")

    def _check_lock(self) -> None:
        owner = _lock_owner(self.out / LOCK)
        if owner is not None and _alive(*owner):
            pid, host = owner
            raise CryogsError(f"--out {self.out} is in use by cryogs process {pid} on {host} ({self.out / LOCK}); "
                              "wait for it to end, or delete that file if the process is gone")

    def _check_writable(self) -> None:
        existing = self.out
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise CryogsError(f"--out {self.out}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise CryogsError(f"--out {self.out}: no permission to write in {existing}")

    # ------------------------------------------------------------------ while the run writes
    @contextlib.contextmanager
    def claimed(self):
        """Create the folder, hold the lock, log the command line and record the run; on leaving,
        release the lock (whatever happened). Only the main process writes."""
        if not self.main:
            yield self
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CryogsError(f"--out {self.out}: cannot create the folder ({err.strerror or err})") from None
        self._take_lock()
        try:
            with open(self.out / COMMAND_LOG, "a") as fh:
                fh.write(self.args.command_line + "\n")
            self._write_record("running")
            yield self
        finally:
            with contextlib.suppress(OSError):
                self._lock.unlink()

    def finish(self) -> None:
        """Mark the run finished in its record (a later --resume has nothing to do)."""
        if self.main:
            self._write_record("finished")

    def _write_record(self, status: str) -> None:
        actions = _options(self.args)
        values = {dest: getattr(self.args, dest) for dest in actions}
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        write_json(self.out / RECORD, {
            "command": self.args.command, "status": status, "updated": now,
            "options": {dest: _to_json(v) for dest, v in values.items()},
            "inputs": {dest: [fingerprint(p) for p in _files(v)] for dest, v in values.items() if _files(v)}})

    def _take_lock(self) -> None:
        path = self.out / LOCK
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _lock_owner(path)
                if owner is not None and _alive(*owner):
                    self._check_lock()
                print(f"note: {path} was left by a cryogs process that no longer runs; taking it over")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            except OSError as err:
                raise CryogsError(f"--out {self.out}: cannot write there ({err.strerror or err})") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {socket.gethostname()}\n")
            self._lock = path
            return
        raise CryogsError(f"--out {self.out}: could not take {path}; another run is starting there")


def _lock_owner(path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in a lock file, or None when there is none (an unreadable one counts as dead)."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return 0, socket.gethostname()


def _alive(pid: int, host: str) -> bool:
    """Whether process ``pid`` on ``host`` runs; a process on another host is assumed to."""
    if host != socket.gethostname():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
