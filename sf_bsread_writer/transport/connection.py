"""A bounded socket's connection to its peer, made again where libzmq gives it up.

Every network-facing socket has ``ZMQ_MAXMSGSIZE``: a part over it is refused
at its header, before any of it is buffered. libzmq treats that as a
*protocol error*, and after a protocol error it never connects again
(``session_base_t::engine_error``: only a connection error, a peer that went
away, is reconnected). A socket that *connects* to its peer (the buffer's
ingest, a ``--direct`` writer, a feed reader) would never hear from that peer
again after one such part: a source, a whole beamline, silent until a restart.

:class:`ConnectionWatch` connects the socket and reads its monitor: libzmq
follows a disconnect it will make good with ``EVENT_CONNECT_RETRIED`` at once
(from the same I/O thread); a disconnect without one within
``GIVEN_UP_SECONDS`` was given up, and the watch connects the same socket
again. The same socket, not a new one: messages already received on it are
not lost, and no connection is ever doubled (a second connection to a PUB
would deliver every message twice). The decision is :meth:`ConnectionWatch.check`'s,
fed ``now``; its owner calls it now and then (each loop round, each receive).
"""
from __future__ import annotations

import logging

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["ConnectionWatch", "GivenUp", "GIVEN_UP_SECONDS", "WATCHED_EVENTS"]

logger = logging.getLogger(__name__)

#: A disconnect not followed by libzmq's own reconnection attempt within this long was given up.
GIVEN_UP_SECONDS = 1.0
#: The monitor events :class:`GivenUp` needs.
WATCHED_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED


class GivenUp:
    """The decision alone: a connecting socket's monitor events and ``now`` in, "libzmq gave it up" out.

    For an owner that answers a given-up connection otherwise than by connecting the same socket again
    (the writer's replay client asks for the rest of its range on a new socket).
    """

    def __init__(self) -> None:
        self._dropped_at: float | None = None

    def event(self, event: int, now: float) -> None:
        if event == zmq.EVENT_DISCONNECTED:
            if self._dropped_at is None:
                self._dropped_at = now
        elif event in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECTED):
            # CONNECT_RETRIED: libzmq connects again by itself (a peer that went away); CONNECTED: it has
            self._dropped_at = None

    def check(self, now: float) -> bool:
        """True once for each disconnect that no reconnection attempt followed within GIVEN_UP_SECONDS."""
        if self._dropped_at is None or now - self._dropped_at < GIVEN_UP_SECONDS:
            return False
        self._dropped_at = None
        return True


class ConnectionWatch:
    """Connects ``socket`` to ``address`` and connects it again when libzmq has given the connection up.

    ``reconnects`` counts the connections made again. Same thread as the
    socket's owner; :meth:`close` before the socket is closed.
    """

    def __init__(self, socket: zmq.Socket, address: str, name: str = "socket") -> None:
        self.socket = socket
        self.address = address
        self.name = name
        self.reconnects = 0
        self._given_up = GivenUp()
        self._monitor: zmq.Socket | None = socket.get_monitor_socket(WATCHED_EVENTS)
        socket.connect(address)

    def check(self, now: float) -> bool:
        """Read the socket's connection events; True when it was given up and is connected again now."""
        monitor = self._monitor
        if monitor is None:
            return False
        while monitor.poll(0):
            self._given_up.event(recv_monitor_message(monitor)["event"], now)
        if not self._given_up.check(now):
            return False
        self.socket.connect(self.address)
        self.reconnects += 1
        logger.warning("%s: the connection to %s was dropped and not made again by ZeroMQ (a part over %d bytes "
                       "refused?): connected anew (%d so far)", self.name, self.address,
                       self.socket.getsockopt(zmq.MAXMSGSIZE), self.reconnects)
        return True

    def close(self) -> None:
        """Stop watching (before the socket is closed); idempotent."""
        if self._monitor is None:
            return
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:  # the socket is closed already
            pass
        self._monitor.close(0)
        self._monitor = None
