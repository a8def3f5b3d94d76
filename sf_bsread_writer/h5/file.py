"""One output file in the SwissFEL HDF5 layout: one row per bsread message, written in blocks.

:class:`H5File` is the only thing the writer needs: it takes parsed
:class:`~sf_bsread_writer.bsread.Message` objects and turns them into the
layout of the original SwissFEL writer (``/general/*``, ``/data/<channel>/
{data,pulse_id,is_data_present}``), extended with a per-channel
``timestamp``, channel metadata attributes, file attributes and a
``/missing`` table. docs/file-format.md is the reader's reference; this
docstring is about how and why it is written the way it is. The layout as
a contract (names, attributes, chunk shapes) is ``h5.layout``; the storage
of one channel ``h5.columns``; the packed fast path ``h5.packed``.

Why blocks. The original wrote one element per channel per message (resize
+ write), about 40 messages/s for 100 channels. Here ``append`` touches no
HDF5 at all: it copies each present value part (raw bytes, already in the
channel's byte order) into a per-channel buffer. HDF5 is only written in
:meth:`H5File.flush` — one resize and one slice write per dataset per block —
which runs when a block is full (``block_rows`` rows or ``block_bytes``
bytes) or ``flush_interval`` seconds after the previous flush.

Why direct chunks. A ``bitshuffle_lz4`` value part is byte for byte one
chunk of the HDF5 bitshuffle filter (id 32008, LZ4). Array channels
compressed that way get a dataset with ``chunks=(1,) + array_shape`` and that
filter, and each part is stored with ``write_direct_chunk``: never
decompressed. When :func:`direct_chunk_compatible` says no (legacy
block size, wrong size), the value is decoded and written through the
filter instead.

Why this is crash safe. A flush writes the block, updates the file
attributes (``number_of_messages`` ...) and calls ``H5Fflush``; between
flushes nothing is written at all, because values wait in memory. But
during a flush, and during the close, HDF5 rewrites metadata in place in
its own order (the superblock with the end of allocation last): a chunk
index node that splits points to a node allocated past the end the
superblock on disk still names, an attribute may be written before the
index it counts. A SIGKILL there used to leave a file that does not open
("addr overflow", seen in CI), whatever it held. So every write goes
through :class:`~sf_bsread_writer.h5.journaled.JournaledFile` (h5py's
``fileobj`` driver): before a write replaces bytes the file held at the
last *commit* (the end of a flush: after ``H5Fflush`` returned), those
bytes go to an undo journal beside the file (``h5.journal``). The
guardian, a small process beside the writer (``h5.guardian``), holds the
file's and the journal's descriptors; when the writer ends, however it
ends, it puts those bytes back and cuts the file to its committed size.
The file is then byte for byte the file of the last completed flush: it
opens with plain ``h5py.File(path, "r")`` and its first
``number_of_messages`` rows are complete. A writer and guardian both
killed leave the journal; ``sf_bsread_ctl repair FILE`` applies it, and a
new writer of that path refuses until then. A close that fails half way
is undone here at once. The earliest format is kept: its superblock has no
"file open for write" flag (SWMR and ``libver="latest"`` files need
``h5clear`` after a crash: checked with HDF5 2.0).
tests/test_h5format.py kills a writer at a spread of HDF5's writes of a
flush and of the close, and kills writers at random moments.

Why a full disk costs no row already written. HDF5 writes metadata at
every flush and at the close (object headers, chunk index nodes, the
superblock's end of file); if those writes fail, the file does not open at
all ("addr overflow"), whatever it held. So the file stops *before* the
disk is full: :meth:`H5File.flush` asks the file system how much room is
left and writes only the rows whose chunks, indexes and metadata fit
(``Column.space_needed``: an upper bound of what HDF5 allocates); the
others are dropped and :class:`DiskFull` says how many rows the file
keeps. A reserve of ``RESERVE_BYTES`` taken beside the file when it is
created (``FileSlot.reserve``) is given back for the close, and for a
write that fails anyway (another process filled the disk between the
check and the write, a quota): then the rows of that block are cut off
again, metadata only, and the file closes with the rows of the last flush.

Why lazy datasets. A channel's datasets are created at its first *present*
value, with the type of that value, and earlier rows read as absent (fill
value 0) — so a channel first seen absent (the Python sender announces an
absent value as ``float64 [1]``) keeps every value that arrives later. A
value whose (type, shape) differs from the channel's first one goes to a
sibling group ``/data/<channel>@2`` (``@3``...) while the file is written:
appending never renames a dataset, so a killed file is always a consistent
state of that "writing layout". At close the groups are merged into the
original writer's layout (the newest type under ``data``, older ones as
``data(1)``...): ``h5.variants``.
"""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import time
import traceback
import weakref
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from sf_bsread_writer.bsread.codecs import value_problem
from sf_bsread_writer.bsread.message import Message
from sf_bsread_writer.bsread.spec import ChannelSpec, RejectReason
from sf_bsread_writer.h5 import guardian
from sf_bsread_writer.h5.calls import CALLS
from sf_bsread_writer.h5.columns import Column, ColumnMaker
from sf_bsread_writer.h5.layout import (
    CALLER_ATTRIBUTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    GENERAL_FIELDS,
    MISSING_DTYPE,
    NOT_GIVEN,
    STRING_DTYPE,
    VARIANT_SEPARATOR,
    attribute_value,
    channel_group_name,
    channel_signature,
    fixed_string,
    storable_text,
)
from sf_bsread_writer.h5.packed import HeaderPlan, PackedRows
from sf_bsread_writer.h5.journaled import JournaledFile, undo
from sf_bsread_writer.h5.placement import FileSlot
from sf_bsread_writer.h5.variants import merge_variants
from sf_bsread_writer.replay.messages import MissingRange

__all__ = [
    "H5File",
    "DiskFull",
    "is_disk_full",
    "RESERVE_BYTES",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_BLOCK_ROWS",
    "DEFAULT_BLOCK_BYTES",
    "CHUNK_CACHE_BYTES",
]

