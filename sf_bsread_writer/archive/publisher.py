"""The archiver: follows a buffer's ring over the replay protocol and stores every message in NATS JetStream.

It runs as a child process of the buffer (``buffer/archive_link.py`` starts
and supervises it; ``python -m sf_bsread_writer.archive.publisher``), so the
buffer's loop never waits on the broker and the NATS client's Python work
never takes the buffer's GIL (measured: docs/performance.md, "Archive"). It
is an ordinary client of the buffer's replay endpoint: a session from the
pulse after the archive's newest, with no stop. So:

- **never stalls ingest**: the ring serves it like a writer, by credits;
  when the archiver falls behind, the ring evicts under it and the session
  reports an ``evicted`` gap with an exact count;
- **catches up**: after the broker was away (or the archiver restarted) it
  asks the archive for its newest stored pulse and requests the ring from
  the next one; whatever the ring no longer holds is reported;
- **counts, never hides**: every pulse that will never be archived is
  counted (``ArchiveStatus.lost`` / ``unarchived_at_start``) *and* stored as
  a gap marker, so a reader gets a gap with reason ``not_archived``;
- **byte-identical**: the payload is the message's parts as the ring holds
  them (``archive.records.encode_payload``), pulse id and time in headers.

Its status goes to the buffer a few times a second as one JSON message
(``status.ArchiveStatus``) on a loopback PUSH socket; the buffer adds
the lag against its ring and shows it in /statistics, /metrics, the status
page and ``sf_bsread_ctl status``.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import nats
import nats.errors
import nats.js.errors
import zmq
from nats.js import api

from sf_bsread_writer import process
from sf_bsread_writer.archive.reader import (
    ArchiveUnavailable,
    connect,
    record_at,
    stored_bounds,
)
from sf_bsread_writer.archive.records import (
    GAP_NOT_ARCHIVED,
    ArchiveTarget,
    InvalidArchive,
    PulseStep,
    StreamSettings,
    encode_payload,
    gap_headers,
    lost_pulses,
    marker_range,
    message_headers,
    settings_conflicts,
)
from sf_bsread_writer.replay.client import ReplayClient
from sf_bsread_writer.replay.messages import (
    BufferLost,
    Data,
    End,
    Gap,
    GapReason,
    Refused,
)
from sf_bsread_writer.status import ArchiveStatus

__all__ = ["Archiver", "ArchiveConflict", "main", "stream_config"]

logger = logging.getLogger(__name__)

# Publishes awaiting their acknowledgement: at most this many, and this many bytes.
MAX_IN_FLIGHT = 256
MAX_IN_FLIGHT_BYTES = 64 * 1024**2
# Events taken from the ring per hop to the ring's thread.
RING_BATCH = 64
RING_WAIT = 0.1
ACK_TIMEOUT = 5.0
STATUS_INTERVAL = 0.25
STORED_INTERVAL = 1.0  # how often the archive's own figures (first/last pulse id, bytes) are read
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
DUPLICATE_WINDOW = 120.0  # JetStream drops a repeated Nats-Msg-Id within this window
# Bytes a message's headers and the PUB line add to its payload (the broker's max_payload counts both).
HEADER_ALLOWANCE = 512


class ArchiveConflict(RuntimeError):
    """A stream of the archive's name exists with settings that make it another archive."""


def stream_config(target: ArchiveTarget, settings: StreamSettings) -> api.StreamConfig:
    return api.StreamConfig(
        name=target.stream, subjects=list(target.subjects), retention=api.RetentionPolicy(settings.retention),
        storage=api.StorageType(settings.storage), discard=api.DiscardPolicy(settings.discard),
        max_bytes=settings.max_bytes if settings.max_bytes > 0 else -1,
        max_age=settings.max_age if settings.max_age > 0 else 0, num_replicas=settings.replicas,
        duplicate_window=DUPLICATE_WINDOW, allow_direct=True,
        description="sf_bsread_writer archive of one buffer (docs/archive.md)")


def _existing_settings(config: api.StreamConfig) -> StreamSettings:
    return StreamSettings(subjects=tuple(config.subjects or ()), replicas=config.num_replicas or 1,
                          max_bytes=config.max_bytes if config.max_bytes is not None else -1,
                          max_age=float(config.max_age or 0.0),
                          storage=getattr(config.storage, "value", config.storage) or "file",
                          retention=getattr(config.retention, "value", config.retention) or "limits",
                          discard=getattr(config.discard, "value", config.discard) or "old")


