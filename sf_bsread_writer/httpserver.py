"""HTTP for the Bottle apps of the buffer and the writer: a stoppable server and one JSON answer style.

Bottle's ``run()`` blocks forever and cannot be stopped from another thread,
and it prints to stderr for every request. The services need the opposite:
start the API beside their own main loop, learn the port actually bound (port
0 means "any free port", which the tests use), and stop it on shutdown.
:class:`HttpServer` wraps ``wsgiref`` with exactly that, and sends access
logs to ``logging``.

Every answer of every API is JSON ``{"state": "ok"|"error", "status": ...}``
(the original writer's style): :func:`ok_answer` and :func:`error_answer`
build the two kinds, :func:`install_json_errors` makes Bottle's own 404,
405 and 500 answers look the same, and :class:`RequestCounter` lets a
process wait until its last answers are sent before it exits.
"""
from __future__ import annotations

import json
import logging
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle

__all__ = ["HttpServer", "ok_answer", "error_answer", "install_json_errors", "RequestCounter"]

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
        # stop() waits for the serving loop to see the request: at most one poll interval, which a writer
        # spends between its closed file and its exit (the original's clients want it gone within 0.5 s).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="http", daemon=True
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


# ---------------------------------------------------------------------------
# JSON answers
# ---------------------------------------------------------------------------
def ok_answer(status: str, **extra: Any) -> dict[str, Any]:
    """A successful answer: ``{"state": "ok", "status": status, **extra}`` (Bottle sends a dict as JSON)."""
    return {"state": "ok", "status": status, **extra}


def error_answer(http_status: int, message: str) -> str:
    """Set the response status and answer ``{"state": "error", "status": message}`` as JSON text."""
    bottle.response.status = http_status
    bottle.response.content_type = "application/json"
    return json.dumps({"state": "error", "status": message})


def install_json_errors(app: bottle.Bottle, paths_hint: str = "") -> None:
    """Bottle's 404, 405 and 500 (and any other HTTP error) answered as JSON that says what to fix.

    ``paths_hint`` (e.g. "GET /status, /statistics") is added to a 404. An
    unexpected exception is logged with its traceback and answered 500; it
    never ends the process.
    """
    def handler(error: bottle.HTTPError) -> str:
        request = bottle.request
        if error.status_code == 404:
            message = f"unknown path {request.path}" + (f" ({paths_hint})" if paths_hint else "")
        elif error.status_code == 405:
            allowed = error.headers.get("Allow", "")
            message = f"method {request.method} not allowed on {request.path} (allowed: {allowed})"
        elif error.status_code >= 500:
            exception = error.exception
            if exception is not None:
                logger.error("%s %s failed: %s", request.method, request.path, exception,
                             exc_info=(type(exception), exception, exception.__traceback__))
                message = f"internal error: {type(exception).__name__}: {exception}"
            else:
                message = f"internal error: {error.body}"
        else:
            message = str(error.body)
        return error_answer(error.status_code, message)

    app.default_error_handler = handler


class RequestCounter:
    """A WSGI wrapper counting requests whose answer is not yet completely sent.

    A process that is about to exit calls :meth:`wait_until_idle`, so that
    the answer of ``/stop`` or ``/kill`` reaches its client.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._idle = threading.Condition()
        self._count = 0

    def in_flight(self) -> int:
        return self._count

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait until no answer is being sent (at most ``timeout`` s); False if some still are."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)

    def _done(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        with self._idle:
            self._count += 1
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self._done()
            raise
        return _ClosingIterable(result, self._done)


class _ClosingIterable:
    """The app's answer; the WSGI server calls ``close`` once it is sent."""

    def __init__(self, result: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._result = result
        self._on_close = on_close

    def __iter__(self):
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()
