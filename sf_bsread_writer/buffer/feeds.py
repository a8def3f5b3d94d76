"""The loopback feeds of the buffer's children (``--ca``: the CA gateway, ``--web``: the web service).

Why a feed of its own per child, and not the live output: PVs and web
clients update at most ``max_rate`` times a second, so the child need not
ingest (and the buffer need not send) every message, and a PUSH live output
keeps all its messages for its legacy consumer. A feed is a PUB socket on
loopback (it never blocks the loop: a slow child loses old messages) that
gets ``max_rate`` messages a second plus those that carry a sparse channel
the last one lacked (``rates.SparseAwareGrid``) and, when it carries
status, the buffer's status snapshot as a message of its own each time the
loop publishes one (the wire form: ``feed``; the reader: ``feed.FeedReader``).
"""
from __future__ import annotations

import zmq

from sf_bsread_writer.bsread.parts import PackedParts
from sf_bsread_writer.feed import status_message
from sf_bsread_writer.rates import SparseAwareGrid
from sf_bsread_writer.status import BufferStatus, CaFeedStatus
from sf_bsread_writer.transport.partsio import bind_again, send_parts

__all__ = ["LoopbackFeed", "FEED_HWM"]

# Messages queued to a child's feed; it wants only the newest, so a slow child loses old ones.
FEED_HWM = 4


class LoopbackFeed:
    """A child's feed: a loopback PUB socket at ``address`` (owned by the loop thread).

    The buffer's status snapshots go on it too (docs/buffer.md, "Feeds"): both readers, the web service
    and the CA gateway, read it with ``feed.FeedReader`` and need no HTTP poll.
    """

    def __init__(self, context: zmq.Context, max_rate: float) -> None:
        self.max_rate = max_rate
        self.address = "tcp://127.0.0.1:0"  # our own child reads it: loopback only
        self.socket = self.bound_socket(context)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._grid = SparseAwareGrid(max_rate)
        self.sent = 0
        self.statuses_sent = 0

    def bound_socket(self, context: zmq.Context, again: bool = False) -> zmq.Socket:
        """The PUB at ``address`` (again: the same port after a cut socket was closed; the child reconnects)."""
        socket = context.socket(zmq.PUB)
        socket.setsockopt(zmq.SNDHWM, FEED_HWM)
        socket.setsockopt(zmq.LINGER, 0)
        if again:
            bind_again(socket, self.address)
        else:
            socket.bind(self.address)
        return socket

    def offer(self, frames: PackedParts, now: float) -> None:
        """A message the buffer took: sent if the rate allows it (or it has a sparse channel)."""
        if self._grid.take(now, frames.layout.presence):
            send_parts(self.socket, frames)
            self.sent += 1

    def publish_status(self, status: BufferStatus) -> None:
        """The newest status snapshot, as a message of its own."""
        send_parts(self.socket, status_message(status))
        self.statuses_sent += 1

    def status(self) -> CaFeedStatus:
        return CaFeedStatus(address=self.address, max_rate=self.max_rate, sent=self.sent)