async def ensure_stream(js: Any, target: ArchiveTarget, settings: StreamSettings) -> None:
    """Create the archive's stream, or check an existing one (ArchiveConflict) and update its limits."""
    wanted = stream_config(target, settings)
    try:
        info = await js.stream_info(target.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(wanted)
        logger.info("archive: created stream %s (subjects %s, replicas %d, max_bytes %s, max_age %s s)",
                    target.stream, ", ".join(target.subjects), settings.replicas, settings.max_bytes,
                    settings.max_age)
        return
    existing = _existing_settings(info.config)
    problems = settings_conflicts(existing, settings)
    if problems:
        raise ArchiveConflict(f"the broker has a stream {target.stream} with other settings: {'; '.join(problems)}. "
                              "Give this buffer another --name, or remove that stream (nats stream rm) if it is "
                              "no longer needed")
    if (existing.max_bytes, existing.max_age) != (wanted.max_bytes, float(wanted.max_age or 0)):
        await js.update_stream(replace(info.config, max_bytes=wanted.max_bytes, max_age=wanted.max_age))
        logger.info("archive: stream %s limits changed to max_bytes %s, max_age %s s", target.stream,
                    wanted.max_bytes, wanted.max_age)


class Archiver:
    """Follows the ring at ``replay_address`` into the archive ``target``; :meth:`run` until :meth:`stop`.

    Usable in a thread (tests, the benchmark's in-process variant) or as the
    buffer's child process (:func:`main`).
    """

    def __init__(self, replay_address: str, target: ArchiveTarget, settings: StreamSettings,
                 status_address: str | None = None, connect_timeout: float = 2.0) -> None:
        self.replay_address = replay_address
        self.target = target
        self.settings = settings
        self.status_address = status_address
        self.connect_timeout = connect_timeout
        self.status = ArchiveStatus(url=target.url(), stream=target.stream, state="starting",
                                    replicas=settings.replicas)
        self._counts: dict[str, Any] = {}
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ring: ReplayClient | None = None
        # The ring's socket lives in this one thread: ReplayClient is used from nowhere else.
        self._ring_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="archive-ring")
        self._step = PulseStep()
        self._opened_once = False  # the first ring session of this process (its resume gap is "at start")
        # The ring's oldest pulse when this archiver first asked (None: the ring was empty then, as at a
        # buffer's start): with an empty archive, what the ring evicted after it was never archived.
        self._ring_floor: int | None = None
        self._sessions = 0  # connections to the broker that got as far as archiving
        self.started = threading.Event()

    # -- public ------------------------------------------------------------
    def stop(self) -> None:
        """Thread-safe (and safe from a signal handler: only sets an event)."""
        self._stop.set()

    def run(self) -> int:
        try:
            asyncio.run(self._main())
        finally:
            self._ring_thread.shutdown(wait=True)
        return 0

    # -- main ----------------------------------------------------------------
    def _set(self, **changes: Any) -> None:
        self.status = replace(self.status, **changes)

    def _add(self, **increments: int) -> None:
        self.status = replace(self.status, **{key: getattr(self.status, key) + value
                                              for key, value in increments.items()})

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        reporter = asyncio.create_task(self._report_status())
        self.started.set()
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    await self._session()
                    attempt = 0
                except ArchiveConflict as error:
                    logger.error("archive: %s", error)
                    self._set(state="error", error=str(error))
                    await self._pause(30.0)
                except (ArchiveUnavailable, nats.errors.Error, nats.js.errors.Error, OSError,
                        asyncio.TimeoutError) as error:
                    if self.status.state != "broker_unreachable":
                        logger.warning("archive: the broker at %s is unreachable (%s); the buffer goes on, and "
                                       "the archive catches up from the ring when it is back",
                                       ",".join(self.target.servers), error or type(error).__name__)
                    self._set(state="broker_unreachable", error=str(error) or type(error).__name__)
                    await self._pause(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
                    attempt += 1
                finally:
                    await self._close_ring()
        finally:
            self._set(state="stopped")
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            await self._send_status_once()

    async def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def _session(self) -> None:
        """One connection: set up the stream, resume after its newest pulse, archive until trouble or stop."""
        nc = await connect(self.target, self.connect_timeout, max_reconnect_attempts=-1,
                           name=f"sf_bsread archiver {self.target.name}")
        try:
            js = nc.jetstream(timeout=ACK_TIMEOUT)
            await ensure_stream(js, self.target, self.settings)
            resume = await self._newest_stored(js)
            if self._sessions:
                self._add(reconnects=1)
            self._sessions += 1
            self._set(state="archiving", error=None)
            logger.info("archive: storing %s in %s (newest stored pulse %s)", self.replay_address,
                        self.target.stream, resume)
            stored = asyncio.create_task(self._watch_stored(js))
            try:
                await self._follow(nc, js, resume)
            finally:
                stored.cancel()
                await asyncio.gather(stored, return_exceptions=True)
        finally:
            try:
                await asyncio.wait_for(nc.close(), 2.0)
            except Exception:  # noqa: BLE001 (a dead broker: nothing to close cleanly)
                pass

    async def _newest_stored(self, js: Any) -> tuple[int, float] | None:
        """(pulse id, time) of the newest record in the archive, None when it is empty."""
        first, last = await stored_bounds(js, self.target)
        if last < max(first, 1):
            return None
        for seq in range(last, max(first, last - 16) - 1, -1):
            try:
                found = await record_at(js, self.target, seq)
            except InvalidArchive:
                continue
            if found is not None:
                record = found[0]
                return (record.gap_last_pulse_id if record.kind == "gap" else record.pulse_id), record.time
        return None

    # -- the ring ----------------------------------------------------------
    async def _close_ring(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            await asyncio.get_running_loop().run_in_executor(self._ring_thread, ring.close)

    def _drain_ring(self, ring: ReplayClient) -> list[Any]:
        """In the ring's thread: the next events (waits up to RING_WAIT for the first)."""
        events = []
        event = ring.receive(RING_WAIT)
        while event is not None:
            events.append(event)
            if len(events) >= RING_BATCH or isinstance(event, (End, Refused)):
                break
            event = ring.receive(0)
        return events

    async def _follow(self, nc: Any, js: Any, resume: tuple[int, float] | None) -> None:
        loop = asyncio.get_running_loop()
        start_pulse_id = resume[0] + 1 if resume is not None else 0
        last_time = resume[1] if resume is not None else 0.0
        ring = ReplayClient(self.replay_address, start_pulse_id=start_pulse_id)
        await loop.run_in_executor(self._ring_thread, ring.start)
        self._ring = ring
        if not self._opened_once:
            accepted = await loop.run_in_executor(self._ring_thread, ring.handshake, 5.0)
            self._ring_floor = accepted.oldest_pulse_id
        at_start, self._opened_once = not self._opened_once, True
        first_event = True
        # The newest pulse id seen: a message, or the last of a gap (or the archive's newest).
        last_seen: int | None = resume[0] if resume is not None else None
        # (pulse id (-1: a gap marker), time, bytes, the acknowledgement, when it was sent)
        # ... and for a gap marker the counts to add once it is stored
        in_flight: deque[tuple[int, float, int, asyncio.Future, float, dict | None]] = deque()
        in_flight_bytes = 0
        max_payload = nc.max_payload
        while not self._stop.is_set():
            if not nc.is_connected:
                # nats-py keeps reconnecting and would buffer what we publish meanwhile; we rather stop reading
                # the ring (it keeps the messages) and resume from the archive's newest pulse when it is back.
                raise ArchiveUnavailable("the connection to the broker was lost")
            if in_flight and time.monotonic() - in_flight[0][4] > ACK_TIMEOUT:
                in_flight_bytes -= await self._acknowledged(in_flight.popleft())  # raises: no answer in time
            events = await loop.run_in_executor(self._ring_thread, self._drain_ring, ring)
            for event in events:
                if isinstance(event, Data):
                    first_event = False
                    pulse_id, message_time = event.pulse_id, event.time if event.time is not None else 0.0
                    self._step.add(pulse_id)
                    last_time = message_time
                    last_seen = pulse_id
                    payload = encode_payload(event.frames)
                    if len(payload) + HEADER_ALLOWANCE > max_payload:
                        self._add(oversize=1)
                        logger.warning("archive: pulse %d not archived: %d bytes, over the broker's max_payload "
                                       "%d (it stays in the ring; raise max_payload in the nats-server config)",
                                       pulse_id, len(payload), max_payload)
                        continue
                    future = await js.publish_async(self.target.message_subject, payload,
                                                    headers=message_headers(pulse_id, message_time),
                                                    wait_stall=ACK_TIMEOUT)
                    in_flight.append((pulse_id, message_time, len(payload), future, time.monotonic(), None))
                    in_flight_bytes += len(payload)
                elif isinstance(event, Gap):
                    lost = self._lost_in(event, resume, at_start and first_event)
                    first_event = False
                    if lost is None:
                        continue
                    count, first, last = lost
                    first, last = marker_range(first, last, last_seen)
                    if last is not None:
                        last_seen = max(last, last_seen if last_seen is not None else last)
                    counter = "unarchived_at_start" if at_start and event.reason == GapReason.BEFORE_BUFFER.value \
                        else "lost"
                    logger.warning("archive: pulses %s..%s (%d) left the ring before they were archived (%s%s): "
                                   "marked in the archive", first, last, count, event.reason,
                                   ", before this archiver started" if counter != "lost" else "")
                    if first is not None and last is not None and first <= last:
                        # Counted when the marker is stored, once: a catch-up that meets the same gap again
                        # (the broker failed in between) sends the same marker, which JetStream drops.
                        future = await js.publish_async(self.target.gap_subject, b"", wait_stall=ACK_TIMEOUT,
                                                        headers=gap_headers(first, last, count, GAP_NOT_ARCHIVED,
                                                                            last_time))
                        in_flight.append((-1, last_time, 0, future, time.monotonic(), {counter: count}))
                    else:
                        self._add(**{counter: count})
                elif isinstance(event, Refused):
                    raise ArchiveUnavailable(f"the buffer refused the archiver's session: {event.reason}: "
                                             f"{event.detail}")
                elif isinstance(event, BufferLost):
                    logger.warning("archive: the buffer at %s is silent; the session is requested again",
                                   self.replay_address)
                # End cannot come (no stop); Heartbeats are the client's own.
                while in_flight and (in_flight[0][3].done() or len(in_flight) > MAX_IN_FLIGHT
                                     or in_flight_bytes > MAX_IN_FLIGHT_BYTES):
                    in_flight_bytes -= await self._acknowledged(in_flight.popleft())
            while in_flight and in_flight[0][3].done():
                in_flight_bytes -= await self._acknowledged(in_flight.popleft())
        while in_flight:  # stopping: what was sent is waited for (a restart would re-send it anyway)
            try:
                await self._acknowledged(in_flight.popleft())
            except Exception:  # noqa: BLE001
                break

    async def _acknowledged(self, entry: tuple[int, float, int, asyncio.Future, float, dict | None]) -> int:
        """Wait for one publish's acknowledgement; any failure ends the session (it resumes from the archive)."""
        pulse_id, message_time, size, future, sent, counts = entry
        try:
            ack = await asyncio.wait_for(future, max(0.0, sent + ACK_TIMEOUT - time.monotonic()))
        except nats.js.errors.APIError as error:
            self._add(refused=1)
            raise ArchiveUnavailable(f"the broker refused pulse {pulse_id}: {error}") from None
        except asyncio.TimeoutError:
            raise ArchiveUnavailable(f"no acknowledgement for pulse {pulse_id} within {ACK_TIMEOUT} s") from None
        if pulse_id < 0:  # a gap marker
            if counts and not ack.duplicate:
                self._add(**counts)
            return size
        if ack.duplicate:
            self._add(duplicates=1)
        else:
            self._add(archived=1, archived_bytes=size)
        self._set(last_archived_pulse_id=pulse_id, last_archived_time=message_time)
        return size

    def _lost_in(self, gap: Gap, resume: tuple[int, float] | None,
                 opening: bool) -> tuple[int, int | None, int | None] | None:
        """(pulses, first, last) a ring gap means for the archive; None if it means no loss.

        An empty archive's first gap (the ring's oldest is after pulse 0) is
        no loss: nothing before the archiver's start was promised. Later,
        with the archive still empty (the broker never reachable), the loss
        is what the ring evicted since the archiver first saw it
        (``_ring_floor``); unknown if the ring was empty then (documented in
        docs/archive.md).
        """
        if gap.reason == GapReason.BEFORE_BUFFER.value and resume is None:
            if opening or self._ring_floor is None or gap.last_pulse_id is None:
                return None
            first = max(self._ring_floor, gap.first_pulse_id or 0)
            return lost_pulses(first, gap.last_pulse_id, self._step.step), first, gap.last_pulse_id
        if gap.count is not None:
            return (gap.count, gap.first_pulse_id, gap.last_pulse_id) if gap.count else None
        if gap.first_pulse_id is None or gap.last_pulse_id is None:
            return None
        return lost_pulses(gap.first_pulse_id, gap.last_pulse_id, self._step.step), gap.first_pulse_id, \
            gap.last_pulse_id

    # -- the archive's own figures -------------------------------------------
    async def _watch_stored(self, js: Any) -> None:
        while True:
            try:
                info = await js.stream_info(self.target.stream)
                state = info.state
                first_pulse_id = last_pulse_id = None
                if state.messages:
                    first = await record_at(js, self.target, state.first_seq)
                    last = await record_at(js, self.target, state.last_seq)
                    first_pulse_id = first[0].pulse_id if first else None
                    last_pulse_id = (last[0].gap_last_pulse_id if last[0].kind == "gap" else last[0].pulse_id) \
                        if last else None
                self._set(first_pulse_id=first_pulse_id, last_pulse_id=last_pulse_id, stored_messages=state.messages,
                          stored_bytes=state.bytes, discarded=max(0, state.first_seq - 1),
                          replicas=info.config.num_replicas)
            except (nats.errors.Error, nats.js.errors.Error, InvalidArchive, asyncio.TimeoutError) as error:
                logger.debug("archive: reading the stream's state: %s", error)
            await asyncio.sleep(STORED_INTERVAL)

    # -- status to the buffer ------------------------------------------------
    async def _report_status(self) -> None:
        if not self.status_address:
            return
        while True:
            await self._send_status_once()
            await asyncio.sleep(STATUS_INTERVAL)

    _status_socket: Any = None

    async def _send_status_once(self) -> None:
        if not self.status_address:
            return
        if self._status_socket is None:
            socket = zmq.Context.instance().socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, 4)
            socket.setsockopt(zmq.LINGER, 500)
            socket.connect(self.status_address)
            self._status_socket = socket
        try:
            self._status_socket.send(json.dumps(self.status.to_json()).encode(), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the buffer reads the newest; an old one missed is no loss


def _positive_or_zero(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sf_bsread_writer.archive.publisher REPLAY ARCHIVE_URL --name NAME ...``: the buffer's child."""
    process.service_start()  # first: the knobs, and its death with the buffer that started it (process.start_child)
    parser = argparse.ArgumentParser(prog="sf_bsread_archiver", description=__doc__.splitlines()[0])
    parser.add_argument("replay_address")
    parser.add_argument("archive")
    parser.add_argument("--name", required=True)
    parser.add_argument("--max-bytes", type=int, default=-1)
    parser.add_argument("--max-age", type=_positive_or_zero, default=0.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--status-address", default=None)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    process.configure_logging(args.log_level)
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # its reconnect tracebacks: our own lines say it once
    try:
        target = ArchiveTarget.parse(args.archive, args.name)
    except InvalidArchive as error:
        logger.error("archive: %s", error)
        return 2
    archiver = Archiver(args.replay_address, target,
                        StreamSettings(subjects=target.subjects, replicas=args.replicas, max_bytes=args.max_bytes,
                                       max_age=args.max_age), args.status_address)
    process.stop_on_signals(lambda _name: archiver.stop())
    if args.parent_pid:
        def watch_parent() -> None:
            while not archiver._stop.wait(1.0):
                if not process.pid_alive(args.parent_pid):
                    archiver.stop()
        threading.Thread(target=watch_parent, daemon=True).start()
    return archiver.run()


if __name__ == "__main__":
    sys.exit(main())
