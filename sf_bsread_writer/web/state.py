"""What the web service knows and shares between its handlers: settings, latest values, subscriptions,
tokens, counters, and the feed thread (``feed.FeedReader``) that keeps the latest values and the buffer's
status current."""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sf_bsread_writer.bsread.message import Message, MessageParser
from sf_bsread_writer.bsread.spec import IgnoredMessage, ProtocolError
from sf_bsread_writer.feed import FeedReader
from sf_bsread_writer.rates import SparseAwareGrid
from sf_bsread_writer.status import BufferStatus, PrometheusText
from sf_bsread_writer.web.auth import TokenFileError, TokenSet, read_tokens
from sf_bsread_writer.web.history import RateHistory, ValueHistory
from sf_bsread_writer.web.live import LatestValues, SubscriptionHub
from sf_bsread_writer.web.range_query import RangeLimits
from sf_bsread_writer.web.writers import WriterRows

__all__ = ["WebSettings", "WebService", "WebCounters", "FeedStatus"]

logger = logging.getLogger(__name__)

# The buffer publishes its status on the feed 4 times a second: one this old means the buffer has stalled.
STATUS_STALE_SECONDS = 5.0
STATUS_PUSH_SECONDS = 1.0
HANDOVER_MESSAGES = 8  # parsed messages waiting for the loop: a stalled loop loses the oldest, never memory


@dataclass(frozen=True)
class FeedStatus:
    """The buffer's newest status from the feed and when it came (the feed thread's monotonic clock)."""

    status: BufferStatus
    received: float


@dataclass
class WebSettings:
    feed: str
    status_url: str | None  # only for a feed that carries no status (a buffer's live output)
    replay: str
    source_mode: str = "sub"
    port: int = 8891
    bind: str = "127.0.0.1"
    tokens_file: str | None = None
    max_rate: float = 10.0
    limits: RangeLimits = field(default_factory=RangeLimits)
    range_timeout: float = 30.0
    parent_pid: int = 0
    listen_fd: int | None = None  # an inherited listening socket (the buffer's --web) instead of bind/port
    heartbeat_seconds: float = 10.0  # websocket pings; a client silent for longer is dropped
    max_clients: int = 1000  # websockets at once (503 beyond)
    range_workers: int = 2  # range requests at once (503 beyond): each holds one of the buffer's replay sessions
    allow_origins: tuple[str, ...] = ()  # web page origins besides the service's own (config.parse_origins)


@dataclass
class WebCounters:
    """The service's own metrics (``GET /metrics``)."""

    feed_messages: int = 0
    feed_rejected: int = 0
    feed_overrun: int = 0  # parsed messages dropped because the loop was behind
    feed_sockets_replaced: int = 0  # the feed socket left mid-message (transport.partsio.MessageCutError)
    feed_oversize: int = 0  # feed messages over max_message_bytes, dropped by the reader (feed.FeedReader)
    feed_reconnects: int = 0  # feed connections given up by libzmq (a part over MAXMSGSIZE), made anew
    values_sent: int = 0
    values_dropped: int = 0
    clients_total: int = 0
    clients_dropped: int = 0  # closed for not answering heartbeats, or by error
    unauthorized: int = 0
    origin_refused: int = 0  # websockets from a page of another site (not --allow-origin)
    range_requests: dict[str, int] = field(default_factory=dict)  # by outcome


