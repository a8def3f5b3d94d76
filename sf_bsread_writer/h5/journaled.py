"""The output file as HDF5 writes it: every in-place overwrite saved to the undo journal first.

:class:`JournaledFile` is the file object h5py's ``fileobj`` driver calls
(``seek``/``tell``/``readinto``/``write``/``truncate``/``flush``) for the
output file: positional I/O on the real descriptor, and before a write
replaces bytes that existed at the last :meth:`~JournaledFile.commit`, a
record with those bytes is appended to the journal (``h5.journal`` has the
format and why). :func:`undo` applies a journal (the guardian, ``sf_bsread_ctl
repair``); :func:`repair` does it by path.

Only ``os`` and the pure ``h5.journal`` are imported: the guardian process
runs :func:`undo` and must start fast and small.
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the guardian imports this module: nothing it does not need at run time
    from collections.abc import Callable

from sf_bsread_writer.h5.journal import HEADER_SIZE, UndoPlan, encode_header, encode_record, journal_name, plan_undo

__all__ = ["JournaledFile", "JournalInUse", "undo", "repair", "journal_path", "lock_journal"]

_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


class JournalInUse(OSError):
    """The journal is locked: its writer (or the guardian that holds it after the writer's end) is alive."""


def lock_journal(journal_fd: int) -> None:
    """Take the journal's lock (JournalInUse if taken): held by the writer, and by its guardian with the same
    open file (passed over the socket), so that ``repair`` never undoes a journal that is in use."""
    try:
        fcntl.flock(journal_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JournalInUse(11, "the journal is in use by a running writer or its guardian") from None


class JournaledFile:
    """A file h5py writes through: positional I/O on ``fd``; overwrites of committed bytes journaled first.

    ``fd``: the output file, open for reading and writing (this object
    owns it from now on: :meth:`close`). Without a journal
    (:meth:`start_journal` not called) it only passes the writes through.
    The file never shrinks while it is written: HDF5 asks to cut it to its
    end of allocation at every flush, and bytes cut there would have no
    before-image; a longer file opens as well. :meth:`finish` applies the
    last size asked for.

    Not thread safe: HDF5 calls it under h5py's lock, from the file's owner.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._position = 0
        self._size = os.fstat(fd).st_size  # the file's real length (never shrunk while written)
        self._wanted_size = self._size  # what HDF5 last made it (truncate), or longer by writes since
        self._committed = 0  # bytes below this are journaled before they are overwritten
        self._journal_fd = -1
        self._journal_size = 0
        self._journaled: set[tuple[int, int]] = set()  # (offset, length) saved since the commit
        self.journal_bytes_at_commit = 0  # the journal's size when it was last committed (for space bounds)
        self.writes = 0
        # Called when a write finds no room: True if it made some (the owner's spare reserve given back),
        # then the write is tried again. An exception raised here reaches HDF5 through h5py's driver,
        # which then goes on calling this object with the exception still set (a SystemError caused by it):
        # the spare keeps that for the case where even it is not enough.
        self.on_full: Callable[[], bool] | None = None

    # -- the journal -------------------------------------------------------
    def set_journal(self, journal_fd: int) -> None:
        """Journal into ``journal_fd`` (an empty file; owned from now on) from the first :meth:`commit` on.

        Until then it stays empty: a journal without a header undoes
        nothing (the file is not at its name yet, see h5/placement.py).
        """
        self._journal_fd = journal_fd

    def end_journal(self) -> None:
        """The file is closed whole: empty the journal (it undoes nothing from now on), journal no more."""
        if self._journal_fd >= 0:
            os.ftruncate(self._journal_fd, 0)
        self._journal_size = 0
        self._committed = 0
        self._journaled.clear()

    @property
    def journal_fd(self) -> int:
        return self._journal_fd

    @property
    def journal_size(self) -> int:
        """Bytes in the journal now (header and records since the last commit)."""
        return self._journal_size

    def commit(self) -> None:
        """The file as it is now is the state to come back to (call after ``H5Fflush`` returned).

        The journal is emptied first, then gets its new header: a kill in
        between leaves a journal with no header, which undoes nothing (the
        file is whole: the flush had returned).
        """
        if self._journal_fd < 0:
            return
        self.journal_bytes_at_commit = self._journal_size
        os.ftruncate(self._journal_fd, 0)
        header = encode_header(self._size)
        os.pwrite(self._journal_fd, header, 0)
        self._journal_size = len(header)
        self._committed = self._size
        self._journaled.clear()

    def _save(self, offset: int, length: int) -> None:
        key = (offset, length)
        if key in self._journaled:  # this region's committed bytes are saved already
            return
        before = os.pread(self.fd, length, offset)
        record = encode_record(offset, before)
        # Whole before the write it protects; a record torn by a kill belongs to a write that never happened.
        self._journal_size += self._write_all(self._journal_fd, record, self._journal_size)
        self._journaled.add(key)

    def _write_all(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """``pwrite`` all of ``data`` (short writes continued); no room: :attr:`on_full`, then once more."""
        length = len(data)
        done = 0
        while done < length:
            try:
                done += os.pwrite(fd, data[done:] if done else data, offset + done)
            except OSError as error:
                if error.errno not in _NO_ROOM or self.on_full is None or not self.on_full():
                    raise
        return length

    # -- the file object h5py's fileobj driver calls ------------------------
    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._position = offset
        elif whence == 2:
            self._position = self._wanted_size + offset
        else:
            self._position += offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        """Present for h5py, which takes an object with ``read`` and ``seek`` for a file (it calls readinto)."""
        size = max(0, self._wanted_size - self._position) if size < 0 else size
        data = os.pread(self.fd, size, self._position)
        self._position += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        position, wanted = self._position, len(buffer)
        done = os.preadv(self.fd, [buffer], position)
        if done < wanted:  # past the end: HDF5 reads zeros there (sec2 does the same)
            buffer[done:] = bytes(wanted - done)
        self._position = position + wanted
        return wanted

    def write(self, data: memoryview) -> int:
        position = self._position
        length = len(data)
        self.writes += 1
        if position < self._committed:
            self._save(position, min(length, self._committed - position))
        self._write_all(self.fd, data, position)
        end = position + length
        self._position = end
        if end > self._size:
            self._size = end
        if end > self._wanted_size:
            self._wanted_size = end
        return length

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if size > self._size:
            os.ftruncate(self.fd, size)
            self._size = size
        self._wanted_size = size  # a shrink waits for finish(): see the class docstring
        return size

    def flush(self) -> None:
        """Nothing to do: every write went to the kernel at once (a SIGKILL keeps it)."""

    # -- the end ------------------------------------------------------------
    def finish(self) -> None:
        """After HDF5 closed the file: cut it to the size HDF5 left it at, close, remove nothing."""
        if self.fd >= 0 and self._wanted_size < self._size:
            os.ftruncate(self.fd, self._wanted_size)
            self._size = self._wanted_size

    def close(self) -> None:
        """Close the file and the journal descriptors (the journal's name is the owner's to remove)."""
        for fd in (self.fd, self._journal_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._journal_fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0


def journal_path(path: str | os.PathLike) -> str:
    """The journal beside the output file ``path``."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, journal_name(name))


def undo(file_fd: int, journal_fd: int) -> UndoPlan:
    """Apply the journal ``journal_fd`` to the file ``file_fd``: committed bytes back, cut, fsync.

    Returns what was done. The caller removes the journal's name after
    this returned (a second undo of the same journal does the same again).
    ``file_fd`` -1: the file is gone (never named): nothing to apply.
    """
    size = os.fstat(journal_fd).st_size
    content = os.pread(journal_fd, size, 0) if size else b""
    plan = plan_undo(content)
    if file_fd < 0 or plan.committed_size is None:
        return plan
    for restore in plan.restores:
        os.pwrite(file_fd, restore.data, restore.offset)
    if os.fstat(file_fd).st_size > plan.committed_size:
        os.ftruncate(file_fd, plan.committed_size)
    os.fsync(file_fd)
    return plan


def repair(path: str | os.PathLike) -> UndoPlan | None:
    """Undo the journal beside ``path`` and remove it: the file as of its last completed flush.

    None if there is no journal (nothing to do). For ``sf_bsread_ctl
    repair``, after a writer and its guardian were both killed;
    JournalInUse while either is alive (the guardian does it then). A file
    that does not exist (killed before it got its name) only loses its
    journal.
    """
    journal = journal_path(path)
    try:
        journal_fd = os.open(journal, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            lock_journal(journal_fd)
        except JournalInUse as error:
            raise JournalInUse(error.errno, f"{journal}: {error.strerror}; it is applied when they end") from None
        try:
            file_fd = os.open(os.fspath(path), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            file_fd = -1
        try:
            plan = undo(file_fd, journal_fd)
        finally:
            if file_fd >= 0:
                os.close(file_fd)
        os.unlink(journal)  # still locked: nobody else applies it meanwhile
    finally:
        os.close(journal_fd)
    return plan
