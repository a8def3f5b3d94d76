"""A plain live bsread stream as a writer's source (``sf_bsread_writer --direct``), no buffer in between."""
from __future__ import annotations

import logging
import time

import zmq

from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.replay.messages import Data
from sf_bsread_writer.transport.connection import ConnectionWatch
from sf_bsread_writer.transport.partsio import MessageCutError, PartsReceiver

__all__ = ["DirectSource"]

logger = logging.getLogger(__name__)


class DirectSource:
    """A plain bsread stream (PULL or SUB), live only: what the original writer read.

    Offers the part of the ReplayClient interface the run loop uses; every
    message is a ``Data`` whose ``pulse_id`` is None (the run loop
    parses the frames anyway). There is no history: a start pulse in the past
    is recorded as missing ("not_received"), and the run loop applies the stop.

    A receive cut in the middle of a message (``partsio.MessageCutError``)
    replaces the socket: a new one connects to the same stream, the
    replacement is counted (``sockets_replaced``) and logged, and that
    receive returns None (the messages queued in the old socket are lost,
    and the run loop sees them as missing pulse ids). A part over the
    socket's bound (twice ``max_message_bytes``) is refused by ZeroMQ, which
    then gives the connection up for good: the source connects again
    (``transport.connection``), counted in ``reconnects``.
    """

    def __init__(self, address: str, mode: str = "pull", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._context = zmq.Context()
        self._mode = mode
        self._max_message_bytes = max_message_bytes
        self._address = address
        self._receiver = PartsReceiver()
        self._socket = self._new_socket()
        self._connection: ConnectionWatch | None = None
        self.sockets_replaced = 0
        self.reconnects = 0

    def _new_socket(self) -> zmq.Socket:
        socket = self._context.socket(zmq.SUB if self._mode == "sub" else zmq.PULL)
        if self._mode == "sub":
            socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, 2 * self._max_message_bytes)  # as the buffer's ingest
        return socket

    def start(self) -> "DirectSource":
        self._connection = ConnectionWatch(self._socket, self._address, f"direct source {self._address}")
        return self

    def receive(self, timeout: float) -> Data | None:
        if self._connection is not None and self._connection.check(time.monotonic()):
            self.reconnects += 1
        if not self._socket.poll(int(timeout * 1000)):
            return None
        try:
            return Data(pulse_id=None, frames=self._receiver.receive(self._socket)[1])
        except MessageCutError as error:
            self._close_socket()
            self._socket = self._new_socket()
            self.start()
            self.sockets_replaced += 1
            logger.error("direct source %s: socket replaced (%d so far): %s", self._address, self.sockets_replaced,
                         error)
            return None

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        pass

    def _close_socket(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._socket.close(linger=0)

    def close(self) -> None:
        self._close_socket()
        self._context.term()
