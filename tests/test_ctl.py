"""sf_bsread_ctl and the runtime registry against a real buffer and source (bsread's Sender).

The registry directory is the test session's (tests/conftest.py sets SF_BSREAD_RUNTIME_DIR), so the
buffers of this machine's users never show up here and ours never show up there.
"""
from __future__ import annotations

import json
import os
import re
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


# --------------------------------------------------------------------------
# What an operator reads: why a write failed, what is on disk, which URL is meant, whole lines
# --------------------------------------------------------------------------
def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, result.stdout + result.stderr
    return lines[-1]


def _newest_and_oldest() -> tuple[int, int]:
    ring = json.loads(ctl("status", "CTLTEST", "--json").stdout)["ring"]
    return ring["newest_pulse_id"], ring["oldest_pulse_id"]


def test_a_failed_or_partial_write_says_why_and_what_is_on_disk(buffer, tmp_path):
    newest, oldest = _newest_and_oldest()
    gone = tmp_path / "gone.h5"
    evicted = ctl("write", "CTLTEST", str(oldest - 300), str(oldest - 101), str(gone))  # wholly evicted
    line = _last_line(evicted)
    assert evicted.returncode == 1, evicted.stdout + evicted.stderr
    assert line.startswith(f"{gone}: failed (pulses {oldest - 300}..{oldest - 101})"), line
    assert "0 rows, 200 pulses missing (before_buffer: 200)" in line and f"{gone}.summary.json" in line, line
    assert f"on disk: {gone} with no row" in line, line
    # The writer's warning, at the start, where the operator looks while it runs.
    assert "the writer warns" in evicted.stderr and "older than the buffer's oldest pulse" in evicted.stderr, \
        evicted.stderr

    head = tmp_path / "head.h5"
    # Its head evicted, its tail 2 s ahead: partial however long the writer takes to start (the ring holds 6 s).
    newest, oldest = _newest_and_oldest()
    partial = ctl("write", "CTLTEST", str(oldest - 50), str(newest + 100), str(head))
    line = _last_line(partial)
    assert partial.returncode == 3, partial.stdout + partial.stderr
    with h5py.File(head, "r") as h5:
        rows = len(h5["data/MIXED:FLOAT64/pulse_id"])
    assert line.startswith(f"{head}: partial (pulses {oldest - 50}..{newest + 100})"), line
    # At least the 50 pulses before the oldest asked for; more if the ring moved on before the writer started.
    # (A loaded simulator may skip pulses too: pulse_id_jump, also named.)
    evicted_head = re.search(r"\d+ pulses missing \((?:[a-z_]+: \d+, )*before_buffer: (\d+)[,)]", line)
    assert f": {rows} rows, " in line and evicted_head and int(evicted_head.group(1)) >= 50, line
    assert f"on disk: {head} ({rows} rows) and {head}.summary.json" in line, line
    assert "older than the buffer's oldest pulse" in partial.stderr, partial.stderr

    newest, _ = _newest_and_oldest()  # the ring (6 s) has moved on during the two writes
    complete = ctl("write", "CTLTEST", str(newest - 5), str(newest), str(tmp_path / "whole.h5"))
    assert complete.returncode == 0 and "complete" in _last_line(complete) and "6 rows" in _last_line(complete)