class WebService:
    """State shared by the handlers: latest values, subscriptions, tokens, counters."""

    def __init__(self, settings: WebSettings, tokens: TokenSet) -> None:
        self.settings = settings
        self.tokens = tokens
        self.latest = LatestValues()
        self.hub = SubscriptionHub()
        self.counters = WebCounters()
        self.wakeups: dict[Any, asyncio.Event] = {}  # per websocket: frames are waiting
        self.socket_tokens: dict[Any, str | None] = {}  # per websocket: the token it opened with
        self.loop: asyncio.AbstractEventLoop | None = None
        self._handover: deque[Message] = deque(maxlen=HANDOVER_MESSAGES)
        self._handover_lock = threading.Lock()
        self._handover_scheduled = False
        self._feed_thread: threading.Thread | None = None
        self.range_slots = asyncio.Semaphore(settings.range_workers)
        self.status_source: Any = None  # app.status_document: the buffer's status, for the pushes
        self._status_task: asyncio.Future | None = None
        # HDF5 ranges are written here; removed whole at shutdown (a request cut short leaves nothing behind).
        self.temp_root = tempfile.mkdtemp(prefix="sf_bsread_web-")
        self._stop = threading.Event()
        self.feed_error: str | None = None
        self.buffer_status: FeedStatus | None = None  # replaced whole by the feed thread
        # The plots' recent past (web/history.py) and the writers' rates (web/writers.py): bounded, in the loop.
        self.history = ValueHistory()
        self.rate_history = RateHistory()
        self.writer_rows = WriterRows()
        self._history_header: Any = None

    # -- the feed ---------------------------------------------------------------
    def start_feed(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._feed_thread = threading.Thread(target=self._read_feed, name="web-feed", daemon=True)
        self._feed_thread.start()

    def stop_feed(self) -> None:
        self._stop.set()
        if self._feed_thread is not None:
            self._feed_thread.join(timeout=2)
        shutil.rmtree(self.temp_root, ignore_errors=True)

    def _read_feed(self) -> None:
        """Receive (``feed.FeedReader``): the buffer's status is kept; messages are kept to max_rate without
        losing sparse channels, parsed, and handed to the loop."""
        parser = MessageParser()
        sampler = SparseAwareGrid(self.settings.max_rate)
        reader = None
        try:
            reader = FeedReader(self.settings.feed, self.settings.source_mode)
            while not self._stop.is_set():
                item = reader.receive(0.2)
                self.counters.feed_sockets_replaced = reader.sockets_replaced
                self.counters.feed_oversize = reader.oversize
                self.counters.feed_reconnects = reader.reconnects
                if item is None:
                    continue
                if isinstance(item, BufferStatus):
                    self.buffer_status = FeedStatus(item, time.monotonic())  # one reference: read by the loop
                    continue
                if not sampler.take(time.monotonic(), item.layout.presence):
                    continue
                try:
                    message = parser.parse(item)
                except IgnoredMessage:
                    continue
                except ProtocolError as error:
                    self.counters.feed_rejected += 1
                    if self.counters.feed_rejected <= 10:
                        logger.warning("feed message rejected: %s", error)
                    continue
                self._hand_over(message)
        except Exception as error:  # the service answers on, saying that it has no live data
            self.feed_error = f"{type(error).__name__}: {error}"
            logger.exception("feed reader failed")
        finally:
            if reader is not None:
                reader.close()

    def feed_status(self, now: float) -> tuple[BufferStatus | None, str | None]:
        """The buffer's status from the feed, or None and why not (none yet, or too old: the buffer stalled)."""
        latest = self.buffer_status
        if latest is None:
            return None, f"no status on the feed {self.settings.feed} yet"
        age = now - latest.received
        if age > STATUS_STALE_SECONDS:
            return None, f"the buffer's status on the feed {self.settings.feed} is {age:.0f} s old"
        return latest.status, None

    def _hand_over(self, message: Message) -> None:
        """Feed thread -> loop through a bounded queue; one scheduled callback drains it."""
        with self._handover_lock:
            if len(self._handover) == self._handover.maxlen:
                self.counters.feed_overrun += 1
            self._handover.append(message)
            if self._handover_scheduled:
                return
            self._handover_scheduled = True
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._drain_handover)

    def _drain_handover(self) -> None:
        with self._handover_lock:
            messages = list(self._handover)
            self._handover.clear()
            self._handover_scheduled = False
        for message in messages:
            self.on_message(message)

    def on_message(self, message: Message) -> None:
        """In the loop: the newest message -> latest values -> due frames of every subscriber."""
        self.counters.feed_messages += 1
        self.latest.update(message)
        if not message.data_header.same_as(self._history_header):
            self._history_header = message.data_header
            self.history.forget_absent(message.data_header.names)
        self.history.add(message, time.monotonic())
        for key in self.hub.publish(self.latest, message, time.monotonic()):
            wakeup = self.wakeups.get(key)
            if wakeup is not None:
                wakeup.set()

    # -- tokens -----------------------------------------------------------------
    def reload_tokens(self) -> None:
        """SIGHUP: read the token file again; a bad file keeps the tokens in force (and says so)."""
        if self.settings.tokens_file is None:
            return
        try:
            self.tokens = TokenSet(read_tokens(self.settings.tokens_file))
            logger.info("tokens re-read: %d token(s)", len(self.tokens.tokens))
        except TokenFileError as error:
            logger.error("%s; the previous tokens stay in force", error)
            return
        revoked = [socket for socket, token in self.socket_tokens.items() if not self.tokens.allows(token)]
        for socket in revoked:  # a revoked token ends the sockets it opened
            asyncio.ensure_future(socket.close(code=4001, message=b"token revoked"))
        if revoked:
            logger.info("closed %d websocket(s) of revoked tokens", len(revoked))

    # -- metrics ----------------------------------------------------------------
    def metrics_text(self) -> str:
        counters, hub = self.counters, self.hub
        m = PrometheusText({}, prefix="sf_bsread_web_")
        m.one("up", "gauge", "1 while the web service runs.", 1)
        m.one("clients", "gauge", "Websocket clients connected.", len(hub.clients))
        m.one("subscriptions", "gauge", "Channel subscriptions of all clients.", hub.subscription_count)
        m.one("clients_total", "counter", "Websocket clients accepted.", counters.clients_total)
        m.one("clients_dropped_total", "counter", "Websocket clients closed for not answering heartbeats.",
              counters.clients_dropped)
        m.one("values_sent_total", "counter", "Values sent to websocket clients.",
              counters.values_sent + sum(client.values_sent for client in hub.clients.values()))
        m.one("values_dropped_total", "counter", "Values dropped for websocket clients that read too slowly.",
              counters.values_dropped + sum(client.dropped_total for client in hub.clients.values()))
        m.one("feed_messages_total", "counter", "Messages taken from the buffer's feed.", counters.feed_messages)
        m.one("feed_rejected_total", "counter", "Malformed feed messages dropped.", counters.feed_rejected)
        m.one("feed_overrun_messages_total", "counter", "Feed messages dropped because the service was behind.",
              counters.feed_overrun)
        m.one("feed_sockets_replaced_total", "counter", "Feed sockets replaced after a message cut in half.",
              counters.feed_sockets_replaced)
        m.one("feed_oversize_messages_total", "counter", "Feed messages over the size limit, dropped.",
              counters.feed_oversize)
        m.one("feed_reconnects_total", "counter", "Feed connections given up by ZeroMQ and made anew.",
              counters.feed_reconnects)
        m.one("unauthorized_requests_total", "counter", "Requests refused for a missing or wrong token.",
              counters.unauthorized)
        m.one("origin_refused_total", "counter", "Websockets refused for a page origin not allowed.",
              counters.origin_refused)
        m.family("range_requests_total", "counter", "Range requests, by outcome.",
                 [({"outcome": outcome}, count) for outcome, count in sorted(counters.range_requests.items())])
        return m.text()

    def want_status(self) -> None:
        """A client asked for status pushes: one poll of the buffer a second serves every such client."""
        self.start_status()

    def start_status(self) -> None:
        """Start the status poll (if it is not running): at service start, so the rate history fills."""
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.ensure_future(self._push_status())

    async def _push_status(self) -> None:
        """Poll the buffer's status once a second while the service runs (the rate plots' history is made
        of these polls, web/history.py) and push it to every client that asked."""
        while True:
            listeners = [key for key, client in self.hub.clients.items() if client.wants_status]
            if self.status_source is None:
                return
            try:
                document = await self.status_source(self)
            except Exception as error:  # a bug or an odd answer: this push fails, the pushes go on
                logger.exception("status for the websocket clients failed")
                document = {"state": "error", "status": f"status failed: {type(error).__name__}: {error}"}
            for key in listeners:
                client = self.hub.clients.get(key)
                if client is not None:
                    client.queue_message({"type": "status", **document})
                    wakeup = self.wakeups.get(key)
                    if wakeup is not None:
                        wakeup.set()
            await asyncio.sleep(STATUS_PUSH_SECONDS)  # the push period, not a synchronisation

    def stop_status(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()

    def forget_client(self, key: Any) -> None:
        """A websocket closed: its counts go into the service's totals, its queue is freed."""
        client = self.hub.clients.pop(key, None)
        self.wakeups.pop(key, None)
        self.socket_tokens.pop(key, None)
        self.hub.changed()
        if client is not None:
            self.counters.values_sent += client.values_sent
            self.counters.values_dropped += client.dropped_total


