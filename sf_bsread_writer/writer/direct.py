"""A plain live bsread stream as a writer's source (``sf_bsread_writer --direct``), no buffer in between."""
from __future__ import annotations

import zmq

from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.replay.messages import Data
from sf_bsread_writer.transport.partsio import PartsReceiver

__all__ = ["DirectSource"]


class DirectSource:
    """A plain bsread stream (PULL or SUB), live only: what the original writer read.

    Offers the part of the ReplayClient interface the run loop uses; every
    message is a ``Data`` whose ``pulse_id`` is None (the run loop
    parses the frames anyway). There is no history: a start pulse in the past
    is recorded as missing ("not_received"), and the run loop applies the stop.
    """

    def __init__(self, address: str, mode: str = "pull", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB if mode == "sub" else zmq.PULL)
        if mode == "sub":
            self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)  # as the buffer's ingest
        self._address = address
        self._receiver = PartsReceiver()

    def start(self) -> "DirectSource":
        self._socket.connect(self._address)
        return self

    def receive(self, timeout: float) -> Data | None:
        if not self._socket.poll(int(timeout * 1000)):
            return None
        return Data(pulse_id=None, frames=self._receiver.receive(self._socket)[1])

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        pass

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
