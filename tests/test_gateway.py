"""The CA gateway (its one server: EPICS records in a pythonSoftIOC process) with real CA clients.

caproto's threading client, pyepics (libca) and EPICS base's tools; the
record-specific checks (fields, access security, channel set changes) are in
tests/test_gateway_ioc.py, the pure decisions in tests/test_gateway_policy.py.

All on loopback with free ports (tests/ca_helpers.py). A bsread PUB socket in
the test process feeds the gateway messages built with protocol.build_message,
so every type and every change of the channel set is exact and deterministic.
"""
from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest

from sf_bsread_writer.buffer import children
from sf_bsread_writer.ca.environment import prepare_server_environment

from .ca_helpers import (
    T0,
    CaprotoClient,
    Feeder,
    Tool,
    ca_env,
    pulse_of,
    run_pyepics,
    run_tool,
    start_gateway,
    start_repeater,
)
from .helpers import free_port, wait_for

PREFIX = "GWT:"
NAME = "GWTEST"

CHANNELS = [
    {"name": "BOOL", "type": "bool"},
    {"name": "I8", "type": "int8"},
    {"name": "U8", "type": "uint8"},
    {"name": "I16", "type": "int16"},
    {"name": "U16", "type": "uint16"},
    {"name": "I32", "type": "int32"},
    {"name": "U32", "type": "uint32"},
    {"name": "I64", "type": "int64"},
    {"name": "U64", "type": "uint64"},
    {"name": "F32", "type": "float32"},
    {"name": "F64", "type": "float64"},
    {"name": "TEXT", "type": "string"},
    {"name": "LONGTEXT", "type": "string"},
    {"name": "WAVE", "type": "float64", "shape": [5]},
    {"name": "IMAGE", "type": "uint16", "shape": [4, 3]},
    {"name": "BIGINTS", "type": "int64", "shape": [3]},
    {"name": "FLAKY", "type": "float64"},
]


def expected_values(pulse_id: int) -> list:
    return [
        pulse_id % 2 == 0,
        -(pulse_id % 100) - 1,
        200 + pulse_id % 50,
        -30000 + pulse_id % 100,
        60000 + pulse_id % 100,
        -2_000_000_000 + pulse_id,
        4_000_000_000 + pulse_id,
        2**52 + pulse_id,
        2**53 - 1000 + pulse_id % 1000,
        np.float32(pulse_id / 8),
        pulse_id * 0.1,
        f"p{pulse_id}",
        "L" * 60 + str(pulse_id),
        np.arange(5, dtype=np.float64) + pulse_id,
        (np.arange(12, dtype=np.uint16).reshape(3, 4) + 65000 + pulse_id % 100).astype(np.uint16),
        np.array([2**40 + pulse_id, -pulse_id, 0], dtype=np.int64),
        float(pulse_id),
    ]


def values_for(pulse_id: int) -> list:
    typed = []
    for channel, value in zip(CHANNELS, expected_values(pulse_id)):
        if channel["type"] not in ("string", "bool") and channel.get("shape", [1]) == [1]:
            value = np.array([value], dtype=channel["type"])
        typed.append(value)
    return typed


@pytest.fixture(scope="module")
def env():
    environment = ca_env()
    repeater = start_repeater(environment)
    yield environment
    repeater.stop()


@pytest.fixture(scope="module")
def feeder():
    source = Feeder(CHANNELS, values_for, rate=20.0)
    yield source
    source.close()


@pytest.fixture(scope="module")
def served(env, feeder, tmp_path_factory):
    # strace is part of the machine image; without it only the broadcast check is skipped.
    trace = tmp_path_factory.mktemp("strace") / "gateway.strace" if shutil.which("strace") else None
    child, ready = start_gateway(feeder.address, env, "--ca-prefix", PREFIX, "--name", NAME,
                                 "--max-rate", "20", strace_file=trace)
    yield child, ready, trace
    child.stop()


@pytest.fixture(scope="module")
def client(env, served):
    caproto_client = CaprotoClient(env)
    yield caproto_client
    caproto_client.close()


def ca_type_name(pv) -> str:
    """The native type as EPICS names it (caproto calls DBR_SHORT "INT")."""
    name = pv.channel.native_data_type.name
    return "SHORT" if name == "INT" else name


