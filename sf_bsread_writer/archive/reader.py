"""Reading a pulse range from the archive: the JetStream side (async) and a writer's source (a thread's loop).

:class:`ArchiveSource` is a source like ``replay.client.ReplayClient``
(``start``, ``handshake``, ``receive(timeout)``, ``set_stop``, ``close``), so
the writer's run loop, ``sf_bsread_ctl write`` and the web's ranges take it
unchanged: ``sf_bsread_writer nats://HOST:PORT/NAME ...`` writes from the
archive alone, and ``archive.reach_back`` uses it for what a ring no longer
holds. The NATS client is asyncio: it runs on an event loop in a thread of
its own, and the caller's thread only waits on futures with a deadline.

How a range is read (docs/archive.md, "Reading"):

1. the start: a binary search over stream sequence numbers by the
   ``Sf-Pulse-Id`` (or ``Sf-Time``) header with direct gets, ~log2(n) of
   them (the payloads of the probes are read too: JetStream 2.9 has no
   headers-only get);
2. the messages: an ephemeral pull consumer from that sequence (no acks,
   in memory, removed by the server when idle), fetched in batches bounded
   by bytes; one fetch is always in flight while the writer writes the last
   one;
3. each stored record through ``archive.records.RangeCursor``: Data, Gap
   (``before_archive``, ``not_archived``, ``archive_discarded``), End.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from sf_bsread_writer.archive.records import (
    ARCHIVE,
    ArchivedRecord,
    ArchiveTarget,
    InvalidArchive,
    OriginLog,
    PayloadDecoder,
    RangeCursor,
    parse_headers,
)
from sf_bsread_writer.replay.messages import (
    Accepted,
    BufferLost,
    Data,
    End,
    Gap,
    GapReason,
)

__all__ = ["ArchiveLoop", "ArchiveSource", "ArchiveUnavailable", "connect", "seek", "stored_bounds", "GAP_DISCARDED"]

logger = logging.getLogger(__name__)

#: Messages removed by the archive's retention while a reader was on its way to them.
GAP_DISCARDED = GapReason.ARCHIVE_DISCARDED.value
# One fetch brings at most this many bytes (estimated from the messages seen) and messages.
FETCH_BYTES = 16 * 1024**2
FETCH_MESSAGES = 256
# How long one fetch waits for messages that are not there yet (the range reaches the present).
FETCH_WAIT = 0.5
# The server removes a reader's consumer after this much idleness (a writer killed with kill -9).
CONSUMER_IDLE_SECONDS = 30.0
CONNECT_TIMEOUT = 5.0
MAX_NATS_PAYLOAD = 64 * 1024**2  # the largest message a nats-server accepts at all (its max_payload's limit)
REQUEST_TIMEOUT = 5.0


class ArchiveUnavailable(ConnectionError):
    """The archive cannot be reached or has no stream of this name (``unavailable``: a 503 for a start)."""

    unavailable = True


async def _quiet_error(error: Exception) -> None:
    logger.debug("nats: %s", error)


async def connect(target: ArchiveTarget, timeout: float = CONNECT_TIMEOUT, **options: Any) -> Any:
    """A NATS connection to any of ``target.servers`` (ArchiveUnavailable if none answers within ``timeout``)."""
    try:
        return await asyncio.wait_for(nats.connect(
            list(target.servers), connect_timeout=min(timeout, 2.0), max_reconnect_attempts=options.pop(
                "max_reconnect_attempts", 5), reconnect_time_wait=0.2, allow_reconnect=True,
            error_cb=options.pop("error_cb", _quiet_error), name=options.pop("name", "sf_bsread_writer"),
            **options), timeout)
    except (OSError, asyncio.TimeoutError, nats.errors.Error) as error:
        raise ArchiveUnavailable(f"cannot reach the archive at {','.join(target.servers)}: "
                                 f"{error or type(error).__name__}") from None


async def stored_bounds(js: Any, target: ArchiveTarget) -> tuple[int, int]:
    """(first_seq, last_seq) of the stream; first > last when it is empty. ArchiveUnavailable without a stream."""
    try:
        info = await js.stream_info(target.stream)
    except nats.js.errors.NotFoundError:
        raise ArchiveUnavailable(f"the archive has no stream {target.stream} (no buffer archived as "
                                 f"{target.name!r} to {','.join(target.servers)})") from None
    return info.state.first_seq, info.state.last_seq


async def record_at(js: Any, target: ArchiveTarget, seq: int) -> tuple[ArchivedRecord, Any] | None:
    """The record stored at ``seq`` and its raw message; None if it is gone (retention) or not there."""
    if seq < 1:
        return None
    try:
        message = await js.get_msg(target.stream, seq=seq, direct=True)
    except nats.js.errors.NotFoundError:
        return None
    return parse_headers(message.headers), message


async def seek(js: Any, target: ArchiveTarget, first: int, last: int, pulse_id: int | None = None,
               time_: float | None = None) -> int:
    """The first seq in [first, last] whose record is at or after ``pulse_id`` (or ``time_``); last + 1 if none.

    A binary search: pulse ids and times rise along the stream (the
    archiver publishes in ring order). A record that is gone (retention ran
    meanwhile) lies before the oldest, so before the target. A record that
    no archiver wrote says nothing: the next readable one above it decides,
    and if it is at or after the target, the search goes on below the
    unreadable one (a reader then starts a little early and skips it,
    counted), so junk can never make a reader start late.
    """
    wanted = pulse_id if pulse_id is not None else time_
    low, high = first, last + 1
    while low < high:
        middle = (low + high) // 2
        probe, record = middle, None
        while probe < high:
            try:
                found = await record_at(js, target, probe)
            except InvalidArchive:
                probe += 1
                continue
            if found is None and probe == middle:  # gone: before the oldest, so before the target
                break
            record = found[0] if found is not None else None
            break
        if record is None:
            if probe == middle:
                low = middle + 1
            else:
                high = middle
            continue
        key = (record.gap_last_pulse_id if record.kind == "gap" else record.pulse_id) if pulse_id is not None \
            else record.time
        if key >= wanted:
            high = middle
        else:
            low = probe + 1
    return low


class ArchiveLoop:
    """An asyncio loop in a daemon thread: the NATS client's home. ``run(coroutine, timeout)`` from any thread."""

    def __init__(self, name: str = "archive-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Any, timeout: float) -> Any:
        future = self.submit(coroutine)
        if not concurrent.futures.wait([future], timeout).done:  # (a TimeoutError inside is the coroutine's)
            future.cancel()
            raise ArchiveUnavailable(f"the archive did not answer within {timeout:.1f} s")
        return future.result()

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def _cancel_all() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(2.0)
        except Exception:  # noqa: BLE001 (closing: best effort)
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self.loop.close()


class ArchiveSource:
    """A pulse range from the archive, as a writer's source (the interface of ``ReplayClient``).

    ``receive(timeout)`` returns a replay event (``Data`` with the stored
    parts and time, ``Gap``, ``End``) or None when nothing came within
    ``timeout``; a range whose stop is not archived yet waits for it (the
    archiver keeps adding), as a buffer's session waits for the source.
    ``caught_up`` is True once a fetch found nothing more stored (the
    reach-back then goes back to the ring). Not thread-safe: one caller.
    """

    def __init__(self, target: ArchiveTarget | str, start_pulse_id: int | None = None, start_time: float | None = None,
                 stop_pulse_id: int | None = None, stop_time: float | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, fetch_wait: float = FETCH_WAIT) -> None:
        self.target = ArchiveTarget.parse(target) if isinstance(target, str) else target
        self.start_pulse_id = start_pulse_id
        self.start_time = start_time
        self.stop_pulse_id = stop_pulse_id
        self.stop_time = stop_time
        self.connect_timeout = connect_timeout
        self.fetch_wait = fetch_wait
        self.accepted: Accepted | None = None
        self.ended: End | None = None
        self.caught_up = False
        self.rejected = 0  # stored messages that are not an archiver's (bad headers or payload): skipped
        self.restarts = 0
        self._loop: ArchiveLoop | None = None
        self._nc: Any = None
        self._js: Any = None
        self._subscription: Any = None
        self._cursor: RangeCursor | None = None
        self._events: deque[Any] = deque()
        self._fetch: concurrent.futures.Future | None = None
        self._next_seq: int | None = None  # the stream seq expected next (a jump: retention removed some)
        # The largest message seen: a fetch asks for at most FETCH_BYTES of them, so what one fetch brings
        # stays within the subscription's pending limit (beyond it the client would drop messages).
        self._largest = 1024
        self._origins = OriginLog()
        self._decoder = PayloadDecoder()  # layouts worked out once per stream, not per message
        self._empty_fetches = 0  # in a row, while the stream holds messages we have not had
        self._broken = False  # the last reopen failed: retried at most once a second
        self._last_retry = 0.0

    @property
    def last_pulse_id(self) -> int | None:
        return self._cursor.last_pulse_id if self._cursor is not None else None

    @property
    def pulse_sources(self) -> list[dict[str, Any]] | None:
        """Runs of pulses delivered (all ``archive``): the file's ``pulse_sources``."""
        return self._origins.runs() or None

    # -- the interface of a source -------------------------------------------
    def start(self) -> "ArchiveSource":
        """Connect, find the start, open the consumer (ArchiveUnavailable if the archive cannot be had)."""
        self._loop = ArchiveLoop()
        try:
            self.accepted = self._loop.run(self._open(), self.connect_timeout + 4 * REQUEST_TIMEOUT)
        except Exception:
            self.close()
            raise
        return self

    def handshake(self, timeout: float) -> Accepted | None:
        """What the archive holds (oldest/newest pulse id), as a buffer's acceptance says of its ring."""
        return self.accepted

    def receive(self, timeout: float) -> Any:
        if self._events:
            return self._events.popleft()
        if self.ended is not None or self._loop is None:
            return None
        if self._broken:
            return self._lost(ArchiveUnavailable("still unreachable")) if self._retry_due() else None
        if self._fetch is None:
            self._fetch = self._loop.submit(self._next_batch())
        # Waited for apart from its result: since Python 3.11 a TimeoutError *inside* the fetch (a request to
        # a cluster electing a leader) is the same class as result()'s own timeout, and was taken for "not yet".
        if not concurrent.futures.wait([self._fetch], timeout).done:
            return None
        try:
            batch = self._fetch.result()
        except Exception as error:  # noqa: BLE001 (a server of a cluster died, the consumer with it: resume)
            self._fetch = None
            return self._lost(error)
        self._fetch = None
        self._take(batch)
        if self.ended is None:
            self._fetch = self._loop.submit(self._next_batch())  # the next one while the writer writes
        return self._events.popleft() if self._events else None

    def _lost(self, error: Exception) -> BufferLost | None:
        """The archive failed under a read: reopen after the last pulse delivered (a ``BufferLost`` for the writer).

        As a writer does with a buffer that went silent: the rest of the range
        is asked for again (JetStream keeps it; a cluster answers from another
        server). If the archive cannot be had now, None: the next receive tries
        again, and a writer's stop deadline ends a range that never resumes.
        """
        logger.warning("archive: reading %s failed (%s); resuming after pulse %s", self.target.stream,
                       str(error) or type(error).__name__, self.last_pulse_id)
        assert self._loop is not None and self._cursor is not None
        cursor = self._cursor
        try:
            self._loop.run(self._close(), REQUEST_TIMEOUT)
        except Exception:  # noqa: BLE001 (the old connection is gone anyway)
            pass
        self._subscription = self._nc = None
        self.restarts += 1
        try:
            self._loop.run(self._reopen(cursor), self.connect_timeout + 4 * REQUEST_TIMEOUT)
        except Exception as again:  # noqa: BLE001
            logger.warning("archive: %s not readable yet: %s", self.target.stream, again)
            self._broken = True
        else:
            self._broken = False
        return BufferLost(0.0)

    async def _reopen(self, cursor: RangeCursor) -> None:
        self._nc = await connect(self.target, self.connect_timeout)
        self._js = self._nc.jetstream(timeout=REQUEST_TIMEOUT)
        first, last = await stored_bounds(self._js, self.target)
        if cursor.last_pulse_id is not None:
            seq = await seek(self._js, self.target, first, last, cursor.last_pulse_id + 1)
        else:
            seq = await seek(self._js, self.target, first, last, self.start_pulse_id,
                             self.start_time if self.start_pulse_id is None else None)
        await self._subscribe(max(seq, 1))

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        self.stop_pulse_id, self.stop_time = stop_pulse_id, stop_time
        if self._cursor is not None:
            for event in self._cursor.set_stop(stop_pulse_id, stop_time):
                self._note(event)

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._fetch is not None:
            self._fetch.cancel()
            self._fetch = None
        try:
            loop.run(self._close(), REQUEST_TIMEOUT)
        except Exception as error:  # noqa: BLE001 (closing: the consumer expires by itself)
            logger.debug("archive: closing: %s", error)
        loop.close()

    def __enter__(self) -> "ArchiveSource":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retry_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_retry < 1.0:
            return False
        self._last_retry = now
        return True

    # -- the loop's side ---------------------------------------------------
    async def _open(self) -> Accepted:
        self._nc = await connect(self.target, self.connect_timeout)
        self._js = self._nc.jetstream(timeout=REQUEST_TIMEOUT)
        first, last = await stored_bounds(self._js, self.target)
        oldest = newest = None
        first_record = None
        if first <= last:
            found = await record_at(self._js, self.target, first)
            first_record = found[0] if found else None
            found_last = await record_at(self._js, self.target, last)
            oldest = first_record.pulse_id if first_record else None
            newest = found_last[0].pulse_id if found_last else None
            if found_last is not None:  # the first fetch's size: the stream's messages are alike
                self._largest = max(self._largest, len(found_last[1].data or b""))
        self._cursor = RangeCursor(self.start_pulse_id, self.start_time, self.stop_pulse_id, self.stop_time,
                                   first_record)
        for event in self._cursor.opening():
            self._note(event)
        if self.ended is None:
            seq = await seek(self._js, self.target, first, last, self.start_pulse_id,
                             self.start_time if self.start_pulse_id is None else None) if first <= last else last + 1
            await self._subscribe(max(seq, 1))
        return Accepted(0, oldest, newest, self.target.url())  # "archive": what is older is a gap with its reason

    async def _subscribe(self, seq: int) -> None:
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq,
                                    ack_policy=api.AckPolicy.NONE, inactive_threshold=CONSUMER_IDLE_SECONDS,
                                    mem_storage=True, num_replicas=1)
        self._subscription = await self._js.pull_subscribe(
            self.target.message_subject.rsplit(".", 1)[0] + ".*", stream=self.target.stream, config=config,
            pending_bytes_limit=2 * FETCH_BYTES + MAX_NATS_PAYLOAD)
        self._next_seq = seq

    async def _next_batch(self) -> list[Any]:
        count = int(max(1, min(FETCH_MESSAGES, FETCH_BYTES // max(self._largest, 1))))
        try:
            batch = await self._subscription.fetch(count, timeout=self.fetch_wait)
        except nats.errors.TimeoutError:
            batch = []
        if batch:
            self._empty_fetches = 0
            return batch
        # Nothing came. Either nothing newer is stored (a range reaching into the present), or our consumer
        # is dead: in a cluster, one created while a server was dying may have been placed on it. The
        # stream says which; twice in a row, and the read is resumed on a new consumer.
        _, last = await asyncio.wait_for(stored_bounds(self._js, self.target), REQUEST_TIMEOUT)
        if self._next_seq is not None and last >= self._next_seq:
            self._empty_fetches += 1
            if self._empty_fetches >= 2:
                self._empty_fetches = 0
                raise ArchiveUnavailable(f"the consumer delivers nothing although messages up to {last} are "
                                         f"stored (from {self._next_seq} on)")
        else:
            self._empty_fetches = 0
        return []

    async def _close(self) -> None:
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
        if self._nc is not None:
            await self._nc.close()

    # -- records -> events ---------------------------------------------------
    def _note(self, event: Any) -> None:
        self._events.append(event)
        if isinstance(event, End):
            self.ended = event

    def _take(self, batch: list[Any]) -> None:
        """A fetched batch through the cursor; a jump of stream sequence numbers is a counted gap."""
        self.caught_up = not batch
        cursor = self._cursor
        assert cursor is not None
        for message in batch:
            if self.ended is not None:
                return
            self._largest = max(self._largest, len(message.data or b""))
            seq = message.metadata.sequence.stream
            try:
                record = parse_headers(message.headers)
                parts = self._decoder.decode(message.data) if record.kind == "msg" else None
            except InvalidArchive as error:
                self.rejected += 1
                logger.warning("archive: stored message %d of %s skipped: %s", seq, self.target.stream, error)
                self._next_seq = seq + 1
                continue
            if self._next_seq is not None and seq > self._next_seq and cursor.started:
                # Retention removed messages between our reads (the reader fell behind the oldest).
                first = (cursor.last_pulse_id + 1) if cursor.last_pulse_id is not None else cursor.start_pulse_id
                self._note(Gap(first, record.pulse_id - 1, GAP_DISCARDED, seq - self._next_seq))
            self._next_seq = seq + 1
            for event in cursor.record(record, parts):
                if isinstance(event, Data):
                    self._origins.add(ARCHIVE, event.pulse_id)
                self._note(event)
