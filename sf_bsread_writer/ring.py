"""The ring: recent raw bsread messages, addressed by sequence number, pulse_id and time.

The buffer keeps every message exactly as it arrived (its frames are never
decoded and re-encoded) so that what a writer or a viewer receives is
byte for byte what the source sent. The ring is pure bookkeeping: no
sockets, no threads, no clock. The buffer's single-threaded main loop
appends what it received and sends what ``frames(seq)`` returns.

Addressing
    Every stored message gets a sequence number ``seq`` that grows by one per
    stored message and is never reused. A reader's cursor is therefore a
    plain int; ``seek(cursor)`` tells it where it can continue and, when the
    answer is not ``cursor``, that messages were lost under it (evicted for
    space, or dropped by a pulse-id reset). Messages are kept sorted by
    pulse_id (a confirmed pulse-id reset evicts the tail first, see
    ``append``), so ``seq_for_pulse_id`` is a binary search.

Pulse-id resets need confirmation
    A source that restarts numbers its pulses from a lower value and keeps
    counting up; a single glitched message (a pulse_id of 0 in a stream at
    2e10, a late re-send) does not continue. Acting on the first backwards
    message would let one bad message evict the whole ring, so a backwards
    pulse_id is *held back* until ``reset_confirm`` messages in a row,
    increasing among themselves, confirm the new timeline. Only then is the
    old tail evicted and the held messages stored. If the stream goes on
    above the newest held pulse_id instead, the held-back messages are
    dropped and counted as ``out_of_order``.

Storage (why it looks like this; numbers in docs/performance.md)
    * Per-message index fields (seq, pulse_id, timestamp, bytes) live in
      preallocated numpy arrays used circularly: no per-message Python ints.
    * Each message is held in the packed form of ``bsread.parts``
      (:class:`~.parts.PackedParts`): the small parts (below
      ``LARGE_PART_BYTES``, pyzmq's zero-copy threshold) in one ``bytes``,
      the large ones (images, big arrays) as the objects received, zero-copy
      and reference-counted by libzmq, so the same frame can be sent to any
      number of peers any number of times. A 500-channel scalar message has
      1002 parts of 8-16 bytes: one Python object each would cost about 10x
      the payload. The compiled receiver (``transport.partsio``) delivers
      this form directly; plain frame lists are packed here.
    * Consecutive messages with equal part lengths share one ``Layout``.
    * Part 1 (the bsread data header, ~80 bytes per channel, sent in every
      message) is shared with the previous message when byte-identical, so a
      scalar stream's ring holds one copy of its data header, not one per
      message. ``n_bytes`` still counts it for every message (the logical,
      on-the-wire size, which is what ``max_bytes`` bounds), so the memory
      actually held is at most ``n_bytes`` plus small overhead.
    Where large parts live in memory is decided by the allocator: see
    ``process.tune_allocator``, which the buffer calls once at start.

Thread safety: none. One owner (the buffer's main loop).
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sf_bsread_writer.bsread.parts import (
    LARGE_PART_BYTES,
    LayoutCache,
    PackedParts,
    pack,
)

__all__ = [
    "RingEvent",
    "LARGE_PART_BYTES",
    "RESET_CONFIRM_MESSAGES",
    "FORWARD_CONFIRM_STEPS",
    "AppendResult",
    "AppendStatus",
    "Ring",
    "RingCounters",
]


#: Backwards messages in a row, increasing among themselves, that confirm a
#: pulse-id reset (a source restart). 3 messages are 30 ms at 100 Hz.
RESET_CONFIRM_MESSAGES = 3

#: A forward step of more than this many usual steps (10 s at 100 Hz) is held
#: back until the next message goes on above it; one that does not was a
#: stray pulse id (a glitch near 2^63, say) and is dropped.
FORWARD_CONFIRM_STEPS = 1000



class AppendStatus(str, enum.Enum):
    """What ``Ring.append`` did with a message (stable values: usable as statistics keys)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same pulse_id as the newest held message: not stored
    OVERSIZE = "oversize"  # larger than max_bytes on its own: not stored, ring untouched
    HELD_BACK = "held_back"  # pulse_id went backwards: held until a reset is confirmed (module doc)


