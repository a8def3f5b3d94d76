"""sf_bsread_web under hostile input: every endpoint and the websocket answer a 4xx JSON that says what to fix,
at once (no range slot held), with nothing in the log but a line; a misspelt channel is named.

One real stack for the module: the simulator (bsread's Sender) -> the buffer with --web, tokens and
--web-allow-origin (so the pass-through to the web child is tested too); raw sockets where a client
library would refuse to send the bytes. The web child's log goes to the buffer's output, which the
last test reads for tracebacks.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp is not installed: the web service cannot run")

from .helpers import Child, wait_for  # noqa: E402

TOKEN = "edge-token-0123456789abcdef"
SCALAR, ARRAY = "MIXED:FLOAT64", "MIXED:ARRAY"
GOOD_ORIGIN, OTHER_ORIGIN = "http://good.example", "https://other.example:8443"


def _ready(child: Child) -> dict:
    return json.loads(child.wait_for_line("READY {", timeout=60).split("READY", 1)[1])


def _raw(port: int, request: bytes, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request as raw bytes (Connection: close); (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b" 101 " in answer.split(b"\r\n", 1)[0]:
                break  # a websocket upgrade: the connection stays open
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _get(port: int, target: str, headers: dict[str, bytes] | None = None, token: bool = True) -> tuple[int, dict,
                                                                                                       bytes]:
    lines = [f"GET {target} HTTP/1.1".encode(), f"Host: 127.0.0.1:{port}".encode(), b"Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {TOKEN}".encode())
    for name, value in (headers or {}).items():
        lines.append(name.encode() + b": " + value)
    return _raw(port, b"\r\n".join(lines) + b"\r\n\r\n")


def _ws_upgrade(port: int, target: str, headers: dict[str, bytes]) -> tuple[int, dict, bytes]:
    key = base64.b64encode(os.urandom(16))
    return _get(port, target, {"Upgrade": b"websocket", "Connection": b"Upgrade", "Sec-WebSocket-Key": key,
                               "Sec-WebSocket-Version": b"13", **headers}, token=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """simulator -> buffer --web (tokens, an origin allow-list); yields (port, web URL, buffer child)."""
    tokens = tmp_path_factory.mktemp("edges") / "tokens"
    tokens.write_text(TOKEN + "\n", encoding="utf-8")
    simulator = Child.python_module("sf_bsread_writer.tools.simulate", "--profile", "mixed", "--rate", "50",
                                    "--port", "0")
    buffer = None
    try:
        source = _ready(simulator)["address"]
        buffer = Child.python_module("sf_bsread_writer.buffer", source, "-o", "0", "--replay-port", "0",
                                     "--rest-port", "0", "-b", "400", "--web", "--web-port", "0",
                                     "--web-tokens", str(tokens), "--web-allow-origin", GOOD_ORIGIN,
                                     "--web-allow-origin", f"http://unused.example,{OTHER_ORIGIN}")
        url = _ready(buffer)["web"]
        port = int(url.rsplit(":", 1)[1])

        def channels_known() -> bool:
            try:
                code, _, body = _get(port, "/api/v1/channels")
            except OSError:
                return False
            return code == 200 and json.loads(body)["status"] == "ok"

        wait_for(channels_known, timeout=60, interval=0.2, message="the web service's first live values")
        wait_for(lambda: json.loads(_get(port, "/api/v1/status")[2])["look_back"]["messages"] >= 100,
                 timeout=30, interval=0.2, message="100 messages in the buffer")
        yield port, url, buffer
    finally:
        if buffer is not None:
            buffer.stop()
        simulator.stop()


def _newest(port: int) -> int:
    return json.loads(_get(port, "/api/v1/status")[2])["look_back"]["newest_pulse_id"]


def _error_answer(code: int, body: bytes) -> dict:
    document = json.loads(body)
    assert 400 <= code < 500 and document["state"] == "error" and document["status"], (code, document)
    return document


# --------------------------------------------------------------------------
# GET /api/v1/range: every parameter, hostile
# --------------------------------------------------------------------------
HUGE = "9" * 3000  # two of them fit in a request line (aiohttp answers longer lines itself, in text)
RANGE_CASES = [  # (query string, answer code, words of the answer)
    ("channels=A&start_pulse_id=9223372036854775808&stop_pulse_id=9223372036854775808", 400, "2**63"),
    ("channels=A&start_pulse_id=18446744073709551615&stop_pulse_id=18446744073709551615", 400, "2**63"),
    ("channels=A&start_pulse_id=9223372036854775807&stop_pulse_id=9223372036854775807", 400, "after the newest"),
    (f"channels=A&start_pulse_id={HUGE}&stop_pulse_id={HUGE}", 400, "start_pulse_id"),
    ("channels=A&start_pulse_id=-5&stop_pulse_id=5", 400, "start_pulse_id"),
    ("channels=A&start_pulse_id=1e3&stop_pulse_id=2000", 400, "start_pulse_id"),
    ("channels=A&start_pulse_id=0x10&stop_pulse_id=20", 400, "start_pulse_id"),
    ("channels=A&start_pulse_id=%201&stop_pulse_id=2", 400, "start_pulse_id"),
    ("channels=A&start_pulse_id=1_000&stop_pulse_id=2000", 400, "start_pulse_id"),
    ("channels=A&start_pulse_id=%D9%A1&stop_pulse_id=%D9%A2", 400, "start_pulse_id"),  # Arabic-Indic digits
    ("channels=A&start_pulse_id=%FF%FE&stop_pulse_id=2", 400, "start_pulse_id"),
    ("channels=A&start_pulse_id=1&stop_pulse_id=2&start_pulse_id=3", 400, "more than once"),
    ("channels=A&start_time=1e300&stop_time=1e300", 400, "future"),
    ("channels=A&start_time=inf&stop_time=inf", 400, "start_time"),
    ("channels=A&start_time=nan&stop_time=1", 400, "start_time"),
    ("channels=A&start_time=-1&stop_time=1", 400, "start_time"),
    (f"channels=A&start_time={HUGE}&stop_time={HUGE}", 400, "start_time"),
    ("channels=A&start_time=1&stop_time=2&format=%FF", 400, "format"),
    ("channels=A&start_time=1&stop_time=2&format=csv", 400, "format"),
    ("channels=A&start_time=1&stop_time=2&fromat=npz", 400, "fromat"),
    ("channels=%2C%2C&start_time=1&stop_time=2", 400, "channels"),
    (f"channels={'X' * 300}&start_time=1&stop_time=2", 400, "256"),
    ("channels=" + ",".join(f"C{i}" for i in range(1001)) + "&start_time=1&stop_time=2", 413, "1000"),
]


@pytest.mark.parametrize("query,code,words", RANGE_CASES, ids=[case[0][:60] for case in RANGE_CASES])
def test_a_hostile_range_is_refused_at_once_with_what_to_fix(stack, query, code, words):
    port, _, _ = stack
    started = time.monotonic()
    answer_code, _, body = _get(port, "/api/v1/range?" + query)
    assert time.monotonic() - started < 5.0  # refused before any replay: no slot held
    document = _error_answer(answer_code, body)
    assert answer_code == code and words in document["status"], document


def test_hostile_ranges_hold_no_slot(stack):
    """Both range slots' worth of hostile ranges at once, then valid ranges are served (not 503)."""
    port, _, _ = stack

    async def scenario():
        loop = asyncio.get_running_loop()
        hostile = [loop.run_in_executor(None, _get, port, "/api/v1/range?" + query) for query, _, _ in RANGE_CASES[:3]]
        answers = await asyncio.gather(*hostile)
        newest = _newest(port)
        valid = f"/api/v1/range?channels={SCALAR}&start_pulse_id={newest - 20}&stop_pulse_id={newest - 11}"
        good = await asyncio.gather(*[loop.run_in_executor(None, _get, port, valid) for _ in range(2)])
        return answers, good

    answers, good = asyncio.run(scenario())
    assert all(code == 400 for code, _, _ in answers)
    assert [code for code, _, _ in good] == [200, 200], [body[:200] for _, _, body in good]


