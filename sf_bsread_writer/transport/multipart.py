"""Sending and receiving whole bsread messages with pyzmq at the lowest cost per part.

A bsread message has 2 + 2N parts for N channels, so at 500 channels the
per-part cost of pyzmq's Python layer, not the bytes, decides how fast the
buffer replays and the writer receives (numbers in docs/performance.md).
The hot loops therefore use:

* plain ints for the flags: pyzmq's constants are enum members, and
  ``SNDMORE | flags`` builds a new enum member per part;
* the compiled base-class ``send``/``recv``/``get``: the ``zmq.Socket``
  wrappers add Python-level work per call (draft-socket routing_id/group
  handling) that a 1002-part message pays 1002 times.

This is the pure pyzmq path; ``partsio`` moves whole messages in one
compiled call where the extension is built, and falls back to these.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

__all__ = ["SNDMORE", "NOBLOCK", "raw_send", "send_message", "AdaptiveReceiver"]

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_BaseSocket = zmq.backend.Socket if issubclass(zmq.Socket, zmq.backend.Socket) else zmq.Socket
raw_send = _BaseSocket.send
_raw_recv = _BaseSocket.recv
_raw_get = _BaseSocket.get


def send_message(socket: zmq.Socket, head: Sequence[Any], frames: Sequence[Any]) -> None:
    """Send ``head`` (small control parts) then ``frames`` as one message; the first part non-blocking.

    The first part is sent with NOBLOCK: once it is accepted the rest
    cannot block (ZeroMQ queues whole messages), so the caller handles
    ``zmq.Again`` / ``EHOSTUNREACH`` from this call as "not sent at all".
    Parts below the socket's ``copy_threshold`` are copied into the
    outgoing message; ``zmq.Frame`` parts always go by reference.
    """
    send = raw_send
    parts = [*head, *frames]
    last = len(parts) - 1
    send(socket, parts[0], NOBLOCK | (SNDMORE if last else 0), False)
    for part in parts[1:last]:
        send(socket, part, SNDMORE, False)
    if last:
        send(socket, parts[last], 0, False)


class AdaptiveReceiver:
    """Receives one whole multipart message, as ``zmq.Frame`` (zero-copy) or ``bytes`` parts.

    Why not ``recv_multipart(copy=False)``: a ``zmq.Frame`` per part costs
    about twice a small ``bytes`` object, so for a 500-channel message
    (1002 parts of 8-16 bytes) zero-copy made the replay client the
    bottleneck of a replay; for a camera message (one 2.6 MB part) copying
    would cost a memcpy and fresh pages per image instead. Part sizes are
    only known once received, so the previous message decides, as pyzmq
    does for sends: zero-copy when its parts averaged at least
    ``zmq.COPY_THRESHOLD`` (64 KiB) bytes. A stream's shape rarely changes,
    and a wrong guess only costs time, never content: both kinds of part
    hold exactly the bytes sent. Messages of two parts or fewer (control
    messages) do not change the guess.
    """

    def __init__(self) -> None:
        self.zero_copy = True

    def receive(self, socket: zmq.Socket, flags: int = 0) -> list[Any]:
        """One whole message; ``flags`` (NOBLOCK) apply to its first part (``zmq.Again``: nothing queued)."""
        copy = not self.zero_copy
        parts = [_raw_recv(socket, flags, copy)]
        while _raw_get(socket, _RCVMORE):
            parts.append(_raw_recv(socket, 0, copy))
        if len(parts) > 2:
            self.zero_copy = sum(map(len, parts)) >= zmq.COPY_THRESHOLD * len(parts)
        return parts
