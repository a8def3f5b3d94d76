"""HTTP and websocket handlers of ``sf_bsread_web`` (aiohttp); the contract is docs/web-api.md.

Every answer is JSON ``{"state": "ok"|"error", "status": ...}`` like the
buffer's and the writer's; a bad request gets a 4xx that says what to fix,
a websocket client's bad message an ``{"type": "error"}`` (the socket stays
open). Tokens are checked first, for every path: without a valid one the
answer is 401 and nothing else.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from sf_bsread_writer import process
from sf_bsread_writer.jsontext import JsonError
from sf_bsread_writer.jsontext import loads as strict_json
from sf_bsread_writer.status import BufferStatus
from sf_bsread_writer.web import ranges
from sf_bsread_writer.web.auth import origin_allowed
from sf_bsread_writer.web.image import render as render_image
from sf_bsread_writer.web.live import (
    MAX_CHANNEL_NAME,
    ClientFeed,
    SubscriptionError,
    value_document,
)
from sf_bsread_writer.web.range_query import (
    RangeQueryError,
    RangeTooLarge,
    parse_range_query,
)
from sf_bsread_writer.web.state import WebService

__all__ = ["make_app"]

logger = logging.getLogger(__name__)

SERVICE_KEY: web.AppKey[WebService] = web.AppKey("service", WebService)
STATIC_DIRECTORY = Path(__file__).with_name("static")
PNG_MAX_SIDE = 512
STATUS_TIMEOUT_SECONDS = 3.0
FILE_CHUNK_BYTES = 1024 * 1024
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024  # a subscribe of thousands of channel names fits
MAX_CLIENT_MESSAGE_DEPTH = 4  # {"op": ..., "channels": [...]} is 2 deep
MAX_HISTORY_CHANNELS = 1000  # the page asks for its sparklines (40) and the selected channel


def _error(status: int, text: str, **extra: Any) -> web.Response:
    return web.json_response({"state": "error", "status": text, **extra}, status=status)


def _token_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer "):].strip()
    return request.query.get("token")


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Tokens first (but for the status page's own files, which hold no data and ask for the token);
    then any error as JSON (aiohttp's own 404/405 pages too)."""
    service = request.app[SERVICE_KEY]
    public = request.path == "/" or request.path.startswith("/static/")
    if not public and not service.tokens.allows(_token_of(request)):
        service.counters.unauthorized += 1
        response = _error(401, "unauthorized: send a valid token as 'Authorization: Bearer <token>' "
                               "(websockets from a browser: ?token=<token>)")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    repeated = _repeated_parameter(request)
    if repeated is not None:
        return _error(400, f"parameter {repeated[:40]!r} is given more than once")
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        hint = " (GET /api/v1/status, /api/v1/channels, /api/v1/channels/<name>, /api/v1/range, " \
               "/api/v1/history, /api/v1/ws, /metrics)" if error.status in (404, 405) else ""
        return _error(error.status, f"{error.reason}: {request.method} {request.path}{hint}")
    except Exception as error:  # a bug: this request fails, visibly, and the service serves on
        logger.exception("%s %s failed", request.method, request.path)  # not path_qs: it may hold ?token=
        return _error(500, f"internal error: {type(error).__name__}: {error} (logged by the service)")


def _repeated_parameter(request: web.Request) -> str | None:
    """A query parameter given twice (which one counts would be a guess): its name, else None."""
    keys = [key for key, _ in request.query.items()]  # every occurrence (a MultiDict's keys() has each once)
    if len(keys) == len(set(keys)):
        return None
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


def make_app(service: WebService) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[SERVICE_KEY] = service
    app.on_shutdown.append(_close_websockets)
    service.status_source = status_document
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC_DIRECTORY, follow_symlinks=False)
    app.router.add_get("/api/v1/status", _status)
    app.router.add_get("/api/v1/channels", _channels)
    app.router.add_get("/api/v1/channels/{name:.+}", _channel)
    app.router.add_get("/api/v1/range", _range)
    app.router.add_get("/api/v1/history", _history)
    app.router.add_get("/api/v1/ws", _websocket)
    app.router.add_get("/metrics", _metrics)
    return app


