"""The guardian: a small process beside each writer process that undoes the journals of a writer that died.

A SIGKILL gives the writer no chance to do anything, so the undo of a file
killed mid-flush (``h5.journal``) must be done by another process. The
guardian holds one end of a socket pair whose other end only the writer
holds; for every output file the writer sends ``watch`` with the file's
descriptors (the pinned directory, the file, its journal: passed with
``SCM_RIGHTS``, so the guardian works on the very files the writer opened,
whatever happens to their names) and ``done`` once the file is closed and
its journal removed. When the socket reads end-of-file the writer has
ended, however it ended: every journal still watched is undone
(``h5.journaled.undo``), its name removed, what was done logged to stderr
(the writer's log), and the guardian exits.

One guardian per writer process, started on first use
(:func:`watch`) through ``process.start_child`` (its own session,
``dies_with_parent=False``: it must outlive the writer), as the user the
writer runs as. A writer that drops its privileges starts it before the
drop (:func:`start`, ``run_as``): after it, the interpreter itself may not
be readable (a pyenv Python under a 0700 /root), so the guardian is
started by root and switches to the writer's user as its first act. It ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C or a
``kill`` of the process group must not stop it before the writer's end),
runs ``python -I -S`` and imports nothing of the package from disk: the
writer hands it the source of the three modules it needs (this one,
``h5.journaled``, ``h5.journal``; read when the writer imported them,
before it dropped its privileges) as the first message, so that a
checkout the writer's user cannot read does not matter, and it starts in
tens of milliseconds with a few MB of memory.
"""
from __future__ import annotations

import os
import signal
import socket
import sys

__all__ = ["Guardian", "start", "watch", "done", "guardian_pid", "main", "GUARDIAN_TAG"]

GUARDIAN_TAG = "sf_bsread_writer-guardian"  # in its command line, for ps
_MODULES = ("sf_bsread_writer.h5.journal", "sf_bsread_writer.h5.journaled", "sf_bsread_writer.h5.guardian")
_MESSAGE_BYTES = 64 * 1024
_FDS_PER_WATCH = 3

# The guardian's whole program before it has the package: ignore the stop signals first, then build the three
# modules from the sources of the first message (package stubs above them), switch user if asked (only now: the
# standard library they import may be out of that user's reach) and run main().
_BOOT = f"""
import os, signal, socket, sys, types
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, signal.SIG_IGN)
channel = socket.socket(fileno=int(sys.argv[1]))
parts = channel.recv({4 * 1024 * 1024}).split(b"\\0")
for package in ("sf_bsread_writer", "sf_bsread_writer.h5"):
    stub = sys.modules[package] = types.ModuleType(package)
    stub.__path__, stub.GUARDIAN_BOOT = [], True
for name, source in zip(parts[0::2], parts[1::2]):
    module = sys.modules[name.decode()] = types.ModuleType(name.decode())
    exec(compile(source, "<" + name.decode() + ">", "exec"), module.__dict__)
if len(sys.argv) > 3:  # started by root for a writer that drops its privileges: everything imported, now switch
    os.setgroups([int(group) for group in sys.argv[5].split(",") if group])
    os.setgid(int(sys.argv[4]))
    os.setuid(int(sys.argv[3]))
sys.exit(sys.modules["sf_bsread_writer.h5.guardian"].main(channel))
"""


def _sources() -> bytes | None:
    """The three modules' sources, joined for the first message (None if one has no source: run it from disk)."""
    import importlib.util

    parts: list[bytes] = []
    for name in _MODULES:
        spec = importlib.util.find_spec(name)
        source = spec.loader.get_source(name) if spec is not None and spec.loader is not None else None
        if source is None or "\0" in source:
            return None
        parts += [name.encode(), source.encode("utf-8")]
    return b"\0".join(parts)


# Read at import, in the writer (before any privilege drop); not in the guardian, where they came in a message.
_SOURCES = None if getattr(sys.modules.get("sf_bsread_writer.h5"), "GUARDIAN_BOOT", False) else _sources()


class _Watched:
    """One watched journal: its key, names (for the log) and descriptors (directory, file, journal)."""

    __slots__ = ("key", "journal_name", "path", "fds")

    def __init__(self, key: int, journal_name: str, path: str, fds: list[int]) -> None:
        self.key, self.journal_name, self.path, self.fds = key, journal_name, path, fds

    def message(self) -> bytes:
        return f"watch {self.key}\n{self.journal_name}\n{self.path}".encode("utf-8", "surrogateescape")


