"""sf_bsread_web against a real buffer and source: HTTP queries, ranges, one websocket per client, tokens,
slow clients, a killed service; the product's client (sf_bsread_writer.remote) and a plain aiohttp client
written here, so that the wire contract (docs/web-api.md) is tested independently of the client.

Processes: the simulator (bsread's Sender, mixed profile: every type, a modulo channel) -> the buffer
CLI with --web (which starts sf_bsread_web as its child), or sf_bsread_web standalone. All on
127.0.0.1, free ports; every process is stopped by pid.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp is not installed: the web service cannot run")

from sf_bsread_writer.remote import RemoteBuffer, RemoteError, RemoteTimeout  # noqa: E402
from sf_bsread_writer.tools.simulate import expected_values  # noqa: E402

from .ca_helpers import Feeder  # noqa: E402
from .helpers import Child, children_of, free_port, process_gone, wait_for  # noqa: E402

PROFILE = "mixed"
SCALAR, ARRAY, TEXT, SLOW = "MIXED:FLOAT64", "MIXED:ARRAY", "MIXED:STRING", "MIXED:SLOW"


def _ready(child: Child) -> dict:
    return json.loads(child.wait_for_line("READY {", timeout=60).split("READY", 1)[1])


def _expected(name: str, pulse_id: int):
    return expected_values(PROFILE, pulse_id)[name]


def _http(url: str, token: str | None = None, **params) -> tuple[int, bytes, dict]:
    async def get():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(url, params=params or None, timeout=aiohttp.ClientTimeout(total=60)) as answer:
                return answer.status, await answer.read(), dict(answer.headers)
    return asyncio.run(get())


def _json(url: str, token: str | None = None, **params) -> tuple[int, dict]:
    status, body, _ = _http(url, token, **params)
    return status, json.loads(body)


@pytest.fixture(scope="module")
def stack():
    """simulator -> buffer --web; yields (web base URL, buffer READY document)."""
    simulator = Child.python_module("sf_bsread_writer.tools.simulate", "--profile", PROFILE, "--rate", "50",
                                    "--port", "0")
    buffer = None
    try:
        source = _ready(simulator)["address"]
        buffer = Child.python_module("sf_bsread_writer.buffer", source, "-o", "0", "--replay-port", "0",
                                     "--rest-port", "0", "-b", "400", "--web", "--web-port", "0")
        endpoints = _ready(buffer)
        url = endpoints["web"]  # --web-port 0: the buffer chose the port and says which
        wait_for(lambda: _web_up(url) and _json(url + "/api/v1/channels")[1].get("status") == "ok", timeout=60,
                 interval=0.2, message="the web service's first live values")
        # The first data can come before the first status (the feed keeps 4 messages: a status may be dropped),
        # and until one has come /api/v1/status answers {"state": "error"}: wait for the count, not for the key.
        wait_for(lambda: _json(url + "/api/v1/status")[1].get("look_back", {}).get("messages", 0) >= 100,
                 timeout=30, interval=0.2, message="100 messages in the buffer")
        yield url, endpoints
    finally:
        if buffer is not None:
            buffer.stop()
        simulator.stop()


def _web_up(url: str) -> bool:
    try:
        return _http(url + "/metrics")[0] == 200
    except aiohttp.ClientError:
        return False


# --------------------------------------------------------------------------
# HTTP: status, channels, latest values, ranges
# --------------------------------------------------------------------------
def test_status_channels_and_latest_values_are_what_the_source_sent(stack):
    url, endpoints = stack
    status, document = _json(url + "/api/v1/status")
    assert status == 200 and document["state"] == "ok" and document["status"] == "receiving"
    look_back = document["look_back"]
    assert look_back["pulses"] == look_back["newest_pulse_id"] - look_back["oldest_pulse_id"] + 1
    assert 1.0 < look_back["seconds"] < 20.0  # ~400 messages at 50 Hz at most
    assert document["buffer"]["endpoints"]["web"] == url

    status, listing = _json(url + "/api/v1/channels")
    by_name = {channel["name"]: channel for channel in listing["channels"]}
    assert by_name[SCALAR]["type"] == "float64" and by_name[ARRAY]["shape"] == [16]
    assert by_name["MIXED:INT32_BE"]["encoding"] == "big"
    assert by_name[SLOW]["pulse_id"] % 10 == 0  # a modulo channel: its own last pulse id

    for name in (SCALAR, ARRAY, TEXT, "MIXED:UINT64", "MIXED:INT32_BE", SLOW):
        status, value = _json(url + f"/api/v1/channels/{name}")
        assert status == 200 and value["channel"] == name
        expected = _expected(name, value["pulse_id"])
        if isinstance(expected, str):
            assert value["value"] == expected
        else:
            assert np.array_equal(np.asarray(value["value"]).reshape(expected.shape), expected), name
    status, raw, headers = _http(url + f"/api/v1/channels/{ARRAY}", format="npy")
    array = np.load(io.BytesIO(raw))
    np.testing.assert_array_equal(array, _expected(ARRAY, int(headers["X-Pulse-Id"])))
    status, missing = _json(url + "/api/v1/channels/NOPE:X")
    assert status == 404 and "GET /api/v1/channels lists them" in missing["status"]


def test_a_past_range_as_json_npz_and_hdf5_equals_the_source(stack, tmp_path):
    import h5py

    url, _ = stack
    _, status = _json(url + "/api/v1/status")
    newest = status["look_back"]["newest_pulse_id"]
    start, stop = newest - 40, newest - 11  # 30 pulses, SLOW present in 3 of them
    names = f"{SCALAR},{ARRAY},{TEXT},{SLOW}"
    code, document = _json(url + "/api/v1/range", channels=names, start_pulse_id=str(start), stop_pulse_id=str(stop))
    assert code == 200 and document["status"] == "complete" and document["missing"] == []
    columns = document["channels"]
    assert columns[SCALAR]["pulse_id"] == list(range(start, stop + 1))
    for row, pulse_id in enumerate(range(start, stop + 1)):
        assert columns[SCALAR]["data"][row] == _expected(SCALAR, pulse_id)[0]
        assert columns[ARRAY]["data"][row] == _expected(ARRAY, pulse_id).tolist()
        assert columns[TEXT]["data"][row] == _expected(TEXT, pulse_id)
        assert columns[SLOW]["is_data_present"][row] == (pulse_id % 10 == 0)

    code, raw, _ = _http(url + "/api/v1/range", channels=names, start_pulse_id=str(start),
                         stop_pulse_id=str(stop), format="npz")
    archive = np.load(io.BytesIO(raw))
    assert archive[f"{ARRAY}/data"].shape == (30, 16) and json.loads(str(archive["missing"])) == []
    np.testing.assert_array_equal(archive[f"{ARRAY}/data"][5], _expected(ARRAY, start + 5))
    assert archive[f"{SLOW}/is_data_present"].sum() == 3

    temporary = Path(os.environ.get("TMPDIR", "/tmp"))
    before = set(temporary.glob("sf_bsread_range-*"))
    code, raw, headers = _http(url + "/api/v1/range", channels=names, start_pulse_id=str(start),
                               stop_pulse_id=str(stop), format="hdf5")
    assert code == 200 and headers["Content-Type"] == "application/x-hdf5"
    (tmp_path / "range.h5").write_bytes(raw)
    with h5py.File(tmp_path / "range.h5", "r") as h5:  # the writer's own layout
        assert sorted(h5["data"]) == sorted(names.split(","))
        assert h5["data"][SCALAR]["pulse_id"][:].tolist() == list(range(start, stop + 1))
        np.testing.assert_array_equal(h5["data"][ARRAY]["data"][7], _expected(ARRAY, start + 7))
        assert h5.attrs["outcome"] == "complete"
    assert set(temporary.glob("sf_bsread_range-*")) == before  # the service removed its file after sending it


def test_evicted_pulses_and_bad_ranges_are_answered_with_what_to_fix(stack):
    url, _ = stack
    _, status = _json(url + "/api/v1/status")
    oldest = status["look_back"]["oldest_pulse_id"]
    code, document = _json(url + "/api/v1/range", channels=SCALAR, start_pulse_id=str(oldest - 100),
                           stop_pulse_id=str(oldest + 4))
    assert code == 200 and document["status"] == "partial"
    gap = document["missing"][0]
    assert gap["reason"] == "before_buffer" and gap["first_pulse_id"] == oldest - 100
    assert document["channels"][SCALAR]["pulse_id"][0] >= oldest
    for params, code, text in (({}, 400, "channels=A,B is required"),
                               ({"channels": SCALAR, "start_pulse_id": "1"}, 400, "both"),
                               ({"channels": SCALAR, "start_pulse_id": "0", "stop_pulse_id": "10000000"}, 413,
                                "at most 100000"),
                               ({"channels": SCALAR, "start_time": "x", "stop_time": "1"}, 400, "seconds")):
        answer_code, answer = _json(url + "/api/v1/range", **params)
        assert answer_code == code and answer["state"] == "error" and text in answer["status"], answer
    code, answer = _json(url + "/api/v1/nowhere")
    assert code == 404 and "/api/v1/range" in answer["status"]


# --------------------------------------------------------------------------
# The websocket, with a plain aiohttp client: the wire contract
# --------------------------------------------------------------------------
def test_websocket_contract_with_a_plain_client(stack):
    url, _ = stack

    async def scenario():
        frames = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url + "/api/v1/ws") as ws:
                await ws.send_json({"op": "subscribe", "channels": [SCALAR, ARRAY, SLOW], "max_rate": 5})
                await ws.send_str("not json")
                await ws.send_json({"op": "dance"})
                await ws.send_json({"op": "subscribe", "channels": "not a list"})
                await ws.send_json({"op": "ping"})
                started = time.monotonic()
                while time.monotonic() - started < 3.0:
                    frames.append(await ws.receive_json(timeout=5))
                await ws.send_json({"op": "unsubscribe", "channels": [SCALAR, ARRAY, SLOW]})
                later = []
                try:
                    while True:
                        later.append(await ws.receive_json(timeout=1.0))
                except asyncio.TimeoutError:
                    pass
        return frames, later

    frames, later = asyncio.run(scenario())
    kinds = [frame["type"] for frame in frames]
    assert kinds[0] == "subscribed" and "pong" in kinds
    errors = [frame["status"] for frame in frames if frame["type"] == "error"]
    assert len(errors) == 3 and "not JSON" in errors[0] and "dance" in errors[1] and "non-empty list" in errors[2]
    values = [message for frame in frames if frame["type"] == "batch" for message in frame["messages"]]
    by_channel: dict[str, list[dict]] = {}
    for value in values:
        assert value["type"] == "value"
        by_channel.setdefault(value["channel"], []).append(value)
        expected = _expected(value["channel"], value["pulse_id"])
        assert np.array_equal(np.asarray(value["value"]).reshape(expected.shape), expected)
    # 5 per second asked, the buffer feeds 10: ~15 in 3 s, plus the latest value at subscription.
    assert 10 <= len(by_channel[SCALAR]) <= 20, len(by_channel[SCALAR])
    # A channel sent every 10th pulse gets through the rate-limited feed (SparseAwareGrid): 5 a second come.
    assert len(by_channel[SLOW]) >= 5 and all(value["pulse_id"] % 10 == 0 for value in by_channel[SLOW])
    assert [frame for frame in later if frame["type"] == "batch"][1:] == []  # at most one in flight


def test_tokens_sighup_and_a_non_loopback_bind(tmp_path):
    tokens = tmp_path / "tokens"
    first, second = "a" * 24, "b" * 24
    tokens.write_text(f"# operators\n{first}\n", encoding="utf-8")
    feed = _pub_feed()
    port = free_port()
    web = Child.python_module("sf_bsread_writer.web", feed.address, "--status-url", "http://127.0.0.1:9",
                              "--replay", "tcp://127.0.0.1:9", "--port", str(port), "--tokens", str(tokens))
    try:
        assert _ready(web)["tokens"] is True
        base = f"http://127.0.0.1:{port}"
        for token in (None, "wrong" * 5):
            code, answer = _json(base + "/api/v1/channels", token)
            assert code == 401 and answer == {"state": "error", "status": answer["status"]}
            assert _json(base + "/api/v1/nowhere", token)[0] == 401  # not even whether a path exists
        assert _json(base + "/api/v1/channels", first)[0] == 200
        assert _http(base + "/metrics", token=None)[0] == 401
        assert _ws_status(base + f"/api/v1/ws?token={first}") == "ok"
        assert _ws_status(base + "/api/v1/ws?token=nope") == 401

        tokens.write_text(f"{second}\n", encoding="utf-8")
        web.signal(signal.SIGHUP)
        wait_for(lambda: _json(base + "/api/v1/channels", second)[0] == 200, timeout=10, interval=0.1,
                 message="the new token after SIGHUP")
        assert _json(base + "/api/v1/channels", first)[0] == 401
        metrics = _http(base + "/metrics", second)[1].decode()
        assert _metric(metrics, "sf_bsread_web_unauthorized_requests_total") >= 6
    finally:
        web.stop()
        feed.close()
    exposed = Child.python_module("sf_bsread_writer.web", "tcp://127.0.0.1:9", "--status-url", "http://x",
                                  "--replay", "tcp://127.0.0.1:9", "--bind", "0.0.0.0", "--port", "0")
    assert exposed.wait(30) == 2 and "give --tokens" in exposed.output()


def _ws_status(url: str):
    async def connect():
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url) as ws:
                    await ws.send_json({"op": "ping"})
                    return "ok" if (await ws.receive_json(timeout=5))["type"] == "pong" else "?"
            except aiohttp.WSServerHandshakeError as error:
                return error.status
    return asyncio.run(connect())


def _pub_feed(n_channels: int = 20, rate: float = 50.0) -> Feeder:
    """A bsread PUB source in this process for the standalone service: float64 channels CH0000, CH0001, ..."""
    channels = [{"name": f"CH{i:04d}", "type": "float64"} for i in range(n_channels)]
    return Feeder(channels, lambda pulse_id: [pulse_id + i / 1000 for i in range(n_channels)], rate=rate)


# The web service with websocket pings every 10 minutes instead of 10 s: a client that never reads never
# answers a ping either (the ping waits behind the data it does not read), and on a loaded machine the 10 s
# heartbeat closed it before its drop count arrived. What is measured here is the drop count and the memory
# of a connected client that does not read; the heartbeat has its own contract (docs/web-api.md).
_WEB_WITH_SLOW_HEARTBEAT = ("import functools, sys; from sf_bsread_writer.web import service; "
                            "service.WebSettings = functools.partial(service.WebSettings, heartbeat_seconds=600.0); "
                            "sys.exit(service.main(sys.argv[1:]))")


def test_a_client_that_stops_reading_costs_bounded_memory_and_its_drops_are_counted():
    feed = _pub_feed(n_channels=2000, rate=50.0)  # ~170 kB of JSON per frame, 10 frames a second
    port = free_port()
    web = Child([sys.executable, "-c", _WEB_WITH_SLOW_HEARTBEAT, feed.address, "--status-url", "http://127.0.0.1:9",
                 "--replay", "tcp://127.0.0.1:9", "--port", str(port)])
    sock = None
    try:
        _ready(web)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _json(base + "/api/v1/channels")[1]["status"] == "ok", timeout=30, interval=0.1,
                 message="live values")
        sock = _raw_websocket(port, {"op": "subscribe", "channels": [f"CH{i:04d}" for i in range(2000)]})
        rss = []

        def dropped() -> int:
            text = _http(base + "/metrics")[1].decode()
            rss.append(_rss_kb(web.process.pid))
            return int(_metric(text, "sf_bsread_web_values_dropped_total"))

        wait_for(lambda: dropped() > 20_000, timeout=60, interval=0.5, message="values dropped for the slow client")
        settled = rss[-1]
        wait_for(lambda: dropped() > 60_000, timeout=60, interval=0.5, message="more values dropped")
        assert rss[-1] < settled + 30_000, rss  # kB: the queue is bounded, not the client's backlog
        metrics = _http(base + "/metrics")[1].decode()
        assert _metric(metrics, "sf_bsread_web_clients") == 1  # counted on a client still connected
        assert _metric(metrics, "sf_bsread_web_clients_dropped_total") == 0
    finally:
        if sock is not None:
            sock.close()
        web.stop()
        feed.close()


def _metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics:\n{text}")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _raw_websocket(port: int, request: dict) -> socket.socket:
    """A websocket client that subscribes and then never reads (tiny receive buffer)."""
    import base64

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /api/v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(1)
    assert b" 101 " in answer.split(b"\r\n")[0], answer
    payload = json.dumps(request).encode()
    mask = os.urandom(4)
    header = bytes([0x81]) + (bytes([0x80 | 126]) + len(payload).to_bytes(2, "big") if len(payload) > 125
                              else bytes([0x80 | len(payload)]))
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


# --------------------------------------------------------------------------
# The product's client
# --------------------------------------------------------------------------
def test_remote_client_reads_what_the_source_sent(stack):
    url, _ = stack
    remote = RemoteBuffer(url, timeout=20)
    status = remote.status()
    assert status["status"] == "receiving" and status["look_back"]["pulses"] > 0
    assert SCALAR in {channel["name"] for channel in remote.channels()}
    value = remote.get(ARRAY)
    np.testing.assert_array_equal(value.value, _expected(ARRAY, value.pulse_id))
    newest = status["look_back"]["newest_pulse_id"]
    data = remote.range([SCALAR, SLOW, TEXT], start_pulse_id=newest - 30, stop_pulse_id=newest - 1)
    assert data.complete
    scalar = data.channels[SCALAR]
    assert scalar.pulse_id.tolist() == list(range(newest - 30, newest))
    assert scalar.data[:, 0].tolist() == [_expected(SCALAR, p)[0] for p in range(newest - 30, newest)]
    assert data.channels[SLOW].is_data_present.sum() == 3
    assert data.channels[TEXT].data[0] == _expected(TEXT, newest - 30)

    try:
        new = remote.wait_until_new(SCALAR, timeout=10)
        assert new.pulse_id > value.pulse_id
        with pytest.raises(RemoteError) as error:
            remote.get("NOPE")
        assert error.value.http_status == 404
        seen = []

        def call_back_into_the_client(value):
            try:
                remote.status()
            except RuntimeError as error:
                seen.append(str(error))

        handle = remote.subscribe([SCALAR], call_back_into_the_client, max_rate=5)
        wait_for(lambda: seen, timeout=10, interval=0.05, message="a callback's call refused")
        assert "would wait for itself" in seen[0]
        handle.close()
    finally:
        remote.close()


def test_one_websocket_per_process_and_url_and_one_upstream_subscription_per_channel(stack):
    url, _ = stack
    first, second = RemoteBuffer(url, timeout=20), RemoteBuffer(url, timeout=20)
    got_a, got_b = [], []
    a = first.subscribe([SCALAR], got_a.append, max_rate=2)
    b = second.subscribe([SCALAR, ARRAY], got_b.append)
    try:
        wait_for(lambda: len(got_a) >= 3 and len({v.channel for v in got_b}) == 2, timeout=20, interval=0.1,
                 message="values on both subscriptions")
        metrics = _http(url + "/metrics")[1].decode()
        assert _metric(metrics, "sf_bsread_web_clients") == 1  # both share one socket
        assert _metric(metrics, "sf_bsread_web_subscriptions") == 2  # SCALAR once, ARRAY once
        for value in got_b[-5:]:
            expected = _expected(value.channel, value.pulse_id)
            assert np.array_equal(np.asarray(value.value).reshape(expected.shape), expected)
        stamps = [v.pulse_id for v in got_a]
        assert stamps == sorted(stamps)
        assert a.connected and b.connected
    finally:
        a.close()
        b.close()
        first.close()


def test_calls_time_out_with_a_clear_error():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts TCP, never answers HTTP
    try:
        remote = RemoteBuffer(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        started = time.monotonic()
        with pytest.raises(RemoteTimeout, match="within 1 s"):
            remote.status()
        assert time.monotonic() - started < 5
    finally:
        silent.close()
    with pytest.raises(RemoteError):
        RemoteBuffer(f"http://127.0.0.1:{free_port()}", timeout=2).channels()


def test_a_client_that_leaves_during_a_large_answer_is_no_error(caplog):
    """A cancelled download (a browser tab closed mid-range) must not log an error with a traceback:
    operators alert on errors. The answer is sent by the range handler's own _send_body."""
    import logging

    from aiohttp import web

    from sf_bsread_writer.web import app as web_app

    finished = []

    async def handler(request):
        response = await web_app._send_body(request, b"x" * (64 << 20), {"Content-Type": "application/json"})
        finished.append(True)
        return response

    async def scenario():
        application = web.Application()
        application.router.add_get("/", handler)
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await reader.read(100_000)
            writer.transport.abort()  # gone mid-answer
            deadline = time.monotonic() + 10
            while not finished and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(scenario())
    assert finished == [True]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_the_async_client_never_hands_a_finished_loops_socket_to_a_new_loop():
    """One shared websocket per (event loop, URL): a script that calls asyncio.run() again and again
    must neither collect the sockets of finished loops nor get one of them back (a new loop can
    reuse a finished one's id())."""
    from sf_bsread_writer import remote
    from sf_bsread_writer.remote import AsyncRemoteBuffer

    url = f"http://127.0.0.1:{free_port()}"  # nothing is sent: the socket connects lazily
    before = len(remote._SOCKETS)

    async def use() -> None:
        shared = AsyncRemoteBuffer(url)._shared()
        assert shared.loop is asyncio.get_running_loop() and AsyncRemoteBuffer(url)._shared() is shared

    for _ in range(20):
        asyncio.run(use())
    assert len(remote._SOCKETS) <= before + 1  # at most the last loop's, until the next use


