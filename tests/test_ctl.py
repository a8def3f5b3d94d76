"""sf_bsread_ctl and the runtime registry against a real buffer and source (bsread's Sender).

The registry directory is the test session's (tests/conftest.py sets SF_BSREAD_RUNTIME_DIR), so the
buffers of this machine's users never show up here and ours never show up there.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from sf_bsread_writer import registry, write_range
from sf_bsread_writer.tools.simulate import expected_values
from sf_bsread_writer.writer.acquisition import Outcome

from .helpers import Child, wait_for

CTL = [sys.executable, "-m", "sf_bsread_writer.tools.ctl"]


def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def _ready(child: Child) -> dict:
    return json.loads(child.wait_for_line("READY {", timeout=60).split("READY", 1)[1])


@pytest.fixture(scope="module")
def buffer():
    simulator = Child.python_module("sf_bsread_writer.tools.simulate", "--profile", "mixed", "--rate", "50",
                                    "--port", "0")
    child = None
    try:
        source = _ready(simulator)["address"]
        child = Child.python_module("sf_bsread_writer.buffer", source, "-o", "0", "--replay-port", "0",
                                    "--rest-port", "0", "--name", "CTLTEST", "-b", "300")
        endpoints = _ready(child)
        wait_for(lambda: json.loads(ctl("status", "CTLTEST", "--json").stdout or "{}").get("ring", {})
                 .get("messages", 0) >= 50, timeout=60, interval=0.2, message="50 messages in the buffer")
        yield child, endpoints
    finally:
        if child is not None:
            child.stop()
        simulator.stop()


def test_the_registry_ignores_entries_of_dead_processes(tmp_path):
    directory = tmp_path / "runtime"
    path = registry.register("buffer", "A/B name", {"rest": "http://127.0.0.1:1"}, directory=directory)
    assert path is not None and path.name == f"buffer-A_B_name-{os.getpid()}.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (directory / f"buffer-GONE-{dead.pid}.json").write_text(json.dumps(
        {"kind": "buffer", "name": "GONE", "pid": dead.pid, "started": 1.0, "endpoints": {}}))
    (directory / "garbage.json").write_text("{not json")
    assert [entry.name for entry in registry.entries(directory)] == ["A/B name"]
    assert {entry.name for entry in registry.entries(directory, include_stale=True)} == {"A/B name", "GONE"}
    registry.unregister(path)
    assert registry.entries(directory) == []
    assert registry.runtime_directory({"SF_BSREAD_RUNTIME_DIR": "/x"}).as_posix() == "/x"
    assert registry.runtime_directory({"RUNTIME_DIRECTORY": "/run/a:/run/b"}).as_posix() == "/run/a"
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    assert registry.register("buffer", "X", {}, directory=unwritable / "sub") is None  # logged, never fatal
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # anybody could plant entries here: neither listed nor written to
    assert registry.register("buffer", "X", {}, directory=shared) is None and registry.entries(shared) == []
    link = tmp_path / "link"
    link.symlink_to(directory)
    assert registry.entries(link) == []


def test_ls_status_channels_and_peek(buffer):
    child, endpoints = buffer
    listed = json.loads(ctl("ls", "--json").stdout)
    mine = [entry for entry in listed if entry["name"] == "CTLTEST"]
    assert len(mine) == 1 and mine[0]["pid"] == child.process.pid and mine[0]["endpoints"]["rest"] == endpoints["rest"]
    table = ctl("ls")
    assert table.returncode == 0 and "CTLTEST" in table.stdout and "receiving" in table.stdout

    status = json.loads(ctl("status", endpoints["rest"], "--json").stdout)  # by URL as well as by name
    assert status["name"] == "CTLTEST" and status["channels"] == 16
    assert status["ring"]["newest_time"] >= status["ring"]["oldest_time"]

    channels = json.loads(ctl("channels", "CTLTEST", "--json").stdout)
    assert {"name": "MIXED:ARRAY", "type": "float64", "shape": [16]}.items() <= {
        key: value for spec in channels if spec["name"] == "MIXED:ARRAY" for key, value in spec.items()}.items()

    peeked = json.loads(ctl("peek", "CTLTEST", "MIXED:ARRAY", "--json").stdout)
    np.testing.assert_array_equal(peeked["value"], expected_values("mixed", peeked["pulse_id"])["MIXED:ARRAY"])
    unknown = ctl("peek", "CTLTEST", "NOPE")
    assert unknown.returncode == 2 and "not in the stream" in unknown.stderr
    nobody = ctl("status", "NOBODY")
    assert nobody.returncode == 2 and "no buffer named 'NOBODY'" in nobody.stderr and "CTLTEST" in nobody.stderr

    watched = ctl("watch", "CTLTEST", "--count", "2", "--interval", "0.1")
    assert watched.returncode == 0 and "look-back" in watched.stdout


def test_write_from_the_command_line_and_from_python(buffer, tmp_path):
    last = ctl("write", "CTLTEST", str(tmp_path / "last.h5"), "--last", "20", "--param", "general/user=ops")
    assert last.returncode == 0, last.stderr
    assert "complete" in last.stdout
    with h5py.File(tmp_path / "last.h5", "r") as h5:
        pulse_ids = h5["data/MIXED:FLOAT64/pulse_id"][:]
        assert len(pulse_ids) == 20 and np.all(np.diff(pulse_ids) == 1)
        assert h5["general/user"][()] == b"ops" and h5.attrs["outcome"] == "complete"

    status = json.loads(ctl("status", "CTLTEST", "--json").stdout)
    oldest, newest = status["ring"]["oldest_pulse_id"], status["ring"]["newest_pulse_id"]
    outcome = write_range("CTLTEST", newest - 30, newest - 21, str(tmp_path / "api.h5"))
    assert outcome is Outcome.COMPLETE
    with h5py.File(tmp_path / "api.h5", "r") as h5:
        assert h5["data/MIXED:FLOAT64/pulse_id"][:].tolist() == list(range(newest - 30, newest - 20))

    # Its head before the buffer, its tail still to come: partial whatever the time the two starts take
    # (a stop in the past was evicted too when a loaded machine took the ring's 6 s to start them).
    evicted = ctl("write", "CTLTEST", str(oldest - 100), str(newest + 50), str(tmp_path / "partial.h5"))
    assert evicted.returncode == 3 and "partial" in evicted.stdout, evicted.stdout + evicted.stderr  # partial
    bad = ctl("write", "CTLTEST", "x", "y", str(tmp_path / "bad.h5"))
    assert bad.returncode == 2 and "pulse ids" in bad.stderr


def test_a_stopped_buffer_leaves_the_list_and_a_killed_one_is_ignored(buffer):
    _, endpoints = buffer
    source = endpoints["stream"]
    for how in ("stop", "kill"):
        child = Child.python_module("sf_bsread_writer.buffer", source, "-o", "0", "--replay-port", "0",
                                    "--rest-port", "0", "--name", f"SHORT-{how}")
        try:
            _ready(child)
            assert any(entry["name"] == f"SHORT-{how}" for entry in json.loads(ctl("ls", "--json").stdout))
            if how == "stop":
                child.signal(signal.SIGTERM)
            else:
                child.process.kill()
            child.wait(20)
            assert not any(entry["name"] == f"SHORT-{how}" for entry in json.loads(ctl("ls", "--json").stdout))
        finally:
            child.stop()