def _wait_valid(client, name, timeout=30.0):
    """Read until the PV has a value (severity NO_ALARM)."""
    return wait_for(lambda: _read_ok(client, name), timeout=timeout, interval=0.1,
                    message=f"{name} to carry a valid value")


def _read_ok(client, name):
    reading = client.read(name)
    return reading if reading.metadata.severity == 0 else None


# --------------------------------------------------------------------------
# Types and timestamps, caproto client
# --------------------------------------------------------------------------
CA_NATIVE = {  # the records' native types (ca.camapping.ioc_record_for)
    "BOOL": "LONG", "I8": "LONG", "U8": "LONG", "I16": "LONG", "U16": "LONG", "I32": "LONG", "U32": "DOUBLE",
    "I64": "DOUBLE", "U64": "DOUBLE", "F32": "DOUBLE", "F64": "DOUBLE", "TEXT": "STRING", "WAVE": "DOUBLE",
    "IMAGE": "LONG", "BIGINTS": "DOUBLE",
}


def test_every_bsread_type_reads_back_exactly_with_its_bsread_timestamp(client):
    for index, channel in enumerate(CHANNELS):
        name = channel["name"]
        if name not in CA_NATIVE:
            continue
        pv = client.pv(PREFIX + name)
        assert ca_type_name(pv) == CA_NATIVE[name], name
        reading = _wait_valid(client, PREFIX + name)
        pulse_id = pulse_of(reading.metadata.stamp.secondsSinceEpoch)
        # The channel timestamp, not the time of serving (to a double's precision: pythonSoftIOC takes seconds).
        assert abs(reading.metadata.stamp.nanoSeconds - pulse_id) < 500, "the channel timestamp"
        expected = expected_values(pulse_id)[index]
        if name == "TEXT":
            assert reading.data[0].decode() == expected
        elif isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(np.asarray(reading.data), expected.reshape(-1))
        else:
            assert reading.data[0] == expected, (name, reading.data[0], expected)


def test_arrays_publish_their_numpy_shape(client):
    assert client.read(PREFIX + "IMAGE:SHAPE").data.tolist() == [3, 4]
    assert client.read(PREFIX + "WAVE:SHAPE").data.tolist() == [5]


def test_long_string_becomes_a_char_array_holding_all_of_it(client):
    def long_form():
        pv = client.pv(PREFIX + "LONGTEXT")
        return pv if ca_type_name(pv) == "CHAR" else None

    wait_for(long_form, timeout=30, interval=0.2, message="LONGTEXT to be served as a CHAR array")
    reading = _wait_valid(client, PREFIX + "LONGTEXT")
    text = bytes(np.asarray(reading.data, dtype=np.uint8)).decode().rstrip("\x00")  # an EPICS long string ends in NUL
    assert text == "L" * 60 + str(pulse_of(reading.metadata.stamp.secondsSinceEpoch))


def test_absent_value_raises_an_alarm_and_keeps_no_fresh_timestamp(client, feeder):
    _wait_valid(client, PREFIX + "FLAKY")
    feeder.absent.add("FLAKY")
    try:
        flagged = wait_for(lambda: (lambda r: r if r.metadata.severity == 3 else None)(client.read(PREFIX + "FLAKY")),
                           timeout=20, interval=0.1, message="FLAKY flagged INVALID")
        assert flagged.metadata.status == 10  # TIMEOUT: three of its usual intervals without a value
        # The others in the same messages stay valid.
        assert client.read(PREFIX + "F64").metadata.severity == 0
    finally:
        feeder.absent.discard("FLAKY")
    _wait_valid(client, PREFIX + "FLAKY")


def test_status_pvs_from_the_stream_alone(client, feeder):
    reading = wait_for(lambda: (lambda r: r if r.metadata.severity == 0 else None)(client.read(f"{NAME}:PULSE_ID")),
                       timeout=20, interval=0.2, message="status PULSE_ID")
    assert abs(reading.data[0] - feeder.pulse_id) < 200
    assert client.read(f"{NAME}:CHANNELS").data[0] == len(CHANNELS)
    rate = wait_for(lambda: (lambda r: r if r.metadata.severity == 0 else None)(client.read(f"{NAME}:RATE")),
                    timeout=20, interval=0.2, message="status RATE")
    assert 5 < rate.data[0] < 40
    # Without --status-url there is no ring to report: flagged, not zero.
    assert client.read(f"{NAME}:N_MESSAGES").metadata.severity == 3
    assert client.read(f"{NAME}:MAX_RATE").data[0] == 20