def test_a_killed_service_the_client_reconnects_and_its_subscription_resumes():
    feed = _pub_feed(n_channels=5, rate=20.0)
    port = free_port()
    command = ["sf_bsread_writer.web", feed.address, "--status-url", "http://127.0.0.1:9", "--replay",
               "tcp://127.0.0.1:9", "--port", str(port)]
    web = Child.python_module(*command)
    remote = handle = None
    try:
        _ready(web)
        remote = RemoteBuffer(f"http://127.0.0.1:{port}", timeout=20)
        values = []
        handle = remote.subscribe(["CH0001"], values.append, max_rate=5)
        wait_for(lambda: len(values) >= 3, timeout=20, interval=0.05, message="values before the kill")
        web.process.kill()
        web.wait(10)
        wait_for(lambda: not remote.connected, timeout=15, interval=0.05, message="the client sees the loss")
        before = values[-1].pulse_id
        web = Child.python_module(*command)
        _ready(web)
        wait_for(lambda: values[-1].pulse_id > before, timeout=30, interval=0.05,
                 message="values again after the service's restart")
        assert remote.connected and remote.reconnects >= 1 and handle.reconnects >= 1
    finally:
        if handle is not None:
            handle.close()
        if remote is not None:
            remote.close()
        web.stop()
        feed.close()



