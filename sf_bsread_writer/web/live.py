"""Live values for web clients (pure): the latest value of every channel, values as JSON, subscriptions.

The web service (``web/``) reads a rate-limited feed of the buffer; this
module decides what each websocket client gets, without doing any I/O:

* :class:`LatestValues` keeps, per channel, the newest message in which it
  was present (a channel sent every Nth pulse keeps its last value, with
  its own pulse id and timestamp, until the next one comes).
* :func:`value_document` turns one channel value into the JSON the web API
  promises (``{"type": "value", "channel", "pulse_id", "timestamp",
  "value"}``), with a size limit so that one 1.3-million-pixel image cannot
  become a 10 MB JSON frame per client and update.
* :class:`ClientFeed` is one websocket client: its subscriptions (channel ->
  max rate, due times fed ``now``), and a **bounded** queue of frames to
  send. A client that reads slower than values come loses the oldest frames,
  counted, and is told how many values it lost (``{"type": "dropped"}``):
  memory per client is bounded by frames and bytes, never by its slowness.
* :class:`SubscriptionHub` is all clients of one service: which channels
  anybody wants (only those are encoded), and one encoding of each value per
  feed message shared by every client subscribed to it (the multiplexing).

Frames: one feed message becomes at most one frame per client, a batch
``{"type": "batch", "messages": [value, value, ...]}`` of that client's due
values (docs/web-api.md).
"""
from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sf_bsread_writer.bsread.headers import DataHeader
from sf_bsread_writer.bsread.message import Message
from sf_bsread_writer.rates import RateGrid

__all__ = [
    "LatestValues",
    "ChannelValue",
    "json_safe",
    "value_document",
    "ClientFeed",
    "SubscriptionHub",
    "SubscriptionError",
    "MAX_JSON_ELEMENTS",
]

#: Arrays with more elements than this are not put into JSON (the value is null, with
#: ``"too_large": true`` and its shape): fetch them as ``?format=npy``.
MAX_JSON_ELEMENTS = 65536
#: A client's queue: at most this many frames and bytes waiting to be sent.
DEFAULT_MAX_FRAMES = 32
DEFAULT_MAX_QUEUE_BYTES = 16 * 1024 * 1024
#: Most channels one client may subscribe to, and the longest channel name accepted.
MAX_SUBSCRIPTIONS = 10000
MAX_CHANNEL_NAME = 256


class SubscriptionError(ValueError):
    """A bad subscribe/unsubscribe request: the message says what to fix; the socket stays open."""


# --------------------------------------------------------------------------
# Latest values
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelValue:
    """Where a channel's newest present value is: in ``message`` at channel ``index``."""

    message: Message
    index: int

    @property
    def pulse_id(self) -> int:
        return self.message.pulse_id

    @property
    def timestamp(self) -> float:
        """The channel's own timestamp (seconds), else the message's."""
        return self.message.channel_seconds(self.index)

    def decoded(self) -> Any:
        return self.message.value(self.index)


class LatestValues:
    """The newest present value of every channel of the stream (names of the current data header only)."""

    def __init__(self) -> None:
        self.message: Message | None = None  # the newest message
        self._values: dict[str, ChannelValue] = {}
        self._header: DataHeader | None = None

    def update(self, message: Message) -> None:
        """Take the newest message; a channel absent in it keeps its last present value."""
        header = message.data_header
        if not header.same_as(self._header):
            names = set(header.names)
            self._values = {name: value for name, value in self._values.items() if name in names}
            self._header = header
        values = self._values
        for index, name in enumerate(header.names):
            if message.is_present(index):
                values[name] = ChannelValue(message, index)
        self.message = message

    def get(self, name: str) -> ChannelValue | None:
        return self._values.get(name)

    def unknown(self, names: Sequence[str]) -> list[str]:
        """The names not in the stream's newest data header (misspelt, or not sent now); [] before any message
        (nothing is known then)."""
        if self.message is None:
            return []
        header = self.message.data_header
        return [name for name in names if name not in header]

    @property
    def channels(self) -> Sequence[Any]:
        """The channel specs of the newest data header (empty before the first message)."""
        return self.message.data_header.channels if self.message is not None else ()


