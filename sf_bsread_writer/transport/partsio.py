"""Whole multipart messages in and out of a ZeroMQ socket in one call, in the packed form of ``bsread.parts``.

Two implementations behind one small API, chosen once at import:

* ``compiled``: the C extension ``_partsio`` (one C call per message; the
  GIL released while it blocks). It resolves libzmq through pyzmq's own
  compiled module, so both use the same libzmq instance (``_partsio.c``).
* ``python``: pure pyzmq, the same behaviour at pyzmq's per-part cost.
  Used when the extension was not built (no compiler at install), refuses to
  bind (an unexpected pyzmq/libzmq), or ``SF_BSREAD_NO_EXTENSION=1`` is set.

``IMPLEMENTATION`` says which is active and ``FALLBACK_REASON`` why the
compiled one is not; the buffer's READY line and ``/status`` and the
writer's statistics show it (``io_path``).

API
    ``PartsReceiver().receive(socket, flags=0, n_prefix=0) -> (prefix, PackedParts)``
        one whole message; the first ``n_prefix`` parts (routing or kind
        frames) as a tuple of bytes, the rest packed. Consecutive messages
        share their data header and layout objects (the receiver keeps the
        previous ones as hints). ``zmq.Again`` with ``NOBLOCK`` when nothing
        is queued.
    ``send_parts(socket, parts, prefix=(), nonblocking=False)``
        ``prefix`` parts, then ``parts`` (a ``PackedParts``), as one
        message. ``nonblocking`` applies to the first part only: once it is
        accepted the rest cannot block (ZeroMQ queues whole messages), so
        ``zmq.Again`` / ``EHOSTUNREACH`` from this call mean "nothing sent".
    ``MessageCutError``
        from either call: the socket was left in the middle of a message (a
        send that failed after its first part, a receive abandoned with
        parts still queued) or was so left before. ZeroMQ would append the
        next message's parts to the unfinished one, so the socket is never
        used again: its owner closes it and opens a new one
        (``transport.multipart`` explains what can cut a message on each
        path; docs/buffer.md "Message I/O").
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import zmq

from sf_bsread_writer.bsread.parts import (
    LARGE_PART_BYTES,
    LayoutCache,
    PackedParts,
    pack,
)
from sf_bsread_writer.transport.multipart import (
    NOBLOCK,
    AdaptiveReceiver,
    MessageCutError,
    cut,
    is_cut,
    mark_cut,
    receive_cut,
    refuse_if_cut,
    send_all,
)

__all__ = ["IMPLEMENTATION", "AVAILABLE", "FALLBACK_REASON", "NO_EXTENSION_VARIABLE", "MessageCutError",
           "PartsReceiver", "send_parts", "receive_frames", "is_cut", "bind_again"]

logger = logging.getLogger(__name__)

#: Set to 1 to use the pure pyzmq implementation even where the extension is built.
NO_EXTENSION_VARIABLE = "SF_BSREAD_NO_EXTENSION"


def _load_extension() -> tuple[Any, str | None]:
    """The bound extension module, or (None, why not)."""
    if os.environ.get(NO_EXTENSION_VARIABLE, "") not in ("", "0"):
        return None, f"{NO_EXTENSION_VARIABLE}={os.environ[NO_EXTENSION_VARIABLE]}"
    try:
        from sf_bsread_writer.transport import _partsio  # type: ignore[attr-defined]
    except ImportError as error:
        return None, f"the extension is not built ({error})"
    try:
        from zmq.backend.cython import _zmq as pyzmq_compiled
        _partsio.bind(pyzmq_compiled.__file__, tuple(zmq.zmq_version_info()), zmq.ZMQError, zmq.Again,
                      MessageCutError)
    except (ImportError, AttributeError, OSError) as error:
        return None, f"the extension cannot use pyzmq's libzmq ({error})"
    return _partsio, None


_extension, FALLBACK_REASON = _load_extension()
#: "compiled" or "python" (module docstring).
IMPLEMENTATION = "compiled" if _extension is not None else "python"
#: The implementations usable in this process (tests run both).
AVAILABLE = ("compiled", "python") if _extension is not None else ("python",)


def _compiled(implementation: str | None) -> bool:
    """Whether to use the extension: the active implementation, or the one asked for (tests)."""
    if implementation is None:
        return _extension is not None
    if implementation not in AVAILABLE:
        raise ValueError(f"message I/O implementation {implementation!r} is not available here: {AVAILABLE}")
    return implementation == "compiled"
if _extension is None:
    logger.debug("message I/O in pure Python: %s", FALLBACK_REASON)


class PartsReceiver:
    """Receives whole messages as ``(prefix, PackedParts)``; keeps the hints that let messages share objects.

    One per socket (or per stream): the previous message's data header and
    layout are what the next one is compared with. Not thread-safe.
    """

    def __init__(self, layouts: LayoutCache | None = None, implementation: str | None = None) -> None:
        self.layouts = layouts or LayoutCache()
        self._header: bytes | None = None
        self._adaptive = AdaptiveReceiver()  # the pure path's copy decision
        self.receive = self._receive_compiled if _compiled(implementation) else self._receive_python

    def _receive_compiled(self, socket: zmq.Socket, flags: int = 0,
                          n_prefix: int = 0) -> tuple[tuple[bytes, ...], PackedParts | None]:
        last = self.layouts.last
        refuse_if_cut(socket)
        try:
            prefix, key, small, header, large = _extension.recv(
                socket.underlying, int(flags), n_prefix, self._header, None if last is None else last.key,
                LARGE_PART_BYTES)
        except BaseException as error:  # a raising signal handler or MemoryError, maybe between two parts
            if not receive_cut(socket):
                raise
            error_out = cut(socket, "receive", error)
            if error_out is error:
                raise
            raise error_out from error
        if not key:
            return prefix, None
        if header is not None:
            self._header = header
        return prefix, PackedParts(self.layouts.get(key), small, header, large)

    def _receive_python(self, socket: zmq.Socket, flags: int = 0,
                        n_prefix: int = 0) -> tuple[tuple[bytes, ...], PackedParts | None]:
        frames = self._adaptive.receive(socket, int(flags))
        prefix = tuple(f if type(f) is bytes else f.bytes for f in frames[:n_prefix])
        rest = frames[n_prefix:]
        if not rest:
            return prefix, None
        parts = pack(rest, self.layouts, self._header)
        if parts.header is not None:
            self._header = parts.header
        return prefix, parts


def send_parts(socket: zmq.Socket, parts: PackedParts | Sequence[Any], prefix: Sequence[Any] = (),
               nonblocking: bool = False, implementation: str | None = None) -> None:
    """Send ``prefix`` then ``parts`` as one message (module docstring); a plain list of frames is accepted too.

    A plain list goes the pure pyzmq way on both paths (control messages);
    its parts are checked before the first is sent, as the compiled path
    checks a packed message, so a part that is no buffer is a TypeError and
    nothing sent, never a cut message.
    """
    first_flags = NOBLOCK if nonblocking else 0
    if type(parts) is not PackedParts:
        frames = [*prefix, *parts]
        for frame in frames:
            if type(frame) is not bytes:
                memoryview(frame)  # TypeError before anything is sent
        send_all(socket, frames, first_flags)
        return
    if _compiled(implementation):
        refuse_if_cut(socket)
        try:
            _extension.send(socket.underlying, first_flags, tuple(prefix), parts.layout.key,
                            parts.small, parts.header, parts.large, LARGE_PART_BYTES)
        except MessageCutError:  # a part after the first failed (ENOMEM, ETERM): _partsio.c
            mark_cut(socket)
            raise
    else:
        send_all(socket, [*prefix, *parts.frames()], first_flags)


def receive_frames(socket: zmq.Socket, flags: int = 0) -> list[bytes]:
    """One whole small message as a list of bytes (control messages: pyzmq's ``recv_multipart``), with the
    same guarantee as ``PartsReceiver.receive``: ``MessageCutError`` if the receive stops mid-message."""
    refuse_if_cut(socket)
    try:
        return socket.recv_multipart(flags)
    except BaseException as error:
        if not receive_cut(socket):
            raise
        error_out = cut(socket, "receive", error)
        if error_out is error:
            raise
        raise error_out from error


def bind_again(socket: zmq.Socket, endpoint: str, timeout: float = 5.0) -> None:
    """Bind ``endpoint``, the ``LAST_ENDPOINT`` of a socket just closed (a cut one, replaced by its owner).

    libzmq closes the old listener in its reaper thread, after ``close``
    returned, so the port may still be taken for a moment: EADDRINUSE is
    retried until ``timeout``, then raised. Peers that were connected
    reconnect by themselves (ZeroMQ's reconnect interval).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.bind(endpoint)
            return
        except zmq.ZMQError as error:
            if error.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)  # the reaper thread's close, not ours to wait on otherwise
