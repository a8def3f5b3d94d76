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

    header  "SFJ2" | committed size (u64) | generation (u64) | crc32 of the 20 bytes before (u32)
    record  offset (u64) | length (u64) | crc32 of offset, length, bytes (u32) | the bytes before the write

The journal's room on the disk is allocated once and reused by every
commit (``h5.journaled``), so the file is longer than its content: what
follows the last record is zeros or the records of an older commit. A record's checksum is seeded with its header's checksum
(:func:`record_seed`), and every commit has a new generation: a record of
another commit never checks out, and the records are read up to the first
that does not. A commit writes the new header over the old one: a kill
while it is written leaves a header that does not check out (nothing to
undo: the flush had returned, the file is whole). Records are copied whole
before their write happens, so a torn last record (killed while it was
copied) belongs to a write that never happened, and is ignored. Records are applied last first: when a region
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
    "record_seed",
    "plan_undo",
]

MAGIC = b"SFJ2"
_HEADER = struct.Struct("<4sQQI")
_RECORD = struct.Struct("<QQI")
_RECORD_HEAD = struct.Struct("<QQ")
HEADER_SIZE = _HEADER.size  # 24
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
    ``torn``: the bytes after the last record that checks out (ignored: a
    torn record, whose write never happened, or the room after the records,
    reused from an older commit).
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
        return (f"{len(self.restores)} regions ({self.restored_bytes} bytes) restored, "
                f"cut to {self.committed_size} bytes")


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


def encode_header(committed_size: int, generation: int = 1) -> bytes:
    """The journal's first bytes after the commit number ``generation`` at ``committed_size``."""
    head = struct.pack("<4sQQ", MAGIC, committed_size, generation)
    return head + struct.pack("<I", zlib.crc32(head))


def record_seed(header: bytes | memoryview) -> int:
    """What the checksums of the records after ``header`` (an SFJ2 header) start from: the header's own."""
    return int.from_bytes(header[HEADER_SIZE - 4:HEADER_SIZE], "little")


def record_checksum(offset: int, before: bytes | memoryview, seed: int) -> int:
    """The checksum of a record of ``before`` at ``offset`` after a header of seed ``seed``."""
    return zlib.crc32(before, zlib.crc32(_RECORD_HEAD.pack(offset, len(before)), seed))


def encode_record(offset: int, before: bytes | memoryview, seed: int) -> bytes:
    """One record: ``before`` are the bytes at ``offset`` that a write is about to replace."""
    return _RECORD.pack(offset, len(before), record_checksum(offset, before, seed)) + bytes(before)


def plan_undo(journal: bytes) -> UndoPlan:
    """What undoing ``journal`` (its whole content) does; never raises on any bytes.

    A header that is short, of another magic or with a wrong checksum
    counts as no header (a cut commit); records are read up to the first
    that is short or whose checksum fails (a torn append, or the zeros and
    older records after the last one). ``torn``: the bytes after the last
    record that checks out.
    """
    if len(journal) < _HEADER.size or journal[:4] != MAGIC:
        return UndoPlan(None, ())
    _, committed_size, _, checksum = _HEADER.unpack_from(journal, 0)
    if checksum != zlib.crc32(journal[:_HEADER.size - 4]):
        return UndoPlan(None, ())
    seed = checksum
    restores: list[Restore] = []
    position = _HEADER.size
    view = memoryview(journal)
    while position < len(journal):
        if len(journal) - position < RECORD_HEADER_SIZE:
            break
        offset, length, checksum = _RECORD.unpack_from(journal, position)
        start = position + RECORD_HEADER_SIZE
        if length > len(journal) - start:
            break
        data = view[start:start + length]
        if zlib.crc32(data, zlib.crc32(journal[position:position + 16], seed)) != checksum:
            break
        restores.append(Restore(offset, bytes(data)))
        position = start + length
    restores.reverse()
    return UndoPlan(committed_size, tuple(restores), torn=len(journal) - position)