logger = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL = 1.0  # seconds: the most data a SIGKILL can cost
DEFAULT_BLOCK_ROWS = 1000  # rows held in memory before they are written
DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024  # ... or this many value bytes

# HDF5's raw data chunk cache, per dataset: none. The default (HDF5 2.0: 8 MiB
# and 8191 slots per dataset; 1 MiB / 521 before) only ever fills here: block
# writes go to the newest chunk, and a chunk once touched stays cached until
# its dataset's cache is full. With 4 datasets per channel that is memory that
# grows through the whole run, ~300 B per row for the demo profile (48 of 52
# datasets are scalar-sized: full only after 8 MiB / 8 B = 1M rows, ~3 h at
# 100 Hz); benchmarks/bench_h5_memory.py and docs/performance.md "Writer: RSS".
# Nothing is read back, unfiltered chunks take a block's rows straight to the
# file, and a direct-chunk or filtered row is one whole chunk, so the cache
# bought nothing (bench_h5format.py: same throughput without it).
CHUNK_CACHE_BYTES = 0
CHUNK_CACHE_SLOTS = 1

# A full disk (docs/file-format.md, "A full disk"). The reserve taken beside
# the file for its close: measured on tmpfs, the close after a flush grew the
# file by 0 pages (camera, 100 scalars, the mixed profile: the metadata it
# rewrites is already allocated); /missing, groups of channels never present
# and the summary JSON beside the file (a few KiB) are what it is for. The margin each flush keeps free beyond the block:
# attributes, /missing records, metadata of a flush; a channel group's
# metadata (four object headers, attributes, link): 2.3-2.6 KiB measured.
RESERVE_BYTES = 1024 * 1024
# The spare: room for a write that finds none although the check said there was (the check is an upper bound
# of what HDF5 and the undo journal take, but a bound of HDF5's allocations, not a promise; another process may
# take the room meanwhile). That write gets the spare instead of an error deep inside H5Fflush, the flush ends
# whole, and the file takes no more rows (DiskFull after it). Both reserves are taken when the file is created.
SPARE_BYTES = 1024 * 1024
RESERVED_BYTES = RESERVE_BYTES + SPARE_BYTES  # what a writer needs free beside its data to start
FLUSH_MARGIN_BYTES = 64 * 1024
GROUP_BYTES = 4 * 1024
MISSING_RECORD_BYTES = 128
# The undo journal beside the file takes room too: the committed bytes a flush rewrites in place, per channel
# group that existed at the last flush Column.rewritten_bytes (object headers, index nodes when a chunk is added,
# the rows written into shared chunks); groups made since hold nothing committed. Measured: 3.4 KiB per scalar
# channel and 100-row flush (10-11 KiB when the block starts a chunk), bounded by 14 (45) KiB.
JOURNAL_FILE_BYTES = 128 * 1024  # the file's own: superblock, root and /data groups, their attributes, /missing
# Channels of HDF5 work (a group created, a column's block written) between two
# calls of H5File.keep_alive: ~1 ms of work per channel, so a call every ~16 ms,
# a few microseconds each.
KEEP_ALIVE_CHANNELS = 16
# The errors of a write that found no room: no space, a quota, a file size limit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DISK_FULL_TEXTS = tuple(os.strerror(number) for number in DISK_FULL_ERRNOS)


