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

A message cut in half: a send that fails after its first part went, or a
receive abandoned while parts of the message are still queued (a signal
handler that raised between two parts, MemoryError), leaves the socket
mid-message, and ZeroMQ would glue the next message's parts onto the
unfinished one. Such a socket is never used again: the call raises
``MessageCutError`` (a ``KeyboardInterrupt`` or ``SystemExit`` propagates
as it is), the socket is remembered as cut (weakly), and every later call of
this module or of ``partsio`` on it raises ``MessageCutError`` at once. Its
owner closes it and opens a new one.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import zmq

__all__ = ["SNDMORE", "NOBLOCK", "MessageCutError", "raw_send", "send_message", "send_all", "AdaptiveReceiver",
           "refuse_if_cut", "mark_cut", "is_cut"]

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_BaseSocket = zmq.backend.Socket if issubclass(zmq.Socket, zmq.backend.Socket) else zmq.Socket
raw_send = _BaseSocket.send
_raw_recv = _BaseSocket.recv
_raw_get = _BaseSocket.get


class MessageCutError(Exception):
    """This socket was left in the middle of a message (module docstring): close it and open a new one.

    Raised by the call that cut the message and by every later send or
    receive on the same socket; nothing is sent or received by those.
    """


# Sockets left mid-message. Weak: a socket closed and dropped by its owner leaves no trace here.
_cut_sockets: "weakref.WeakSet[zmq.Socket]" = weakref.WeakSet()


def mark_cut(socket: zmq.Socket) -> None:
    """Remember ``socket`` as cut: every later call on it raises ``MessageCutError``."""
    _cut_sockets.add(socket)


def is_cut(socket: zmq.Socket) -> bool:
    """Whether ``socket`` was left mid-message (and must be replaced)."""
    return bool(_cut_sockets.data) and socket in _cut_sockets


def refuse_if_cut(socket: zmq.Socket) -> None:
    """``MessageCutError`` if ``socket`` was left mid-message; free (one set test) when no socket ever was."""
    if _cut_sockets.data and socket in _cut_sockets:
        raise MessageCutError("this socket was left in the middle of a message by an earlier failed send or "
                              "receive: close it and open a new one")


def cut(socket: zmq.Socket, what: str, error: BaseException) -> BaseException:
    """Mark ``socket`` cut; the exception to raise: ``MessageCutError``, or ``error`` itself when the process is
    being stopped (KeyboardInterrupt, SystemExit are not turned into something a loop would catch)."""
    mark_cut(socket)
    if not isinstance(error, Exception):
        return error
    return MessageCutError(f"{what} cut in the middle of a message ({type(error).__name__}: {error}); "
                           "this socket must be closed and replaced")


def receive_cut(socket: zmq.Socket) -> bool:
    """After a failed receive: whether parts of the message are still queued (the socket is mid-message).

    ZeroMQ hands a receiver whole messages only, so the parts after the
    first never block and libzmq never fails between them; what can stop a
    receive there is our side (a raising signal handler, MemoryError), and
    RCVMORE of the last part taken says exactly whether the rest is waiting.
    """
    try:
        return bool(_raw_get(socket, _RCVMORE))
    except zmq.ZMQError:  # closed or the context terminated: unusable anyway
        return False


def send_all(socket: zmq.Socket, parts: Sequence[Any], first_flags: int = 0) -> None:
    """Send ``parts`` as one message; ``first_flags`` (NOBLOCK) apply to the first part only.

    A ZeroMQ error on the first part (``zmq.Again``, ``EHOSTUNREACH``) means
    nothing was sent and the socket is fine. Anything else (a later part's
    error, a signal handler that raised, MemoryError) may have cut the
    message: the socket is marked cut and ``MessageCutError`` raised, even
    where the exception came just before the first part went (a replaced
    socket costs little, a glued message costs a file).
    """
    refuse_if_cut(socket)
    send = raw_send
    last = len(parts) - 1
    index = 0
    try:
        send(socket, parts[0], first_flags | (SNDMORE if last else 0), False)
        index = 1
        for index in range(1, last):
            send(socket, parts[index], SNDMORE, False)
        if last:
            index = last
            send(socket, parts[last], 0, False)
    except zmq.ZMQError as error:
        if index == 0:
            raise  # the first part was refused: nothing sent
        error_out = cut(socket, f"send of part {index + 1} of {last + 1}", error)
        if error_out is error:
            raise
        raise error_out from error
    except BaseException as error:
        error_out = cut(socket, f"send (near part {index + 1} of {last + 1})", error)
        if error_out is error:
            raise
        raise error_out from error


def send_message(socket: zmq.Socket, head: Sequence[Any], frames: Sequence[Any]) -> None:
    """Send ``head`` (small control parts) then ``frames`` as one message; the first part non-blocking.

    The first part is sent with NOBLOCK: once it is accepted the rest
    cannot block (ZeroMQ queues whole messages), so the caller handles
    ``zmq.Again`` / ``EHOSTUNREACH`` from this call as "not sent at all"
    (and ``MessageCutError`` as "replace the socket": ``send_all``).
    Parts below the socket's ``copy_threshold`` are copied into the
    outgoing message; ``zmq.Frame`` parts always go by reference.
    """
    send_all(socket, [*head, *frames], NOBLOCK)


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
        """One whole message; ``flags`` (NOBLOCK) apply to its first part (``zmq.Again``: nothing queued).

        ``MessageCutError`` (the socket marked cut) when the receive stops
        with parts of the message still queued (module docstring).
        """
        refuse_if_cut(socket)
        copy = not self.zero_copy
        try:
            parts = [_raw_recv(socket, flags, copy)]
            while _raw_get(socket, _RCVMORE):
                parts.append(_raw_recv(socket, 0, copy))
        except BaseException as error:
            if not receive_cut(socket):
                raise  # nothing of a message taken, or all of it: the socket is fine
            error_out = cut(socket, "receive", error)
            if error_out is error:
                raise
            raise error_out from error
        if len(parts) > 2:
            self.zero_copy = sum(map(len, parts)) >= zmq.COPY_THRESHOLD * len(parts)
        return parts