def test_a_misspelt_channel_is_named(stack):
    port, _, _ = stack
    newest = _newest(port)
    span = f"start_pulse_id={newest - 20}&stop_pulse_id={newest - 11}"
    for fmt in ("json", "npz", "hdf5"):
        code, _, body = _get(port, f"/api/v1/range?channels=NOPE:ONE,NOPE:TWO&{span}&format={fmt}")
        document = _error_answer(code, body)
        assert code == 404 and document["unknown"] == ["NOPE:ONE", "NOPE:TWO"] and "NOPE:ONE" in document["status"]
    code, headers, body = _get(port, f"/api/v1/range?channels={SCALAR},NOPE:ONE&{span}")
    document = json.loads(body)
    assert code == 200 and document["unknown"] == ["NOPE:ONE"] and list(document["channels"]) == [SCALAR]
    assert len(document["channels"][SCALAR]["pulse_id"]) == 10 and document["status"] == "partial"
    code, headers, body = _get(port, f"/api/v1/range?channels={SCALAR}&{span}")
    assert code == 200 and json.loads(body)["unknown"] == [] and json.loads(body)["status"] == "complete"
    for fmt in ("npz", "hdf5"):
        code, headers, body = _get(port, f"/api/v1/range?channels={SCALAR},NOPE:ONE&{span}&format={fmt}")
        assert code == 200 and json.loads(headers["x-unknown-channels"]) == ["NOPE:ONE"]
        assert headers["x-unknown-channels-count"] == "1"


