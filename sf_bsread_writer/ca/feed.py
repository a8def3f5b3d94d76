"""What an IOC process of the gateway feeds from: the buffer's live stream and its status.

* :class:`Ingest`, a thread, reads the buffer's feed with the one feed
  reader (``feed.FeedReader``: data messages and the buffer's status
  snapshots, a socket cut mid-message replaced) and keeps only the newest
  message (conflation: a slow gateway skips messages, it never queues
  them), and the older ones that carry a sparse channel it lacks
  (``policy.keep_sparse``); the newest status is its ``latest``;
* :class:`StatusPoller`, a thread, polls a buffer's ``GET /statistics``
  once a second, only for a gateway started by hand on a plain live output
  (``--status-url``), which carries no status.

Both offer ``latest``, ``latest_monotonic`` and ``expected`` (a status is
to be had: its absence is a fault, shown INVALID on the status PVs).

Imported by the IOC process only (the supervisor stays light: start-up).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import numpy as np

from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.bsread.parts import bit_indices, presence_bits
from sf_bsread_writer.ca.policy import keep_sparse, sparse_rounds
from sf_bsread_writer.feed import FeedReader
from sf_bsread_writer.status import BufferStatus

__all__ = ["Ingest", "StatusPoller", "SPARSE_KEPT", "SPARSE_KEPT_BYTES"]

logger = logging.getLogger(__name__)

#: Older messages kept beside the newest because they carry a channel it lacks (sparse channels).
SPARSE_KEPT = 8
SPARSE_KEPT_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------
# Ingest: the buffer's live output -> newest message
# --------------------------------------------------------------------------
class Ingest(threading.Thread):
    """Receives the live output and keeps the newest message for the CA server.

    Also kept, up to SPARSE_KEPT of them: older messages that carry a channel the
    newest lacks (a channel sent every Nth pulse would otherwise be overwritten
    before the server, applying a few times a second, ever saw it); the softioc
    server applies just those channels of them (``take_messages``).
    """

    def __init__(self, address: str, mode: str, notify: Any) -> None:
        super().__init__(name="gateway-ingest", daemon=True)
        self.address = address
        self.mode = mode
        self._notify = notify
        self._lock = threading.Lock()
        self._latest: list[Any] | None = None
        self._latest_presence = 0
        self._latest_received = 0.0  # monotonic
        self._sparse: list[_Kept] = []  # oldest first
        self._arrived = threading.Event()
        self._stop_event = threading.Event()
        self.parser = MessageParser()
        self.rejected = 0
        self.received = 0
        self.last_receive_monotonic: float | None = None
        self.error: BaseException | None = None
        # The buffer's status as it comes on the feed (its own --ca feed carries it; a live output does not).
        self.latest: BufferStatus | None = None
        self.latest_monotonic: float | None = None
        # The feed reader's counters (feed.FeedReader), for the gateway statistics PVs.
        self.status_rejected = 0
        self.sockets_replaced = 0
        self.oversize = 0
        self.reconnects = 0

    @property
    def expected(self) -> bool:
        """A status is to be had from this feed: one has come, readable or not (a plain live output never sends
        one). A feed whose every status is unreadable still carries one: its absence is a fault (INVALID/COMM),
        never a reason to show the gateway's own view of the stream in the buffer's place."""
        return self.latest is not None or self.status_rejected > 0

    def take(self) -> list[Any] | None:
        with self._lock:
            frames, self._latest = self._latest, None
            self._sparse = []
        return frames

    def take_messages(self, timeout: float) -> list[tuple[Any, float, frozenset[int] | None]]:
        """``(message, monotonic receive time, channel indices to apply)``, oldest first; waits up to
        ``timeout`` for one. The newest comes last with None (all of it); each older one with just the
        channels that neither the newest nor a newer kept message has, so every channel is applied at
        most once a round. The receive times tell a channel's own period."""
        self._arrived.wait(timeout)
        self._arrived.clear()
        with self._lock:
            frames, received, presence, self._latest = self._latest, self._latest_received, self._latest_presence, None
            older, self._sparse = self._sparse, []
        if frames is None:
            return []
        taken: list[tuple[Any, float, frozenset[int] | None]] = []
        for kept, wanted in zip(older, sparse_rounds(presence, [kept.presence for kept in older])):
            message = self._parse(kept.frames) if wanted else None
            if message is not None:
                taken.append((message, kept.received, frozenset(bit_indices(wanted))))
        newest = self._parse(frames)
        return taken + ([(newest, received, None)] if newest is not None else [])

    def wait_and_take(self, timeout: float) -> list[Any] | None:
        """The newest message, waiting up to ``timeout`` seconds for one (for a thread, not asyncio)."""
        self._arrived.wait(timeout)
        self._arrived.clear()
        return self.take()

    def take_message(self, timeout: float | None = None) -> Any:
        """The newest message parsed (``timeout``: wait that long for one), or None.

        A message that does not parse is counted in ``rejected`` (the first 10
        logged) and never fatal: both CA servers apply what this returns.
        """
        frames = self.take() if timeout is None else self.wait_and_take(timeout)
        return None if frames is None else self._parse(frames)

    def _parse(self, frames: list[Any]) -> Any:
        try:
            return self.parser.parse(frames)
        except Exception as error:  # ProtocolError or IgnoredMessage
            self.rejected += 1
            if self.rejected <= 10:
                logger.warning("message not shown: %s", error)
            return None

    def arrive(self, frames: list[Any], received_at: float) -> bool:
        """One received message becomes the newest; the one before it is kept if it has a channel this lacks.
        Returns True when nothing was waiting before (the CA server is to be told)."""
        presence = _presence(frames)
        with self._lock:
            was_empty = self._latest is None
            if self._latest is not None and self._latest_presence & ~presence and len(self._latest) == len(frames):
                self._keep(_Kept(self._latest, self._latest_received, self._latest_presence), presence)
            self._latest, self._latest_presence, self._latest_received = frames, presence, received_at
        self._arrived.set()
        return was_empty

    def _keep(self, kept: _Kept, newest_presence: int) -> None:
        """Add ``kept`` (caller holds the lock); drop what it makes useless, and the oldest beyond the bounds.

        A kept message is useful while it has a channel that neither a newer kept one nor the newest
        has; whatever a stream's channels do, at most SPARSE_KEPT messages and SPARSE_KEPT_BYTES stay.
        """
        self._sparse = keep_sparse(self._sparse, kept, newest_presence, SPARSE_KEPT, SPARSE_KEPT_BYTES)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        reader = None
        try:
            # A short queue: old messages are worthless here (the newest wins, sparse ones are kept apart).
            reader = FeedReader(self.address, self.mode, hwm=4)
            while not self._stop_event.is_set():
                item = reader.receive(0.2)
                # Drain what is queued: the newest message, and older ones with channels it lacks.
                received = notify = False
                while item is not None:
                    now = time.monotonic()
                    if isinstance(item, BufferStatus):
                        self.latest, self.latest_monotonic = item, now
                    else:
                        self.received += 1
                        received = True
                        notify = self.arrive(item, now) or notify
                    item = reader.receive(0)
                self.status_rejected, self.sockets_replaced = reader.status_rejected, reader.sockets_replaced
                self.oversize, self.reconnects = reader.oversize, reader.reconnects
                if not received:
                    continue
                self.last_receive_monotonic = time.monotonic()
                self._arrived.set()
                if notify:
                    self._notify()
        except Exception as error:  # reported by the gateway, which then exits non-zero
            self.error = error
            logger.exception("ingest from %s failed", self.address)
            self._notify()
        finally:
            if reader is not None:
                reader.close()


