"""The writer's REST API (Bottle), thin: parse and validate the request, call the writer, answer JSON.

Every answer is ``{"state": "ok"|"error", "status": ...}``; on success
``status`` is the writer's state (waiting, writing, finishing, finished,
error) and some answers add a field (``parameters``, ``statistics``), as the
original writer did. A request that cannot be carried out gets 400 (bad
input, with a message naming the problem) or 409 (wrong state); an unknown
path 404 and a wrong method 405, both as JSON. An unexpected exception is
answered with 500 JSON and logged; it never ends the process.

The full reference with curl examples is docs/writer.md.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import bottle

from sf_bsread_writer.writer import BadRequest, RequestError, Writer, parse_pulse_id

__all__ = ["make_app", "RequestCounter", "MAX_BODY_BYTES"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # parameters are a few hundred bytes; anything huge is a mistake
START_BODY_KEYS = ("output_file",)


def _answer(status: str, **extra: Any) -> dict:
    return {"state": "ok", "status": status, **extra}


def _error(http_status: int, message: str) -> str:
    bottle.response.status = http_status
    bottle.response.content_type = "application/json"
    return json.dumps({"state": "error", "status": message})


def _read_json_body(required: bool) -> Any:
    """The request body as JSON; None when empty (and not required). BadRequest names what is wrong."""
    length = bottle.request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise BadRequest(f"request body too large ({length} bytes, at most {MAX_BODY_BYTES})")
    raw = bottle.request.body.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"request body too large (more than {MAX_BODY_BYTES} bytes)")
    if not raw.strip():
        if required:
            raise BadRequest("request body missing: expected a JSON object")
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None


def _start_options(body: Any) -> str | None:
    """``{"output_file": ...}`` or nothing; anything else is 400."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise BadRequest(f'body must be a JSON object like {{"output_file": "..."}}, not {type(body).__name__}')
    unknown = sorted(set(body) - set(START_BODY_KEYS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)} in the body (allowed: {', '.join(START_BODY_KEYS)})")
    output_file = body.get("output_file")
    if output_file is not None and not isinstance(output_file, str):
        raise BadRequest(f"output_file must be a string, not {json.dumps(output_file)}")
    return output_file


def make_app(writer: Writer) -> "RequestCounter":
    """The Bottle app for ``writer``, wrapped so that the process can wait for answers in flight."""
    app = bottle.Bottle(catchall=True)

    def handle(callback: Callable[..., dict]) -> Callable[..., Any]:
        """Turn RequestError into 400/409 JSON; everything else is for the 500 handler."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except RequestError as error:
                logger.info("%s %s refused (%d): %s", bottle.request.method, bottle.request.path,
                            error.http_status, error.message)
                return _error(error.http_status, error.message)
        wrapper.__name__ = callback.__name__
        return wrapper

    @app.get("/status")
    @handle
    def status() -> dict:
        return _answer(writer.status())

    @app.get("/statistics")
    @handle
    def statistics() -> dict:
        return _answer(writer.status(), statistics=writer.statistics())

    @app.post("/parameters")
    @handle
    def set_parameters() -> dict:
        parameters = writer.set_parameters(_read_json_body(required=True))
        return _answer(writer.status(), parameters=parameters)

    @app.get("/parameters")
    @handle
    def get_parameters() -> dict:
        return _answer(writer.status(), parameters=writer.parameters())

    @app.put("/start_pulse_id/<pulse_id>")
    @handle
    def start_pulse_id(pulse_id: str) -> dict:
        value = parse_pulse_id(pulse_id, "start_pulse_id")
        output_file = _start_options(_read_json_body(required=False))
        return _answer(writer.start_pulse_id(value, output_file))

    @app.put("/stop_pulse_id/<pulse_id>")
    @handle
    def stop_pulse_id(pulse_id: str) -> dict:
        return _answer(writer.stop_pulse_id(parse_pulse_id(pulse_id, "stop_pulse_id")))

    @app.put("/start_now")
    @handle
    def start_now() -> dict:
        output_file = _start_options(_read_json_body(required=False))
        return _answer(writer.start_now(output_file))

    @app.put("/stop_now")
    @handle
    def stop_now() -> dict:
        return _answer(writer.stop_now())

    @app.get("/stop")
    @handle
    def stop() -> dict:
        return _answer(writer.stop())

    @app.get("/kill")
    @handle
    def kill() -> dict:
        return _answer(writer.kill())

    def error_handler(error: bottle.HTTPError) -> str:
        if error.status_code == 404:
            message = f"unknown path {bottle.request.path}"
        elif error.status_code == 405:
            allowed = error.headers.get("Allow", "")
            message = f"method {bottle.request.method} not allowed on {bottle.request.path} (allowed: {allowed})"
        elif error.status_code >= 500:
            if error.exception is not None:
                logger.error("%s %s failed: %s", bottle.request.method, bottle.request.path, error.exception,
                             exc_info=(type(error.exception), error.exception, error.exception.__traceback__))
                message = f"internal error: {type(error.exception).__name__}: {error.exception}"
            else:
                message = f"internal error: {error.body}"
        else:
            message = str(error.body)
        bottle.response.content_type = "application/json"
        return json.dumps({"state": "error", "status": message})

    app.default_error_handler = error_handler
    return RequestCounter(app)


class RequestCounter:
    """A WSGI wrapper counting requests whose answer is not yet completely sent.

    The process waits for ``in_flight() == 0`` before it exits, so that the
    answer of ``/stop`` or ``/kill`` reaches its client.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._count = 0

    def in_flight(self) -> int:
        return self._count

    def _done(self) -> None:
        with self._lock:
            self._count -= 1

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        with self._lock:
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
