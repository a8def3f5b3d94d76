"""The buffer's side of one replay session: one writer's cursor over the ring (pure).

Given the ring, the writer's credits and ``now``, :meth:`ReplaySession.poll`
says what to send next (data, gap notices, the end notice, heartbeats). The
buffer's replay endpoint (``replay.endpoint``) is a thin shell that
moves frames between its ROUTER socket and the sessions. The wire messages
are in :mod:`.replay_messages`; the protocol is docs/replay-protocol.md.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from sf_bsread_writer.replay.messages import (
    MAX_WINDOW,
    Credit,
    Data,
    End,
    EndReason,
    Gap,
    GapReason,
    Heartbeat,
    Request,
    SetStop,
)
from sf_bsread_writer.status import SessionStatus

__all__ = ["RingView", "ReplaySession"]


class RingView(Protocol):
    """What a session needs from ring.Ring (see docs/architecture.md)."""

    first_seq: int
    next_seq: int
    oldest_pulse_id: int | None
    newest_pulse_id: int | None

    def message(self, seq: int) -> Any: ...
    def nbytes(self, seq: int) -> int: ...
    def pulse_id(self, seq: int) -> int: ...
    def timestamp(self, seq: int) -> float: ...
    def seek(self, seq: int) -> int: ...
    def seq_for_pulse_id(self, pulse_id: int) -> int: ...
    def seq_for_time(self, t: float) -> int: ...


class ReplaySession:
    """One writer's cursor over the ring, and everything owed to it.

    Pure: the buffer calls :meth:`on_message` with what the writer sent and
    :meth:`poll` with the ring and the clock, and sends what ``poll``
    returns, in order. Guarantees:

    - at most ``window`` :class:`Data` in flight (sent, not yet reported
      consumed by a :class:`Credit`), and at most ``max_in_flight_bytes`` of
      them (but always one message): what a writer that stops reading can
      pin in the buffer's memory is bounded whatever the message size;
    - messages in ring order, each at most once; a :class:`Gap` before the
      first message after any loss (coalesced: one gap per hole); a message
      larger than the request's ``max_message_bytes`` is a gap (``oversize``)
      in its place, never sent;
    - :class:`End` after the stop (inclusive) and nothing afterwards;
    - a :class:`Heartbeat` when nothing else was sent for ``heartbeat_interval``.
    """

    def __init__(self, session_id: str, request: Request, ring: RingView, now: float,
                 heartbeat_interval: float = 1.0, max_in_flight_bytes: int | None = None) -> None:
        self.session_id = session_id
        self.request = request
        self.window = min(request.window, MAX_WINDOW)
        self.start_pulse_id = request.start_pulse_id
        self.start_time = request.start_time
        self.stop_pulse_id = request.stop_pulse_id
        self.stop_time = request.stop_time
        self.heartbeat_interval = heartbeat_interval
        self.created = now
        self.last_heard = now
        self.last_sent = now
        self.sent = 0  # data messages sent
        self.acked = 0  # data messages the writer reports consumed
        self.max_in_flight_bytes = max_in_flight_bytes
        self._in_flight_sizes: deque[int] = deque()  # bytes of the messages in flight, oldest first
        self._in_flight_bytes = 0
        self.gaps = 0
        self.lost = 0  # messages reported lost (where known)
        self.last_pulse_id: int | None = None  # last pulse id sent
        self.last_time: float | None = None  # its time (the ring's): progress of a range by time
        self.ended: End | None = None
        self._started = False  # first message at/after the start found
        self._order_pulse_id: int | None = None  # for detecting a pulse-id restart without loss
        self._resets_seen = _ring_resets(ring)
        self._pending: list[Any] = []  # control messages owed before the next data
        if request.start_pulse_id is not None:
            self.cursor = ring.seq_for_pulse_id(request.start_pulse_id)
            oldest = ring.oldest_pulse_id
            if oldest is not None and request.start_pulse_id < oldest:
                self._add_gap(Gap(request.start_pulse_id, oldest - 1, GapReason.BEFORE_BUFFER.value, None), None)
        else:
            assert request.start_time is not None
            self.cursor = ring.seq_for_time(request.start_time)
            if ring.first_seq < ring.next_seq and request.start_time < ring.timestamp(ring.first_seq):
                oldest = ring.pulse_id(ring.first_seq)
                self._add_gap(Gap(None, oldest - 1, GapReason.BEFORE_BUFFER.value, None), None)

    # -- input from the writer --------------------------------------------
    def on_message(self, message: Credit | SetStop, now: float) -> None:
        self.last_heard = now
        if isinstance(message, Credit):
            # Cumulative, so a lost or duplicated credit cannot inflate the window.
            acked = max(self.acked, min(message.received, self.sent))
            for _ in range(acked - self.acked):
                self._in_flight_bytes -= self._in_flight_sizes.popleft()
            self.acked = acked
        elif isinstance(message, SetStop):
            self.stop_pulse_id = message.stop_pulse_id
            self.stop_time = message.stop_time

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight_bytes

    def _room_for(self, ring: RingView) -> bool:
        """Another message may go out: the window has room, and the bytes in flight allow the next one."""
        if self.in_flight >= self.window:
            return False
        if self.max_in_flight_bytes is None or not self._in_flight_sizes:
            return True
        if self.cursor >= ring.next_seq:
            return True
        return self.in_flight_bytes + ring.nbytes(ring.seek(self.cursor)) <= self.max_in_flight_bytes

    def expired(self, now: float, timeout: float) -> bool:
        return now - self.last_heard > timeout

    def has_work(self, ring: RingView) -> bool:
        """True if poll() would send something now (used to decide whether the loop may sleep)."""
        if self.ended is not None:
            return False
        return bool(self._pending) or (self.cursor < ring.next_seq and self._room_for(ring))

    # -- output to the writer ---------------------------------------------
    def _add_gap(self, gap: Gap, lost: int | None) -> None:
        self._pending.append(gap)
        self.gaps += 1
        if lost:
            self.lost += lost

    def _end(self, reason: EndReason) -> None:
        self.ended = End(reason.value, self.last_pulse_id)
        self._pending.append(self.ended)

    def _catch_up(self, ring: RingView) -> None:
        """Messages vanished under the cursor: report them and move to the next message held.

        They vanish by eviction (the cursor fell below ``first_seq``) or by a
        pulse-id reset (the ring drops its tail, leaving a hole of seqs).
        Seqs are never reused, so the count of lost messages is exact.
        """
        resets = _ring_resets(ring)
        reset = resets != self._resets_seen
        self._resets_seen = resets
        if self.cursor >= ring.next_seq:
            return
        target = ring.seek(self.cursor)
        if target == self.cursor:
            return
        lost = target - self.cursor
        self.cursor = target
        next_pulse_id = ring.pulse_id(target) if target < ring.next_seq else None
        first = self.last_pulse_id + 1 if self.last_pulse_id is not None else self.start_pulse_id
        if reset or (next_pulse_id is not None and self._order_pulse_id is not None
                     and next_pulse_id <= self._order_pulse_id):
            # Lost messages carried the old numbering: their last pulse id is unknown.
            self._add_gap(Gap(first, None, GapReason.SOURCE_RESET.value, lost), lost)
            self._order_pulse_id = None
        else:
            last = next_pulse_id - 1 if next_pulse_id is not None else None
            self._add_gap(Gap(first, last, GapReason.EVICTED.value, lost), lost)

    def poll(self, ring: RingView, now: float, budget: int = 32) -> list[Any]:
        """What to send now, in order: Gap/End/Heartbeat and Data(pulse_id, frames) events.

        ``budget`` bounds the ring entries looked at, so that one session
        cannot hold the buffer's loop for long.
        """
        out: list[Any] = []
        if self.ended is not None:
            return out
        if self.stop_pulse_id is not None and self.last_pulse_id is not None and self.last_pulse_id >= self.stop_pulse_id:
            self._end(EndReason.STOP_PULSE_ID)  # the stop was moved below what was already sent
        while budget > 0 and self.ended is None and self.in_flight < self.window:
            self._catch_up(ring)
            if self.cursor >= ring.next_seq or not self._room_for(ring):
                break
            budget -= 1
            pulse_id = ring.pulse_id(self.cursor)
            timestamp = ring.timestamp(self.cursor)  # the ring's time: bsread.timebase (sent with the data)
            if not self._started:
                # Only for a start in the future (live messages older than the start).
                if (self.start_pulse_id is not None and pulse_id < self.start_pulse_id) or \
                        (self.start_time is not None and timestamp < self.start_time):
                    self.cursor += 1
                    continue
                self._started = True
            if self.stop_pulse_id is not None and pulse_id > self.stop_pulse_id:
                self._end(EndReason.STOP_PULSE_ID)
                break
            if self.stop_time is not None and timestamp > self.stop_time:
                self._end(EndReason.STOP_TIME)
                break
            if self._order_pulse_id is not None and pulse_id <= self._order_pulse_id:
                # Pulse ids went backwards without a loss for this writer: say so anyway.
                self._add_gap(Gap(None, None, GapReason.SOURCE_RESET.value, 0), 0)
            size = ring.nbytes(self.cursor)
            limit = self.request.max_message_bytes
            if limit is not None and size > limit:
                # The writer would refuse it (at its socket, or its parser after taking its bytes).
                self._add_gap(Gap(pulse_id, pulse_id, GapReason.OVERSIZE.value, 1), 1)
            else:
                self._pending.append(Data(pulse_id, ring.message(self.cursor),
                                          timestamp if self.request.message_times else None))
                self._in_flight_sizes.append(size)
                self._in_flight_bytes += size
                self.sent += 1
            self.cursor += 1
            self.last_pulse_id = pulse_id
            self.last_time = timestamp
            self._order_pulse_id = pulse_id
            if self.stop_pulse_id is not None and pulse_id == self.stop_pulse_id:
                self._end(EndReason.STOP_PULSE_ID)  # inclusive: no need to wait for the next message
        if self._pending:
            out, self._pending = self._pending, []
        elif now - self.last_sent >= self.heartbeat_interval:
            out.append(Heartbeat(ring.oldest_pulse_id, ring.newest_pulse_id))
        if out:
            self.last_sent = now
        return out

    def status(self) -> SessionStatus:
        """This session in the buffer's status snapshot."""
        return SessionStatus(
            session=self.session_id, start_pulse_id=self.start_pulse_id, start_time=self.start_time,
            stop_pulse_id=self.stop_pulse_id, stop_time=self.stop_time, cursor_seq=self.cursor,
            last_pulse_id=self.last_pulse_id, sent=self.sent, in_flight=self.in_flight,
            in_flight_bytes=self.in_flight_bytes, window=self.window,
            gaps=self.gaps, lost=self.lost, ended=self.ended.reason if self.ended else None,
            label=self.request.label, last_time=self.last_time)


def _ring_resets(ring: Any) -> int:
    counters = getattr(ring, "counters", None)
    return int(getattr(counters, "resets", 0)) if counters is not None else 0
