"""The buffer's loopback feed: what travels on it (data and status) and its one reader.

Why this module: the buffer's children (the web service for ``--web``, the
CA gateway for ``--ca``) are processes of their own that must never import
the buffer's code, and each needs two things of the buffer: the newest
messages (rate limited) and the buffer's status. Both travel on one
channel, the feed (a PUB socket on loopback, ``buffer.feeds``), and one
reader (:class:`FeedReader`) takes them off it, for every consumer alike.

The wire form (docs/buffer.md, "Feeds"):

- a **data message** is the bsread message as received, unchanged;
- a **status message** is a bsread-like control message of two parts: the
  main header ``{"htype":"sf_bsread_status-1.0"}`` (exactly these bytes)
  and the buffer's ``status.BufferStatus`` as JSON (``to_json``, the
  ``GET /statistics`` document). A bsread parser ignores it as a control
  message (``htype`` not ``bsr_m-*``: ``bsread.spec.IgnoredMessage``).

The reader replaces its socket after a message cut in half
(``transport.partsio.MessageCutError``): the next message arrives whole on
the new one. A status message that cannot be read is counted
(``status_rejected``) and logged, never raised: the feed comes from another
process. A loopback feed is still network input, bounded as the buffer's
ingest is (``max_message_bytes``, the same default): a message larger than
that is counted (``oversize``) and dropped; a part larger than twice that is
refused by ZeroMQ at its header (``MAXMSGSIZE``) before any of it is
buffered. libzmq then drops the connection *for good* (a protocol error: it
does not reconnect, unlike after a peer that went away); the reader connects
again (``transport.connection.ConnectionWatch``, counted in ``reconnects``).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import zmq

from sf_bsread_writer.bsread.parts import PackedParts
from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.jsontext import depth
from sf_bsread_writer.status import BufferStatus
from sf_bsread_writer.transport.connection import ConnectionWatch
from sf_bsread_writer.transport.partsio import MessageCutError, PartsReceiver

__all__ = ["FeedReader", "FeedStatusError", "STATUS_HTYPE", "status_message", "is_status_message",
           "parse_status_message", "FEED_HWM"]

logger = logging.getLogger(__name__)

STATUS_HTYPE = "sf_bsread_status-1.0"
STATUS_HEAD = json.dumps({"htype": STATUS_HTYPE}, separators=(",", ":")).encode()
# A status is a few kB (one entry per writer session); anything this large is not one of ours.
MAX_STATUS_BYTES = 1024 * 1024
MAX_STATUS_DEPTH = 8
# Messages queued on the receiving side: the newest few; a slow reader loses old ones.
FEED_HWM = 4
REJECTIONS_LOGGED = 10


class FeedStatusError(ValueError):
    """A status message that is not a readable ``BufferStatus``; the text says why."""


def status_message(status: BufferStatus) -> list[bytes]:
    """The two parts of the status message for ``status`` (the buffer's side)."""
    return [STATUS_HEAD, json.dumps(status.to_json(), separators=(",", ":")).encode()]


def is_status_message(parts: Sequence[Any]) -> bool:
    """A status message, not a data message: its first part is exactly ``STATUS_HEAD``."""
    return len(parts) >= 1 and len(parts[0]) == len(STATUS_HEAD) and bytes(parts[0]) == STATUS_HEAD


def parse_status_message(parts: Sequence[Any]) -> BufferStatus:
    """The ``BufferStatus`` of a status message; FeedStatusError if it is not a readable one."""
    if len(parts) != 2:
        raise FeedStatusError(f"a status message has 2 parts, not {len(parts)}")
    body = parts[1]
    if len(body) > MAX_STATUS_BYTES:
        raise FeedStatusError(f"status of {len(body)} bytes (most {MAX_STATUS_BYTES})")
    try:
        # json.loads, not jsontext.loads: the buffer's own JSON, which (as its HTTP answer) may hold NaN
        document = json.loads(bytes(body))
    except (RecursionError, UnicodeDecodeError, ValueError) as error:
        raise FeedStatusError(f"status is no JSON: {error}") from None
    if depth(document) > MAX_STATUS_DEPTH:
        raise FeedStatusError(f"status nested more than {MAX_STATUS_DEPTH} levels")
    try:
        return BufferStatus.from_json(document)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise FeedStatusError(f"status is no BufferStatus: {error}") from None


class FeedReader:
    """One subscriber of a feed: :meth:`receive` returns the next data message (``PackedParts``, as
    received) or status (``BufferStatus``), or None (nothing within the timeout, a status that could not be
    read, or a socket replaced after a cut message).

    One owner thread. ``mode`` "sub" (a buffer's feed or live output) or "pull". Counters:
    ``messages``, ``statuses``, ``status_rejected``, ``oversize``, ``sockets_replaced``, ``reconnects``.
    ``max_message_bytes``: as the buffer's (module docstring).
    """

    def __init__(self, address: str, mode: str = "sub", *, hwm: int = FEED_HWM,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, context: zmq.Context | None = None) -> None:
        if mode not in ("sub", "pull"):
            raise ValueError(f"mode must be sub or pull, not {mode!r}")
        self.address = address
        self.mode = mode
        self.hwm = hwm
        self.max_message_bytes = max_message_bytes
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._receiver = PartsReceiver()
        self.messages = 0
        self.statuses = 0
        self.status_rejected = 0
        self.oversize = 0
        self.sockets_replaced = 0
        self.reconnects = 0
        self.socket: zmq.Socket | None = None
        self._connection: ConnectionWatch | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        socket = self._context.socket(zmq.SUB if self.mode == "sub" else zmq.PULL)
        try:
            socket.setsockopt(zmq.RCVHWM, self.hwm)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)  # as the buffer's ingest
            if self.mode == "sub":
                socket.setsockopt(zmq.SUBSCRIBE, b"")
            self._connection = ConnectionWatch(socket, self.address, f"feed {self.address}")
        except BaseException:
            socket.close(0)
            raise
        self.socket = socket

    def _close_socket(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    def receive(self, timeout: float) -> PackedParts | BufferStatus | None:
        """The next message or status within ``timeout`` seconds, else None."""
        if self.socket is None:
            raise RuntimeError("feed reader closed")
        if self._connection is not None and self._connection.check(time.monotonic()):
            self.reconnects += 1  # given up by libzmq after a part over MAXMSGSIZE (module docstring)
        if not self.socket.poll(max(0, int(timeout * 1000))):
            return None
        try:
            _, parts = self._receiver.receive(self.socket, zmq.NOBLOCK)
        except zmq.Again:
            return None
        except MessageCutError as error:  # a new socket; the next message arrives whole on it
            self._close_socket()
            self._open()
            self.sockets_replaced += 1
            logger.error("feed socket replaced (%d so far): %s", self.sockets_replaced, error)
            return None
        if parts is None:
            return None
        if parts.nbytes > self.max_message_bytes:
            self.oversize += 1
            if self.oversize <= REJECTIONS_LOGGED:
                logger.warning("message of %d bytes from %s dropped (most %d)", parts.nbytes, self.address,
                               self.max_message_bytes)
            return None
        if is_status_message(parts):
            try:
                status = parse_status_message(parts)
            except FeedStatusError as error:
                self.status_rejected += 1
                if self.status_rejected <= REJECTIONS_LOGGED:
                    logger.warning("status message from %s dropped: %s", self.address, error)
                return None
            self.statuses += 1
            return status
        self.messages += 1
        return parts

    def close(self) -> None:
        """Close the socket (and the context this reader made); idempotent."""
        self._close_socket()
        if self._own_context and not self._context.closed:
            self._context.term()

    def __enter__(self) -> "FeedReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