# --------------------------------------------------------------------------
# Headers: non-ASCII and binary in every header the service reads; the channel path and format
# --------------------------------------------------------------------------
PATHS = ["/api/v1/status", "/api/v1/channels", f"/api/v1/channels/{SCALAR}", "/api/v1/range?channels=A",
         "/metrics", "/api/v1/ws", "/api/v1/nowhere"]


@pytest.mark.parametrize("value", ["Bearer tökén".encode("utf-8"), b"Bearer \xff\xfe\x80", b"\xc3\x28 x",
                                   b"Bearer " + bytes(range(0x80, 0x100))])
def test_non_ascii_and_binary_authorization_is_401_on_every_path(stack, value):
    port, _, _ = stack
    for path in PATHS:
        code, headers, body = _get(port, path, {"Authorization": value}, token=False)
        document = _error_answer(code, body)
        assert code == 401 and "unauthorized" in document["status"], (path, document)


def test_hostile_tokens_paths_and_formats_in_the_url(stack):
    port, _, _ = stack
    for target in ("/api/v1/status?token=%FF%FE", "/api/v1/status?token=" + "x" * 8000,
                   "/api/v1/status?token=t%C3%B6k%C3%A9n%00"):
        code, _, body = _get(port, target, token=False)
        assert _error_answer(code, body) and code == 401
    for target, expected in ((f"/api/v1/channels/{SCALAR}?format=%FF", 400), (f"/api/v1/channels/{SCALAR}?format=", 400),
                             ("/api/v1/channels/%FF%FE", 404), ("/api/v1/channels/" + "N" * 4000, 404),
                             (f"/api/v1/channels/{SCALAR}?format=json&format=npy", 400)):
        code, _, body = _get(port, target)
        assert code == expected, (target, body[:300])
        _error_answer(code, body)


# --------------------------------------------------------------------------
# The websocket: origin, deep and huge JSON, wrong types, unknown names
# --------------------------------------------------------------------------
def test_a_websocket_from_another_sites_page_is_refused(stack):
    port, _, _ = stack
    for origin in (b"http://evil.example", b"null", b"http://good.example.evil.example", b"http://g\xc3\xb6od.example",
                   b"\xff\xfe", b"https://good.example"):
        code, _, body = _ws_upgrade(port, f"/api/v1/ws?token={TOKEN}", {"Origin": origin})
        document = _error_answer(code, body)
        assert code == 403 and "--web-allow-origin" in document["status"], (origin, document)
    for origin in (GOOD_ORIGIN.encode(), OTHER_ORIGIN.encode(), f"http://127.0.0.1:{port}".encode(), None):
        code, _, _ = _ws_upgrade(port, f"/api/v1/ws?token={TOKEN}", {"Origin": origin} if origin else {})
        assert code == 101, origin