# --------------------------------------------------------------------------
# Values as JSON
# --------------------------------------------------------------------------
#: The largest integer a JavaScript number (a double) holds exactly: beyond it a browser rounds what it parses.
JS_EXACT_INTEGER = 2**53 - 1


def json_safe(value: Any, max_elements: int = MAX_JSON_ELEMENTS) -> tuple[Any, dict[str, Any]]:
    """``(JSON-able value, extra fields)`` of a decoded bsread value.

    Arrays become (nested) lists in numpy shape; a 1-element array a number,
    and an integer beyond 2**53 also ``{"exact": "<decimal>"}`` (the JSON number
    is exact, but a browser's JSON.parse rounds it).
    Non-finite floats (NaN, inf) are not JSON: they become null (exact values:
    ``format=npy``/``npz``/``hdf5``). An array over ``max_elements`` becomes null
    with ``{"too_large": true, "shape": [...], "dtype": "..."}``.
    """
    if value is None or isinstance(value, str):
        return value, {}
    array = np.asarray(value)
    if array.size > max_elements:
        return None, {"too_large": True, "shape": list(array.shape), "dtype": array.dtype.name}
    if array.size == 1 and array.ndim <= 1:
        item = array.reshape(-1)[0].item()
        if isinstance(item, int) and abs(item) > JS_EXACT_INTEGER:  # a uint64 counter, a time in ns
            return item, {"exact": str(item)}
        return (None if isinstance(item, float) and not math.isfinite(item) else item), {}
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        listed = array.astype(object)
        listed[~np.isfinite(array)] = None
        return listed.tolist(), {}
    return array.tolist(), {}


def value_document(channel: str, value: ChannelValue, max_elements: int = MAX_JSON_ELEMENTS) -> dict[str, Any]:
    """The web API's value message for ``channel``."""
    try:
        data, extra = json_safe(value.decoded(), max_elements)
    except Exception as error:  # a corrupt part: the client learns it, the service goes on
        data, extra = None, {"error": f"cannot decode: {error}"}
    return {"type": "value", "channel": channel, "pulse_id": value.pulse_id, "timestamp": value.timestamp,
            "value": data, **extra}


# --------------------------------------------------------------------------
# Subscriptions
# --------------------------------------------------------------------------