def is_disk_full(error: BaseException) -> bool:
    """True for an error of a write that found no room (h5py gives HDF5's errno as ``errno``, or in its text)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    # Through the chain: a write of the journaled file object that found no room raises inside h5py's driver,
    # and h5py reports it as the SystemError of its next call into the object, caused by the OSError.
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DiskFull):
            return True
        if isinstance(cause, OSError) and (cause.errno in DISK_FULL_ERRNOS
                                           or any(text in str(cause) for text in _DISK_FULL_TEXTS)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class DiskFull(OSError):
    """The disk has no room for more rows: the first ``rows_kept`` rows are in the file, later ones are not.

    Raised by :meth:`H5File.flush` (and by what flushes: ``append``,
    ``truncate``) once; the file then takes no more rows, but records
    missing pulses and closes as usual (the reserve is given back for it).
    ``rows_dropped``: rows appended that are not in the file.
    """

    def __init__(self, message: str, rows_kept: int, rows_dropped: int) -> None:
        super().__init__(errno.ENOSPC, message)
        self.rows_kept = rows_kept
        self.rows_dropped = rows_dropped


class H5File:
    """One output file in the SwissFEL layout, fed one message per row.

    Not thread safe: one owner (the writer's loop) calls everything. The
    HDF5 file is open from construction until :meth:`close`; a crash leaves
    the data of the last :meth:`flush` readable (see the module docstring).

    ``general`` are the REST parameters (keys ``general/created`` or
    ``created`` ...); ``extra_parameters`` anything else to keep. Both are
    stored: see :meth:`_write_general`. ``clock`` is for tests.
    ``decompress_images``: bitshuffle_lz4 arrays are decoded and stored
    plain (``buffered``) instead of as direct chunks, for readers without
    the bitshuffle plugin (h5dump, MATLAB, plain h5py).
    """

    def __init__(self, path: str | os.PathLike, general: Mapping[str, Any] | None = None,
                 extra_parameters: Mapping[str, Any] | None = None, *,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL, block_rows: int = DEFAULT_BLOCK_ROWS,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, clock: Callable[[], float] = time.monotonic,
                 directory_fd: int | None = None, decompress_images: bool = False, journal: bool = True,
                 guardian: bool = True) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, not {block_rows}")
        self.path = os.fspath(path)
        self.flush_interval = float(flush_interval)
        self.block_rows = int(block_rows)
        self.block_bytes = int(block_bytes)
        self._clock = clock
        self._journal = journal
        self._guardian = journal and guardian
        self.decompress_images = decompress_images  # no direct chunks: plain datasets, readable without the plugin
        self._maker = ColumnMaker(decompress_images)  # channel groups, copied from one of their kind

        self._columns: dict[str, dict[tuple, Column]] = {}  # name -> signature -> column
        self._plan: HeaderPlan | None = None  # for the data header of the last message
        # The packed fast path gathers rows of one plan and hands them to the columns in one go.
        self._packed = PackedRows()
        self._last_spec: dict[str, ChannelSpec] = {}  # every channel ever announced
        # One entry per row appended (on disk and pending): the pulse ids of a block,
        # and what truncate() needs to put the counters back (24 bytes per row).
        self._row_pulse_ids = array("q")
        self._row_timestamps = array("d")
        self._row_absent_values = array("q")  # absent_values after the row
        self._row_bytes_written = array("q")  # bytes_written after the row
        self._pending_bytes = 0
        self._rows_written = 0  # rows on disk (in every dataset)
        # The missing pulses have one owner: the writer's PulseRange (missing_from), else this file
        # (record_missing). /missing is written from the owner's list at every flush and at the close.
        self._own_missing: list[MissingRange] = []
        self._missing_source: Callable[[], Sequence[MissingRange]] | None = None
        # What the /missing table holds (None: unknown, a write failed on a full disk): not an owner,
        # the file's account of its own table, so that a flush appends only what is new.
        self._missing_on_disk: list[MissingRange] | None = []
        self._attributes: dict[str, Any] = {}
        self._refused: dict[str, str] = {}  # channel name -> why it has no group
        # Values refused one by one (a refused header entry, a value that does not decode):
        # channel name -> reason -> [count, first detail]. Those rows are absent; a channel
        # with no decoded value gets no group (nothing sized by an undecoded claim).
        self._refused_values: dict[str, dict[str, list]] = {}
        self._row_refusals: list[tuple[str, str, str]] = []  # of the row being added (all or nothing)
        self._last_flush = clock()
        self._groups_since_flush = 0  # channel groups made since the last flush (metadata it writes)
        self._spare_spent = False  # a write found no room and got the spare reserve: no rows after this flush
        self.disk_full: DiskFull | None = None  # set once the disk was full: no more rows
        # Called every KEEP_ALIVE_CHANNELS channels of HDF5 work (groups, block writes): see _busy.
        self.keep_alive: Callable[[], None] | None = None
        self._busy_channels = 0

        self.bytes_written = 0  # value bytes accepted (as received: compressed stays compressed)
        self.absent_values = 0  # channel values announced in a header but empty
        self.hdf5_writes = 0  # dataset writes issued by block writes (for tests/benchmarks)
        self.blocks_written = 0
        self.flushes = 0
        self._closed = False
        self._create(general, extra_parameters, directory_fd)
        logger.info("opened %s", self.path)

    def _create(self, general: Mapping[str, Any] | None, extra_parameters: Mapping[str, Any] | None,
                directory_fd: int | None) -> None:
        """Create the file whole under a temporary name, flush its skeleton, then give it its name.

        From the moment the path exists, the file opens with plain h5py
        (``number_of_messages = 0``, ``complete = 0``): see h5/placement.py.
        ``directory_fd``: the pinned directory to create it in (the writer's
        output-root check was made on it).
        """
        self._slot = FileSlot(self.path, directory_fd)
        self._io: JournaledFile | None = None
        self._guard_key: int | None = None
        try:
            try:
                self._slot.reserve(RESERVE_BYTES, spare=SPARE_BYTES)
            except OSError as error:
                raise OSError(error.errno, f"no room for the writer's reserve of {RESERVED_BYTES} bytes beside "
                                           f"{self.path} ({error.strerror}): the disk is (nearly) full") from None
            # The journal first (exclusive: one left by a killed writer and guardian refuses this start, JournalLeft),
            # then the file under its temporary name; the guardian holds both before HDF5 writes a byte.
            journal_fd = self._slot.create_journal() if self._journal else -1
            try:
                self._io = JournaledFile(self._slot.create_file())
                self._io.on_full = self._spend_spare
            except BaseException:
                if journal_fd >= 0:
                    os.close(journal_fd)
                raise
            if journal_fd >= 0:
                self._io.set_journal(journal_fd)
                if self._guardian:
                    try:
                        self._guard_key = guardian.watch(self._slot.directory_fd, self._io.fd, journal_fd,
                                                         self._slot.journal_name, self.path)
                    except OSError as error:  # the file is still written; only a kill would need a repair by hand
                        logger.error("%s: no guardian (%s): a kill of this process mid-flush would leave the file "
                                     "for `sf_bsread_ctl repair %s`", self.path, error, self.path)
            # Exclusive ("w-"; the file is ours already, created with O_EXCL). Default (earliest) libver on
            # purpose: no superblock "open for write" flag, so a file left by SIGKILL opens without h5clear.
            # No raw data chunk cache: see CHUNK_CACHE_BYTES. Every write goes through self._io (the journal).
            self._file = h5py.File(self._io, "w-", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=CHUNK_CACHE_SLOTS)
            _OPEN.add(self)
        except BaseException:
            self._end_journal(cut=False)
            self._slot.discard()
            self._slot.close()
            raise
        try:
            self._file_fd = self._io.fd
            self._data = self._file.create_group("data")
            self._write_general(dict(general or {}), dict(extra_parameters or {}))
            self._file.attrs["format"] = FORMAT_NAME
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._write_file_attributes(complete=False)
            self._file.flush()
            self._io.commit()  # from here on, an overwrite of these bytes is journaled first
            self._slot.publish()
        except BaseException:
            self._closed = True
            self._file.close()
            self._end_journal(cut=False)
            self._slot.discard()
            self._slot.close()
            raise

    def _end_journal(self, cut: bool = True) -> None:
        """The file is closed whole (or removed): empty the journal, cut the file, remove the journal, tell the guardian.

        In this order: a kill at any point leaves a journal that undoes
        nothing (emptied) or no journal, never one that undoes a whole file.
        """
        io = self._io
        if io is None:
            return
        try:
            if io.fd >= 0:
                io.end_journal()
                if cut:
                    io.finish()
            self._slot.remove_journal()
            if self._guard_key is not None:
                guardian.done(self._guard_key)
                self._guard_key = None
        finally:
            io.close()

    # -- public API ------------------------------------------------------
    @property
    def channels(self) -> list[str]:
        """Names of every channel seen in a data header, in order of first sight."""
        return list(self._last_spec)

    @property
    def rows(self) -> int:
        """Messages appended (pending included)."""
        return len(self._row_pulse_ids)

    @property
    def first_pulse_id(self) -> int | None:
        return self._row_pulse_ids[0] if self._row_pulse_ids else None

    @property
    def last_pulse_id(self) -> int | None:
        return self._row_pulse_ids[-1] if self._row_pulse_ids else None

    @property
    def first_timestamp(self) -> float | None:
        return self._row_timestamps[0] if self._row_timestamps else None

    @property
    def last_timestamp(self) -> float | None:
        return self._row_timestamps[-1] if self._row_timestamps else None

    @property
    def rows_flushed(self) -> int:
        """Rows that are on disk and would survive a SIGKILL now."""
        return self._rows_written

    @property
    def missing(self) -> list[MissingRange]:
        """The missing pulses as the owner of the list has them now (written at the next flush)."""
        return list(self._current_missing())

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, message: Message, time: float | None = None) -> None:
        """Add one row: every channel gets a value or an absent marker.

        ``time``: the row's time (``first_/last_timestamp``), when it is not
        the message's global timestamp (``bsread.timebase``: the receive time
        stands in for an implausible one). Touches no HDF5 unless a block is
        full or the flush interval has passed, in which case it writes and
        flushes (see :meth:`flush`).
        """
        self._check_open()
        if self.disk_full is not None:
            raise self.disk_full
        header = message.data_header
        plan = self._plan
        if plan is None or not header.same_as(plan.header):
            plan = self._use_header(header)
        row = len(self._row_pulse_ids) - self._rows_written
        absent_before = self.absent_values
        self._row_refusals = []
        try:
            accepted_total = self._add_values(plan, message, row)
        except BaseException as error:
            # All or nothing: a row half in the columns would shift every later row of those channels.
            self._packed.drop_from(row)
            for column in self._each_column():
                column.drop_pending(row)
            self.absent_values = absent_before
            if is_disk_full(error):  # a new group's metadata found no room
                self._recover_from_full_disk(error)
            raise
        for name, reason, detail in self._row_refusals:
            counts = self._refused_values.setdefault(name, {}).setdefault(reason, [0, detail])
            counts[0] += 1
        self._row_pulse_ids.append(message.pulse_id)
        self._pending_bytes += accepted_total
        self.bytes_written += accepted_total
        self._row_timestamps.append(message.timestamp if time is None else time)
        self._row_absent_values.append(self.absent_values)
        self._row_bytes_written.append(self.bytes_written)
        if (row + 1 >= self.block_rows or self._pending_bytes >= self.block_bytes
                or self._clock() - self._last_flush >= self.flush_interval):
            self.flush()

    def _add_values(self, plan: HeaderPlan, message: Message, row: int) -> int:
        """Every channel's value of ``message`` into block row ``row``; returns the value bytes accepted."""
        header = message.data_header
        accepted_total = 0
        slow = plan.others
        if plan.packed:
            added = self._packed.add(plan, message.frames, row, self._column_for)
            if added is None:  # a packed value of the wrong size: channel by channel
                self._scatter()
                slow = range(len(header.channels))
            else:
                accepted_total, absent = added
                self.absent_values += absent
        columns = plan.columns
        channels = header.channels
        for index in slow:
            spec = channels[index]
            if spec.refused is not None:  # its data-header entry was wrong: absent, counted, never sized
                self._refuse_value(spec.name, spec.refused.value, spec.refused_detail)
                continue
            part = message.value_part(index)
            if not len(part):
                self.absent_values += 1
                continue
            column = columns[index]
            if column is None:
                # A group is sized by a value that decodes, never by what its header claims.
                problem = value_problem(spec, part)
                if problem is not None:
                    self._refuse_value(spec.name, problem.reason.value, problem.detail)
                    continue
                column = columns[index] = self._column_for(spec)
                if column is None:  # refused: recorded once, its values dropped
                    continue
            accepted = column.append(spec, part, message.timestamp_part(index), row)
            if not accepted:  # did not decode: stored absent (the column logged why)
                self._refuse_value(spec.name, RejectReason.VALUE_INVALID.value,
                                   "a value that does not decode (the writer's log says why)")
            accepted_total += accepted
            if column.expanded:
                self._pending_bytes += column.take_expansion()
        return accepted_total

    def _refuse_value(self, name: str, reason: str, detail: str) -> None:
        """One value of ``name`` refused in the row being added: absent, counted by reason at the row's end."""
        self.absent_values += 1
        self._row_refusals.append((name, reason, detail))

    def record_missing(self, first_pulse_id: int, last_pulse_id: int, reason: str,
                       count: int | None = None) -> None:
        """Note pulses that will not be in the file (written at the next flush), for a file that keeps its own list.

        ``count`` defaults to ``last - first + 1``; give it when the pulse
        step is not 1 or when it is known from the source. A file whose
        list has another owner (:meth:`missing_from`) refuses: one list, one owner.
        """
        self._check_open()
        if self._missing_source is not None:
            raise RuntimeError(f"{self.path}: the missing pulses come from their owner's list (missing_from)")
        first, last = int(first_pulse_id), int(last_pulse_id)
        if last < first:
            raise ValueError(f"last_pulse_id {last} < first_pulse_id {first}")
        self._own_missing.append(
            MissingRange(first, last, int(count) if count is not None else last - first + 1, str(reason)))

    def missing_from(self, records: Callable[[], Sequence[MissingRange]]) -> None:
        """Take the missing pulses from their owner: ``records()`` is the whole list, asked at every flush and at close.

        The writer's :class:`~sf_bsread_writer.writer.pulse_range.PulseRange`
        decides what is missing (and clips it when a stop comes late, adds
        to it when the disk is full); the file only writes what that list
        says, so /missing, ``missing_pulses`` and the writer's statistics
        cannot disagree. Records the owner only appended are appended to
        the table; a list that changed otherwise rewrites the table whole.
        """
        if self._own_missing:
            raise RuntimeError(f"{self.path}: missing pulses were recorded already; one list, one owner")
        self._missing_source = records

    def _current_missing(self) -> Sequence[MissingRange]:
        return self._missing_source() if self._missing_source is not None else self._own_missing

    def _missing_unwritten(self) -> int:
        """Records a flush writes to /missing (all of them when the table is rewritten)."""
        current, on_disk = self._current_missing(), self._missing_on_disk
        if on_disk is not None and list(current[:len(on_disk)]) == on_disk:
            return len(current) - len(on_disk)
        return len(current)

    @property
    def missing_pulses(self) -> int:
        return sum(record.count for record in self._current_missing())

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        """File attributes (e.g. the requested range) written at the next flush and at close.

        ``None`` values are skipped (an unset stop pulse is simply absent);
        lists and dicts are stored as JSON text.
        """
        self._check_open()
        unknown = sorted(set(attributes) - set(CALLER_ATTRIBUTES))
        if unknown:
            raise ValueError(f"not a documented file attribute: {', '.join(unknown)} "
                             f"(docs/file-format.md; settable: {', '.join(CALLER_ATTRIBUTES)})")
        self._attributes.update(attributes)

    def flush_due(self) -> bool:
        """True when data waits and the flush interval has passed (for idle loops)."""
        # A length check each loop turn; a list changed in place (a late stop) comes with truncate's flush.
        on_disk = self._missing_on_disk
        missing_waits = on_disk is None or len(self._current_missing()) != len(on_disk)
        return (not self._closed and (self.rows > self._rows_written or missing_waits)
                and self._clock() - self._last_flush >= self.flush_interval)

    def maybe_flush(self) -> bool:
        """Flush if :meth:`flush_due`; the writer calls this when the source is quiet."""
        if self.flush_due():
            self.flush()
            return True
        return False

    def truncate(self, rows: int, missing: Iterable[MissingRange] | None = None) -> int:
        """Keep only the first ``rows`` rows; return how many were removed.

        For a stop that comes after its pulse was written (normal for a past
        range: the replay runs ahead before the DAQ sends the stop). Rows not
        flushed yet are dropped from memory; rows on disk are cut by shrinking
        every dataset under /data (all share axis 0). ``rows``,
        ``first_/last_pulse_id``, ``first_/last_timestamp``, ``absent_values``
        and ``bytes_written`` then describe the rows kept, and the attribute
        ``rows_removed_after_stop`` adds up the rows removed. /missing is
        written again from the list's owner (a PulseRange clips its records
        to the stop: the file does not know the pulse step); a file that
        keeps its own list takes the clipped records as ``missing`` (None
        keeps them). Groups
        created by removed rows stay, all absent. Ends with a :meth:`flush`:
        on return the file on disk is the cut one.
        """
        self._check_open()
        if not 0 <= rows <= self.rows:
            raise ValueError(f"cannot truncate {self.rows} rows to {rows}")
        removed = self.rows - rows
        if rows < self._rows_written:
            # The row count first: a reader (or a kill) never sees rows counted that are gone.
            self._file.attrs["number_of_messages"] = np.int64(rows)
            self._forget_rows(rows)
            for column in self._each_column():
                column.resize(rows)
            self._rows_written = rows
        else:
            self._forget_rows(rows)
        if missing is not None:
            if self._missing_source is not None:
                raise ValueError(f"{self.path}: the missing pulses come from their owner's list, not from truncate")
            self._own_missing = list(missing)
        if removed:
            self._attributes["rows_removed_after_stop"] = self._attributes.get("rows_removed_after_stop", 0) + removed
            logger.info("%s: %d rows removed after the stop, %d kept", self.path, removed, rows)
        self.flush()
        return removed

    def _forget_rows(self, rows: int) -> None:
        """Keep the first ``rows`` rows in memory's account (pending rows after them dropped); disk untouched."""
        self._scatter()  # every pending row into its column
        for column in self._each_column():
            column.drop_pending(max(0, rows - self._rows_written))
        for log in (self._row_pulse_ids, self._row_timestamps, self._row_absent_values, self._row_bytes_written):
            del log[rows:]
        self.absent_values = self._row_absent_values[-1] if rows else 0
        self.bytes_written = self._row_bytes_written[-1] if rows else 0
        self._pending_bytes = 0  # the rows kept are written by the next flush

    def flush(self) -> None:
        """Write pending rows and missing records, update attributes, ``H5Fflush``.

        After it returns, everything appended so far survives a SIGKILL.
        :class:`DiskFull` if not every pending row fits on the disk: the rows
        that fit are written and flushed first (the file is then as after a
        successful flush, with ``rows_kept`` rows), the others dropped.
        """
        self._check_open()
        self._slot.check(self._file_fd)  # a removed output folder is an error, not rows "written" into nothing
        pending = self.rows - self._rows_written
        try:
            fitting = self._rows_that_fit() if self.disk_full is None else pending
            if fitting < pending:
                self._forget_rows(self._rows_written + fitting)
            self._write_block()
            self._write_missing()
            self._write_file_attributes(complete=False)
            self._file.flush()
            self._io.commit()  # only now: the file on disk is this flush's, whole
        except Exception as error:
            if not is_disk_full(error) or isinstance(error, DiskFull):
                raise
            self._recover_from_full_disk(error)
        self._last_flush = self._clock()
        self.flushes += 1
        self._groups_since_flush = 0
        if fitting < pending:
            self.disk_full = DiskFull(
                f"{self.path}: the disk is full; {self._rows_written} rows are in the file, the last "
                f"{pending - fitting} appended do not fit ({self._slot.free_bytes()} bytes free)",
                self._rows_written, pending - fitting)
            logger.error("%s", self.disk_full)
            raise self.disk_full
        if self._spare_spent and self.disk_full is None:
            self.disk_full = DiskFull(
                f"{self.path}: the disk is full; {self._rows_written} rows are in the file (their flush needed the "
                f"spare reserve), no more fit ({self._slot.free_bytes()} bytes free)", self._rows_written, 0)
            logger.error("%s", self.disk_full)
            raise self.disk_full

    def _spend_spare(self) -> bool:
        """A write found no room although the check said there was: give it the spare reserve (once)."""
        if not self._slot.release_spare():
            return False
        self._spare_spent = True
        logger.error("%s: a write found no room (%d bytes free); the spare reserve of %d bytes is given to it, "
                     "the rows appended so far are flushed, and no more are taken", self.path,
                     self._slot.free_bytes(), SPARE_BYTES)
        return True

    def _rows_that_fit(self) -> int:
        """How many pending rows fit on the disk with the margin of a flush (all of them, normally).

        An upper bound of what writing them takes (``Column.space_needed``),
        and of what the undo journal takes meanwhile (the committed bytes the
        flush rewrites in place: ``Column.rewritten_bytes``), against the
        file system's free space; the close has its own reserve.
        """
        self._scatter()
        start, pending = self._rows_written, self.rows - self._rows_written
        unsettled = sum(1 for name in self._last_spec if name not in self._columns and name not in self._refused)
        columns = list(self._each_column())
        margin = (FLUSH_MARGIN_BYTES + GROUP_BYTES * (self._groups_since_flush + unsettled)
                  + MISSING_RECORD_BYTES * self._missing_unwritten())
        free = self._slot.free_bytes() - margin
        if self._io.journal_fd >= 0:  # groups made since the last flush (the newest ones) rewrite nothing committed
            committed = columns[:max(0, len(columns) - self._groups_since_flush)]
            # For the largest block (all pending rows): a smaller one rewrites no more.
            journal = JOURNAL_FILE_BYTES + sum(column.rewritten_bytes(start, pending) for column in committed)
            free -= max(0, journal - self._io.journal_room)  # its room allocated already is not free and is reused

        def fits(rows: int) -> bool:
            return sum(column.space_needed(start, rows) for column in columns) <= free

        if fits(pending):
            return pending
        low, high = 0, pending  # fits(low); not fits(high)
        if not fits(0):
            return 0
        while high - low > 1:
            middle = (low + high) // 2
            if fits(middle):
                low = middle
            else:
                high = middle
        return low

    def _recover_from_full_disk(self, error: BaseException) -> None:
        """A write found no room although the check said there was: back to the rows of the last flush.

        Another process took the space (or a quota refused it). The reserve
        is given back, so that HDF5 can write the metadata it holds; every
        dataset is cut back to the rows on disk (metadata only) and the rows
        of this block dropped; then the file is flushed as it was, and
        :class:`DiskFull` raised.
        """
        released = self._slot.release_reserve()
        logger.error("%s: the disk is full while writing (%s); reserve %s; back to the %d rows flushed",
                     self.path, error, "released" if released else "already used", self._rows_written)
        dropped = self.rows - self._rows_written
        # The failed write's frames still hold numpy views of the pending buffers: let go, so they can shrink.
        traceback.clear_frames(error.__traceback__)
        self._forget_rows(self._rows_written)
        self._missing_on_disk = None  # the table may be half grown: written again whole
        try:
            for column in self._each_column():
                column.resize(self._rows_written)
            self._write_missing()
            self._write_file_attributes(complete=False)
            self._file.flush()
            self._io.commit()
        except Exception:  # noqa: BLE001 (the close tries again, with whatever room there is)
            logger.exception("%s: flushing after the full disk failed", self.path)
        self.disk_full = DiskFull(f"{self.path}: the disk is full ({error}); {self._rows_written} rows are in "
                                  f"the file, the last {dropped} appended are not", self._rows_written, dropped)
        raise self.disk_full from error

    def close(self, attributes: Mapping[str, Any] | None = None) -> None:
        """Write everything, mark the file complete and close it. Idempotent.

        Channels announced but never present get all-absent datasets with
        their last announced type. The HDF5 file is closed even when writing
        fails (the error is then raised).
        """
        if self._closed:
            return
        try:
            if attributes:
                self.set_attributes(attributes)
            self._slot.release_reserve()  # the room the close needs, also on a full disk
            self.settle_channels()
            self._write_block()
            self._merge_variants()
            self._write_missing()
            self._write_file_attributes(complete=True)
            self._slot.check(self._file_fd)  # complete, but where nobody will find it: an error
        finally:
            self._closed = True
            try:
                closed_whole = False
                try:
                    self._file.close()
                    closed_whole = True
                finally:
                    try:
                        if closed_whole:
                            self._end_journal()
                        else:  # HDF5 stopped half way through its close: the file as of the last flush
                            self._undo_to_last_flush()
                    finally:
                        self._slot.close()
            finally:
                self._maker.close()  # its in-memory templates: after the file, whatever happens there
        logger.info("closed %s: %d rows, %d channels, %d missing pulses",
                    self.path, self.rows, len(self._last_spec), self.missing_pulses)

    def settle_channels(self) -> None:
        """Give every channel announced so far its group (or refuse it): after this, no append, no refusal.

        :meth:`close` does it; the writer calls it first, so that the
        outcome it writes into the file counts every refused channel.
        """
        self._check_open()
        if self.disk_full is not None:
            self._slot.release_reserve()  # new groups need room
        self._scatter()
        undecoded = RejectReason.VALUE_INVALID.value
        for name, spec in self._last_spec.items():
            # A channel whose values all failed to decode gets no group: its claimed shape never held.
            if name not in self._columns and undecoded not in self._refused_values.get(name, ()):
                self._column_for(spec)  # created with _rows_written rows, all absent

    def abandon(self) -> None:
        """Close and remove the file (a start that failed after it was created), through its pinned folder."""
        try:
            if not self._closed:
                self._closed = True
                self._file.close()
        finally:
            self._maker.close()
            try:
                self._end_journal(cut=False)
            finally:
                self._slot.remove()
                self._slot.close()

    def leave_at_last_flush(self) -> None:
        """Close without writing anything more: the file stays as of its last completed flush.

        For a process that ends with the file open (an exception past the
        close, a test that failed): HDF5 closes the file (whatever it writes
        then is journaled) and the journal is applied here, as the guardian
        would after a kill. Runs at exit for every file still open
        (:func:`_leave_open_files`): HDF5's own exit handler would close it
        after Python has gone, through h5py's driver that calls back into
        Python: a segmentation fault, and a journal left for the guardian.
        """
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._file.close()
            finally:
                try:
                    self._undo_to_last_flush(reason="the file was left open")
                finally:
                    self._slot.close()
        finally:
            self._maker.close()

    def _undo_to_last_flush(self, reason: str = "the close failed") -> None:
        """Apply the journal here and now (a close that failed half way), then remove it."""
        io = self._io
        if io is not None and io.fd >= 0 and io.journal_fd >= 0:
            plan = undo(io.fd, io.journal_fd)
            logger.error("%s: %s; the file is back at its last flush (%s)", self.path, reason, plan.describe())
        self._end_journal(cut=False)

    def __enter__(self) -> "H5File":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path} is closed")

    def _use_header(self, header: Any) -> HeaderPlan:
        """A new data header: map each channel index to its column (if any yet)."""
        self._scatter()  # pending packed rows belong to the previous plan
        columns: list[Column | None] = []
        for spec in header.channels:
            if spec.refused is None:  # a refused entry describes nothing (and may repeat a good name)
                self._last_spec[spec.name] = spec
            variants = self._columns.get(spec.name)
            columns.append(variants.get(channel_signature(spec)) if variants else None)
        self._plan = HeaderPlan(header, columns)
        return self._plan

    def _scatter(self) -> None:
        """Every packed row gathered so far into its column (before anything else touches the columns)."""
        self._packed.scatter(self._plan, self._column_for)

    def _column_for(self, spec: ChannelSpec) -> Column | None:
        """The column for this channel's (type, shape), creating it (and its group) if new.

        None for a refused channel: a group that cannot be made (its name
        taken by a variant group, an HDF5 error) costs that channel, never
        another one or the close; the refusal is recorded in the file.
        """
        if spec.name in self._refused:
            return None
        variants = self._columns.setdefault(spec.name, {})
        signature = channel_signature(spec)
        column = variants.get(signature)
        if column is not None:
            return column
        base = channel_group_name(spec.name)
        if not variants:
            group_name = base
            if CALLS.exists(self._data.id, group_name.encode("utf-8")):  # `in self._data`, without h5py's cost
                return self._refuse(spec.name, f"its group /data/{group_name} is already taken")
        else:
            number = len(variants) + 1
            while f"{base}{VARIANT_SEPARATOR}{number}" in self._data:
                number += 1
            group_name = f"{base}{VARIANT_SEPARATOR}{number}"
        try:
            # Rows already on disk read as absent (fill value 0); pending rows of
            # this block before the first value are padded as absent by append.
            column = self._maker.new(self._data, group_name, spec, self._rows_written)
        except Exception as error:  # noqa: BLE001 (whatever HDF5 refuses costs this channel only)
            if is_disk_full(error):
                if not variants:
                    del self._columns[spec.name]
                raise  # not this channel's fault: append() handles the full disk
            logger.exception("channel %r: cannot create /data/%s", spec.name, group_name)
            if not variants:
                del self._columns[spec.name]
            return self._refuse(spec.name, f"cannot create /data/{group_name}: {error}")
        variants[signature] = column
        self._groups_since_flush += 1
        self._busy()
        if len(variants) > 1:
            group = column.group
            group.attrs["channel"] = storable_text(spec.name)
            group.attrs["variant"] = len(variants)
            first = self._data[base]
            first.attrs["variants"] = np.array(
                [base] + [c.group.name.rsplit("/", 1)[1] for c in list(variants.values())[1:]],
                dtype=STRING_DTYPE)
            logger.warning("channel %s changed to %s %s: values go to /data/%s",
                           spec.name, signature[0], list(signature[1]), group_name)
        return column

    def _busy(self) -> None:
        """One channel's HDF5 work done: every KEEP_ALIVE_CHANNELS, ``keep_alive()`` (if set).

        Why: the first block of a stream of 12 000 channels creates 12 000
        groups (seconds, tens of seconds on a loaded machine), and every
        block writes four datasets per channel; a writer that hears nothing
        of its source meanwhile would lose its replay session (the buffer
        forgets a silent writer). The writer sets ``keep_alive`` to its
        source's (``ReplayClient.keep_alive``: a heartbeat when one is due).
        """
        if self.keep_alive is not None:
            self._busy_channels += 1
            if self._busy_channels >= KEEP_ALIVE_CHANNELS:
                self._busy_channels = 0
                self.keep_alive()

    def _merge_variants(self) -> None:
        """Channels that changed type: their variant groups into the original's layout (``h5.variants``).

        A merge that HDF5 refuses is logged and leaves that channel in the
        writing layout (its data is all there); it never costs the close.
        """
        for name, variants in self._columns.items():
            if len(variants) < 2:
                continue
            try:
                merge_variants(self._data, [column.group for column in variants.values()])
            except Exception:  # noqa: BLE001 (the rows are on disk either way)
                logger.exception("channel %r: its types could not be merged; in %s its datasets are left "
                                 "where the merge stopped (/data/%s, /data/%s@n)", name, self.path,
                                 channel_group_name(name), channel_group_name(name))

    def _refuse(self, name: str, reason: str) -> None:
        logger.error("channel %r refused: %s; its values are not in %s", name, reason, self.path)
        self._refused[name] = reason
        if not self._columns.get(name):
            self._columns.pop(name, None)
        return None

    @property
    def refused_channels(self) -> dict[str, str]:
        """Channels whose values (all, or some rows) are not in the file, and why (the file attribute
        ``refused_channels``); any makes the outcome partial."""
        refused = {name: ", ".join(f"{reason} ({count} values): {detail}" for reason, (count, detail) in reasons.items())
                   for name, reasons in self._refused_values.items()}
        return {**refused, **self._refused}

    @property
    def refused_values(self) -> dict[str, dict[str, int]]:
        """Values refused one by one, by channel and reason (stored absent; counted in ``absent_values`` too)."""
        return {name: {reason: count for reason, (count, _) in reasons.items()}
                for name, reasons in self._refused_values.items()}

    def _each_column(self) -> Iterable[Column]:
        for variants in self._columns.values():
            yield from variants.values()

    def _write_block(self) -> None:
        """Write the pending rows of every column: one resize and slice write per dataset."""
        self._scatter()
        start = self._rows_written
        count = self.rows - start
        if not count:
            return
        pulse_ids = np.frombuffer(self._row_pulse_ids[start:], dtype="i8")  # a copy: the log keeps growing
        writes = 0
        for column in self._each_column():
            writes += column.write_block(start, count, pulse_ids)
            self._busy()
        self._rows_written = start + count
        self._pending_bytes = 0
        self.hdf5_writes += writes
        self.blocks_written += 1

    def _write_missing(self) -> None:
        """/missing as the owner's list has it now: what is new appended, else (clipped, half written) whole again."""
        current = list(self._current_missing())
        on_disk = self._missing_on_disk
        if on_disk is not None and current[:len(on_disk)] == on_disk:
            new = current[len(on_disk):]
        else:
            if "missing" in self._file:
                del self._file["missing"]  # absent when nothing is missing, as always
            new = current
        if not new:
            self._missing_on_disk = current
            return
        if "missing" not in self._file:
            table = self._file.create_dataset("missing", shape=(0,), maxshape=(None,),
                                              dtype=MISSING_DTYPE, chunks=(256,))
            table.attrs["description"] = ("pulses not in the file: first_pulse_id..last_pulse_id "
                                          "(inclusive), count pulses, and why")
        table = self._file["missing"]
        start = table.shape[0]
        rows = np.array([(r.first_pulse_id, r.last_pulse_id, r.count, r.reason) for r in new], dtype=MISSING_DTYPE)
        table.resize(start + len(rows), axis=0)
        table[start:] = rows
        self._missing_on_disk = current

    def _write_file_attributes(self, complete: bool) -> None:
        attrs = self._file.attrs
        for key, value in self._attributes.items():
            if value is None:
                if key in attrs:
                    del attrs[key]
                continue
            attrs[key] = attribute_value(value)
        # Counts describe what is on disk, so that they hold after a crash too.
        attrs["number_of_messages"] = np.int64(self._rows_written)
        attrs["missing_pulses"] = np.int64(self.missing_pulses)
        attrs["absent_values"] = np.int64(self.absent_values)
        if self._rows_written:
            attrs["first_pulse_id"] = np.int64(self.first_pulse_id)
            attrs["last_pulse_id"] = np.int64(self.last_pulse_id)
            attrs["first_timestamp"] = float(self.first_timestamp)
            attrs["last_timestamp"] = float(self.last_timestamp)
        else:  # none yet, or truncate() removed them all
            for key in ("first_pulse_id", "last_pulse_id", "first_timestamp", "last_timestamp"):
                attrs.pop(key, None)
        if self._refused or self._refused_values:
            attrs["refused_channels"] = json.dumps(
                [{"channel": name, "reason": reason} for name, reason in self._refused.items()]
                + [{"channel": name, "reason": reason, "values": count, "detail": detail}
                   for name, reasons in self._refused_values.items() for reason, (count, detail) in reasons.items()])
        attrs["complete"] = np.uint8(complete)

    def _write_general(self, general: dict[str, Any], extra: dict[str, Any]) -> None:
        """/general: the four original datasets plus every other parameter.

        The four fields are scalar fixed-length byte strings as in the
        original ("not given" when unset). Every other parameter becomes a
        scalar dataset ``/general/<key>`` (key without a leading
        ``general/``, remaining ``/`` replaced by ``.``): strings as
        fixed-length bytes, numbers as numbers, anything else as JSON text.
        The full parameter dict as received is also kept, losslessly, as
        JSON in the attribute ``/general.attrs["parameters"]``.
        """
        group = self._file.create_group("general")
        parameters = {**general, **extra}
        plain: dict[str, Any] = {}
        for key, value in parameters.items():
            name = str(key)
            if name.startswith("general/"):
                name = name[len("general/"):]
            name = channel_group_name(name.replace("/", ".")) or "_"
            if name in plain:
                logger.warning("parameter %r collides with another after normalisation; "
                               "kept in /general attribute 'parameters' only", key)
                continue
            plain[name] = value
        for name in GENERAL_FIELDS:
            value = plain.pop(name, None)
            text = NOT_GIVEN if value is None else (value if isinstance(value, str) else str(value))
            group.create_dataset(name, data=fixed_string(text))
        for name, value in plain.items():
            try:
                if isinstance(value, str):
                    data: Any = fixed_string(value)
                elif isinstance(value, bool):
                    data = np.uint8(value)
                elif isinstance(value, (int, float)) and not (isinstance(value, int) and abs(value) >= 2**63):
                    data = value
                else:
                    data = fixed_string(json.dumps(value, default=str))
                group.create_dataset(name, data=data)
            except (ValueError, TypeError) as error:
                logger.warning("parameter %r not stored as a dataset (%s); kept in the "
                               "'parameters' attribute", name, error)
        group.attrs["parameters"] = json.dumps(parameters, default=str, sort_keys=True)


#: Files open in this process (weakly: an H5File nobody holds closes with its h5py file, while Python runs).
_OPEN: "weakref.WeakSet[H5File]" = weakref.WeakSet()


@atexit.register
def _leave_open_files() -> None:
    """At exit, every file still open back to its last flush, while Python can still serve h5py's driver."""
    for h5file in list(_OPEN):
        try:
            h5file.leave_at_last_flush()
        except Exception:  # noqa: BLE001 (the next file still gets its turn; the guardian undoes this one)
            logger.exception("%s: leaving the file at its last flush failed", h5file.path)