def test_origins_are_parsed_and_compared_as_browsers_send_them():
    from sf_bsread_writer.config import parse_origins
    from sf_bsread_writer.web.auth import origin_allowed

    allowed = parse_origins(["HTTPS://Status.Example.org/", "http://a.example:8080, http://b.example"])
    assert allowed == ("https://status.example.org", "http://a.example:8080", "http://b.example")
    for bad in ("*", "status.example.org", "ftp://x", "https://x/path", "http://x y"):
        with pytest.raises(ValueError, match="not an origin"):
            parse_origins([bad])
    own = "http://127.0.0.1:8891"
    assert origin_allowed(None, own, ()) and origin_allowed("http://127.0.0.1:8891", own, ())
    assert origin_allowed("https://STATUS.example.org", own, allowed)
    for refused in ("null", "", "http://evil.example", "http://127.0.0.1:8892", "https://status.example.org.evil"):
        assert not origin_allowed(refused, own, allowed), refused


def test_a_bad_allow_origin_stops_the_service_with_a_usage_error():
    web = Child.python_module("sf_bsread_writer.web", "tcp://127.0.0.1:9", "--status-url", "http://127.0.0.1:9",
                              "--replay", "tcp://127.0.0.1:9", "--port", "0", "--allow-origin", "*")
    assert web.wait(30) == 2 and "not an origin" in web.output()


def _ws_exchange(url: str, messages: list, answers: int) -> list[dict]:
    async def scenario():
        received = []
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            async with session.ws_connect(url + "/api/v1/ws") as ws:
                for message in messages:
                    await ws.send_str(message)
                while len(received) < answers:
                    frame = await ws.receive_json(timeout=10)
                    if frame["type"] != "batch":
                        received.append(frame)
        return received
    return asyncio.run(scenario())


WS_CASES = [  # (text sent, words of the error answer)
    ("[" * 32000 + "]" * 32000, "nested"),
    ('{"op": "subscribe", "channels": ' + "[" * 20 + "]" * 20 + "}", "nested"),
    ("NaN", "not JSON"),
    ('{"op": "subscribe", "channels": ["A"], "max_rate": 1e999}', "max_rate"),
    ('{"op": "subscribe", "channels": ["A"], "max_rate": ' + "9" * 400 + "}", "max_rate"),
    ('{"op": "subscribe", "channels": ["A"], "max_rate": -1}', "max_rate"),
    ('{"op": "subscribe", "channels": ["A"], "max_rate": "fast"}', "max_rate"),
    ('{"op": "subscribe", "channels": [1, 2]}', "channel names"),
    ('{"op": "subscribe", "channels": ["' + "C" * 300 + '"]}', "channel names"),
    ('{"op": "subscribe", "channels": {"A": 1}}', "non-empty list"),
    ('{"op": "unsubscribe", "channels": null}', "non-empty list"),
    ('{"op": 5}', "op"),
    ('{"op": ["subscribe"]}', "op"),
    ('["subscribe"]', "op"),
    ('{"op": "status", "subscribe": "no"}', "true or false"),
    ('{"op": "ping", "extra": ' + "9" * 5000 + "}", "not JSON"),
]


def test_hostile_websocket_messages_get_error_answers_and_the_socket_stays(stack):
    _, url, _ = stack
    texts = [text for text, _ in WS_CASES] + ['{"op": "ping"}']
    answers = _ws_exchange(url, texts, len(texts))
    for (text, words), answer in zip(WS_CASES, answers):
        assert answer["type"] == "error" and words in answer["status"], (text[:80], answer)
    assert answers[-1]["type"] == "pong"


def test_a_subscription_names_the_unknown_channels(stack):
    _, url, _ = stack
    answers = _ws_exchange(url, [json.dumps({"op": "subscribe", "channels": [SCALAR, "NOPE:X", ARRAY, "NOPE:Y"]})], 1)
    assert answers[0] == {"type": "subscribed", "channels": [SCALAR, "NOPE:X", ARRAY, "NOPE:Y"],
                          "unknown": ["NOPE:X", "NOPE:Y"]}


def test_zz_nothing_above_left_a_traceback_in_the_log(stack):
    _, _, buffer = stack
    log = buffer.output()
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
