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
from collections.abc import Callable
from typing import Any

import bottle

from sf_bsread_writer import jsontext
from sf_bsread_writer.httpserver import (
    RequestCounter,
    error_answer,
    install_json_errors,
    ok_answer,
)
from sf_bsread_writer.writer.acquisition import BadRequest, RequestError, parse_pulse_id
from sf_bsread_writer.writer.service import Started, Writer

__all__ = ["make_app", "MAX_BODY_BYTES"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # parameters are a few hundred bytes; anything huge is a mistake
START_BODY_KEYS = ("output_file",)


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
        return jsontext.loads(raw)
    except jsontext.JsonError as error:
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


def _started(started: Started) -> dict:
    """A start's answer: the state, and a ``warning`` about the range when there is one."""
    return ok_answer(started.status, **({"warning": started.warning} if started.warning else {}))


def make_app(writer: Writer) -> RequestCounter:
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
                return error_answer(error.http_status, error.message)
        wrapper.__name__ = callback.__name__
        return wrapper

    @app.get("/status")
    @handle
    def status() -> dict:
        return ok_answer(writer.status())

    @app.get("/statistics")
    @handle
    def statistics() -> dict:
        return ok_answer(writer.status(), statistics=writer.statistics().to_json())

    @app.post("/parameters")
    @handle
    def set_parameters() -> dict:
        parameters = writer.set_parameters(_read_json_body(required=True))
        return ok_answer(writer.status(), parameters=parameters)

    @app.get("/parameters")
    @handle
    def get_parameters() -> dict:
        return ok_answer(writer.status(), parameters=writer.parameters())

    @app.put("/start_pulse_id/<pulse_id>")
    @handle
    def start_pulse_id(pulse_id: str) -> dict:
        value = parse_pulse_id(pulse_id, "start_pulse_id")
        output_file = _start_options(_read_json_body(required=False))
        return _started(writer.start_at_pulse(value, output_file))

    @app.put("/stop_pulse_id/<pulse_id>")
    @handle
    def stop_pulse_id(pulse_id: str) -> dict:
        return ok_answer(writer.stop_at_pulse(parse_pulse_id(pulse_id, "stop_pulse_id")))

    @app.put("/start_now")
    @handle
    def start_now() -> dict:
        output_file = _start_options(_read_json_body(required=False))
        return _started(writer.start_now(output_file))

    @app.put("/stop_now")
    @handle
    def stop_now() -> dict:
        return ok_answer(writer.stop_now())

    @app.get("/stop")
    @handle
    def stop() -> dict:
        return ok_answer(writer.stop())

    @app.get("/kill")
    @handle
    def kill() -> dict:
        return ok_answer(writer.kill())

    install_json_errors(app)
    return RequestCounter(app)
