"""The undo journal of an output file: its byte format and what undoing it restores (pure).

HDF5 rewrites metadata in place during a flush and the close, in its own
order (the superblock last): a process killed half way leaves a file whose
parts disagree ("addr overflow", a chunk index pointing at a node not yet
written). So every write that overwrites bytes the file held at its last
*commit* (the end of a completed flush) first saves those bytes here, and
undoing the journal puts them back and cuts the file to its committed size:
the file is then byte for byte the file of the last completed flush.
``h5.journaled`` is the shell that writes and applies it, ``h5.guardian``
the process that applies it when a writer dies.

The journal, a file beside the output file (:func:`journal_name`)::

    header  "SFJ1" | committed size (u64) | crc32 of the 12 bytes before (u32)
    record  offset (u64) | length (u64) | crc32 of offset, length, bytes (u32) | the bytes before the write

A commit empties the journal (truncated to nothing, then a new header):
a journal without a whole header has nothing to undo and no size to cut
to. Records are appended whole before their write happens, so a torn last
record (killed while it was appended) belongs to a write that never
happened, and is ignored. Records are applied last first: when a region
was overwritten twice since the commit, the oldest before-image (the
committed bytes) is the one that stays. Undoing twice is harmless: every
record holds absolute bytes.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "MAGIC",
    "HEADER_SIZE",
    "RECORD_HEADER_SIZE",
    "JOURNAL_SUFFIX",
    "Restore",
    "UndoPlan",
    "journal_name",
    "encode_header",
    "encode_record",
    "plan_undo",
]

MAGIC = b"SFJ1"
_HEADER = struct.Struct("<4sQI")
_RECORD = struct.Struct("<QQI")
HEADER_SIZE = _HEADER.size  # 16
RECORD_HEADER_SIZE = _RECORD.size  # 20
JOURNAL_SUFFIX = ".journal"
_NAME_MAX = 255  # bytes of one file name on Linux file systems


@dataclass(frozen=True)
class Restore:
    """Put ``data`` back at ``offset`` (the bytes there at the last commit)."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class UndoPlan:
    """What undoing a journal does to its file.

    ``committed_size`` None: the journal has no whole header (a commit was
    cut, or it was never written): nothing to restore, the file is left as
    it is. Otherwise ``restores`` are applied in their order (the journal's
    records last first), then the file is cut to ``committed_size``.
    ``torn``: bytes at the end that are no whole record (ignored: their
    write never happened).
    """

    committed_size: int | None
    restores: tuple[Restore, ...]
    torn: int = 0

    @property
    def restored_bytes(self) -> int:
        return sum(len(restore.data) for restore in self.restores)

    def describe(self) -> str:
        """One line for a log: what was (or will be) done."""
        if self.committed_size is None:
            return "no committed state recorded (nothing to undo)"
        text = (f"{len(self.restores)} regions ({self.restored_bytes} bytes) restored, "
                f"cut to {self.committed_size} bytes")
        return text + (f"; a torn last record of {self.torn} bytes ignored" if self.torn else "")


def journal_name(file_name: str) -> str:
    """The journal's name beside the file ``file_name`` (a name, not a path): hidden, one per output file.

    A name too long to take the suffix is shortened, with a hash of the
    whole name so that two long names never share a journal.
    """
    name = f".{file_name}{JOURNAL_SUFFIX}"
    if len(name.encode("utf-8", "surrogateescape")) <= _NAME_MAX:
        return name
    digest = hashlib.sha256(file_name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    stem = file_name.encode("utf-8", "surrogateescape")[:_NAME_MAX - len(digest) - len(JOURNAL_SUFFIX) - 3]
    return f".{stem.decode('utf-8', 'ignore')}.{digest}{JOURNAL_SUFFIX}"


def encode_header(committed_size: int) -> bytes:
    """The journal's first bytes after a commit at ``committed_size``."""
    head = struct.pack("<4sQ", MAGIC, committed_size)
    return head + struct.pack("<I", zlib.crc32(head))


def encode_record(offset: int, before: bytes | memoryview) -> bytes:
    """One record: ``before`` are the bytes at ``offset`` that a write is about to replace."""
    head = struct.pack("<QQ", offset, len(before))
    checksum = zlib.crc32(before, zlib.crc32(head))
    return head + struct.pack("<I", checksum) + bytes(before)


def plan_undo(journal: bytes) -> UndoPlan:
    """What undoing ``journal`` (its whole content) does; never raises on any bytes.

    A header that is short, of another magic or with a wrong checksum
    counts as no header (a cut commit); records are read up to the first
    that is short or whose checksum fails (a torn append).
    """
    if len(journal) < HEADER_SIZE:
        return UndoPlan(None, ())
    magic, committed_size, checksum = _HEADER.unpack_from(journal, 0)
    if magic != MAGIC or checksum != zlib.crc32(journal[:HEADER_SIZE - 4]):
        return UndoPlan(None, ())
    restores: list[Restore] = []
    position = HEADER_SIZE
    view = memoryview(journal)
    while position < len(journal):
        if len(journal) - position < RECORD_HEADER_SIZE:
            break
        offset, length, checksum = _RECORD.unpack_from(journal, position)
        start = position + RECORD_HEADER_SIZE
        if length > len(journal) - start:
            break
        data = view[start:start + length]
        if zlib.crc32(data, zlib.crc32(journal[position:position + 16])) != checksum:
            break
        restores.append(Restore(offset, bytes(data)))
        position = start + length
    restores.reverse()
    return UndoPlan(committed_size, tuple(restores), torn=len(journal) - position)
