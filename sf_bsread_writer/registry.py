"""Which buffers and writers run on this host: one small JSON file per process in a runtime directory.

Each buffer and writer registers itself once it serves (its READY line) and
removes its entry when it ends; ``sf_bsread_ctl ls`` reads the directory. An
entry of a process that died without cleaning up (``kill -9``, a crash) is
*stale*: readers recognise it by its pid and ignore it (and the next process
of the same kind and name replaces it).

The directory, first that applies: ``$SF_BSREAD_RUNTIME_DIR``; systemd's
``$RUNTIME_DIRECTORY`` (``RuntimeDirectory=sf_bsread_writer`` in the units);
``/run/sf_bsread_writer`` when it exists and is writable; else per user:
``$XDG_RUNTIME_DIR/sf_bsread_writer`` or ``/tmp/sf_bsread_writer-<uid>``.
Registering never fails a service: a directory that cannot be written is
logged once and the service runs unlisted.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import process

__all__ = ["Entry", "runtime_directory", "register", "unregister", "entries"]

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Entry:
    """One registered process: ``kind`` buffer|writer, its name, pid, start time and addresses."""

    kind: str
    name: str
    pid: int
    started: float
    endpoints: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)  # writer: output file, buffer; buffer: stream
    path: str = ""

    @property
    def alive(self) -> bool:
        return process.pid_alive(self.pid)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "pid": self.pid, "started": self.started,
                "endpoints": dict(self.endpoints), "details": dict(self.details)}


def runtime_directory(environ: Mapping[str, str] | None = None) -> Path:
    """The registry directory for this user (see the module docstring); not created here."""
    environ = os.environ if environ is None else environ
    if environ.get("SF_BSREAD_RUNTIME_DIR"):
        return Path(environ["SF_BSREAD_RUNTIME_DIR"])
    if environ.get("RUNTIME_DIRECTORY"):  # systemd: may list several, colon separated
        return Path(environ["RUNTIME_DIRECTORY"].split(":")[0])
    system = Path("/run/sf_bsread_writer")
    if system.is_dir() and os.access(system, os.W_OK | os.X_OK):
        return system
    if environ.get("XDG_RUNTIME_DIR"):
        return Path(environ["XDG_RUNTIME_DIR"]) / "sf_bsread_writer"
    return Path(tempfile.gettempdir()) / f"sf_bsread_writer-{os.getuid()}"


def register(kind: str, name: str, endpoints: Mapping[str, Any], details: Mapping[str, Any] | None = None,
             directory: Path | None = None, now: float | None = None) -> Path | None:
    """Write this process's entry (atomically); returns its path, None when it could not be written."""
    directory = directory or runtime_directory()
    entry = Entry(kind, name, os.getpid(), time.time() if now is None else now, dict(endpoints), dict(details or {}))
    path = directory / f"{kind}-{_SAFE.sub('_', name)[:64]}-{entry.pid}.json"
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)  # readable: operators run sf_bsread_ctl
        _check_directory(directory, writing=True)
        for old in directory.glob(f"{kind}-{_SAFE.sub('_', name)[:64]}-*.json"):
            _remove_if_stale(old)
        # A new file of our own (mkstemp never follows or reuses a planted name), renamed into place.
        handle, temporary = tempfile.mkstemp(prefix=".entry-", suffix=".tmp", dir=directory)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(json.dumps(entry.to_json()))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
        return path
    except OSError as error:
        logger.warning("not listed for sf_bsread_ctl: cannot write %s: %s", path, error)
        return None


def _check_directory(directory: Path, writing: bool = False) -> None:
    """Refuse (OSError) a directory somebody else could have planted entries or links in.

    Always: a real directory (no symlink) that nobody but its owner can write to. To write into
    it, or when it is the per-user fallback in a shared temporary directory (which another user
    could create first, with entries pointing ``sf_bsread_ctl write`` at their endpoint): ours
    (or root's). The systemd runtime directory of the service user is readable by operators.
    """
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{directory} is not a directory")
    if info.st_mode & 0o022:
        raise OSError(f"{directory} is writable by others")
    per_user_fallback = directory.parent == Path(tempfile.gettempdir()) and directory.name.startswith(
        "sf_bsread_writer-")
    if (writing or per_user_fallback) and info.st_uid not in (os.getuid(), 0):
        raise OSError(f"{directory} belongs to uid {info.st_uid}, not to us")


def unregister(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


def entries(directory: Path | None = None, include_stale: bool = False) -> list[Entry]:
    """Every readable entry, oldest first; stale ones (process gone) only with ``include_stale``."""
    directory = directory or runtime_directory()
    found = []
    try:
        _check_directory(directory)
    except OSError:
        return []  # missing, or not trustworthy (see _check_directory): nothing listed from it
    for path in sorted(directory.glob("*.json")):
        entry = _read(path)
        if entry is not None and (include_stale or entry.alive):
            found.append(entry)
    return sorted(found, key=lambda entry: entry.started)


def _read(path: Path) -> Entry | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return Entry(str(document["kind"]), str(document["name"]), int(document["pid"]),
                     float(document["started"]), dict(document.get("endpoints") or {}),
                     dict(document.get("details") or {}), str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # half-written by another process, or not ours: not an entry


def _remove_if_stale(path: Path) -> None:
    entry = _read(path)
    if entry is not None and not entry.alive:
        unregister(path)


def by_kind(found: Iterable[Entry], kind: str) -> list[Entry]:
    return [entry for entry in found if entry.kind == kind]
