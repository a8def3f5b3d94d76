"""The output file as HDF5 writes it: every in-place overwrite saved to the undo journal first.

:class:`JournaledFile` is the file object h5py's ``fileobj`` driver calls
(``seek``/``tell``/``readinto``/``write``/``truncate``/``flush``) for the
output file: positional I/O on the real descriptor, and before a write
replaces bytes that existed at the last :meth:`~JournaledFile.commit`, a
record with those bytes is appended to the journal (``h5.journal`` has the
format and why). :func:`undo` applies a journal (the guardian, ``sf_bsread_ctl
repair``); :func:`repair` does it by path.

Only ``os``, the pure ``h5.journal`` and the small compiled core
(``_journaledio.c``: ``seek``/``tell``/``readinto``/``write`` with the
journaling, one C call per HDF5 I/O; the Python core here is its fallback)
are imported: the guardian process runs :func:`undo` and must start fast
and small.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from sf_bsread_writer.h5.journal import (RECORD_HEADER_SIZE, UndoPlan, encode_header, journal_name, plan_undo,
                                         record_checksum, record_seed)

_RECORD = struct.Struct("<QQI")  # h5.journal's record header, packed here in place

__all__ = ["JournaledFile", "PythonJournaledFile", "IMPLEMENTATION", "IMPLEMENTATIONS",
           "FALLBACK_REASON", "JournalInUse", "undo", "repair", "journal_path", "lock_journal"]

#: The errors of a write that found no room, for which ``on_full`` may make some.
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class JournalInUse(OSError):
    """The journal is locked: its writer (or the guardian that holds it after the writer's end) is alive."""


def lock_journal(journal_fd: int) -> None:
    """Take the journal's lock (JournalInUse if taken): held by the writer, and by its guardian with the same
    open file (passed over the socket), so that ``repair`` never undoes a journal that is in use."""
    try:
        fcntl.flock(journal_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JournalInUse(11, "the journal is in use by a running writer or its guardian") from None


class _PythonCore:
    """seek, tell, readinto and write of :class:`JournaledFile` in Python: the fallback of ``_journaledio.c``.

    The state is JournaledFile's (its ``__init__``); both cores keep it
    under the same names.
    """

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

    def readinto(self, buffer: memoryview) -> int:
        position, wanted = self._position, len(buffer)
        done = os.preadv(self.fd, [buffer], position)
        if done < wanted:  # past the end: HDF5 reads zeros there (sec2 does the same)
            buffer[done:] = bytes(wanted - done)
        self._position = position + wanted
        if position < self._committed and self._read_images_bytes < self._read_images_limit:
            # Bytes as they are since the commit: the before-image of a write there (HDF5 reads metadata,
            # changes it, writes it back; the class docstring says why any copy since the commit will do).
            image = bytes(buffer[:min(wanted, self._committed - position)])
            if len(self._read_images.get(position, b"")) < len(image):
                self._read_images[position] = image
                self._read_images_bytes += len(image)
        return wanted

    def write(self, data: memoryview) -> int:
        position = self._position
        length = len(data)
        self.writes += 1
        if position < self._committed:
            self._save(position, min(length, self._committed - position))
        try:
            self._pwrite_all(data, position)
        except OSError as error:  # no room: the owner may give some (on_full), then once more
            if error.errno not in NO_ROOM_ERRNOS or self.on_full is None or not self.on_full():
                raise
            self._pwrite_all(data, position)
        end = position + length
        self._position = end
        if end > self._size:
            self._size = end
        if end > self._wanted_size:
            self._wanted_size = end
        return length

    def _pwrite_all(self, data: memoryview, position: int) -> None:
        done = os.pwrite(self.fd, data, position)
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], position + done)

    def _save(self, offset: int, length: int) -> None:
        if self._journaled.get(offset, -1) >= length:  # this region's committed bytes are saved already
            return
        record = bytearray(RECORD_HEADER_SIZE + length)
        image = self._read_images.get(offset)
        if image is not None and len(image) >= length:
            record[RECORD_HEADER_SIZE:] = image if len(image) == length else image[:length]
        else:
            with memoryview(record) as view:
                os.preadv(self.fd, [view[RECORD_HEADER_SIZE:]], offset)  # short past the end: zeros stay
            self.before_images_read += 1
        with memoryview(record) as view:
            checksum = record_checksum(offset, view[RECORD_HEADER_SIZE:], self._seed)
        _RECORD.pack_into(record, 0, offset, length, checksum)
        self._append(record)
        self._journaled[offset] = length