async def _close_websockets(app: web.Application) -> None:
    """At shutdown: every websocket is told GOING_AWAY (clients reconnect elsewhere or later) at once."""
    service = app[SERVICE_KEY]
    service.stop_status()
    for socket in list(service.wakeups):
        await socket.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"service stopping")


# --------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------
async def _index(request: web.Request) -> web.FileResponse:
    """The status page (docs/operations.md): static files; the data comes over the API with the token."""
    return web.FileResponse(STATIC_DIRECTORY / "index.html", headers={"Cache-Control": "no-cache"})


async def _status(request: web.Request) -> web.Response:
    document = await status_document(request.app[SERVICE_KEY])
    return web.json_response(document, status=200 if document["state"] == "ok" else 502)


async def status_document(service: WebService) -> dict[str, Any]:
    """``GET /api/v1/status`` (also pushed to websocket clients that asked for it): the buffer's typed status.

    From the feed (the buffer's ``--web`` feed carries it); only a feed without status (a buffer's live
    output, standalone) falls back to polling ``--status-url``.
    """
    status, problem = service.feed_status(time.monotonic())
    if status is None and service.buffer_status is None and service.settings.status_url:
        url = service.settings.status_url + "/statistics"
        try:
            timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_SECONDS)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url) as answer:
                    document = await answer.json()
            status = BufferStatus.from_json(document["statistics"])
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as error:
            problem = f"the buffer's status at {url} cannot be read: {type(error).__name__}: {error}"
    if status is None:
        return {"state": "error", "status": problem}
    ring = status.ring
    service.rate_history.add(status.time, status.rates.messages_per_second, status.rates.bytes_per_second)
    writers = service.writer_rows.rows(status.replay.sessions, time.monotonic())
    return {
        "state": "ok",
        "status": status.describe(),
        "writers": [row.to_json() for row in writers],
        "look_back": {"seconds": ring.look_back_seconds, "pulses": ring.look_back_pulses,
                      "messages": ring.messages, "oldest_pulse_id": ring.oldest_pulse_id,
                      "newest_pulse_id": ring.newest_pulse_id},
        "buffer": status.to_json(),
        "web": {"clients": len(service.hub.clients), "subscriptions": service.hub.subscription_count,
                "feed_messages": service.counters.feed_messages, "feed_error": service.feed_error},
    }


