"""A small threaded HTTP server for the Bottle apps of the buffer and the writer.

Bottle's ``run()`` blocks forever and cannot be stopped from another thread,
and it prints to stderr for every request. The services need the opposite:
start the API beside their own main loop, learn the port actually bound (port
0 means "any free port", which the tests use), and stop it on shutdown. This
wraps ``wsgiref`` with exactly that, and sends access logs to ``logging``.
"""
from __future__ import annotations

import logging
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["HttpServer"]

logger = logging.getLogger(__name__)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow client cannot stall a status poll."""

    daemon_threads = True
    allow_reuse_address = True


class _LoggingHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("%s - %s", self.address_string(), format % args)


class HttpServer:
    """Serve a WSGI ``app`` on ``host:port`` in a background thread.

    The socket is bound in the constructor, so ``port`` is known (and a bind
    error raised) before anything else starts.
    """

    def __init__(self, app, host: str, port: int) -> None:
        self._server = make_server(
            host, port, app, server_class=_ThreadingWSGIServer, handler_class=_LoggingHandler
        )
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HttpServer":
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        )
        self._thread.start()
        logger.info("HTTP API listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