@dataclass
class ClientFeed:
    """One websocket client: subscriptions and a bounded queue of frames (see the module docstring)."""

    max_frames: int = DEFAULT_MAX_FRAMES
    max_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    subscriptions: dict[str, RateGrid] = field(default_factory=dict)
    frames: deque = field(default_factory=deque)  # (text, values in it)
    queued_bytes: int = 0
    dropped_unreported: int = 0  # values dropped since the last "dropped" message
    dropped_total: int = 0
    values_sent: int = 0
    wants_status: bool = False  # {"op": "status"}: the buffer's status pushed once a second

    def subscribe(self, channels: Any, max_rate: Any, now: float) -> list[str]:
        """Add (or re-rate) subscriptions; returns the channel names. Raises SubscriptionError."""
        names = _channel_names(channels)
        if max_rate is not None:
            # float() of a JSON integer of hundreds of digits overflows: that is not a rate either.
            try:
                rate = float(max_rate) if isinstance(max_rate, (int, float)) and not isinstance(max_rate, bool) \
                    else math.nan
            except OverflowError:
                rate = math.inf
            if not (rate > 0 and math.isfinite(rate)):
                raise SubscriptionError(f"max_rate {repr(max_rate)[:40]} is not a positive number of updates "
                                        "per second")
        if len(set(self.subscriptions) | set(names)) > MAX_SUBSCRIPTIONS:
            raise SubscriptionError(f"more than {MAX_SUBSCRIPTIONS} subscriptions on one socket")
        for name in names:
            self.subscriptions[name] = RateGrid(max_rate or 0.0)  # None: every value the feed brings
        return names

    def unsubscribe(self, channels: Any) -> list[str]:
        names = _channel_names(channels)
        for name in names:
            self.subscriptions.pop(name, None)
        return names

    def offer(self, encoded: Mapping[str, str], now: float) -> int:
        """Queue the due values among ``encoded`` (channel -> value JSON) as one frame; returns values queued."""
        due = [text for name, grid in self.subscriptions.items()
               if (text := encoded.get(name)) is not None and grid.take(now)]
        if not due:
            return 0
        self._queue('{"type": "batch", "messages": [' + ", ".join(due) + "]}", len(due))
        return len(due)

    def queue_values(self, documents: Sequence[Mapping[str, Any]]) -> None:
        """Value messages outside the feed's rhythm (a new subscriber's latest values), as one batch."""
        self._queue(json.dumps({"type": "batch", "messages": list(documents)}), len(documents))

    def queue_message(self, document: Mapping[str, Any]) -> None:
        """A control answer (pong, error, subscribed): queued like values, counted as none."""
        self._queue(json.dumps(document), 0)

    def _queue(self, text: str, values: int) -> None:
        """Append a frame (``values``: value messages in it; a control answer counts as one), dropping the
        oldest beyond the bounds; a frame larger than the byte bound on its own is dropped at once."""
        if len(text) > self.max_bytes:
            self._count_dropped(values)
            return
        self.frames.append((text, values))
        self.queued_bytes += len(text)
        while self.frames and (len(self.frames) > self.max_frames or self.queued_bytes > self.max_bytes):
            dropped_text, dropped_values = self.frames.popleft()
            self.queued_bytes -= len(dropped_text)
            self._count_dropped(dropped_values)

    def _count_dropped(self, values: int) -> None:
        lost = max(values, 1)  # a lost control answer counts as one
        self.dropped_unreported += lost
        self.dropped_total += lost

    def take(self) -> str | None:
        """The next frame to send: first a ``dropped`` report if values were lost, else the oldest frame."""
        if self.dropped_unreported:
            count, self.dropped_unreported = self.dropped_unreported, 0
            return json.dumps({"type": "dropped", "count": count})
        if not self.frames:
            return None
        text, values = self.frames.popleft()
        self.queued_bytes -= len(text)
        self.values_sent += values
        return text


def _channel_names(channels: Any) -> list[str]:
    if isinstance(channels, str) or not isinstance(channels, (list, tuple)) or not channels:
        raise SubscriptionError('"channels" must be a non-empty list of channel names')
    if not all(isinstance(name, str) and 0 < len(name) <= MAX_CHANNEL_NAME for name in channels):
        raise SubscriptionError(f'"channels" must hold channel names (strings of 1 to {MAX_CHANNEL_NAME} characters)')
    return list(dict.fromkeys(channels))


class SubscriptionHub:
    """Every client of one service (by any hashable key, e.g. the websocket)."""

    def __init__(self, max_elements: int = MAX_JSON_ELEMENTS) -> None:
        self.clients: dict[Any, ClientFeed] = {}
        self.max_elements = max_elements
        self.values_encoded = 0
        self._wanted: set[str] | None = None

    def changed(self) -> None:
        """Call after any (un)subscription or client change: ``wanted`` is recomputed once, not per message."""
        self._wanted = None

    def wanted(self) -> set[str]:
        """Channels at least one client subscribed to."""
        if self._wanted is None:
            found: set[str] = set()
            for client in self.clients.values():
                found.update(client.subscriptions)
            self._wanted = found
        return self._wanted

    @property
    def subscription_count(self) -> int:
        return sum(len(client.subscriptions) for client in self.clients.values())

    def publish(self, latest: LatestValues, message: Message, now: float) -> list[Any]:
        """After ``latest.update(message)``: queue due values of ``message`` for every client.

        Only channels present in ``message`` are sent (a value is sent once, when it comes);
        each is encoded once, whoever wants it. Returns the keys of clients with a new frame.
        """
        wanted = self.wanted()
        if not wanted:
            return []
        encoded: dict[str, str] = {}
        for name in wanted:
            value = latest.get(name)
            if value is None or value.message is not message:
                continue  # not in this message: nothing new
            encoded[name] = json.dumps(value_document(name, value, self.max_elements))
        self.values_encoded += len(encoded)
        return [key for key, client in self.clients.items() if client.offer(encoded, now)]