class _Kept:
    """An older message kept for its sparse channels: its parts, receive time and presence bits."""

    __slots__ = ("frames", "received", "presence", "nbytes")

    def __init__(self, frames: list[Any], received: float, presence: int) -> None:
        self.frames, self.received, self.presence = frames, received, presence
        self.nbytes = sum(len(part) for part in frames)


def _presence(frames: list[Any]) -> int:
    """``bsread.parts.presence_bits`` of a received part list. Linear in channels."""
    return presence_bits(np.fromiter((len(part) for part in frames[2::2]), dtype=np.int64,
                                     count=max(0, (len(frames) - 2) // 2)))


# --------------------------------------------------------------------------
# Status: the buffer's GET /statistics, once a second
# --------------------------------------------------------------------------
class StatusPoller(threading.Thread):
    """The buffer's ``GET /statistics`` once a second, as a typed snapshot (``latest``)."""

    def __init__(self, base_url: str, interval: float = 1.0) -> None:
        super().__init__(name="gateway-status", daemon=True)
        self.url = base_url.rstrip("/") + "/statistics"
        self.interval = interval
        self._stop_event = threading.Event()
        self.latest: BufferStatus | None = None
        self.latest_monotonic: float | None = None
        self.failures = 0
        self.expected = True  # asked for by --status-url: its absence is a fault

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        # Here, not at the top: only a gateway started with --status-url polls, and an IOC's start-up is its
        # imports (urllib.request brings http.client, email and ssl: ~0.03 s of CPU; docs/gateway.md).
        import urllib.error
        import urllib.request

        while not self._stop_event.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=max(0.5, self.interval)) as answer:
                    document = json.loads(answer.read())
                if not isinstance(document, dict) or "statistics" not in document:
                    raise ValueError("answer has no 'statistics' object")
                self.latest = BufferStatus.from_json(document["statistics"])
                self.latest_monotonic = time.monotonic()
            except (OSError, ValueError, TypeError, urllib.error.URLError) as error:
                self.failures += 1
                if self.failures == 1 or self.failures % 60 == 0:
                    logger.warning("buffer status %s unavailable (%d times): %s", self.url, self.failures, error)
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))
