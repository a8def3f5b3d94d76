"""A buffer from anywhere: the Python client of the web service (docs/web-api.md).

::

    from sf_bsread_writer.remote import RemoteBuffer

    buffer = RemoteBuffer("http://daq-host:8891", token="...", timeout=10)
    buffer.status()["look_back"]                  # how far back the buffer reaches
    buffer.get("SAR:CH1")                         # latest value, pulse id, timestamp
    data = buffer.range(["SAR:CH1"], start_pulse_id=..., stop_pulse_id=...)
    data.channels["SAR:CH1"].data                 # numpy arrays, with pulse_id and is_data_present
    handle = buffer.subscribe(["SAR:CH1"], print, max_rate=2)
    buffer.wait_until_new("SAR:CH1", timeout=5)
    handle.close()

* One websocket per (process, URL) carries every subscription of that
  process; a channel subscribed twice is one upstream subscription (at the
  higher of the rates asked), dispatched to both callbacks here.
* A health loop reconnects with backoff when the socket dies (service
  restarted, network gone) and subscribes everything again; ``connected``
  and ``reconnects`` say how it goes.
* Every call has a timeout and raises :class:`RemoteTimeout` (a
  ``TimeoutError``) when it expires; an error answer of the service raises
  :class:`RemoteError` with its HTTP status and message.
* :class:`RemoteBuffer` is synchronous (an event loop in one thread per
  process runs the work; callbacks run in that thread: keep them short);
  :class:`AsyncRemoteBuffer` is the same API for asyncio code.

It imports nothing of the package but the pure ``rates`` (the rate grid the service uses too):
the contract is the JSON of the web API.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import numpy as np

from sf_bsread_writer.rates import RateGrid

__all__ = ["RemoteBuffer", "AsyncRemoteBuffer", "RemoteError", "RemoteTimeout", "Value", "RangeData",
           "RangeResult", "Subscription"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
RECONNECT_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds; the last repeats
HEARTBEAT_SECONDS = 10.0


class RemoteError(RuntimeError):
    """The web service answered with an error (``http_status`` and its ``status`` text), or cannot be reached."""

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class RemoteTimeout(RemoteError, TimeoutError):
    """A call did not complete within its timeout."""


@dataclass(frozen=True)
class Value:
    """One channel value as the service sent it (arrays as numpy arrays)."""

    channel: str
    pulse_id: int
    timestamp: float
    value: Any
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. too_large, shape


@dataclass(frozen=True)
class RangeData:
    """One channel of a range: a row per replayed message (``data`` zeros where not present)."""

    pulse_id: np.ndarray
    timestamp: np.ndarray
    is_data_present: np.ndarray
    data: np.ndarray


@dataclass(frozen=True)
class RangeResult:
    channels: dict[str, RangeData]
    missing: list[dict[str, Any]]  # pulses that will never come, and why; channels without a value

    @property
    def complete(self) -> bool:
        return not self.missing


def _value_of(document: dict[str, Any]) -> Value:
    value = document.get("value")
    if isinstance(value, list):
        value = np.asarray(value)
    extra = {key: item for key, item in document.items()
             if key not in ("type", "channel", "pulse_id", "timestamp", "value", "state", "status")}
    return Value(document["channel"], int(document["pulse_id"]), float(document["timestamp"]), value, extra)


class Subscription:
    """A handle on subscribed channels; :meth:`close` ends it (the upstream one when nobody else wants them)."""

    def __init__(self, socket: "_SharedSocket", channels: Sequence[str], callback: Callable[[Value], Any],
                 max_rate: float | None) -> None:
        self._socket = socket
        self.channels = tuple(dict.fromkeys(channels))
        self.callback = callback
        self.max_rate = max_rate
        self.received = 0
        self._grids: dict[str, RateGrid] = {}
        self._last_pulse_id: dict[str, int] = {}
        self.closed = False

    @property
    def connected(self) -> bool:
        return self._socket.connected

    @property
    def reconnects(self) -> int:
        return self._socket.reconnects

    def _deliver(self, value: Value) -> None:
        # A re-subscription (another subscriber's rate, a reconnect) re-sends the latest value: once is enough.
        if value.pulse_id <= self._last_pulse_id.get(value.channel, -1):
            return
        self._last_pulse_id[value.channel] = value.pulse_id
        # The upstream rate may be another subscriber's higher one: this one keeps to its own (the service's grid).
        grid = self._grids.get(value.channel)
        if grid is None:
            grid = self._grids[value.channel] = RateGrid(self.max_rate or 0.0)
        if not grid.take(time.monotonic()):
            return
        self.received += 1
        try:
            self.callback(value)
        except Exception:  # a caller's bug must not end the socket's reader
            logger.exception("subscription callback failed for %s", value.channel)

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await self._socket.remove(self)


class _SharedSocket:
    """The one websocket of a (loop, URL, token): multiplexed subscriptions, health loop, resubscription."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()  # the socket's tasks live here: never handed to another loop
        self.url = url.rstrip("/") + "/api/v1/ws"
        self.token = token
        self.timeout = timeout
        self.subscriptions: list[Subscription] = []
        self.connected = False
        self.reconnects = 0
        self.dropped = 0  # values the service dropped because we read too slowly
        self.last_error: str | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._connected_event = asyncio.Event()
        self._upstream: dict[str, float | None] = {}  # channel -> rate asked of the service

    def _wanted(self) -> dict[str, float | None]:
        """Channel -> the highest rate any subscriber asked for (None: every value)."""
        wanted: dict[str, float | None] = {}
        for subscription in self.subscriptions:
            rate = subscription.max_rate
            for channel in subscription.channels:
                if channel not in wanted:
                    wanted[channel] = rate
                elif wanted[channel] is not None:
                    wanted[channel] = None if rate is None else max(wanted[channel], rate)
        return wanted

    async def add(self, subscription: Subscription) -> None:
        self.subscriptions.append(subscription)
        if self._task is None or self._task.done():  # first use, or a health loop that ended on a bug
            self._task = asyncio.create_task(self._run())
        await self._sync()

    async def remove(self, subscription: Subscription) -> None:
        if subscription in self.subscriptions:
            self.subscriptions.remove(subscription)
        await self._sync()

    async def _sync(self) -> None:
        """Tell the service what changed: new channels or rates, channels nobody wants any more."""
        wanted = self._wanted()
        if self._socket is None or self._socket.closed:
            return  # the health loop subscribes everything at the next connection
        gone = [channel for channel in self._upstream if channel not in wanted]
        changed = {channel: rate for channel, rate in wanted.items()
                   if channel not in self._upstream or self._upstream[channel] != rate}
        sends = ([{"op": "unsubscribe", "channels": gone}] if gone else []) + [
            {"op": "subscribe", "channels": channels, "max_rate": rate} for rate, channels in _by_rate(changed).items()]
        for request in sends:
            try:
                await asyncio.wait_for(self._socket.send_json(request), self.timeout)
            except (asyncio.TimeoutError, ConnectionError, aiohttp.ClientError) as error:
                self.last_error = f"subscription request not sent: {type(error).__name__}: {error}"
                await self._socket.close()  # the health loop reconnects and subscribes everything
                return
        self._upstream = dict(wanted)

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
        except asyncio.TimeoutError:
            raise RemoteTimeout(f"websocket {self.url} not connected within {timeout:g} s"
                                + (f" ({self.last_error})" if self.last_error else "")) from None

    async def _run(self) -> None:
        """Connect, resubscribe, read; on any loss wait (backoff) and do it again, until closed."""
        attempt = 0
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(headers=headers)
        try:
            while True:
                try:
                    self._socket = await asyncio.wait_for(self._session.ws_connect(
                        self.url, heartbeat=HEARTBEAT_SECONDS, timeout=aiohttp.ClientWSTimeout(ws_close=2.0)),
                        self.timeout)
                    self._upstream = {}
                    await self._sync()
                    self.connected = True
                    self._connected_event.set()
                    attempt = 0
                    await self._read(self._socket)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
                    self.last_error = f"{type(error).__name__}: {error}"
                finally:
                    if self.connected:
                        logger.warning("websocket %s lost; reconnecting", self.url)
                    self.connected = False
                    self._connected_event.clear()
                await asyncio.sleep(RECONNECT_BACKOFF[min(attempt, len(RECONNECT_BACKOFF) - 1)])
                attempt += 1
                self.reconnects += 1
        finally:
            if self._socket is not None:
                await self._socket.close()
            await self._session.close()

    async def _read(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        async for received in socket:
            if received.type != aiohttp.WSMsgType.TEXT:
                break
            try:
                document = json.loads(received.data)
                kind = document.get("type")
                if kind == "batch":
                    for item in document.get("messages", ()):
                        self._dispatch(item)
                elif kind == "value":
                    self._dispatch(document)
                elif kind == "dropped":
                    self.dropped += int(document.get("count", 0))
                elif kind == "error":
                    self.last_error = document.get("status")
                    logger.warning("web service: %s", self.last_error)
            except (ValueError, KeyError, TypeError, AttributeError) as error:  # one odd frame, not the socket
                logger.warning("web service frame not understood (%s): %.200s", error, received.data)

    def _dispatch(self, document: dict[str, Any]) -> None:
        value = _value_of(document)
        for subscription in list(self.subscriptions):
            if value.channel in subscription.channels:
                subscription._deliver(value)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None


def _by_rate(channels: dict[str, float | None]) -> dict[float | None, list[str]]:
    grouped: dict[float | None, list[str]] = {}
    for channel, rate in channels.items():
        grouped.setdefault(rate, []).append(channel)
    return grouped


# One shared socket per (event loop, URL, token): "one websocket per process and URL". The lock: the
# synchronous client's properties look sockets up from the caller's thread while its loop thread adds them.
_SOCKETS: dict[tuple[int, str, str | None], _SharedSocket] = {}
_SOCKETS_LOCK = threading.Lock()


def _socket_for(loop: asyncio.AbstractEventLoop, url: str, token: str | None,
                timeout: float | None = None) -> _SharedSocket | None:
    """The shared socket of ``loop`` for (url, token); a new one if ``timeout`` is given and there is none.

    Keyed by ``id(loop)``, so checked by identity: a loop of a finished
    ``asyncio.run`` may leave its id to a new loop. Sockets of closed loops
    are forgotten here (a script calling ``asyncio.run`` repeatedly does not
    collect them).
    """
    with _SOCKETS_LOCK:
        for key, socket in list(_SOCKETS.items()):
            if socket.loop.is_closed():
                del _SOCKETS[key]
        key = (id(loop), url, token)
        socket = _SOCKETS.get(key)
        if socket is not None and socket.loop is not loop:
            socket = None
        if socket is None and timeout is not None:
            socket = _SOCKETS[key] = _SharedSocket(url, token, timeout)
        return socket


class AsyncRemoteBuffer:
    """The asyncio client (see the module docstring); every method takes the instance's ``timeout``."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # -- HTTP ---------------------------------------------------------------
    async def _get(self, path: str, params: dict[str, Any] | None = None, raw: bool = False) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with aiohttp.ClientSession(headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
                async with session.get(self.url + path, params=params) as answer:
                    body = await answer.read()
                    if answer.status >= 400:
                        try:
                            text = json.loads(body)["status"]
                        except (ValueError, KeyError, TypeError):
                            text = body[:200].decode("utf-8", "replace")
                        raise RemoteError(f"{answer.status} from {self.url}{path}: {text}", answer.status)
                    return (body, dict(answer.headers)) if raw else json.loads(body)
        except asyncio.TimeoutError:
            raise RemoteTimeout(f"{self.url}{path} did not answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as error:
            raise RemoteError(f"{self.url}{path}: {type(error).__name__}: {error}") from None

    async def status(self) -> dict[str, Any]:
        """``GET /api/v1/status``: the buffer's status, its look-back and the web service's."""
        return await self._get("/api/v1/status")

    async def channels(self) -> list[dict[str, Any]]:
        """Every channel of the current data header, with its latest pulse id and timestamp."""
        return (await self._get("/api/v1/channels"))["channels"]

    async def get(self, channel: str) -> Value:
        """The latest value of ``channel`` (arrays exactly, fetched as npy)."""
        path = f"/api/v1/channels/{quote(channel, safe=':')}"
        document = await self._get(path)
        if isinstance(document.get("value"), list) or document.get("too_large"):
            # The array exactly, and the pulse id and timestamp of that same value (a newer one may have come).
            raw, headers = await self._get(path, {"format": "npy"}, raw=True)
            return Value(channel, int(headers["X-Pulse-Id"]), float(headers["X-Timestamp"]),
                         np.load(io.BytesIO(raw), allow_pickle=False))
        return _value_of(document)

    async def range(self, channels: Iterable[str], start_pulse_id: int | None = None,
                    stop_pulse_id: int | None = None, start_time: float | None = None,
                    stop_time: float | None = None) -> RangeResult:
        """A past range out of the buffer (both ends included) as numpy arrays per channel."""
        params: dict[str, Any] = {"channels": ",".join(channels), "format": "npz"}
        for key, value in (("start_pulse_id", start_pulse_id), ("stop_pulse_id", stop_pulse_id),
                           ("start_time", start_time), ("stop_time", stop_time)):
            if value is not None:
                params[key] = repr(value) if isinstance(value, float) else str(value)
        raw, _ = await self._get("/api/v1/range", params, raw=True)
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            missing = json.loads(str(archive["missing"]))
            names = sorted({key.rsplit("/", 1)[0] for key in archive.files if "/" in key})
            found = {name: RangeData(archive[f"{name}/pulse_id"], archive[f"{name}/timestamp"],
                                     archive[f"{name}/is_data_present"], archive[f"{name}/data"])
                     for name in names}
        return RangeResult(found, missing)

    # -- websocket ---------------------------------------------------------
    def _shared(self) -> _SharedSocket:
        socket = _socket_for(asyncio.get_running_loop(), self.url, self.token, self.timeout)
        assert socket is not None
        return socket

    async def subscribe(self, channels: Iterable[str], callback: Callable[[Value], Any],
                        max_rate: float | None = None) -> Subscription:
        """Call ``callback(Value)`` for every new value of ``channels`` (at most ``max_rate`` a second)."""
        names = list(channels)
        if not names:
            raise ValueError("subscribe to at least one channel")
        shared = self._shared()
        subscription = Subscription(shared, names, callback, max_rate)
        try:
            await shared.add(subscription)
            await shared.wait_connected(self.timeout)
        except BaseException:  # the caller gets no handle: nothing may stay subscribed
            await subscription.aclose()
            raise
        return subscription

    async def wait_until_new(self, channel: str, timeout: float | None = None) -> Value:
        """The next value of ``channel`` newer than the one it has now; RemoteTimeout if none comes."""
        timeout = self.timeout if timeout is None else timeout
        try:
            current = (await self.get(channel)).pulse_id
        except RemoteError as error:
            if error.http_status != 404:
                raise
            current = -1
        arrived: asyncio.Future[Value] = asyncio.get_running_loop().create_future()

        def on_value(value: Value) -> None:
            if value.pulse_id > current and not arrived.done():
                arrived.set_result(value)

        subscription = await self.subscribe([channel], on_value)
        try:
            return await asyncio.wait_for(arrived, timeout)
        except asyncio.TimeoutError:
            raise RemoteTimeout(f"no new value of {channel} within {timeout:g} s") from None
        finally:
            await subscription.aclose()

    @property
    def connected(self) -> bool:
        socket = _socket_for(asyncio.get_running_loop(), self.url, self.token)
        return socket is not None and socket.connected

    async def close(self) -> None:
        """Close this URL's shared websocket (every subscription of this loop on it ends)."""
        loop = asyncio.get_running_loop()
        socket = _socket_for(loop, self.url, self.token)
        if socket is not None:
            with _SOCKETS_LOCK:
                _SOCKETS.pop((id(loop), self.url, self.token), None)
            await socket.close()


class _LoopThread:
    """The process's one event loop for the synchronous client, in a daemon thread."""

    _lock = threading.Lock()
    _instance: "_LoopThread | None" = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sf_bsread_remote", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> "_LoopThread":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coroutine: Awaitable[T], timeout: float) -> T:
        if threading.current_thread() is self.thread:
            coroutine.close()  # type: ignore[attr-defined]
            raise RuntimeError("a RemoteBuffer call from inside a subscription callback would wait for itself: "
                               "use AsyncRemoteBuffer there, or hand the work to another thread")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():
                raise  # the call's own RemoteTimeout, which names what did not answer
            future.cancel()
            raise RemoteTimeout(f"no answer within {timeout:g} s") from None


class RemoteBuffer:
    """The synchronous client; see the module docstring. Callbacks run in the client's loop thread."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self._async = AsyncRemoteBuffer(url, token, timeout)
        self._loop = _LoopThread.get()
        self.timeout = timeout

    def _run(self, coroutine: Awaitable[T], timeout: float | None = None) -> T:
        # A little beyond the call's own timeout: its own RemoteTimeout names what did not answer.
        return self._loop.run(coroutine, (timeout or self.timeout) + 1.0)

    def status(self) -> dict[str, Any]:
        return self._run(self._async.status())

    def channels(self) -> list[dict[str, Any]]:
        return self._run(self._async.channels())

    def get(self, channel: str) -> Value:
        return self._run(self._async.get(channel))

    def range(self, channels: Iterable[str], start_pulse_id: int | None = None, stop_pulse_id: int | None = None,
              start_time: float | None = None, stop_time: float | None = None) -> RangeResult:
        return self._run(self._async.range(list(channels), start_pulse_id, stop_pulse_id, start_time, stop_time))

    def subscribe(self, channels: Iterable[str], callback: Callable[[Value], Any],
                  max_rate: float | None = None) -> "SyncSubscription":
        subscription = self._run(self._async.subscribe(list(channels), callback, max_rate))
        return SyncSubscription(subscription, self._loop)

    def wait_until_new(self, channel: str, timeout: float | None = None) -> Value:
        timeout = self.timeout if timeout is None else timeout
        # Its own steps: a get, a subscription (connect), the wait, the unsubscription.
        return self._run(self._async.wait_until_new(channel, timeout), timeout + 3 * self.timeout)

    @property
    def connected(self) -> bool:
        socket = _socket_for(self._loop.loop, self._async.url, self._async.token)
        return socket is not None and socket.connected

    @property
    def reconnects(self) -> int:
        socket = _socket_for(self._loop.loop, self._async.url, self._async.token)
        return socket.reconnects if socket is not None else 0

    def close(self) -> None:
        """Close this URL's shared websocket (every subscription on it, in this process, ends)."""
        self._run(self._async.close())


class SyncSubscription:
    """:class:`Subscription` for the synchronous client."""

    def __init__(self, subscription: Subscription, loop: _LoopThread) -> None:
        self._subscription = subscription
        self._loop = loop

    @property
    def channels(self) -> tuple[str, ...]:
        return self._subscription.channels

    @property
    def received(self) -> int:
        return self._subscription.received

    @property
    def connected(self) -> bool:
        return self._subscription.connected

    @property
    def reconnects(self) -> int:
        return self._subscription.reconnects

    def close(self) -> None:
        """End the subscription (from a callback too: there it is scheduled, not waited for)."""
        if threading.current_thread() is self._loop.thread:
            asyncio.ensure_future(self._subscription.aclose())
            return
        self._loop.run(self._subscription.aclose(), 10.0)


__all__ += ["SyncSubscription"]
