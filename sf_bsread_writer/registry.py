"""Which buffers and writers run on this host: one small JSON file per process in a runtime directory.

Each buffer and writer registers itself once it serves (its READY line) and
removes its entry when it ends; ``sf_bsread_ctl ls`` reads the directory. An
entry of a process that died without cleaning up (``kill -9``, a crash) is
*stale*: readers recognise it and ignore it (and the next process of the
same kind and name replaces it). A pid alone does not say that: pids are
reused, so an entry also records its process's start time (``pid_start``,
field 22 of ``/proc/PID/stat``) and is alive only while a process with that
pid *and* that start time exists. A pid below 1 is never alive (``kill(0)``
would ask about our own process group).

Where an entry is written, first that applies: ``$SF_BSREAD_RUNTIME_DIR``;
systemd's ``$RUNTIME_DIRECTORY`` (``RuntimeDirectory=sf_bsread_writer`` in the
units); ``/run/sf_bsread_writer`` when it exists and is writable; else per
user: ``$XDG_RUNTIME_DIR/sf_bsread_writer`` or ``/tmp/sf_bsread_writer-<uid>``.
Registering never fails a service: a directory that cannot be written is
logged once and the service runs unlisted.

Where entries are read (:func:`runtime_directories`): ``$SF_BSREAD_RUNTIME_DIR``
alone when set; else every directory above that exists and is readable, so an
operator who is not the systemd service user sees the system's buffers (in
``/run/sf_bsread_writer``) and their own (in ``$XDG_RUNTIME_DIR``) together.

Every file is untrusted input (any user may have written the per-user
directory's neighbours, a crash may leave half a file): :func:`scan` reads at
most :data:`MAX_ENTRY_BYTES` of a regular file, validates every field's type
and range, and returns what it could not use as :class:`Skipped` (path and
reason) beside the entries, so one bad file never hides the good ones.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sf_bsread_writer import process

__all__ = ["Entry", "Skipped", "Listing", "runtime_directory", "runtime_directories", "register", "unregister",
           "entries", "scan", "process_start", "SYSTEM_DIRECTORY", "MAX_ENTRY_BYTES"]

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
SYSTEM_DIRECTORY = Path("/run/sf_bsread_writer")
#: An entry is a few hundred bytes; anything longer is not one (and is not read to its end).
MAX_ENTRY_BYTES = 64 * 1024
#: Pids are positive and below 2**22 on Linux (pid_max); 2**31 leaves room for any kernel.
MAX_PID = 2**31 - 1


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None if unknown.

    Together with the pid this names one process: a reused pid has a later start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read(4096)
        # The command name (field 2) may hold spaces and parentheses: the fields after its last ')'.
        return int(text.rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


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
    pid_start: int | None = None  # process_start(pid) at registration; None: written by an older version

    @property
    def alive(self) -> bool:
        """This very process still runs: its pid exists and (when recorded) started when it did then."""
        if not 1 <= self.pid <= MAX_PID:
            return False
        if self.pid_start is not None:
            return process_start(self.pid) == self.pid_start  # None when gone (or /proc unreadable)
        return process.pid_alive(self.pid)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "pid": self.pid, "pid_start": self.pid_start,
                "started": self.started, "endpoints": dict(self.endpoints), "details": dict(self.details)}


@dataclass(frozen=True)
class Skipped:
    """A file in a registry directory that is not an entry, and why (shown by ``sf_bsread_ctl ls``)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Listing:
    """What :func:`scan` found: the entries (oldest first), the files it skipped, the directories read."""

    entries: list[Entry]
    skipped: list[Skipped]
    directories: list[Path]


def runtime_directory(environ: Mapping[str, str] | None = None, system: Path = SYSTEM_DIRECTORY) -> Path:
    """The directory this process registers in (see the module docstring); not created here."""
    environ = os.environ if environ is None else environ
    if environ.get("SF_BSREAD_RUNTIME_DIR"):
        return Path(environ["SF_BSREAD_RUNTIME_DIR"])
    if environ.get("RUNTIME_DIRECTORY"):  # systemd: may list several, colon separated
        return Path(environ["RUNTIME_DIRECTORY"].split(":")[0])
    if system.is_dir() and os.access(system, os.W_OK | os.X_OK):
        return system
    return _user_directory(environ)


def _user_directory(environ: Mapping[str, str]) -> Path:
    if environ.get("XDG_RUNTIME_DIR"):
        return Path(environ["XDG_RUNTIME_DIR"]) / "sf_bsread_writer"
    return Path(tempfile.gettempdir()) / f"sf_bsread_writer-{os.getuid()}"