@dataclass(frozen=True, slots=True)
class RingEvent:
    """Something the ring did that an operator should hear of: the ring decides, the buffer logs (rate limited).

    ``kind``: ``oversize`` (larger than the whole ring: not stored), ``stray`` (a pulse id far ahead of the
    stream that the next message showed to be a stray: dropped), ``reset`` (pulse ids went back and went on:
    a source restart; newer held messages evicted), ``out_of_order`` (held-back messages dropped because the
    stream went on above them). ``text`` says it with the pulse ids.
    """

    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Outcome of one ``Ring.append``; everything the caller may want to count or log."""

    status: AppendStatus
    seq: int | None = None  # seq of the stored message (None unless STORED)
    evicted: int = 0  # oldest messages evicted to make room (count or bytes bound)
    reset_evicted: int = 0  # newest messages evicted because the pulse_id went backwards
    skipped_pulses: int = 0  # > 0: pulses missing before this one (a jump)
    events: tuple[RingEvent, ...] = ()  # what happened besides storing, for the shell to count and log


    @property
    def stored(self) -> bool:
        return self.status is AppendStatus.STORED

    @property
    def reset(self) -> bool:
        return self.reset_evicted > 0


@dataclass(slots=True)
class RingCounters:
    """Cumulative counts since the ring was created (for /statistics)."""

    stored: int = 0
    evicted: int = 0  # by the count/bytes bound
    evicted_bytes: int = 0
    resets: int = 0  # appends whose pulse_id was below the newest held one
    reset_evicted: int = 0  # messages evicted by those resets
    duplicates: int = 0  # appends with pulse_id == newest: not stored
    held_back: int = 0  # backwards messages held until a reset was confirmed or refuted
    out_of_order: int = 0  # held-back messages dropped: the stream went on above them
    oversize: int = 0  # appends larger than max_bytes: not stored
    jumps: int = 0  # forward steps larger than the stream's usual step
    jumped_pulses: int = 0  # pulses missing in those jumps
    strays: int = 0  # messages far ahead of the stream that it did not follow: dropped


class Ring:
    """Raw messages bounded by count and bytes, evicting the oldest; see the module docstring.

    Held messages have sequence numbers in ``[first_seq, next_seq)``; the
    range has holes only where a pulse-id reset dropped messages, and
    ``seek`` steps over them. Every method is O(1) or O(log n) in the number
    of held messages, except ``append`` which is O(parts of the message) (and
    O(evicted) when it evicts).
    """

    def __init__(self, max_messages: int, max_bytes: int,
                 reset_confirm: int = RESET_CONFIRM_MESSAGES) -> None:
        if reset_confirm < 1:
            raise ValueError(f"reset_confirm must be >= 1, got {reset_confirm}")
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self._events: list[RingEvent] = []  # filled by one append, handed out on its result
        self.max_messages = int(max_messages)
        self.max_bytes = int(max_bytes)
        self.reset_confirm = int(reset_confirm)
        # backwards messages awaiting confirmation: (pulse_id, timestamp, message)
        self._held_back: list[tuple[int, float, PackedParts]] = []
        # a message far ahead, awaiting the next one: (pulse_id, timestamp, message)
        self._forward_candidate: tuple[int, float, PackedParts] | None = None
        capacity = self.max_messages
        self._capacity = capacity
        self._seq = np.zeros(capacity, dtype=np.int64)
        self._pulse_id = np.zeros(capacity, dtype=np.int64)
        self._timestamp = np.zeros(capacity, dtype=np.float64)
        # running maximum of timestamps: what seq_for_time searches (sorted even if time is not)
        self._time_key = np.zeros(capacity, dtype=np.float64)
        self._nbytes = np.zeros(capacity, dtype=np.int64)
        self._message: list[PackedParts | None] = [None] * capacity
        self._head = 0  # slot of the oldest held message
        self._count = 0
        self._n_bytes = 0
        self._next_seq = 0
        self._layouts = LayoutCache()
        self._last_header: bytes | None = None
        self._last_step: int | None = None
        self._usual_step: int | None = None
        self.counters = RingCounters()

    # ------------------------------------------------------------------ state

    @property
    def n_messages(self) -> int:
        return self._count

    def __len__(self) -> int:
        return self._count

    @property
    def n_bytes(self) -> int:
        """Sum of the lengths of every part of every held message (what ``max_bytes`` bounds)."""
        return self._n_bytes

    @property
    def first_seq(self) -> int:
        """Seq of the oldest held message; ``next_seq`` when empty. A cursor below it was evicted."""
        if self._count == 0:
            return self._next_seq
        return int(self._seq[self._head])

    @property
    def next_seq(self) -> int:
        """The seq the next stored message will get (one past the newest ever stored)."""
        return self._next_seq

    @property
    def oldest_pulse_id(self) -> int | None:
        return int(self._pulse_id[self._head]) if self._count else None

    @property
    def newest_pulse_id(self) -> int | None:
        return int(self._pulse_id[self._slot_of_index(self._count - 1)]) if self._count else None

    @property
    def oldest_time(self) -> float | None:
        """The time the oldest held message is indexed by (``bsread.timebase``), None when empty."""
        return float(self._timestamp[self._head]) if self._count else None

    @property
    def newest_time(self) -> float | None:
        return float(self._timestamp[self._slot_of_index(self._count - 1)]) if self._count else None

    @property
    def usual_step(self) -> int | None:
        """The pulse-id step this stream usually advances by (None until known)."""
        return self._usual_step

    # ------------------------------------------------------------------ append

    def append(self, pulse_id: int, timestamp: float, frames: PackedParts | Sequence[Any]) -> AppendResult:
        """Store one message: a :class:`~.parts.PackedParts`, or its raw frames (``zmq.Frame``, bytes-like).

        The caller has validated the message (``protocol``); the ring only
        looks at the pulse_id, the timestamp and the part lengths. Rules:

        * larger than ``max_bytes`` on its own: rejected (``OVERSIZE``), the
          ring is left untouched. Wiping a whole ring to hold one message
          that cannot fit anyway would lose everything for nothing.
        * pulse_id equal to the newest held one: rejected (``DUPLICATE``).
        * pulse_id below the newest held one: ``HELD_BACK`` until
          ``reset_confirm`` such messages in a row (increasing among
          themselves) confirm a reset (the source restarted). Then every held
          message with a pulse_id >= the first held-back one is evicted (a
          warning is logged), so the ring stays sorted by pulse_id, and the
          held-back messages are stored; the result is the last one's. Their
          seqs are never reused (a hole). A message above the newest ends the
          wait: the held-back ones are dropped (``out_of_order``).
        * pulse_id more than ``FORWARD_CONFIRM_STEPS`` usual steps above the
          newest: ``HELD_BACK`` until the next message. If that one goes on
          above it, both are stored (a real jump, counted); if not, it was a
          stray and is dropped (``strays``), so one garbage pulse id can
          neither end the ring's order nor inflate ``jumped_pulses``.
        * otherwise the oldest messages are evicted until the new one fits
          both bounds.

        ``bytes`` and ``zmq.Frame`` large parts are kept by reference and must
        not be modified afterwards (neither can be); other large buffers
        (bytearray, memoryview) are copied, because their owner could.
        """
        self._events: list[RingEvent] = []
        result = self._append(int(pulse_id), timestamp, frames)
        if self._events:
            result = dataclasses.replace(result, events=tuple(self._events))
        return result

    def _append(self, pulse_id: int, timestamp: float, frames: PackedParts | Sequence[Any]) -> AppendResult:
        message = pack(frames, self._layouts, self._last_header)
        header = message.header
        if header is not None and header is not self._last_header:
            if header == self._last_header:  # a memcmp: share one copy of an unchanged data header
                message = message.with_header(self._last_header)
            else:
                self._last_header = header
        nbytes = message.nbytes
        if nbytes > self.max_bytes:
            self.counters.oversize += 1
            self._events.append(RingEvent("oversize", f"message with pulse_id {pulse_id} has {nbytes} bytes, more "
                                                      f"than the ring's max_bytes {self.max_bytes}: not stored"))
            return AppendResult(AppendStatus.OVERSIZE)

        candidate = self._forward_candidate
        if candidate is None:
            return self._append_in_order(pulse_id, timestamp, message)
        self._forward_candidate = None
        if pulse_id <= candidate[0]:
            self.counters.strays += 1
            self._events.append(RingEvent("stray", f"pulse_id {candidate[0]} far ahead of the stream was a stray "
                                                   f"(the next is {pulse_id}): dropped"))
            return self._append_in_order(pulse_id, timestamp, message)
        # The stream went on above it: a real jump, stored first; the result tells of both.
        jump = self._append_in_order(*candidate, confirmed=True)
        result = self._append_in_order(pulse_id, timestamp, message)
        return AppendResult(result.status, result.seq, jump.evicted + result.evicted,
                            jump.reset_evicted + result.reset_evicted, jump.skipped_pulses + result.skipped_pulses)

    def _append_in_order(self, pulse_id: int, timestamp: float, message: PackedParts,
                         confirmed: bool = False) -> AppendResult:
        skipped = 0
        if self._count:
            newest = int(self._pulse_id[self._slot_of_index(self._count - 1)])
            if pulse_id == newest:
                self.counters.duplicates += 1
                return AppendResult(AppendStatus.DUPLICATE)
            if pulse_id < newest:
                return self._hold_back(pulse_id, timestamp, message, newest)
            usual = self._usual_step
            if not confirmed and usual is not None and pulse_id - newest > FORWARD_CONFIRM_STEPS * usual:
                # Before anything else: a stray must not end the confirmation of a reset either.
                self._forward_candidate = (pulse_id, timestamp, message)
                self.counters.held_back += 1
                return AppendResult(AppendStatus.HELD_BACK)
            if self._held_back:
                self._drop_held_back(f"the stream went on at pulse_id {pulse_id}")
            skipped = self._track_step(pulse_id - newest)
        seq, evicted = self._store_message(pulse_id, timestamp, message)
        return AppendResult(AppendStatus.STORED, seq, evicted, 0, skipped)

    def _hold_back(self, pulse_id: int, timestamp: float, message: PackedParts, newest: int) -> AppendResult:
        """A backwards pulse_id: wait for confirmation of a reset (module docstring)."""
        held = self._held_back
        if held and pulse_id <= held[-1][0]:
            if pulse_id == held[-1][0]:
                self.counters.duplicates += 1
                return AppendResult(AppendStatus.DUPLICATE)
            self._drop_held_back(f"pulse_id {pulse_id} went below them again")
            held = self._held_back
        held.append((pulse_id, timestamp, message))
        self.counters.held_back += 1
        if len(held) < self.reset_confirm:
            return AppendResult(AppendStatus.HELD_BACK)

        self._held_back = []
        reset_evicted = self._evict_from_pulse_id(held[0][0])
        self._events.append(RingEvent("reset", f"pulse_id went backwards from {newest} to {held[0][0]} and went on "
                                               f"({len(held)} messages): source restart; evicted {reset_evicted} "
                                               f"held messages with pulse_id >= {held[0][0]}"))
        self._last_step = None
        evicted = 0
        previous = None
        for held_pulse_id, held_timestamp, held_message in held:
            if previous is not None:
                self._track_step(held_pulse_id - previous)
            seq, evicted_now = self._store_message(held_pulse_id, held_timestamp, held_message)
            evicted += evicted_now
            previous = held_pulse_id
        return AppendResult(AppendStatus.STORED, seq, evicted, reset_evicted, 0)

    def _drop_held_back(self, why: str) -> None:
        dropped = [entry[0] for entry in self._held_back]
        self._held_back = []
        self.counters.out_of_order += len(dropped)
        shown = ", ".join(map(str, dropped[:10])) + (f" ... ({len(dropped)} in all)" if len(dropped) > 10 else "")
        self._events.append(RingEvent("out_of_order", f"dropped {len(dropped)} out-of-order message(s) with "
                                                      f"pulse_id {shown}: {why}"))

    def _store_message(self, pulse_id: int, timestamp: float, message: PackedParts) -> tuple[int, int]:
        """Evict the oldest until the message fits both bounds, then store it; return (seq, evicted)."""
        nbytes = message.nbytes
        evicted = 0
        while self._count and (self._count >= self.max_messages
                               or self._n_bytes + nbytes > self.max_bytes):
            self._evict_oldest()
            evicted += 1

        slot = self._slot_of_index(self._count)
        seq = self._next_seq
        self._message[slot] = message
        self._seq[slot] = seq
        self._pulse_id[slot] = pulse_id
        timestamp = float(timestamp)
        self._timestamp[slot] = timestamp
        self._insert_time_key(slot, timestamp)
        self._nbytes[slot] = nbytes
        self._count += 1
        self._n_bytes += nbytes
        self._next_seq = seq + 1
        self.counters.stored += 1
        return seq, evicted

    def _track_step(self, step: int) -> int:
        """Count a jump if ``step`` exceeds the usual step; return the pulses skipped.

        The usual step is the most recent step seen twice in a row (the first
        step seen until then), so a source that changes its rate is
        re-learned after two messages while an isolated jump never becomes
        "usual".
        """
        usual = self._usual_step
        skipped = 0
        if usual is None:
            self._usual_step = step
        elif step > usual:
            skipped = (step - 1) // usual
            self.counters.jumps += 1
            self.counters.jumped_pulses += skipped
        if step == self._last_step:
            self._usual_step = step
        self._last_step = step
        return skipped

    def _insert_time_key(self, slot: int, timestamp: float) -> None:
        """Keep ``_time_key`` = suffix minimum of the held timestamps (sorted; see seq_for_time).

        Monotonic time costs one comparison. A timestamp below earlier keys
        lowers them (a vectorised slice assignment, O(affected)).
        """
        key = np.inf if timestamp != timestamp else timestamp  # NaN says nothing about time
        count = self._count
        if count and self._time_key[self._slot_of_index(count - 1)] > key:
            start = self._search(self._time_key, key, side="right")
            self._assign(self._time_key, start, count, key)
        self._time_key[slot] = key

    def _recompute_time_keys(self) -> None:
        """After a reset removed the tail, the suffix minima of what is left may have to rise again."""
        if not self._count:
            return
        order = [self._slot_of_index(i) for i in (0, self._count - 1)]
        if order[0] <= order[1]:
            times = self._timestamp[order[0]:order[1] + 1].copy()
        else:
            times = np.concatenate([self._timestamp[order[0]:], self._timestamp[:order[1] + 1]])
        times[np.isnan(times)] = np.inf
        keys = np.minimum.accumulate(times[::-1])[::-1]
        self._assign(self._time_key, 0, self._count, keys)

    def _assign(self, array: np.ndarray, start: int, stop: int, value: Any) -> None:
        """``array[held index start:stop] = value`` across the circular wrap (value: scalar or array)."""
        if start >= stop:
            return
        first = self._slot_of_index(start)
        n = stop - start
        n_first = min(n, self._capacity - first)
        if isinstance(value, np.ndarray):
            array[first:first + n_first] = value[:n_first]
            array[:n - n_first] = value[n_first:]
        else:
            array[first:first + n_first] = value
            array[:n - n_first] = value

    # ------------------------------------------------------------------ eviction

    def _release(self, slot: int) -> None:
        self._message[slot] = None

    def _evict_oldest(self) -> None:
        slot = self._head
        nbytes = int(self._nbytes[slot])
        self._release(slot)
        self._head = (slot + 1) % self._capacity
        self._count -= 1
        self._n_bytes -= nbytes
        self.counters.evicted += 1
        self.counters.evicted_bytes += nbytes

    def _evict_from_pulse_id(self, pulse_id: int) -> int:
        """Evict every held message with pulse_id >= ``pulse_id`` (the tail); return how many."""
        keep = self._search(self._pulse_id, pulse_id)
        n_evict = self._count - keep
        for index in range(keep, self._count):
            slot = self._slot_of_index(index)
            self._n_bytes -= int(self._nbytes[slot])
            self._release(slot)
        self._count = keep
        self._recompute_time_keys()
        self.counters.resets += 1
        self.counters.reset_evicted += n_evict
        return n_evict

    # ------------------------------------------------------------------ lookup

    def _slot_of_index(self, index: int) -> int:
        """Slot of the index-th held message (0 = oldest)."""
        slot = self._head + index
        return slot - self._capacity if slot >= self._capacity else slot

    def _search(self, array: np.ndarray, value: int | float, side: str = "left") -> int:
        """Index (0 = oldest) of the first held message whose ``array`` entry is >= value (> for "right").

        ``array`` is sorted over the held messages in ring order; held slots
        are at most two contiguous runs, each searched with numpy.
        """
        count = self._count
        if count == 0:
            return 0
        head = self._head
        end = head + count
        if end <= self._capacity:
            return int(np.searchsorted(array[head:end], value, side=side))
        first_run = array[head:]
        last = first_run[-1]
        if value < last or (side == "left" and value == last):
            return int(np.searchsorted(first_run, value, side=side))
        return len(first_run) + int(np.searchsorted(array[:end - self._capacity], value, side=side))

    def _slot_of_seq(self, seq: int) -> int:
        """Slot holding ``seq``; KeyError if it is not held."""
        count = self._count
        first = self.first_seq
        if count == 0 or seq < first or seq >= self._next_seq:
            raise KeyError(seq)
        if self._next_seq - first == count:  # no holes: direct
            return self._slot_of_index(seq - first)
        index = self._search(self._seq, seq)
        slot = self._slot_of_index(index)
        if index >= count or int(self._seq[slot]) != seq:
            raise KeyError(seq)  # in a hole left by a reset
        return slot

    def __contains__(self, seq: int) -> bool:
        try:
            self._slot_of_seq(seq)
        except KeyError:
            return False
        return True

    def seek(self, seq: int) -> int:
        """The first held seq >= ``seq``; ``next_seq`` if there is none.

        This is where a reader whose cursor is ``seq`` continues. When the
        answer is not ``seq`` (and ``seq < next_seq``), the messages in
        between were lost to the reader: evicted for space (``seq <
        first_seq``) or by a pulse-id reset. It owes its client a gap notice.
        """
        first = self.first_seq
        if seq <= first:
            return first
        if seq >= self._next_seq:
            return self._next_seq
        if self._next_seq - first == self._count:
            return seq
        index = self._search(self._seq, seq)
        return int(self._seq[self._slot_of_index(index)]) if index < self._count else self._next_seq

    def frames(self, seq: int) -> list:
        """The message's parts, for ``socket.send_multipart(parts, copy=False)``. KeyError if not held.

        Small parts are read-only memoryviews into the packed storage (pyzmq
        copies them on send); large parts are the stored objects (sent
        zero-copy, any number of times). The list is new on every call; its
        buffers stay valid even after the message is evicted.
        """
        return self._message[self._slot_of_seq(seq)].frames()

    def message(self, seq: int) -> PackedParts:
        """The message as stored (``transport.partsio.send_parts`` sends it in one call). KeyError if not held.

        Immutable, and valid even after the message is evicted.
        """
        return self._message[self._slot_of_seq(seq)]

    def pulse_id(self, seq: int) -> int:
        return int(self._pulse_id[self._slot_of_seq(seq)])

    def timestamp(self, seq: int) -> float:
        """The global timestamp given to ``append`` (seconds), unmodified."""
        return float(self._timestamp[self._slot_of_seq(seq)])

    def nbytes(self, seq: int) -> int:
        return int(self._nbytes[self._slot_of_seq(seq)])

    def seq_for_pulse_id(self, pulse_id: int) -> int:
        """First held seq whose pulse_id >= ``pulse_id``; ``next_seq`` if none. O(log n).

        A pulse_id that is not held (skipped by a jump, or already evicted)
        gives the next one held; below the oldest gives ``first_seq``.
        """
        index = self._search(self._pulse_id, int(pulse_id))
        if index >= self._count:
            return self._next_seq
        return int(self._seq[self._slot_of_index(index)])

    def seq_for_time(self, t: float) -> int:
        """First held seq at which the global timestamp reaches ``t``; ``next_seq`` if none. O(log n).

        Precisely: the first held message from which on *every* held message
        has a timestamp >= ``t`` (a NaN timestamp counts as no constraint).
        For non-decreasing timestamps that is plain bisection. When time is
        not monotonic (a clock stepping back, one message stamped in the
        future or the past) the answer is still well defined, never fails
        and never disturbs the pulse_id order: a future-stamped message is
        ignored once a later one is earlier; a past-stamped one makes every
        held message before it count as "before t", until it is evicted.
        (Kept as a suffix minimum of the timestamps, updated at append.)
        """
        index = self._search(self._time_key, float(t))
        if index >= self._count:
            return self._next_seq
        return int(self._seq[self._slot_of_index(index)])

    def __repr__(self) -> str:
        return (f"Ring({self._count}/{self.max_messages} messages, {self._n_bytes}/{self.max_bytes} bytes,"
                f" seq [{self.first_seq}, {self._next_seq}), pulse_id {self.oldest_pulse_id}"
                f"..{self.newest_pulse_id})")