def _load_core() -> tuple[type, str | None]:
    """The compiled core, or the Python one and why."""
    if os.environ.get(NO_EXTENSION_VARIABLE, "") not in ("", "0"):
        return _PythonCore, f"{NO_EXTENSION_VARIABLE}={os.environ[NO_EXTENSION_VARIABLE]}"
    try:
        from sf_bsread_writer.h5._journaledio import FileCore  # type: ignore[import-not-found]
    except ImportError as error:
        return _PythonCore, f"the extension is not built ({error})"
    return FileCore, None


#: Set to 1 to use the Python core even where the compiled one is built (as transport.partsio).
NO_EXTENSION_VARIABLE = "SF_BSREAD_NO_EXTENSION"
_Core, FALLBACK_REASON = _load_core()  # FileCore, or _PythonCore and why


class _Shell:
    # The docstring of JournaledFile (this shell over one of the two cores).
    """A file h5py writes through: positional I/O on ``fd``; overwrites of committed bytes journaled first.

    ``fd``: the output file, open for reading and writing (this object
    owns it from now on: :meth:`close`). Without a journal
    (:meth:`set_journal` not called) it only passes the writes through.
    The file never shrinks while it is written: HDF5 asks to cut it to its
    end of allocation at every flush, and bytes cut there would have no
    before-image; a longer file opens as well. :meth:`finish` applies the
    last size asked for.

    What a journaled write costs (docs/performance.md, "The undo journal's
    cost"): one ``pwrite`` of its record, into room allocated beforehand
    (the journal is not cut at a commit, its room is reused: an append
    that allocates costs twice as much; a full disk is the ``OSError`` of
    the allocation, raised by the write that needed the room), and the
    before-image: the bytes HDF5 read there since the commit if it did
    (a metadata object is read, changed, written back), else a ``pread``.
    Any copy taken since the commit will do: a byte a write changed before
    is restored by that write's record, which comes earlier and is applied
    later (``h5.journal``).

    Not thread safe: HDF5 calls it under h5py's lock, from the file's owner.
    """

    # What the journal's room grows by at least, and what read images are kept at most between commits.
    JOURNAL_GROWTH = 64 << 10
    READ_IMAGES_BYTES = 32 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._position = 0
        self._size = os.fstat(fd).st_size  # the file's real length (never shrunk while written)
        self._wanted_size = self._size  # what HDF5 last made it (truncate), or longer by writes since
        self._committed = 0  # bytes below this are journaled before they are overwritten
        self._journal_fd = -1
        self._journal_capacity = 0  # bytes of the journal allocated on the disk (its length)
        self._journal_size = 0  # bytes of the header and records (the file is longer: its room)
        self._generation = 0
        self._seed = 0  # the header's checksum: where the records' checksums start
        self._journaled: dict[int, int] = {}  # offset: length saved there since the commit
        self._read_images: dict[int, bytes] = {}  # offset: committed bytes HDF5 read there since the commit
        self._read_images_bytes = 0
        self._read_images_limit = self.READ_IMAGES_BYTES
        self.journal_bytes_at_commit = 0  # the journal's size when it was last committed (for space bounds)
        self.writes = 0
        self.before_images_read = 0  # before-images that took a pread (the others: read images)
        # Called when a write (or the journal's room) finds no room on the disk: True if it made some (the
        # owner's spare reserve given back), and the write is tried once more. Raised instead, the error
        # reaches HDF5 through h5py's driver, which goes on calling this object with the exception still set
        # (h5py then reports a SystemError caused by it, from inside H5Fflush): the spare avoids that.
        self.on_full = None

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
        self._journal_capacity = 0
        self._journal_size = 0
        self._committed = 0
        self._forget()

    @property
    def journal_fd(self) -> int:
        return self._journal_fd

    @property
    def journal_room(self) -> int:
        """Bytes the journal has allocated on the disk (its length): reused by every commit, never cut until the end."""
        return self._journal_capacity

    @property
    def journal_size(self) -> int:
        """Bytes of the journal's content now (header and records since the last commit)."""
        return self._journal_size

    def commit(self) -> None:
        """The file as it is now is the state to come back to (call after ``H5Fflush`` returned).

        The new header, of a new generation, is written over the old one:
        the records after it are of the old generation and no longer check
        out. A kill while it is written leaves a header that does not check
        out (nothing to undo: the flush had returned, the file is whole).
        """
        if self._journal_fd < 0:
            return
        self.journal_bytes_at_commit = self._journal_size
        self._generation += 1
        header = encode_header(self._size, self._generation)
        if self._journal_capacity < len(header):
            self._room(len(header))
        os.pwrite(self._journal_fd, header, 0)
        self._journal_size = len(header)
        self._seed = record_seed(header)
        self._committed = self._size
        self._forget()

    def _forget(self) -> None:
        self._journaled.clear()
        self._read_images.clear()
        self._read_images_bytes = 0

    def _room(self, needed: int) -> None:
        """Allocate at least ``needed`` bytes of the journal on the disk (by doubling, or just that on a full disk)."""
        capacity = max(needed, 2 * self._journal_capacity, self.JOURNAL_GROWTH)
        try:
            os.posix_fallocate(self._journal_fd, 0, capacity)
        except OSError:
            capacity = needed  # what the full-disk check counted on (h5/file.py _rows_that_fit)
            try:
                os.posix_fallocate(self._journal_fd, 0, capacity)
            except OSError as error:
                if error.errno not in NO_ROOM_ERRNOS or self.on_full is None or not self.on_full():
                    raise
                os.posix_fallocate(self._journal_fd, 0, capacity)
        self._journal_capacity = capacity

    def _append(self, record: bytes | bytearray) -> None:
        end = self._journal_size + len(record)
        if end > self._journal_capacity:
            self._room(end)
        written = os.pwrite(self._journal_fd, record, self._journal_size)
        if written != len(record):  # a short write of a full disk: the record is torn, the write not done
            raise OSError(28, f"journal write cut short ({written} of {len(record)} bytes)")
        self._journal_size = end

    # -- the file object h5py's fileobj driver calls (seek, tell, readinto, write: the core's) -----
    def read(self, size: int = -1) -> bytes:
        """Present for h5py, which takes an object with ``read`` and ``seek`` for a file (it calls readinto)."""
        size = max(0, self._wanted_size - self._position) if size < 0 else size
        data = os.pread(self.fd, size, self._position)
        self._position += len(data)
        return data

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


class JournaledFile(_Shell, _Core):  # the Python core where the extension is not built
    __doc__ = _Shell.__doc__


class PythonJournaledFile(_Shell, _PythonCore):
    """:class:`JournaledFile` on the Python core (the fallback; the journal tests run both)."""


#: The core used: "compiled" (``_journaledio.c``) or "python"; the classes of each core usable here (tests).
IMPLEMENTATION = "compiled" if FALLBACK_REASON is None else "python"
IMPLEMENTATIONS: dict[str, type] = {IMPLEMENTATION: JournaledFile, "python": PythonJournaledFile}


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
