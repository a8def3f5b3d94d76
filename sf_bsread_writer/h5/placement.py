"""Where an output file lives: created whole and exclusively in one directory, then watched.

Three promises of the writer depend on how the file meets the file system:

* **Never an unreadable file at the path.** HDF5 keeps its metadata in
  memory until a flush, so a file killed right after ``h5py.File(path, "w")``
  is a superblock without a root group ("bad object header version
  number"). The file is therefore created under a hidden temporary name,
  its skeleton (groups, attributes, ``number_of_messages = 0``) is flushed,
  and only then is it linked at its real name (:meth:`FileSlot.publish`).
  A kill before that leaves no file at the path, only the hidden
  ``.sf_bsread_writer.<pid>.<random>.creating`` beside it.
* **Never outside ``--output-root``, never over another file.** The
  directory is opened once and pinned by its descriptor; the file is
  created exclusively (``O_EXCL``: a dangling symlink or an existing file
  fails) inside that very directory, through ``/proc/self/fd/<dir fd>``,
  and linked there with ``link(2)``, which never replaces a name. Whoever
  checks the root checks :attr:`FileSlot.directory`, the real path of the
  pinned directory, so swapping a folder for a symlink after the check has
  no effect on where the file goes.
* **Never "written" into a file that is gone.** :meth:`FileSlot.check`
  compares the open file with what its path names now; a removed output
  folder (the file's link count drops to 0) or a replaced file is an error.
* **Room to close.** A full disk must not cost the rows already written:
  HDF5 still writes metadata when the file is closed, and a close that
  fails leaves a file that does not open ("addr overflow"). The slot
  therefore holds a reserve beside the file (:meth:`FileSlot.reserve`:
  space taken with ``posix_fallocate`` by a file that has no name, so a
  killed writer leaves nothing behind) and gives it back when the file is
  closed or the disk is full (:meth:`FileSlot.release_reserve`); and it
  says how much the file may still take (:meth:`FileSlot.free_bytes`).
* **Its journal beside it.** The undo journal (``h5.journal``) is created
  exclusively in the same pinned directory, under a hidden name made from
  the file's (:meth:`FileSlot.create_journal`), before the file itself: a
  journal left by a writer and guardian both killed makes the next writer
  of that path refuse (:class:`JournalLeft`) until ``sf_bsread_ctl repair``
  has applied it.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets

from sf_bsread_writer.h5.journal import journal_name
from sf_bsread_writer.h5.journaled import lock_journal

__all__ = ["FileSlot", "OutputFileGone", "JournalLeft"]

logger = logging.getLogger(__name__)

_PROC_FD = "/proc/self/fd"


class OutputFileGone(OSError):
    """The output file is no longer the file at its path (its folder was removed, or it was replaced)."""


class JournalLeft(FileExistsError):
    """The file's journal is there: a writer of this path was killed mid-flush and nobody undid it yet."""