def test_sighup_reaches_the_web_service_through_the_buffer_and_a_stop_is_quick(tmp_path):
    tokens = tmp_path / "tokens"
    first, second = "c" * 24, "d" * 24
    tokens.write_text(first + "\n", encoding="utf-8")
    feed = _pub_feed(n_channels=3, rate=20.0)
    port = free_port()
    buffer = Child.python_module("sf_bsread_writer.buffer", feed.address, "--source-mode", "sub", "-o", "0",
                                 "--replay-port", "0", "--rest-port", "0", "--web", "--web-port", str(port),
                                 "--web-tokens", str(tokens))
    try:
        _ready(buffer)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _web_up_with(base, first), timeout=60, interval=0.2, message="the web service")
        tokens.write_text(second + "\n", encoding="utf-8")
        buffer.signal(signal.SIGHUP)
        wait_for(lambda: _web_up_with(base, second), timeout=20, interval=0.1, message="the new token")
        assert buffer.process.poll() is None and _json(base + "/api/v1/channels", first)[0] == 401

        async def open_socket_then_stop():
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {second}"}) as session:
                async with session.ws_connect(base + "/api/v1/ws") as ws:
                    await ws.send_json({"op": "subscribe", "channels": ["CH0001"]})
                    await ws.receive_json(timeout=10)
                    started = time.monotonic()
                    buffer.signal(signal.SIGTERM)
                    while True:  # values until the service says GOING_AWAY; it does not hang
                        closing = await ws.receive(timeout=15)
                        if closing.type != aiohttp.WSMsgType.TEXT:
                            return closing.type, time.monotonic() - started
        kind, seconds = asyncio.run(open_socket_then_stop())
        assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert buffer.wait(20) == 0 and seconds < 5
    finally:
        buffer.stop()
        feed.close()
    exposed = Child.python_module("sf_bsread_writer.buffer", "tcp://127.0.0.1:9", "--web", "--web-bind", "0.0.0.0")
    assert exposed.wait(30) == 2 and "--web-tokens" in exposed.output()