def test_a_refused_write_is_a_bad_command_without_a_traceback(buffer, tmp_path):
    """Every refusal of the writer (a file that exists, a path it may not write): one line, exit 2."""
    newest, _ = _newest_and_oldest()
    existing = tmp_path / "existing.h5"
    existing.write_bytes(b"a run of yesterday")
    cases = {"exists": existing, "not a folder": existing / "x.h5", "is a directory": tmp_path}
    for expected, path in cases.items():
        refused = ctl("write", "CTLTEST", str(newest - 5), str(newest), str(path))
        assert refused.returncode == 2, (expected, refused.stdout + refused.stderr)
        assert "Traceback" not in refused.stderr and expected in refused.stderr, refused.stderr
        assert refused.stderr.startswith("sf_bsread_ctl: ") and len(refused.stderr.strip().splitlines()) == 1
    assert existing.read_bytes() == b"a run of yesterday"
    # The writer itself refuses its configuration (a bad SF_BSREAD_WRITER_* in the operator's environment).
    env = {**os.environ, "COLUMNS": "200", "SF_BSREAD_WRITER_FLUSH_INTERVAL": "soon"}
    misconfigured = subprocess.run([*CTL, "write", "CTLTEST", str(newest - 5), str(newest), str(tmp_path / "m.h5")],
                                   capture_output=True, text=True, timeout=60, env=env)
    assert misconfigured.returncode == 2, misconfigured.stdout + misconfigured.stderr
    assert "exit 2" in misconfigured.stderr and "SF_BSREAD_WRITER_FLUSH_INTERVAL" in misconfigured.stderr
    assert "Traceback" not in misconfigured.stderr and not (tmp_path / "m.h5").exists()


def test_tables_are_whole_lines_when_stdout_is_not_a_terminal(buffer):
    """A pipe or a log gets every cell whole (no 80-column cut, no '…'), whatever COLUMNS says not."""
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    for command in (["ls"], ["status", "CTLTEST"], ["channels", "CTLTEST"],
                    ["watch", "CTLTEST", "--count", "1"]):
        result = subprocess.run([*CTL, *command], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        assert "…" not in result.stdout, (command, result.stdout)
        widest = max(len(line) for line in result.stdout.splitlines())
        if command == ["ls"]:
            assert widest > 80, result.stdout  # the ls table is wider than 80 columns: shown whole
        if command[0] in ("status", "watch"):
            assert "MB/s" in result.stdout and "messages," in result.stdout, result.stdout


@pytest.fixture(scope="module")
def web_buffer(buffer):
    """A second buffer on the same source, with its web service (``--web``): the URL an operator browses."""
    _, endpoints = buffer
    child = Child.python_module("sf_bsread_writer.buffer", endpoints["stream"], "-o", "0", "--replay-port", "0",
                                "--rest-port", "0", "--name", "CTLWEB", "--web", "--web-port", "0")
    try:
        ready = _ready(child)
        wait_for(lambda: requests_ok(ready["web"] + "/api/v1/status"), timeout=60, interval=0.2,
                 message="the web service answers")
        yield ready
    finally:
        child.stop()


def requests_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_every_command_takes_the_web_url_and_a_wrong_url_says_which_is_expected(web_buffer, tmp_path):
    web = web_buffer["web"]
    for url in (web, web + "/"):
        status = ctl("status", url, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["name"] == "CTLWEB"
    table = ctl("status", web)
    assert table.returncode == 0 and "CTLWEB" in table.stdout, table.stderr
    channels = json.loads(ctl("channels", web, "--json").stdout)
    assert any(spec["name"] == "MIXED:ARRAY" for spec in channels)
    peeked = ctl("peek", web, "MIXED:FLOAT64", "--json")
    assert peeked.returncode == 0 and json.loads(peeked.stdout)["channel"] == "MIXED:FLOAT64", peeked.stderr
    newest = json.loads(ctl("status", web, "--json").stdout)["ring"]["newest_pulse_id"]
    written = ctl("write", web, str(newest - 4), str(newest), str(tmp_path / "web.h5"))
    assert written.returncode == 0, written.stdout + written.stderr

    with Child.python_module("http.server", "0", "--bind", "127.0.0.1", "--directory", str(tmp_path)) as other:
        port = other.wait_for_line("port", timeout=60).split(" port ")[1].split()[0]
        for command in (["status"], ["channels"], ["peek", "X"], ["watch", "--count", "1"], ["write", "1", "2",
                                                                                            str(tmp_path / "o.h5")]):
            result = ctl(command[0], f"http://127.0.0.1:{port}", *command[1:])
            assert result.returncode == 2, (command, result.stdout + result.stderr)
            said = result.stderr
            assert "Traceback" not in said and "KeyError" not in said, said
            assert "http://host:8890" in said and "http://host:8891" in said, said
    assert not (tmp_path / "o.h5").exists()