class FileSlot:
    """One output file's place: a pinned directory, a temporary name while created, the final name.

    ``directory_fd`` (optional) is a directory descriptor the caller opened
    and checked; it is duplicated, so the caller keeps its own. Without it,
    the directory of ``path`` is opened here.
    """

    def __init__(self, path: str | os.PathLike, directory_fd: int | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        directory, self.name = os.path.split(self.path)
        if directory_fd is None:
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            self._dir_fd = os.dup(directory_fd)
        # Short whatever the name: a file name near the 255-byte limit must still work.
        self.temporary_name = f".sf_bsread_writer.{os.getpid()}.{secrets.token_hex(4)}.creating"
        self.published = False
        self._reserve_fd = -1
        self._spare_fd = -1
        self.journal_name = journal_name(self.name)
        self._journal_created = False

    @staticmethod
    def open_directory(directory: str) -> int:
        """A descriptor pinning ``directory`` (symlinks on the way followed once, now)."""
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    @staticmethod
    def real_directory(directory_fd: int) -> str:
        """The real path of a pinned directory, as the kernel sees it now."""
        try:
            return os.readlink(f"{_PROC_FD}/{directory_fd}")
        except OSError:  # no /proc: the best the platform offers
            return os.path.realpath(f"/dev/fd/{directory_fd}")

    @property
    def directory(self) -> str:
        return self.real_directory(self._dir_fd)

    @property
    def directory_fd(self) -> int:
        """The pinned directory's descriptor (the slot's own: not to be closed by the caller)."""
        return self._dir_fd

    def create_file(self) -> int:
        """Create the file under its temporary name (exclusively, in the pinned directory): its descriptor."""
        return os.open(self.temporary_name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o666, dir_fd=self._dir_fd)

    def create_journal(self) -> int:
        """Create the file's (empty) journal exclusively beside it: its descriptor; JournalLeft if one is there."""
        try:
            fd = os.open(self.journal_name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=self._dir_fd)
        except FileExistsError:
            raise JournalLeft(
                errno.EEXIST, f"{self.path} has an undo journal beside it ({self.journal_name}): a writer of this "
                f"file was killed while writing it and its journal was not applied; run `sf_bsread_ctl repair "
                f"{self.path}` (it puts the file back to its last completed flush), then write again") from None
        try:
            lock_journal(fd)  # ours (and our guardian's) until the end: `sf_bsread_ctl repair` leaves it alone
        except BaseException:
            os.close(fd)
            os.unlink(self.journal_name, dir_fd=self._dir_fd)
            raise
        self._journal_created = True
        return fd

    def remove_journal(self) -> None:
        """Unlink the journal's name (the file is closed whole, or gone): idempotent."""
        if not self._journal_created:
            return
        try:
            os.unlink(self.journal_name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass
        self._journal_created = False

    @property
    def creation_path(self) -> str:
        """The path to create the file at: the temporary name inside the pinned directory."""
        if os.path.isdir(_PROC_FD):
            return f"{_PROC_FD}/{self._dir_fd}/{self.temporary_name}"
        return os.path.join(os.path.dirname(self.path), self.temporary_name)

    def publish(self) -> None:
        """Give the whole file its real name (FileExistsError if the name is taken: nothing is replaced)."""
        try:
            os.link(self.temporary_name, self.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd,
                    follow_symlinks=False)
        except FileExistsError:
            raise FileExistsError(f"{self.path} already exists; the writer does not overwrite files") from None
        os.unlink(self.temporary_name, dir_fd=self._dir_fd)
        self.published = True

    def remove(self) -> None:
        """Unlink the file's name in the pinned directory (an abandoned start), never by its path."""
        name = self.name if self.published else self.temporary_name
        try:
            os.unlink(name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass

    def discard(self) -> None:
        """Remove the temporary file of a creation that failed (best effort)."""
        if not self.published:
            try:
                os.unlink(self.temporary_name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            except OSError as error:
                logger.warning("cannot remove %s in %s: %s", self.temporary_name, self.path, error)

    def check(self, file_fd: int) -> None:
        """OutputFileGone unless the open file ``file_fd`` is still the file at :attr:`path`."""
        opened = os.fstat(file_fd)
        if opened.st_nlink == 0:
            raise OutputFileGone(f"{self.path} was removed while it was written (was its folder deleted?)")
        if not self.published:
            return
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except OSError as error:
            raise OutputFileGone(f"{self.path} is no longer reachable at its path ({error.strerror}): "
                                 "its folder was moved or removed") from None
        if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            raise OutputFileGone(f"{self.path} was replaced by another file while it was written")

    def reserve(self, nbytes: int, spare: int = 0) -> None:
        """Take ``nbytes`` (+ ``spare``) of the file system beside the file, for the ``release_*`` to give back.

        The space belongs to files without a name (created, then unlinked
        at once, held by their descriptors only): the kernel frees it when the
        descriptor is closed, also when the process is killed. OSError
        (ENOSPC ...) if the space is not there: the file cannot be written
        safely, so it is not started. ``nbytes`` is the close's
        (:meth:`release_reserve`); ``spare`` the room a write gets that found
        none although the check said there was (:meth:`release_spare`).
        """
        if self._reserve_fd >= 0 or nbytes <= 0:
            return
        self._reserve_fd = self._take(nbytes)
        if spare > 0:
            try:
                self._spare_fd = self._take(spare)
            except BaseException:
                self.release_reserve()
                raise

    def _take(self, nbytes: int) -> int:
        """A descriptor of a file without a name that holds ``nbytes`` of the file system."""
        name = f".sf_bsread_writer.{os.getpid()}.{secrets.token_hex(4)}.reserve"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._dir_fd)
        try:
            os.unlink(name, dir_fd=self._dir_fd)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                zeros = bytes(64 * 1024)  # no fallocate on this file system: written out instead
                for offset in range(0, nbytes, len(zeros)):
                    os.pwrite(fd, zeros[:nbytes - offset], offset)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def release_reserve(self) -> bool:
        """Give the close's reserve back to the file system (idempotent); True if there was one."""
        if self._reserve_fd < 0:
            return False
        os.close(self._reserve_fd)
        self._reserve_fd = -1
        return True

    def release_spare(self) -> bool:
        """Give the spare reserve back to the file system (idempotent); True if there was one."""
        if self._spare_fd < 0:
            return False
        os.close(self._spare_fd)
        self._spare_fd = -1
        return True

    def free_bytes(self) -> int:
        """Bytes the file may still take on its file system now (the reserve not counted).

        What this process may use: ``f_bavail``, or ``f_bfree`` for root,
        which may write into the blocks a file system keeps for it. Quotas
        are not seen here: a write refused by one is handled as a full disk
        where it happens (h5/file.py).
        """
        stat = os.fstatvfs(self._dir_fd)
        return stat.f_frsize * (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail)

    def close(self) -> None:
        self.release_spare()
        self.release_reserve()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