def test_the_web_port_stays_the_buffers_while_its_service_restarts():
    """The buffer listens on the web port itself and hands the socket to each web service it starts: a
    killed service is replaced on the same port, which nobody else can take meanwhile (the port the buffer
    names is never one it merely saw free); a port already taken is a clear error at start."""
    feed = _pub_feed(n_channels=3, rate=20.0)
    buffer = Child.python_module("sf_bsread_writer.buffer", feed.address, "--source-mode", "sub", "-o", "0",
                                 "--replay-port", "0", "--rest-port", "0", "--web", "--web-port", "0")
    try:
        url = _ready(buffer)["web"]
        port = int(url.rsplit(":", 1)[1])
        wait_for(lambda: _web_up(url), timeout=60, interval=0.2, message="the web service")
        [web_pid] = children_of(buffer.process.pid, "sf_bsread_writer.web")
        os.kill(web_pid, signal.SIGKILL)
        wait_for(lambda: process_gone(web_pid), timeout=10, interval=0.05, message="the web service gone")
        with socket.socket() as intruder, pytest.raises(OSError):
            intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not a listener
            intruder.bind(("127.0.0.1", port))  # another process cannot take the port in the gap
            intruder.listen(1)
        wait_for(lambda: _web_up(url), timeout=60, interval=0.2, message="the web service back on its port")
        assert children_of(buffer.process.pid, "sf_bsread_writer.web") != [web_pid]
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = taken.getsockname()[1]
            second = Child.python_module("sf_bsread_writer.buffer", feed.address, "--source-mode", "sub", "-o", "0",
                                         "--replay-port", "0", "--rest-port", "0", "--web", "--web-port", str(busy))
            try:
                # a port in use is a configuration error: 2, which the unit never restarts (process.ExitCode)
                assert second.wait(30) == 2 and f"{busy}" in second.output() and "in use" in second.output()
            finally:
                second.stop()
    finally:
        buffer.stop()
        feed.close()


def _web_up_with(base: str, token: str) -> bool:
    try:
        return _http(base + "/api/v1/channels", token)[0] == 200
    except aiohttp.ClientError:
        return False
