"""Output folders of the commands: who owns them, who is writing them, what may be deleted.

Three rules keep a run from losing or corrupting work that is not its own:

- **Ownership.** A folder that a command writes into carries :data:`MARKER`
  (``.vgkernels.json``: the tool, the command, when). A command starts in a folder that
  does not exist, is empty, carries the marker, or holds a run of an earlier version
  (a sweep's ``meta.json``, a refine's ``run.json``, a demo's ``data/`` and ``sweep/``);
  any other non-empty folder is refused before anything is written into it.
  ``--overwrite`` (and ``demo --out``) delete only such a folder.
- **One run at a time.** :class:`OutputLock` takes an exclusive ``flock`` on
  ``OUT/.vgkernels.lock`` (``.vgkernels.r{rank}.lock`` for the other ranks under
  ``torchrun``) for the whole run and writes the holder (pid, host, command, start time)
  into it. A second run on the same folder fails at once naming the holder. The kernel
  releases the lock when the holding process dies, however it dies (``SIGKILL``
  included), so a stale lock never blocks the next run; the holder text left behind is
  only read when the lock is actually held.
- **Nothing before validation.** Commands take the lock and the marker first (neither
  fixes any setting) and write the files that pin settings (``meta.json``,
  ``run.json``) only once their arguments have been checked, so a failed start never
  blocks the corrected retry.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import sys
import time
from typing import Optional

from .clitools import RunError, UsageError

MARKER = ".vgkernels.json"
LOCK = ".vgkernels.lock"
# Files written by earlier versions that identify a folder as a run of this tool.
_LEGACY = {"meta.json": ("format_version", "fingerprint"), "run.json": ("settings", "heads")}


class OutputLocked(RunError):
    """Another live process holds the output folder's lock."""


def lock_name(rank: int = 0) -> str:
    return LOCK if int(rank) == 0 else f".vgkernels.r{int(rank)}.lock"


def _is_lock(name: str) -> bool:
    return name == LOCK or (name.startswith(".vgkernels.r") and name.endswith(".lock"))


def _holder_text(info: dict) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} "
            f"(command: {info.get('command')})")


class OutputLock:
    """An exclusive, process-lifetime lock on an output folder (one per rank).

    ``acquire()`` raises :class:`OutputLocked` naming the holder when another live
    process has it. Use as a context manager or call :meth:`release`.
    """

    # Locks this process holds: real path -> [fd, count]. A lock is re-entrant within one
    # process (the CLI locks before loading the model, then calls the Python API, which
    # locks again); flock itself would refuse the second open of the same file.
    _held: dict = {}

    def __init__(self, out_dir: str, rank: int = 0):
        self.dir = os.fspath(out_dir)
        self.path = os.path.join(self.dir, lock_name(rank))
        self.rank = int(rank)
        self._fd: Optional[int] = None
        self._key: Optional[str] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutputLock":
        import fcntl

        if self._fd is not None:
            return self
        key = os.path.realpath(self.path)
        if key in OutputLock._held:
            entry = OutputLock._held[key]
            entry[1] += 1
            self._fd, self._key = entry[0], key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputLocked(f"out: {self.dir!r} is in use by {_holder_text(read_holder(self.path))}; "
                               "wait for that run to finish or use another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "rank": self.rank,
                "command": " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:]),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd, self._key = fd, key
        OutputLock._held[key] = [fd, 1]
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        entry = OutputLock._held.get(self._key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] > 0:
                return
            del OutputLock._held[self._key]
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):  # pragma: no cover - the kernel releases it anyway
        try:
            self.release()
        except Exception:
            pass


def read_holder(path: str, wait_s: float = 1.0) -> dict:
    """The holder record written into a lock file (``{}`` when none could be read: the
    holder may be between taking the lock and writing its name, so retry briefly)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as f:
                text = f.read()
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


# ----------------------------------------------------------------------------- ownership


def _entries(out_dir: str) -> list:
    return [e for e in os.listdir(out_dir) if not _is_lock(e)]


def _legacy_run(out_dir: str) -> bool:
    # a demo folder of an earlier version: data/ and sweep/ (a sweep) and nothing else
    entries = set(_entries(out_dir))
    if entries and entries <= {"data", "sweep"} and "sweep" in entries and _legacy_run(os.path.join(out_dir, "sweep")):
        return True
    for name, keys in _LEGACY.items():
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and all(k in doc for k in keys):
                return True
    return False


def ownership(out_dir: str) -> str:
    """``"absent"``, ``"empty"``, ``"ours"`` (carries :data:`MARKER` or holds a run of an
    earlier version) or ``"foreign"``."""
    if not os.path.exists(out_dir):
        return "absent"
    if not os.path.isdir(out_dir):
        return "foreign"
    entries = _entries(out_dir)
    if not entries:
        return "empty"
    if MARKER in entries or _legacy_run(out_dir):
        return "ours"
    return "foreign"


def check_usable(out_dir: str, *, overwrite: bool = False, what: str = "--out") -> str:
    """Raise :class:`UsageError` unless a command may write into (and, with ``overwrite``,
    delete) ``out_dir``; returns its :func:`ownership`. Writes nothing."""
    state = ownership(out_dir)
    if state != "foreign":
        return state
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{what}: {out_dir!r} exists and is not a folder")
    if overwrite:
        raise UsageError(f"{what}: refusing to delete {out_dir!r}: it holds files and was not created by vgkernels "
                         f"(no {MARKER}); only folders this tool created are deleted. Delete it yourself or choose "
                         "another folder")
    raise UsageError(f"{what}: {out_dir!r} holds files that vgkernels did not write (no {MARKER}); choose a new or "
                     "empty folder")


def write_marker(out_dir: str, command: str) -> None:
    p = os.path.join(out_dir, MARKER)
    if os.path.exists(p):
        return
    from . import __version__

    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"tool": "vgkernels", "version": __version__, "command": command,
                   "created": datetime.datetime.now().isoformat(timespec="seconds")}, f)
        f.write("\n")
    os.replace(tmp, p)


def clear(out_dir: str) -> None:
    """Delete everything in a folder of ours except the lock files (the caller holds one)."""
    if ownership(out_dir) not in ("ours", "empty"):
        raise UsageError(f"refusing to delete {out_dir!r}: it was not created by vgkernels (no {MARKER})")
    for e in _entries(out_dir):
        p = os.path.join(out_dir, e)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


def claim(out_dir: str, command: str, *, overwrite: bool = False, rank: int = 0, what: str = "--out") -> OutputLock:
    """Check, create, lock and mark an output folder; with ``overwrite``, empty it first.

    Refused folders are left untouched (no lock file, no marker). Returns the held
    :class:`OutputLock`; the caller releases it when the run ends.
    """
    out_dir = os.fspath(out_dir)
    check_usable(out_dir, overwrite=overwrite, what=what)
    os.makedirs(out_dir, exist_ok=True)
    lock = OutputLock(out_dir, rank).acquire()
    try:
        check_usable(out_dir, overwrite=overwrite, what=what)  # again, now that no one else can write
        if overwrite:
            clear(out_dir)
        write_marker(out_dir, command)
    except BaseException:
        lock.release()
        raise
    return lock


__all__ = ["MARKER", "LOCK", "OutputLock", "OutputLocked", "claim", "check_usable", "clear", "ownership",
           "read_holder", "write_marker", "lock_name"]
