"""A buffer's range that reaches back into its archive: the ring where it has the pulses, the archive where not.

Why here, in the client, and not in the buffer's replay endpoint: the
buffer's loop thread must never wait on a broker, and an endpoint that
read JetStream for its sessions would need a NATS client, a thread and a
queue per session inside the buffer's process, beside ingest. The client
already hears the one fact that matters, the ring's gap notice
(``before_buffer``: older than the ring; ``evicted``: the ring overtook a
slow reader), and the buffer tells every client where its archive is (the
``archive`` field of its acceptance). So the reach-back runs in the
writer's process (and in every other client of the replay protocol that
uses this source: ``sf_bsread_ctl write``, the web service's ranges), and a
buffer without ``--archive`` behaves exactly as before.

How: :class:`ReachBackSource` is a ``ReplayClient`` until the ring reports
a gap the archive can fill (``archive.records.should_reach_back``); then it
closes the ring's session and reads from the archive
(``archive.reader.ArchiveSource``) from the first missing pulse, until the
archive has nothing more (it lags the ring by a second or two); then it
asks the ring again for the rest. The writer sees one ordered stream of
events, with the archive's own gap reasons where the archive lacks pulses
too (``before_archive``, ``not_archived``), and :attr:`pulse_sources`
says which pulses came from where (the file's ``pulse_sources``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sf_bsread_writer.archive.records import (
    ARCHIVE,
    RING,
    ArchiveTarget,
    InvalidArchive,
    OriginLog,
    should_reach_back,
)
from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.replay.client import HANDSHAKE_SECONDS, ReplayClient
from sf_bsread_writer.replay.messages import Accepted, Data, End, Gap

__all__ = ["ReachBackSource"]

logger = logging.getLogger(__name__)


def _archive_source(*args: Any, **kwargs: Any) -> Any:
    from sf_bsread_writer.archive.reader import (
        ArchiveSource,  # nats-py loads only when a range needs it
    )
    return ArchiveSource(*args, **kwargs)


class ReachBackSource:
    """A writer's source over a buffer's replay endpoint that reads what the ring lacks from the buffer's archive.

    The interface of ``ReplayClient`` (``start``, ``handshake``,
    ``receive``, ``set_stop``, ``close``, ``last_pulse_id``, ``ended``,
    ``accepted``, ``restarts``). Not thread-safe: the run thread's own.
    """

    def __init__(self, address: str, start_pulse_id: int | None = None, start_time: float | None = None,
                 stop_pulse_id: int | None = None, stop_time: float | None = None, label: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, replay_factory: Callable[..., Any] = ReplayClient,
                 archive_factory: Callable[..., Any] = _archive_source) -> None:
        self.address = address
        self.start_pulse_id = start_pulse_id
        self.start_time = start_time
        self.stop_pulse_id = stop_pulse_id
        self.stop_time = stop_time
        self.label = label  # the replay request's label (a writer's output file: the status page's writers)
        self.max_message_bytes = max_message_bytes  # the writer's: its replay socket's bound and request
        self._replay_factory = replay_factory
        self._archive_factory = archive_factory
        self._ring: Any = None
        self._archive: Any = None
        self._archive_target: ArchiveTarget | None = None
        self._origins = OriginLog()
        self._last_pulse_id: int | None = None
        self._switches = 0
        self._delivered_since_switch = False
        self.accepted: Accepted | None = None
        self.ended: End | None = None
        self._restarts = 0
        self._reconnects = 0  # of ring clients closed before the current one

    # -- what a source tells ----------------------------------------------------
    @property
    def last_pulse_id(self) -> int | None:
        return self._last_pulse_id

    @property
    def restarts(self) -> int:
        return self._restarts + (getattr(self._ring, "restarts", 0) if self._ring is not None else 0)

    @property
    def reconnects(self) -> int:
        """Ring connections ZeroMQ gave up after a part over the writer's bound, asked anew (replay.client)."""
        return self._reconnects + (getattr(self._ring, "reconnects", 0) if self._ring is not None else 0)

    @property
    def pulse_sources(self) -> list[dict[str, Any]] | None:
        """Runs of pulses by origin (``ring`` / ``archive``); None if the archive was never used."""
        return self._origins.runs() if ARCHIVE in self._origins.used else None

    # -- lifecycle -------------------------------------------------------------
    def _ring_client(self, after: int | None) -> Any:
        if after is None:
            return self._replay_factory(self.address, start_pulse_id=self.start_pulse_id, start_time=self.start_time,
                                        stop_pulse_id=self.stop_pulse_id, stop_time=self.stop_time, label=self.label,
                                        max_message_bytes=self.max_message_bytes)
        return self._replay_factory(self.address, start_pulse_id=after + 1, stop_pulse_id=self.stop_pulse_id,
                                    stop_time=self.stop_time, label=self.label,
                                    max_message_bytes=self.max_message_bytes)

    def start(self) -> "ReachBackSource":
        self._ring = self._ring_client(None).start()
        return self

    def handshake(self, timeout: float = HANDSHAKE_SECONDS) -> Accepted:
        """The buffer's acceptance; its ``archive`` field (if any) is where older pulses are read from."""
        self.accepted = self._ring.handshake(timeout)
        if self.accepted is not None and self.accepted.archive:
            try:
                self._archive_target = ArchiveTarget.parse(self.accepted.archive)
            except InvalidArchive as error:
                logger.warning("the buffer names an archive that cannot be used (%s): pulses older than its ring "
                               "will be missing", error)
        return self.accepted

    def keep_alive(self) -> None:
        """While the writer is busy (``H5File.keep_alive``): the ring's session gets its heartbeat when due.

        Asked of the ring client in use at call time (a switch to the archive and back replaces it); while
        reading the archive there is no session at the buffer to keep.
        """
        if self._archive is None and self._ring is not None:
            self._ring.keep_alive()

    def close(self) -> None:
        self._reconnects = self.reconnects
        for source in (self._archive, self._ring):
            if source is not None:
                source.close()
        self._archive = self._ring = None

    def __enter__(self) -> "ReachBackSource":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        self.stop_pulse_id, self.stop_time = stop_pulse_id, stop_time
        active = self._archive if self._archive is not None else self._ring
        if active is not None:
            active.set_stop(stop_pulse_id=stop_pulse_id, stop_time=stop_time)

    # -- events ----------------------------------------------------------------
    def receive(self, timeout: float) -> Any:
        if self.ended is not None:
            return None
        if self._archive is not None:
            event = self._archive.receive(timeout)
            if event is None:
                if self._archive.caught_up:
                    self._back_to_ring()
                return None
            return self._delivered(event, ARCHIVE)
        event = self._ring.receive(timeout)
        if isinstance(event, Gap) and should_reach_back(event, self._archive_target is not None, self._switches,
                                                        self._delivered_since_switch):
            if self._to_archive(event):
                return None
        return self._delivered(event, RING)

    def _delivered(self, event: Any, origin: str) -> Any:
        if isinstance(event, Data):
            self._last_pulse_id = event.pulse_id
            self._delivered_since_switch = True
            self._origins.add(origin, event.pulse_id)
        elif isinstance(event, End):
            self.ended = event
        return event

    def _to_archive(self, gap: Gap) -> bool:
        """Read from the archive from the first pulse the ring lacks; False (the gap goes on) if it cannot be had."""
        after = self._last_pulse_id
        start_pulse_id = after + 1 if after is not None else self.start_pulse_id
        start_time = None if start_pulse_id is not None else self.start_time
        if start_pulse_id is None and start_time is None:
            return False
        try:
            archive = self._archive_factory(self._archive_target, start_pulse_id=start_pulse_id, start_time=start_time,
                                            stop_pulse_id=self.stop_pulse_id, stop_time=self.stop_time).start()
        except Exception as error:  # noqa: BLE001 (no archive now: the ring's gap stands, as without one)
            logger.warning("pulses %s..%s are not in the ring and the archive cannot be read (%s): they are "
                           "missing (%s)", gap.first_pulse_id, gap.last_pulse_id, error, gap.reason)
            self._switches += 1
            self._delivered_since_switch = False
            return False
        logger.info("pulses from %s on are older than the ring (%s): reading them from the archive %s",
                    start_pulse_id if start_pulse_id is not None else f"time {start_time}", gap.reason,
                    self._archive_target.url() if self._archive_target else "?")
        self._reconnects += getattr(self._ring, "reconnects", 0)
        self._ring.close()
        self._ring = None
        self._archive = archive
        self._switches += 1
        self._delivered_since_switch = False
        return True

    def _back_to_ring(self) -> None:
        """The archive has nothing more (it lags the ring): the rest from the ring."""
        archive, self._archive = self._archive, None
        self._restarts += getattr(archive, "restarts", 0)
        archive.close()
        logger.info("the archive is read up to pulse %s: the rest from the ring", self._last_pulse_id)
        self._ring = self._ring_client(self._last_pulse_id).start()
