"""The buffer's status snapshot: assembled by the loop a few times a second, read by everybody else.

Why a snapshot: the ring, the counters and the sockets belong to the loop
thread alone; the HTTP threads (``buffer.http_app``), systemd's STATUS=
line and the children (through the feeds) get an immutable, typed
``status.BufferStatus`` that the loop builds from its parts and publishes
here. Reading the latest one is safe from any thread and never waits for
the loop.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable

from sf_bsread_writer import process
from sf_bsread_writer.buffer.feeds import LoopbackFeed
from sf_bsread_writer.buffer.ingest import Ingest
from sf_bsread_writer.buffer.settings import BufferSettings
from sf_bsread_writer.rates import RateEstimator
from sf_bsread_writer.ring import Ring
from sf_bsread_writer.status import (
    ArchiveStatus,
    BufferStatus,
    ChildStatus,
    Endpoints,
    PulseIdStatus,
    RateStatus,
    ReplayStatus,
    RingStatus,
    SourceStatus,
)

__all__ = ["Snapshots", "NO_REPLAY", "RATE_WINDOW_SECONDS", "STATUS_LINE_SECONDS"]

RATE_WINDOW_SECONDS = 5.0
# systemd's STATUS= line (systemctl status) is refreshed this often.
STATUS_LINE_SECONDS = 5.0
# Before the replay endpoint is bound.
NO_REPLAY = ReplayStatus(active_sessions=0, started=0, ended=0, expired=0, refused=0, disconnected=0,
                         send_failures=0, sent=0, gaps=0, lost=0, sessions=())


class Snapshots:
    """Builds (loop thread) and hands out (any thread) the buffer's ``BufferStatus``."""

    def __init__(self, settings: BufferSettings, start_monotonic: float) -> None:
        self.settings = settings
        self._start_monotonic = start_monotonic
        self._rates = RateEstimator(RATE_WINDOW_SECONDS)
        self._next_status_line = 0.0
        self._lock = threading.Lock()
        self._latest: BufferStatus | None = None

    def latest(self) -> BufferStatus:
        """The latest published snapshot (frozen); any thread."""
        with self._lock:
            assert self._latest is not None, "no snapshot published yet"
            return self._latest

    def publish(self, now: float, wall_time: float, *, ingest: Ingest, ring: Ring, replay: ReplayStatus,
                endpoints: Endpoints, forwarded: int, output_drops: int, source_reconnects: int, feeds: dict[str, LoopbackFeed | None],
                children: Iterable[ChildStatus], io_path: str, state: str = "running",
                archive: ArchiveStatus | None = None) -> BufferStatus:
        """A new snapshot from the loop's parts (loop thread; ``now``: the loop's clock, ``wall_time``: time.time)."""
        settings = self.settings
        counters = ring.counters
        self._rates.add(now, ingest.received, ingest.received_bytes)
        messages_per_second, bytes_per_second = self._rates.rates() or (0.0, 0.0)
        last = ingest.last_message_monotonic
        idle = None if last is None else now - last
        ca_feed, web_feed = feeds.get("ca"), feeds.get("web")
        snapshot = BufferStatus(
            name=settings.name,
            state=state,
            time=wall_time,
            uptime_seconds=now - self._start_monotonic,
            endpoints=endpoints,
            source=SourceStatus(address=settings.stream, mode=settings.source_mode, idle_seconds=idle,
                                last_message_time=ingest.last_message_time, connected_once=last is not None,
                                timed_by_receive=ingest.timed_by_receive, clock_offset_seconds=ingest.clock_offset,
                                invalid_timestamps=ingest.invalid_timestamps, reconnects=source_reconnects),
            received=ingest.received,
            received_bytes=ingest.received_bytes,
            forwarded=forwarded,
            output_mode=settings.output_mode,
            output_drops=output_drops,
            rejected=dict(ingest.rejected),
            rejected_total=sum(ingest.rejected.values()),
            ignored=ingest.ignored,
            duplicates=ingest.duplicates,
            ca_feed=ca_feed.status() if ca_feed is not None else None,
            web_feed=web_feed.status() if web_feed is not None else None,
            channels=ingest.channels,
            children=tuple(children),
            archive=archive,
            refused_channel_values=dict(ingest.refused_channel_values),
            header_changes=ingest.header_changes,
            ring=RingStatus(messages=ring.n_messages, bytes=ring.n_bytes, max_messages=settings.buffer_length,
                            max_bytes=settings.buffer_bytes, oldest_pulse_id=ring.oldest_pulse_id,
                            newest_pulse_id=ring.newest_pulse_id, evicted=counters.evicted,
                            evicted_bytes=counters.evicted_bytes, oldest_time=ring.oldest_time,
                            newest_time=ring.newest_time),
            pulse_ids=PulseIdStatus(last=ingest.last_pulse_id, usual_step=ring.usual_step, jumps=counters.jumps,
                                    jumped_pulses=counters.jumped_pulses, resets=counters.resets,
                                    reset_evicted=counters.reset_evicted, held_back=counters.held_back,
                                    out_of_order=counters.out_of_order, strays=counters.strays),
            rates=RateStatus(messages_per_second=messages_per_second, bytes_per_second=bytes_per_second,
                             window_seconds=self._rates.span),
            replay=replay,
            io_path=io_path,
        )
        with self._lock:
            self._latest = snapshot
        return snapshot

    def status_line(self, now: float) -> None:
        """systemd's STATUS= line from the latest snapshot, every STATUS_LINE_SECONDS."""
        if now < self._next_status_line:
            return
        self._next_status_line = now + STATUS_LINE_SECONDS
        status = self.latest()
        process.sd_notify(f"STATUS={status.describe()}: {status.rates.messages_per_second:.1f} msg/s, "
                          f"ring {status.ring.messages} messages ({status.ring.oldest_pulse_id}.."
                          f"{status.ring.newest_pulse_id}), {status.replay.active_sessions} writers")