class Guardian:
    """The writer's side: starts the guardian on first use, tells it which journals to watch.

    Thread safe (writers may open files from several threads). A guardian
    that is gone (killed) is started again at the next message, and told
    every journal still watched.
    """

    def __init__(self) -> None:
        import threading  # the writer's side only: the guardian process never needs it

        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._child = None
        self._pid = -1
        self._next_key = 0
        self._watched: dict[int, _Watched] = {}

    @property
    def pid(self) -> int | None:
        """The guardian process's pid (None before the first watch)."""
        return self._child.pid if self._child is not None and self._pid == os.getpid() else None

    def start(self, run_as: tuple[int, int, list[int]] | None = None) -> None:
        """Start the guardian now if none runs; ``run_as`` (uid, gid, groups): it switches to that user first."""
        with self._lock:
            if self._socket is None or self._pid != os.getpid():
                self._start(run_as)

    def watch(self, directory_fd: int, file_fd: int, journal_fd: int, journal_name: str, path: str) -> int:
        """Undo ``journal_fd`` into ``file_fd`` if this process ends before :meth:`done`; returns the key for done.

        The descriptors are duplicated into the guardian: the caller keeps
        (and closes) its own.
        """
        with self._lock:
            self._next_key += 1
            entry = _Watched(self._next_key, journal_name, path, [directory_fd, file_fd, journal_fd])
            self._send(entry)
            self._watched[entry.key] = entry
            return entry.key

    def done(self, key: int) -> None:
        """The file of ``key`` is closed and its journal removed: nothing to undo any more."""
        with self._lock:
            if self._watched.pop(key, None) is None or self._socket is None:
                return
            try:
                self._socket.send(f"done {key}".encode())
            except OSError:
                self._drop()  # gone: the next watch starts a new one, told what is still watched

    def _send(self, entry: _Watched) -> None:
        for attempt in (1, 2):
            if self._socket is None or self._pid != os.getpid():
                self._start()
            try:
                socket.send_fds(self._socket, [entry.message()], entry.fds)
                return
            except OSError:
                if attempt == 2:
                    raise
                self._drop()

    def _start(self, run_as: tuple[int, int, list[int]] | None = None) -> None:
        import subprocess

        from sf_bsread_writer import process  # the package's one way to start a child

        if self._child is not None and self._pid == os.getpid():
            self._child.poll()  # reaped, if it died
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if _SOURCES is not None:
                argv = [sys.executable, "-I", "-S", "-c", _BOOT, str(theirs.fileno()), GUARDIAN_TAG]
                if run_as is not None:
                    uid, gid, groups = run_as
                    argv += [str(uid), str(gid), ",".join(map(str, groups))]
            else:
                argv = [sys.executable, "-m", "sf_bsread_writer.h5.guardian", str(theirs.fileno()), GUARDIAN_TAG]
            # stdout nowhere (a pipe read by whoever started the writer must not wait for it), stderr: the log.
            child = process.start_child(argv, pass_fds=[theirs.fileno()], stdout=subprocess.DEVNULL,
                                        dies_with_parent=False)
        finally:
            theirs.close()
        if _SOURCES is not None:
            ours.send(_SOURCES)
        self._socket, self._child, self._pid = ours, child, os.getpid()
        for entry in self._watched.values():  # a guardian started again: everything still open
            socket.send_fds(ours, [entry.message()], entry.fds)

    def _drop(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None


_GUARDIAN: Guardian | None = None  # this process's, made on first use (never in the guardian itself)


def _guardian() -> Guardian:
    global _GUARDIAN
    if _GUARDIAN is None:
        _GUARDIAN = Guardian()
    return _GUARDIAN


def start(run_as: tuple[int, int, list[int]] | None = None) -> None:
    """:meth:`Guardian.start` of this process's guardian."""
    _guardian().start(run_as)


def watch(directory_fd: int, file_fd: int, journal_fd: int, journal_name: str, path: str) -> int:
    """:meth:`Guardian.watch` of this process's guardian."""
    return _guardian().watch(directory_fd, file_fd, journal_fd, journal_name, path)


def done(key: int) -> None:
    """:meth:`Guardian.done` of this process's guardian."""
    _guardian().done(key)


def guardian_pid() -> int | None:
    """This process's guardian (None if none was started): for tests and the log."""
    return _guardian().pid


# ----------------------------------------------------------------------- the guardian process

def _log(text: str) -> None:
    try:  # one write: a whole line in a log other processes write to
        os.write(2, f"{GUARDIAN_TAG}[{os.getpid()}]: {text}\n".encode("utf-8", "replace"))
    except OSError:
        pass  # no log: the undo matters, not its line


def _undo_one(entry: _Watched) -> None:
    from sf_bsread_writer.h5.journaled import undo

    directory_fd, file_fd, journal_fd = entry.fds
    try:
        plan = undo(file_fd, journal_fd)
    except OSError as error:
        _log(f"{entry.path}: the journal {entry.journal_name} could not be applied ({error}); it is left for "
             f"`sf_bsread_ctl repair {entry.path}`")
        return
    try:
        named = os.stat(entry.journal_name, dir_fd=directory_fd, follow_symlinks=False)
        held = os.fstat(journal_fd)
        if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            os.unlink(entry.journal_name, dir_fd=directory_fd)
    except FileNotFoundError:
        pass
    except OSError as error:
        _log(f"{entry.path}: undone, but its journal {entry.journal_name} could not be removed: {error}")
    if plan.committed_size is not None:
        _log(f"{entry.path}: the writer ended while writing it; back to its last completed flush: {plan.describe()}")


def main(channel: socket.socket | None = None) -> int:
    """The guardian: watch until the writer's end of ``channel`` is closed, then undo what is still watched."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    if channel is None:  # run from disk (python -m): the descriptor is the first argument
        channel = socket.socket(fileno=int(sys.argv[1]))
    watched: dict[int, _Watched] = {}
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(channel, _MESSAGE_BYTES, _FDS_PER_WATCH)
        except OSError as error:
            _log(f"reading the writer's messages failed ({error}): undoing what is watched")
            break
        if not message and not fds:
            break  # end of file: the writer is gone
        words = message.decode("utf-8", "surrogateescape").split("\n")
        command, _, key_text = words[0].partition(" ")
        try:
            key = int(key_text)
        except ValueError:
            key = -1
        if command == "watch" and len(words) == 3 and len(fds) == _FDS_PER_WATCH and key >= 0:
            watched[key] = _Watched(key, words[1], words[2], list(fds))
            continue
        for fd in fds:  # a message of no known form: its descriptors are not kept
            os.close(fd)
        if command == "done" and key in watched:
            for fd in watched.pop(key).fds:
                os.close(fd)
        elif command != "done":
            _log(f"a message of no known form ignored: {message[:80]!r}")
    for entry in watched.values():
        _undo_one(entry)
        for fd in entry.fds:
            os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