# --------------------------------------------------------------------------
# Read-only, with every client
# --------------------------------------------------------------------------
def test_caput_is_refused_by_every_client(client, env):
    pv = client.pv(PREFIX + "F64")
    assert str(pv.access_rights) in ("AccessRights.READ", "READ", "1") or int(pv.access_rights) == 1
    output = run_tool("caput", [PREFIX + "F64", "1"], env)
    assert "write access denied" in output.lower(), output
    result = run_pyepics(f"""
        pv = epics.get_pv({PREFIX + 'F64'!r}, timeout=20)
        pv.wait_for_connection(timeout=20)
        result = {{"write_access": pv.write_access, "read_access": pv.read_access}}
        try:
            pv.put(1.0, wait=True, timeout=5)
            result["put"] = "accepted"
        except Exception as error:
            result["put"] = repr(error)
    """, env)
    assert result["read_access"] and not result["write_access"]
    assert result["put"] != "accepted"


# --------------------------------------------------------------------------
# EPICS base tools and pyepics
# --------------------------------------------------------------------------
def test_epics_base_tools(env, served, client):
    _wait_valid(client, PREFIX + "I64")
    output = run_tool("caget", ["-a", "-g", "17", PREFIX + "I64", PREFIX + "TEXT", f"{NAME}:PULSE_ID"], env)
    lines = {line.split()[0]: line.split() for line in output.splitlines() if line.strip()}
    assert set(lines) == {PREFIX + "I64", PREFIX + "TEXT", f"{NAME}:PULSE_ID"}, output
    # -a prints name, date, time, value: the date is the bsread timestamp (T0 + pulse id)
    i64 = lines[PREFIX + "I64"]
    assert float(i64[3]) >= 2**52, output
    assert lines[PREFIX + "TEXT"][3].startswith("p")
    info = run_tool("cainfo", [PREFIX + "IMAGE"], env)
    assert "DBF_LONG" in info and "Element count:    12" in info and "no write" in info, info

    monitor = Tool("camonitor", ["-t", "s", PREFIX + "F64"], env)
    try:
        wait_for(lambda: len([line for line in monitor.lines if PREFIX + "F64" in line]) >= 5, timeout=30,
                 interval=0.1, message="5 camonitor updates")
    finally:
        monitor.stop()
    values = [float(line.split()[-1]) for line in monitor.lines if PREFIX + "F64" in line]
    assert all(b > a for a, b in zip(values, values[1:])), values  # fresh values, in order


def test_pyepics_reads_values_timestamps_and_monitors(env, served, client, feeder):
    _wait_valid(client, PREFIX + "WAVE")
    result = run_pyepics(f"""
        import time
        values = []
        pv = epics.get_pv({PREFIX + 'F64'!r}, form='time', timeout=20)
        pv.wait_for_connection(timeout=20)
        pv.add_callback(lambda value=None, timestamp=None, **kw: values.append((value, timestamp)))
        wave = epics.caget({PREFIX + 'WAVE'!r}, timeout=20)
        image = epics.caget({PREFIX + 'IMAGE'!r}, timeout=20)
        shape = epics.caget({PREFIX + 'IMAGE:SHAPE'!r}, timeout=20)
        text = epics.caget({PREFIX + 'LONGTEXT'!r}, as_string=True, timeout=20)
        u64 = epics.caget({PREFIX + 'U64'!r}, timeout=20)
        deadline = time.monotonic() + 30
        while len(values) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        result = {{"values": values, "wave": list(map(float, wave)), "image": list(map(int, image)),
                   "shape": list(map(int, shape)), "text": text, "u64": u64}}
    """, env)
    assert len(result["values"]) >= 5
    for value, stamp in result["values"]:
        assert value == pytest.approx(0.1 * round(stamp - T0))  # value and timestamp from the same pulse
    wave = result["wave"]
    assert wave == [wave[0] + i for i in range(5)]
    assert result["shape"] == [3, 4] and len(result["image"]) == 12 and min(result["image"]) >= 65000
    assert result["text"].startswith("L" * 60)
    assert result["u64"] >= 2**53 - 1000


