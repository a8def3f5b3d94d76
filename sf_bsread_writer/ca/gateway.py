"""EPICS Channel Access gateway over a buffer: CLI ``sf_bsread_gateway`` and the buffer's ``--ca``.

Every channel of the buffer's live stream is served as the PV ``PREFIX +
channel`` and the buffer's status as ``NAME:PULSE_ID`` and friends (see
docs/gateway.md). The gateway always runs as its own process: caproto's
server slows down badly when the same process also keeps a core busy with
Python work (the buffer's ingest), and the buffer's ingest must never wait
for a CA client. The buffer starts it with its ``--ca`` as a supervised
child (``buffer.children``) fed by a rate-limited loopback feed.

Inside the process:

* an ingest thread receives the buffer's live output (SUB) and keeps only
  the newest message (conflation: a slow gateway skips messages, it never
  queues them);
* the asyncio loop applies the newest message at most ``--max-rate`` times
  a second (fewer if ``--total-rate`` would be exceeded by the PVs clients
  watch), so camonitor clients are not flooded;
* a status thread polls the buffer's ``GET /statistics`` once a second and
  reads it back as the typed ``status.BufferStatus``;
* the caproto server runs under a supervisor coroutine that restarts it if
  it ever stops with an error.

Channel Access stays on this machine unless the EPICS environment says
otherwise: see ``ca.environment``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sf_bsread_writer import process
from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.bsread.parts import bit_indices, presence_bits
from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.ca.environment import prepare_server_environment
from sf_bsread_writer.config import GATEWAY_ENV_PREFIX, GATEWAY_OPTIONS, parse_args
from sf_bsread_writer.process import ExitCode
from sf_bsread_writer.rates import RateEstimator
from sf_bsread_writer.status import BufferStatus

__all__ = ["main", "Gateway", "GatewaySettings", "STATUS_PVS"]

# The import path even when run as ``python -m`` (where __name__ is "__main__").
logger = logging.getLogger(__spec__.name)

# (suffix, CA type, meaning). Counters are DOUBLE: they outgrow a 32-bit LONG.
STATUS_PVS: tuple[tuple[str, str, str], ...] = (
    ("PULSE_ID", "DOUBLE", "newest pulse id in the buffer"),
    ("OLDEST_PULSE_ID", "DOUBLE", "oldest pulse id in the buffer"),
    ("RATE", "DOUBLE", "messages per second the buffer receives"),
    ("N_MESSAGES", "DOUBLE", "messages held in the ring"),
    ("RECEIVED", "DOUBLE", "valid messages received since start"),
    ("REJECTED", "DOUBLE", "malformed messages dropped since start"),
    ("IDLE_S", "DOUBLE", "seconds since the last message from the source"),
    ("N_WRITERS", "LONG", "active replay sessions (writers)"),
    ("CHANNELS", "LONG", "channels in the stream's data header"),
    ("STATE", "STRING", "what the buffer is doing (receiving, source_idle, ...)"),
    ("MAX_RATE", "DOUBLE", "most updates per second of one PV (writable with --writable)"),
)

# Seconds without a message after which every channel PV is flagged INVALID/COMM.
STALE_AFTER_S = 3.0
#: Older messages kept beside the newest because they carry a channel it lacks (sparse channels).
SPARSE_KEPT = 8
SPARSE_KEPT_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------
# Ingest: the buffer's live output -> newest message
# --------------------------------------------------------------------------
class _Ingest(threading.Thread):
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
        covered = presence
        for kept in reversed(older):  # newest kept first: an older value of a channel is not needed
            wanted = kept.presence & ~covered
            covered |= kept.presence
            message = self._parse(kept.frames) if wanted else None
            if message is not None:
                taken.append((message, kept.received, frozenset(bit_indices(wanted))))
        taken.reverse()
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
        self._sparse = [old for old in self._sparse if old.presence & ~newest_presence & ~kept.presence]
        self._sparse.append(kept)
        while len(self._sparse) > SPARSE_KEPT or (
                len(self._sparse) > 1 and sum(old.nbytes for old in self._sparse) > SPARSE_KEPT_BYTES):
            self._sparse.pop(0)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        import zmq

        context = zmq.Context.instance()
        socket = context.socket(zmq.SUB if self.mode == "sub" else zmq.PULL)
        try:
            if self.mode == "sub":
                socket.setsockopt(zmq.SUBSCRIBE, b"")
            socket.setsockopt(zmq.RCVHWM, 4)  # old messages are worthless here
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE_BYTES)
            socket.connect(self.address)
            poller = zmq.Poller()
            poller.register(socket, zmq.POLLIN)
            while not self._stop_event.is_set():
                if not poller.poll(200):
                    continue
                # Drain what is queued: the newest message, and older ones with channels it lacks.
                received = notify = False
                while True:
                    try:
                        # copy=True: for the many small parts of a wide stream, bytes are
                        # about 3x cheaper than zmq.Frame objects; an image copy is a memcpy.
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.received += 1
                    received = True
                    notify = self.arrive(frames, time.monotonic()) or notify
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
            socket.close(0)


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
class _StatusPoller(threading.Thread):
    """The buffer's ``GET /statistics`` once a second, as a typed snapshot (``latest``)."""

    def __init__(self, base_url: str, interval: float = 1.0) -> None:
        super().__init__(name="gateway-status", daemon=True)
        self.url = base_url.rstrip("/") + "/statistics"
        self.interval = interval
        self._stop_event = threading.Event()
        self.latest: BufferStatus | None = None
        self.latest_monotonic: float | None = None
        self.failures = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
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