async def _channels(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    listed = []
    for spec in service.latest.channels:
        latest = service.latest.get(spec.name)
        listed.append({**spec.metadata(), "pulse_id": latest.pulse_id if latest else None,
                       "timestamp": latest.timestamp if latest else None})
    message = service.latest.message
    return web.json_response({"state": "ok", "status": "ok" if message is not None else "no_data_yet",
                              "pulse_id": message.pulse_id if message is not None else None,
                              "channels": listed})


async def _channel(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    name = request.match_info["name"]
    latest = service.latest.get(name)
    if latest is None:
        known = service.latest.message is not None and name in service.latest.message.data_header
        return _error(404, f"channel {name!r} " + ("has had no value yet" if known else
                                                   "is not in the stream; GET /api/v1/channels lists them"))
    fmt = request.query.get("format", "json")
    if fmt == "png":
        try:
            value = latest.decoded()
            rendered = await asyncio.to_thread(render_image, value, PNG_MAX_SIDE) \
                if getattr(value, "ndim", 0) == 2 else None
        except Exception as error:
            return _error(500, f"channel {name!r}: image cannot be rendered: {error}")
        if rendered is None:
            return _error(400, f"channel {name!r} is not 2-D: format=png is for images")
        # The colour scale: the values shown as the colour map's ends (the page draws its colour bar from them).
        scale = {"X-Scale-Low": repr(rendered.low), "X-Scale-High": repr(rendered.high)} \
            if rendered.low is not None else {}
        return web.Response(body=rendered.png, content_type="image/png",
                            headers={"X-Pulse-Id": str(latest.pulse_id), "X-Timestamp": repr(latest.timestamp),
                                     "Cache-Control": "no-store", **scale})
    if fmt == "npy":
        try:
            value = latest.decoded()
        except Exception as error:
            return _error(500, f"channel {name!r}: value cannot be decoded: {error}")
        if isinstance(value, str):
            return _error(400, f"channel {name!r} is a string: format=npy is for numbers, use format=json")
        out = io.BytesIO()
        np.save(out, np.ascontiguousarray(value), allow_pickle=False)
        return web.Response(body=out.getvalue(), content_type="application/octet-stream",
                            headers={"X-Pulse-Id": str(latest.pulse_id), "X-Timestamp": repr(latest.timestamp)})
    if fmt != "json":
        return _error(400, f"format={fmt!r} is not json, npy or png")
    return web.json_response({"state": "ok", "status": "ok", **value_document(name, latest, 2**62)})


async def _history(request: web.Request) -> web.Response:
    """The plots' recent past (web/history.py): samples of the asked scalar channels and the buffer's rates."""
    service = request.app[SERVICE_KEY]
    text = request.query.get("channels", "")
    names = list(dict.fromkeys(name for name in text.split(",") if name)) if text else []
    if len(names) > MAX_HISTORY_CHANNELS or any(len(name) > MAX_CHANNEL_NAME for name in names):
        return _error(400, f"channels: at most {MAX_HISTORY_CHANNELS} names of at most {MAX_CHANNEL_NAME} "
                           "characters")
    newest = service.latest.message
    document = service.history.document(names, newest.timestamp if newest is not None else None)
    return web.json_response({"state": "ok", "status": "ok", "span_seconds": service.history.span,
                              "resolution_seconds": service.history.resolution, **document,
                              "rates": service.rate_history.document()})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SERVICE_KEY].metrics_text(),
                        content_type="text/plain", headers={"X-Content-Version": "0.0.4"})


# --------------------------------------------------------------------------
# Ranges
# --------------------------------------------------------------------------
def _count(service: WebService, outcome: str) -> None:
    service.counters.range_requests[outcome] = service.counters.range_requests.get(outcome, 0) + 1