# --------------------------------------------------------------------------
# Loopback only
# --------------------------------------------------------------------------
def test_nothing_is_broadcast(served, client):
    child, ready, trace = served
    assert ready["interfaces"] == ["127.0.0.1"]
    assert all(beacon.startswith("127.0.0.1:") for beacon in ready["beacons"])
    _wait_valid(client, PREFIX + "F64")
    if trace is None:
        pytest.skip("strace is not installed: the traffic of the gateway cannot be traced")
    text = trace.read_text()
    assert "connect(" in text or "sendto(" in text  # the trace works
    assert "255.255.255.255" not in text


def test_prepare_epics_environment_defaults_to_loopback_and_honours_settings():
    empty: dict[str, str] = {}
    prepare_server_environment(empty)
    assert empty["EPICS_CAS_INTF_ADDR_LIST"] == "127.0.0.1"
    assert empty["EPICS_CAS_AUTO_BEACON_ADDR_LIST"] == "NO"
    assert empty["EPICS_CAS_BEACON_ADDR_LIST"] == "127.0.0.1"
    site = {"EPICS_CAS_INTF_ADDR_LIST": "10.1.2.3", "EPICS_CAS_BEACON_ADDR_LIST": "10.1.255.255",
            "EPICS_CAS_SERVER_PORT": "5070", "EPICS_CA_SERVER_PORT": "5064", "EPICS_CA_REPEATER_PORT": "5071"}
    prepare_server_environment(site)
    assert site["EPICS_CAS_INTF_ADDR_LIST"] == "10.1.2.3"
    assert site["EPICS_CAS_BEACON_ADDR_LIST"] == "10.1.255.255"
    assert "EPICS_CAS_AUTO_BEACON_ADDR_LIST" not in site
    assert site["EPICS_CA_SERVER_PORT"] == "5070"  # the server port wins for a server
    assert site["EPICS_CAS_BEACON_PORT"] == "5071"


# --------------------------------------------------------------------------
# Channel set changes
# --------------------------------------------------------------------------
PYEPICS_WATCHER = """
import sys, time, epics
def on_update(pvname=None, value=None, type=None, **kw):
    print("UPDATE", type.replace("time_", ""), value, flush=True)
def on_connection(pvname=None, conn=None, **kw):
    print("CONNECTED", conn, flush=True)
pv = epics.get_pv(sys.argv[1], form="time", callback=on_update, connection_callback=on_connection)
time.sleep(90)
"""


# --------------------------------------------------------------------------
# Supervision (what the buffer uses for --ca)
# --------------------------------------------------------------------------
def test_supervisor_restarts_a_dead_gateway(env, feeder):
    port = str(free_port())
    local_env = dict(os.environ) | env | {"EPICS_CA_SERVER_PORT": port, "EPICS_CAS_SERVER_PORT": port}
    supervisor = children.start_gateway(feeder.address, None, "SUP:", "SUP", env=local_env)
    try:
        wait_for(lambda: supervisor.running, timeout=10)
        first = supervisor.process.pid
        supervisor.process.send_signal(signal.SIGKILL)
        wait_for(lambda: supervisor.restarts == 1 and supervisor.running, timeout=30, interval=0.1,
                 message="the gateway to be restarted")
        assert supervisor.process.pid != first
        client = CaprotoClient(local_env)
        try:
            _wait_valid(client, "SUP:F64")
        finally:
            client.close()
    finally:
        assert supervisor.stop() is not None
    assert not supervisor.running