# --------------------------------------------------------------------------
# The gateway (asyncio side)
# --------------------------------------------------------------------------
@dataclass
class GatewaySettings:
    buffer_output: str
    status_url: str | None = None
    source_mode: str = "sub"
    prefix: str = ""
    name: str = "BSBUFFER"
    max_rate: float = 10.0
    total_rate: float = 20000.0
    writable: bool = False
    allow_hosts: tuple[str, ...] = ()
    acf: str | None = None  # the site's EPICS access-security file (softioc server)
    parent_pid: int = 0


class Gateway:
    """Owns the PV database, the caproto server and the loops that feed it."""

    def __init__(self, settings: GatewaySettings) -> None:
        from sf_bsread_writer.ca import (
            server as caserver,  # imports caproto.server: after the environment is prepared
        )

        self.settings = settings
        self.cs = caserver
        self.policy = caserver.AccessPolicy(settings.writable, frozenset(settings.allow_hosts))
        self.pvdb: dict[str, Any] = {}
        self.context: Any = None
        self.stream = caserver.StreamPVs(lambda: self.context, self.pvdb, settings.prefix, self.policy)
        self.status: dict[str, Any] = {}
        for suffix, ca_type, doc in STATUS_PVS:
            status_pv = caserver.StatusPV(suffix, ca_type, doc)
            writable = suffix == "MAX_RATE"
            value = settings.max_rate if writable else ("" if ca_type == "STRING" else 0)
            self.pvdb[f"{settings.name}:{suffix}"] = status_pv.create(self.policy, writable=writable, value=value)
            self.status[suffix] = status_pv
        max_rate_pv = self.status["MAX_RATE"].pv
        max_rate_pv.on_put = self._on_max_rate_put
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.ingest = _Ingest(settings.buffer_output, settings.source_mode, self._notify_threadsafe)
        self.poller = _StatusPoller(settings.status_url) if settings.status_url else None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server_restarts = 0
        self._own_rates = RateEstimator(window=5.0)
        self.newest_pulse_id: int | None = None
        self.last_applied_monotonic: float | None = None

    # -- plumbing -----------------------------------------------------------
    def _notify_threadsafe(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def _on_max_rate_put(self, value: Any) -> None:
        try:
            rate = float(value)
        except (TypeError, ValueError):
            return
        if rate > 0:
            logger.info("max rate per PV set to %.3g Hz over CA", rate)
            self.settings.max_rate = rate

    def stop(self) -> None:
        self._stopping.set()

    def interval(self) -> float:
        """Seconds between two updates of the PVs: the per-PV limit, or the overall budget."""
        per_pv = 1.0 / self.settings.max_rate if self.settings.max_rate > 0 else 0.0
        watched = self.stream.n_watched
        budget = watched / self.settings.total_rate if self.settings.total_rate > 0 else 0.0
        return max(per_pv, budget)

    # -- loops --------------------------------------------------------------
    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.ingest.start()
        if self.poller is not None:
            self.poller.start()
        tasks = [
            asyncio.create_task(self._serve(), name="ca-server"),
            asyncio.create_task(self._apply_loop(), name="apply"),
            asyncio.create_task(self._status_loop(), name="status"),
        ]
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            failed = [task for task in done if task is not stopper and task.exception() is not None]
            for task in failed:
                logger.error("gateway task %s failed: %r", task.get_name(), task.exception())
            return ExitCode.FAILED if failed or self.ingest.error is not None else ExitCode.OK
        finally:
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            self.ingest.stop()
            if self.poller is not None:
                self.poller.stop()
            self.ingest.join(timeout=2)

    async def _serve(self) -> None:
        """Run the caproto server; if it ever ends with an error, start a new one (same PVs)."""
        backoff = 0.5
        while True:
            context = self.cs.GatewayContext(self.pvdb)
            self.context = context
            started = time.monotonic()
            try:
                await context.run(startup_hook=self._announce)
                # caproto's run() swallows its cancellation and returns.
                if self._stopping.is_set() or asyncio.current_task().cancelling():
                    return
                logger.warning("CA server ended; restarting")
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("CA server failed; restarting it")
            finally:
                await context.server_tasks.cancel_all()
                for circuit in list(context.circuits):
                    circuit.client.close()
                context.forget_queues()
                self.context = None
            self.server_restarts += 1
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10.0)
            await asyncio.sleep(backoff)  # not synchronisation: a pause before restarting

    async def _announce(self, async_lib: Any) -> None:
        context = self.context
        ready = {
            "ca_port": context.port,
            "interfaces": list(context.interfaces),
            "beacons": [f"{host}:{port}" for host, port in context.beacon_socks],
            "status_pvs": [f"{self.settings.name}:{suffix}" for suffix, _, _ in STATUS_PVS],
            "prefix": self.settings.prefix,
            "restarts": self.server_restarts,
        }
        if any(host.startswith("255.") or host.endswith(".255") for host, _ in context.beacon_socks):
            logger.warning("CA beacons are broadcast (%s): set EPICS_CAS_BEACON_ADDR_LIST", ready["beacons"])
        process.print_ready(ready)

    async def _apply_loop(self) -> None:
        next_due = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.ingest.error is not None:
                raise RuntimeError(f"ingest failed: {self.ingest.error}")
            now = time.monotonic()
            if now < next_due:
                await asyncio.sleep(next_due - now)  # rate limit, then take the newest
            message = self.ingest.take_message()
            if message is None:
                continue
            started = time.monotonic()
            await self.stream.apply(message)
            self.newest_pulse_id = message.pulse_id
            self.last_applied_monotonic = started
            next_due = started + self.interval()

    async def _status_loop(self) -> None:
        """1 Hz: status PVs, and the stale flag when the stream has stopped."""
        while True:
            await asyncio.sleep(1.0)  # the status PVs' own rate, not synchronisation
            stamp = self.cs.now_stamp()
            last = self.ingest.last_receive_monotonic
            if last is not None and time.monotonic() - last > STALE_AFTER_S:
                await self.stream.mark_stale(stamp)
            await self._update_status(stamp)
            if self.settings.parent_pid and not process.pid_alive(self.settings.parent_pid):
                logger.warning("parent process %d is gone; gateway exits", self.settings.parent_pid)
                self.stop()

    async def _update_status(self, stamp: Any) -> None:
        cs = self.cs
        statistics = self.poller.latest if self.poller is not None else None
        fresh = (self.poller is not None and self.poller.latest_monotonic is not None
                 and time.monotonic() - self.poller.latest_monotonic < 5.0)
        own_idle = (time.monotonic() - self.ingest.last_receive_monotonic
                    if self.ingest.last_receive_monotonic is not None else None)
        own = {
            "PULSE_ID": self.newest_pulse_id,
            "CHANNELS": len(self.stream.stats.channel_names) if self.stream.stats.messages_applied else None,
            "IDLE_S": own_idle,
            "RATE": self._own_rate(),
        }
        from_buffer = {} if statistics is None else statistics.status_pv_values()
        for suffix, status_pv in self.status.items():
            if suffix == "MAX_RATE":
                if status_pv.pv.value != self.settings.max_rate:
                    await status_pv.pv.set_value(self.settings.max_rate, stamp)
                elif status_pv.pv.alarm.severity:
                    await status_pv.pv.set_value(self.settings.max_rate, stamp)
                continue
            value = from_buffer.get(suffix) if fresh else None
            if value is None and suffix != "CHANNELS":
                value = own.get(suffix) if (self.poller is None or not fresh) else None
            if suffix == "CHANNELS":
                value = own["CHANNELS"]
            if value is None:
                alarm = cs.ALARM_STALE if self.poller is not None and not fresh else cs.ALARM_ABSENT
                await status_pv.pv.set_alarm_only(alarm, stamp)
                continue
            if status_pv.ca_type == "STRING":
                value = str(value)[:39]
            elif status_pv.ca_type == "LONG":
                value = int(value)
            else:
                value = float(value)
            await status_pv.pv.set_value(value, stamp)

    def _own_rate(self) -> float | None:
        """Messages per second this gateway receives (used when the buffer's status is unavailable)."""
        self._own_rates.add(time.monotonic(), self.ingest.received)
        return self._own_rates.rate()


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``sf_bsread_gateway BUFFER_OUTPUT [--status-url URL] ...``; returns the exit code."""
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    args = parse_args("sf_bsread_gateway", "Serve a bsread buffer's live stream and status as EPICS PVs.",
                      GATEWAY_OPTIONS, GATEWAY_ENV_PREFIX, argv)
    process.configure_logging(args.log_level)
    # The supervisor and its IOC process alike: a terminal's hangup reaches the whole process group.
    process.survive_hangup("the terminal is gone: the gateway goes on serving (SIGTERM stops it)")
    changes = prepare_server_environment(os.environ)
    if changes and not args.ioc_child:
        logger.info("EPICS environment completed: %s", ", ".join(changes))
    settings = GatewaySettings(
        buffer_output=args.buffer_output,
        status_url=args.status_url,
        source_mode=args.source_mode,
        prefix=args.ca_prefix,
        name=args.name,
        max_rate=args.max_rate,
        total_rate=args.total_rate,
        writable=args.writable,
        allow_hosts=tuple(args.allow_hosts or ()),
        acf=os.path.abspath(args.acf) if args.acf else None,
        parent_pid=getattr(args, "parent_pid", 0) or 0,
    )
    if settings.allow_hosts and not settings.writable:
        logger.warning("--allow-host has no effect without --writable")
    if settings.acf is not None:
        if args.server != "softioc" or _softioc_missing() is not None:
            logger.error("--acf needs the softioc server (EPICS access security); caproto cannot read an ACF")
            return ExitCode.CONFIGURATION
        if settings.writable or settings.allow_hosts:
            logger.error("--acf replaces --writable/--allow-host: give the rules in the file")
            return ExitCode.CONFIGURATION
        if not os.access(settings.acf, os.R_OK):
            logger.error("--acf %s: not a readable file", settings.acf)
            return ExitCode.CONFIGURATION
    if args.server == "softioc":
        if _softioc_missing() is not None:
            logger.warning("pythonSoftIOC is not installed (%s): serving with caproto", _softioc_missing())
        else:
            return _run_ioc(settings, args.ioc_child, sys.argv[1:] if argv is None else list(argv))
    return _run_caproto(settings)


def _softioc_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("softioc") is not None else "no module named softioc"


def _run_ioc(settings: GatewaySettings, child: bool, argv: list[str]) -> int:
    """--server softioc: this process supervises the IOC process, which serves (ca/ioc.py)."""
    from sf_bsread_writer.ca import ioc

    if not child:
        if settings.acf is not None:
            try:
                ioc.check_access_security_file(settings.acf)
            except ioc.AccessSecurityError as error:
                logger.error("%s", error)
                return ExitCode.CONFIGURATION
        return ioc.supervise(argv)
    if not ioc.wait_for_go():
        return ExitCode.OK
    ingest = _Ingest(settings.buffer_output, settings.source_mode, lambda: None)
    poller = _StatusPoller(settings.status_url) if settings.status_url else None
    ingest.start()
    if poller is not None:
        poller.start()
    try:
        return ioc.serve(settings, STATUS_PVS, ingest, poller)
    finally:
        ingest.stop()
        if poller is not None:
            poller.stop()
        ingest.join(timeout=2)


def _run_caproto(settings: GatewaySettings) -> int:
    if "caproto.server.common" in sys.modules:
        logger.warning("caproto was imported before the tuning variables were set; they may not apply")
    from sf_bsread_writer.ca import (
        server as caserver,  # imports caproto.server: after the environment is prepared
    )

    logger.info("caproto tuning: %s", caserver.caproto_tuning())
    return asyncio.run(_run(settings))


async def _run(settings: GatewaySettings) -> int:
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    restore = process.stop_on_signals(lambda name: loop.call_soon_threadsafe(gateway.stop))
    try:
        code = await gateway.run()
    finally:
        restore()
    logger.info("gateway stopped (exit code %d)", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