async def _range(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    settings = service.settings
    newest = service.latest.message
    try:
        query = parse_range_query(request.query, settings.limits,
                                  newest_pulse_id=newest.pulse_id if newest is not None else None,
                                  now=time.time(), max_wait=settings.range_timeout)
    except RangeQueryError as error:
        _count(service, "bad_request")
        return _error(400, str(error))
    except RangeTooLarge as error:
        _count(service, "too_large")
        return _error(413, str(error))
    if service.range_slots.locked():
        _count(service, "busy")
        return _error(503, f"{settings.range_workers} range requests are being served (each holds a replay "
                           "session of the buffer); try again in a moment")
    try:
        return await _serve_range(request, service, query)
    finally:
        # The columns and their encoding (tens of MB, built in worker threads) are free once _serve_range has
        # returned, whatever the answer: hand the memory back, or the service keeps every worker arena at its
        # largest range's size.
        await asyncio.to_thread(process.release_free_memory)


async def _serve_range(request: web.Request, service: WebService, query: Any) -> web.StreamResponse:
    settings = service.settings
    try:
        async with service.range_slots:
            if query.format == "hdf5":
                path, columns = await asyncio.to_thread(ranges.write_hdf5, settings.replay, query, settings.limits,
                                                        settings.range_timeout, service.temp_root)
            else:
                columns = await asyncio.to_thread(ranges.fetch_range, settings.replay, query, settings.limits,
                                                  settings.range_timeout)
    except RangeTooLarge as error:
        _count(service, "too_large")
        return _error(413, str(error))
    except ranges.RangeTimeout as error:
        _count(service, "timeout")
        return _error(504, str(error))
    except ranges.RangeFailed as error:
        _count(service, "failed")
        return _error(502, str(error))
    unknown = columns.unknown
    if unknown and not columns.known:  # nothing asked is in the stream: a misspelling, most likely
        if query.format == "hdf5":
            ranges.remove_range_file(path)
        _count(service, "unknown_channels")
        return _error(404, f"no channel asked is in the stream during the range: {', '.join(unknown)[:2000]}; "
                           "GET /api/v1/channels lists the stream's channels", unknown=unknown)
    _count(service, ranges.outcome(columns))
    unknown_header = _unknown_header(unknown)
    if query.format == "json":  # encoded in a worker: a large range must not stall the websockets' loop
        body = await asyncio.to_thread(_json_bytes, columns)
        del columns
        return await _send_body(request, body, {"Content-Type": "application/json; charset=utf-8"})
    if query.format == "npz":
        body = await asyncio.to_thread(ranges.as_npz, columns)
        del columns
        return await _send_body(request, body, {"Content-Type": "application/octet-stream",
                                                "Content-Disposition": 'attachment; filename="range.npz"',
                                                **unknown_header})
    del columns
    return await _stream_file(request, path, unknown_header)


MAX_UNKNOWN_HEADER = 4096  # HTTP clients refuse headers of more than ~8 KiB


def _unknown_header(unknown: list[str]) -> dict[str, str]:
    """npz and hdf5 carry no JSON answer: the unknown names in headers, as JSON (ASCII: json escapes the rest).

    ``X-Unknown-Channels-Count`` is the number; the list holds as many names as fit 4 KiB (npz: all of them
    in its ``unknown`` array)."""
    if not unknown:
        return {}
    shown = list(unknown)
    while len(json.dumps(shown)) > MAX_UNKNOWN_HEADER:
        shown = shown[:len(shown) // 2]
    return {"X-Unknown-Channels": json.dumps(shown), "X-Unknown-Channels-Count": str(len(unknown))}


def _json_bytes(columns: Any) -> bytes:
    return json.dumps(ranges.as_json(columns), allow_nan=False).encode()


async def _send_body(request: web.Request, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """Send a whole answer and let go of it before the handler returns (then its memory can be released)."""
    response = web.StreamResponse(headers={**headers, "Content-Length": str(len(body))})
    try:
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
    except ConnectionError as error:  # the client went away (a cancelled download): nothing to answer
        logger.debug("range answer not delivered: %s", error)
    return response


async def _stream_file(request: web.Request, path: str, headers: dict[str, str]) -> web.StreamResponse:
    """The HDF5 file in chunks, then removed (whether or not the client read it to the end)."""
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/x-hdf5",
                                               "Content-Disposition": 'attachment; filename="range.h5"',
                                               "Content-Length": str(os.path.getsize(path)), **headers})
        await response.prepare(request)
        with open(path, "rb") as file:
            while chunk := file.read(FILE_CHUNK_BYTES):
                await response.write(chunk)
        await response.write_eof()
    except ConnectionError as error:  # the client went away (a cancelled download): nothing to answer
        logger.debug("range file not delivered: %s", error)
    finally:
        ranges.remove_range_file(path)
    return response


# --------------------------------------------------------------------------
# The websocket
# --------------------------------------------------------------------------
async def _websocket(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    own_origin = f"{request.scheme}://{request.host}"
    if not origin_allowed(request.headers.get("Origin"), own_origin, service.settings.allow_origins):
        service.counters.origin_refused += 1
        return _error(403, f"websockets from a page of {request.headers.get('Origin', '')[:100]!r} are not "
                           f"accepted: only from {own_origin} (this service's own pages) and the origins given "
                           "with --allow-origin (--web-allow-origin on the buffer)")
    if len(service.hub.clients) >= service.settings.max_clients:
        return _error(503, f"{service.settings.max_clients} websocket clients are connected; try again later")
    socket = web.WebSocketResponse(heartbeat=service.settings.heartbeat_seconds,
                                   max_msg_size=MAX_CLIENT_MESSAGE_BYTES)
    await socket.prepare(request)
    client = service.hub.clients.setdefault(socket, ClientFeed())
    wakeup = service.wakeups.setdefault(socket, asyncio.Event())
    service.socket_tokens[socket] = _token_of(request)
    service.counters.clients_total += 1
    sender = asyncio.create_task(_send_frames(socket, client, wakeup))
    try:
        async for received in socket:
            if received.type == aiohttp.WSMsgType.TEXT:
                _handle(service, client, received.data)
                service.hub.changed()
                wakeup.set()
            elif received.type == aiohttp.WSMsgType.BINARY:
                client.queue_message({"type": "error", "status": "send JSON text frames, not binary ones"})
                wakeup.set()
            elif received.type == aiohttp.WSMsgType.ERROR:
                break
    finally:
        if socket.close_code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE or socket.exception() is not None:
            service.counters.clients_dropped += 1  # heartbeat unanswered, or broken
        sender.cancel()
        service.forget_client(socket)
        await socket.close()
    return socket


def _handle(service: WebService, client: ClientFeed, text: str) -> None:
    """One client message: subscribe, unsubscribe, status, ping; anything else an error answer.

    Parsed strictly and bounded (``jsontext``: no NaN, no RecursionError, at most
    MAX_CLIENT_MESSAGE_DEPTH deep); every field's type checked: a bad message is answered, never raised.
    """
    try:
        request = strict_json(text, MAX_CLIENT_MESSAGE_DEPTH)
    except JsonError as error:
        client.queue_message({"type": "error", "status": f"not JSON ({str(error)[:100]}): send "
                                                         "{\"op\": \"subscribe\", \"channels\": [...]}"})
        return
    op = request.get("op") if isinstance(request, dict) else None
    try:
        if op == "subscribe":
            names = client.subscribe(request.get("channels"), request.get("max_rate"), time.monotonic())
            client.queue_message({"type": "subscribed", "channels": names, "unknown": service.latest.unknown(names)})
            _send_latest(service, client, names)
        elif op == "unsubscribe":
            client.queue_message({"type": "unsubscribed", "channels": client.unsubscribe(request.get("channels"))})
        elif op == "ping":
            client.queue_message({"type": "pong", "time": time.time()})
        elif op == "status":
            wanted = request.get("subscribe", True)
            if not isinstance(wanted, bool):
                raise SubscriptionError('"subscribe" of op status must be true or false')
            client.wants_status = wanted
            service.want_status()
        else:
            shown = repr(op)[:60] if isinstance(op, (str, int, float, type(None))) else type(op).__name__
            client.queue_message({"type": "error",
                                  "status": f"op {shown} is not subscribe, unsubscribe, status or ping"})
    except SubscriptionError as error:
        client.queue_message({"type": "error", "status": str(error)})


def _send_latest(service: WebService, client: ClientFeed, names: list[str]) -> None:
    """A new subscriber gets each channel's latest value at once, not only from the next update on."""
    messages = []
    for name in names:
        latest = service.latest.get(name)
        if latest is not None:
            messages.append(value_document(name, latest, service.hub.max_elements))
    if messages:
        client.queue_values(messages)


async def _send_frames(socket: web.WebSocketResponse, client: ClientFeed, wakeup: asyncio.Event) -> None:
    """Send what the client's queue holds, oldest first; wait when it is empty."""
    try:
        while not socket.closed:
            frame = client.take()
            if frame is None:
                wakeup.clear()
                await wakeup.wait()
                continue
            await socket.send_str(frame)
    except (ConnectionResetError, aiohttp.ClientError, RuntimeError):
        pass  # the receive side sees the close and cleans up