# ---------------------------------------------------------------------------
# The buffer's --ca: its own rate-limited feed, the live output untouched
# ---------------------------------------------------------------------------
def test_buffer_ca_feed_is_rate_limited_and_leaves_a_push_output_whole(env, monkeypatch):
    """With --ca and a PUSH live output, the one legacy consumer still gets every message."""
    import json
    import threading
    import time

    import zmq

    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.buffer.service import Buffer
    from sf_bsread_writer.buffer.settings import BufferSettings

    port = str(free_port())
    for key, value in (env | {"EPICS_CA_SERVER_PORT": port, "EPICS_CAS_SERVER_PORT": port}).items():
        monkeypatch.setenv(key, value)  # the gateway child inherits the loopback environment
    context = zmq.Context()
    source = context.socket(zmq.PUSH)
    source.setsockopt(zmq.LINGER, 0)
    source.bind("tcp://127.0.0.1:0")
    consumer = context.socket(zmq.PULL)
    consumer.setsockopt(zmq.LINGER, 0)
    buffer = Buffer(BufferSettings(source.getsockopt_string(zmq.LAST_ENDPOINT), output_mode="push", rest_port=0,
                                   ca=True, ca_prefix="FEED:", name="FEED", ca_max_rate=5.0))
    buffer_thread = threading.Thread(target=buffer.run, daemon=True)
    buffer_thread.start()
    stop_sending = threading.Event()
    sent: list[int] = []

    def _send() -> None:  # a paced source at ~200 Hz: the rate limit, not the source, sets the feed
        channels = [{"name": "X", "type": "int64"}]
        pulse_id = 0
        while not stop_sending.is_set():
            pulse_id += 1
            source.send_multipart(build_message(pulse_id, channels, [np.array([pulse_id])]))
            sent.append(pulse_id)
            stop_sending.wait(0.005)

    sender = threading.Thread(target=_send, daemon=True)
    caproto_client = None
    received: list[int] = []
    try:
        assert buffer.started.wait(30)
        consumer.connect(buffer.output_address)
        sender.start()
        caproto_client = CaprotoClient(dict(os.environ))
        _wait_valid(caproto_client, "FEED:X")  # the gateway serves the stream from its feed
        before = buffer.statistics()
        window_start = time.monotonic()
        wait_for(lambda: buffer.statistics().received >= before.received + 400, 30,
                 message="400 more messages")
        after = buffer.statistics()
        window = time.monotonic() - window_start
        value = caproto_client.read("FEED:X").data[0]
        stop_sending.set()
        sender.join(10)
        deadline = time.monotonic() + 20
        while (not received or received[-1] != sent[-1]) and time.monotonic() < deadline:
            if consumer.poll(200):
                received.append(int(json.loads(consumer.recv_multipart()[0])["pulse_id"]))
    finally:
        stop_sending.set()
        if caproto_client is not None:
            caproto_client.close()
        buffer.stop()
        buffer_thread.join(30)
        source.close()
        consumer.close()
        context.term()
    # The legacy consumer lost nothing once connected (PUSH drops only before a peer is there).
    assert received and received == list(range(received[0], sent[-1] + 1))
    assert buffer.statistics().output_drops == received[0] - 1
    # The gateway got at most --ca-max-rate messages a second of the ~200 a second received.
    fed = after.ca_feed.sent - before.ca_feed.sent
    snapshot_slack = 2 * 0.25 * 5.0 + 2  # statistics are snapshots, published every 0.25 s
    assert 1 <= fed <= 5.0 * window + snapshot_slack, (fed, window)
    assert 1 <= value <= sent[-1]


def test_the_status_poller_reads_the_buffers_statistics_and_counts_what_it_cannot():
    """``--status-url``: GET /statistics once a second as a typed BufferStatus (the poller imports its HTTP
    client when it starts: an IOC fed by a buffer's feed never loads it); an answer that is no status is
    counted, never raised, and the last good status stays."""
    import http.server
    import json
    import threading

    from sf_bsread_writer.buffer.service import Buffer
    from sf_bsread_writer.buffer.settings import BufferSettings
    from sf_bsread_writer.ca.feed import StatusPoller

    status = Buffer(BufferSettings("tcp://127.0.0.1:9", rest_port=None, name="POLLED")).statistics()
    answers = [json.dumps({"statistics": status.to_json()}).encode()]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (the http.server name)
            body = answers[-1]
            self.send_response(200 if self.path == "/statistics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    poller = StatusPoller(f"http://127.0.0.1:{server.server_address[1]}/", interval=0.05)
    poller.start()
    try:
        wait_for(lambda: poller.latest is not None, timeout=20, message="the first status")
        assert poller.latest == status and poller.failures == 0
        answers.append(b"not json")
        wait_for(lambda: poller.failures >= 2, timeout=20, message="unusable answers counted")
        assert poller.latest == status and poller.is_alive()
    finally:
        poller.stop()
        poller.join(timeout=5)
        server.shutdown()
        server.server_close()