def runtime_directories(environ: Mapping[str, str] | None = None, system: Path = SYSTEM_DIRECTORY) -> list[Path]:
    """Every directory ``ls`` reads: ``$SF_BSREAD_RUNTIME_DIR`` alone when set; else systemd's
    ``$RUNTIME_DIRECTORY``, the system directory when it exists and is readable, and this user's."""
    environ = os.environ if environ is None else environ
    if environ.get("SF_BSREAD_RUNTIME_DIR"):
        return [Path(environ["SF_BSREAD_RUNTIME_DIR"])]
    found = []
    if environ.get("RUNTIME_DIRECTORY"):
        found.append(Path(environ["RUNTIME_DIRECTORY"].split(":")[0]))
    if system.is_dir() and os.access(system, os.R_OK | os.X_OK):
        found.append(system)
    found.append(_user_directory(environ))
    return list(dict.fromkeys(found))


def register(kind: str, name: str, endpoints: Mapping[str, Any], details: Mapping[str, Any] | None = None,
             directory: Path | None = None, now: float | None = None) -> Path | None:
    """Write this process's entry (atomically); returns its path, None when it could not be written."""
    directory = directory or runtime_directory()
    pid = os.getpid()
    entry = Entry(kind, name, pid, time.time() if now is None else now, dict(endpoints), dict(details or {}),
                  pid_start=process_start(pid))
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
    """Every valid entry, oldest first; stale ones (process gone) only with ``include_stale``.

    ``directory``: that one only; default: every directory of :func:`runtime_directories`.
    """
    return scan([directory] if directory is not None else None, include_stale).entries


def scan(directories: Iterable[Path] | None = None, include_stale: bool = False) -> Listing:
    """Entries of every directory (oldest first) and the files that are not entries, with the reason."""
    directories = list(runtime_directories() if directories is None else directories)
    found: list[Entry] = []
    skipped: list[Skipped] = []
    for directory in directories:
        try:
            _check_directory(directory)
        except OSError:
            continue  # missing, or not trustworthy (see _check_directory): nothing listed from it
        for path in sorted(directory.glob("*.json")):
            try:
                entry = _read(path)
            except _NotAnEntry as error:
                skipped.append(Skipped(str(path), str(error)))
                continue
            if include_stale or entry.alive:
                found.append(entry)
    return Listing(sorted(found, key=lambda entry: entry.started), skipped, directories)


class _NotAnEntry(ValueError):
    """A registry file that is not a valid entry; the message says why."""


def _read_bounded(path: Path) -> bytes:
    """At most MAX_ENTRY_BYTES of a regular file: never a FIFO (would block), a device or a directory,
    never through a symlink (could point anywhere, /dev/zero never ends)."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise _NotAnEntry(f"cannot open: {error.strerror or error}") from None
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise _NotAnEntry("not a regular file")
        data = os.read(handle, MAX_ENTRY_BYTES + 1)
    except OSError as error:
        raise _NotAnEntry(f"cannot read: {error.strerror or error}") from None
    finally:
        os.close(handle)
    if len(data) > MAX_ENTRY_BYTES:
        raise _NotAnEntry(f"longer than {MAX_ENTRY_BYTES} bytes")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _read(path: Path) -> Entry:
    """The entry in ``path``; _NotAnEntry (with the reason) for anything else."""
    data = _read_bounded(path)
    try:
        document = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise _NotAnEntry("JSON nested too deeply") from None
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _NotAnEntry(f"not JSON: {str(error)[:80]}") from None
    if not isinstance(document, dict):
        raise _NotAnEntry("not a JSON object")

    def field_of(key: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
        if key not in document and default is not ...:
            return default
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _NotAnEntry(f"{key!r} is {type(value).__name__}, not {' or '.join(k.__name__ for k in kinds)}")
        return value

    kind, name = field_of("kind", (str,)), field_of("name", (str,))
    pid = field_of("pid", (int,))
    if not 1 <= pid <= MAX_PID:
        raise _NotAnEntry(f"pid {pid} is not a process id")
    pid_start = field_of("pid_start", (int, type(None)), None)
    started = float(field_of("started", (int, float)))
    if not math.isfinite(started):
        raise _NotAnEntry("'started' is not a finite time")
    endpoints = field_of("endpoints", (dict, type(None)), None) or {}
    if not all(isinstance(value, (str, type(None))) for value in endpoints.values()):
        raise _NotAnEntry("an endpoint is not an address (text)")
    details = field_of("details", (dict, type(None)), None) or {}
    return Entry(kind, name, pid, started, endpoints, details, str(path), pid_start)


def _remove_if_stale(path: Path) -> None:
    try:
        entry = _read(path)
    except _NotAnEntry:
        return  # not ours to judge: left as it is
    if not entry.alive:
        unregister(path)


def by_kind(found: Iterable[Entry], kind: str) -> list[Entry]:
    return [entry for entry in found if entry.kind == kind]
