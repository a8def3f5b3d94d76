"""The writer's REST API over a real HTTP server (port 0) with requests, and the client on top of it.

The source is a scripted stand-in for the ReplayClient (the buffer has its
own end-to-end tests in test_writer.py); the output is a real H5File. The
last tests drive the Writer without HTTP where a fake clock is needed.
"""
from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from types import SimpleNamespace

import h5py
import pytest
import requests

from sf_bsread_writer import client as client_module
from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.client import WriterClient, WriterError
from sf_bsread_writer.h5.file import H5File
from sf_bsread_writer.h5.layout import FILE_ATTRIBUTES
from sf_bsread_writer.httpserver import HttpServer
from sf_bsread_writer.replay import messages as replay
from sf_bsread_writer.writer.acquisition import State
from sf_bsread_writer.writer.outputs import open_output
from sf_bsread_writer.writer.rest import make_app
from sf_bsread_writer.writer.service import Writer, WriterSettings
from tests.helpers import FakeClock, wait_for

PARAMETERS = {"general/created": "2024-01-01T00:00:00", "general/user": "e12345",
              "general/process": "test_rest", "general/instrument": "bench"}
CHANNELS = [{"name": "VALUE", "type": "float64", "shape": [1]}]


class QueuedSource:
    """Replays whatever the test puts on ``events``; records what the writer asked for."""

    def __init__(self) -> None:
        self.events: "queue.Queue" = queue.Queue()
        self.starts: list = []
        self.stops: list = []
        self.closed = threading.Event()

    def __call__(self, start):  # the Writer's source factory
        self.starts.append(start)
        return self

    def start(self):
        return self

    def receive(self, timeout: float):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def set_stop(self, stop_pulse_id=None, stop_time=None):
        self.stops.append((stop_pulse_id, stop_time))

    def close(self):
        self.closed.set()

    def send(self, *pulse_ids: int, timestamp: float = 1.0e9) -> None:
        for pulse_id in pulse_ids:
            frames = build_message(pulse_id, CHANNELS, [pulse_id * 0.5], timestamp=timestamp + pulse_id * 0.01)
            self.events.put(replay.Data(pulse_id, frames))


def _serve(root, monotonic=time.monotonic, output_factory=None):
    source = QueuedSource()
    settings = WriterSettings("tcp://127.0.0.1:1", str(root / "out.h5"), output_root=str(root),
                              stop_deadline=30.0, flush_interval=0.2, finished_grace=0.0)
    writer = Writer(settings, source_factory=source, output_factory=output_factory, monotonic=monotonic)
    server = HttpServer(make_app(writer), "127.0.0.1", 0).start()
    try:
        yield SimpleNamespace(url=server.url, writer=writer, source=source, root=root,
                              client=WriterClient(server.url, timeout=30))
    finally:
        writer.stop(wait=30)
        server.stop()


@pytest.fixture
def api(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    yield from _serve(root)


@pytest.fixture
def run_clock():
    """The run loop's clock (deadlines): fake, moved on by the test, so no test waits for a deadline."""
    return FakeClock(0.0)


@pytest.fixture
def api_on_run_clock(tmp_path, run_clock):
    root = tmp_path / "root"
    root.mkdir()
    yield from _serve(root, monotonic=run_clock)


@pytest.fixture(scope="module")
def idle_api(tmp_path_factory):
    """One writer for the refused requests: each test checks that it is still waiting afterwards."""
    root = tmp_path_factory.mktemp("idle") / "root"
    root.mkdir()
    yield from _serve(root)


def call(api, method: str, path: str, **kwargs) -> tuple[int, dict]:
    response = requests.request(method, api.url + path, timeout=30, **kwargs)
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    return response.status_code, response.json()


def assert_error(api, method, path, code, *words, **kwargs):
    status, body = call(api, method, path, **kwargs)
    assert status == code, body
    assert body["state"] == "error", body
    for word in words:
        assert word in body["status"], body
    return body


def test_status_and_unknown_paths(api):
    assert call(api, "GET", "/status") == (200, {"state": "ok", "status": "waiting"})
    assert_error(api, "GET", "/no/such/path", 404, "unknown path /no/such/path")
    assert_error(api, "GET", "/start_pulse_id", 404)
    assert_error(api, "PUT", "/status", 405, "method PUT not allowed", "GET")
    assert_error(api, "GET", "/start_now", 405, "PUT")
    assert_error(api, "DELETE", "/parameters", 405)


def test_parameters(api):
    status, body = call(api, "POST", "/parameters", json={**PARAMETERS, "scan/step": 3})
    assert status == 200 and body == {"state": "ok", "status": "waiting",
                                      "parameters": {**PARAMETERS, "scan/step": 3}}
    # Without a JSON content type too (curl -d): the body is what counts.
    status, body = call(api, "POST", "/parameters", data=json.dumps(PARAMETERS))
    assert status == 200 and body["parameters"] == PARAMETERS
    assert call(api, "GET", "/parameters")[1]["parameters"] == PARAMETERS


@pytest.mark.parametrize("body, words", [
    (b"", ["body missing"]),
    (b"{not json", ["not valid JSON"]),
    (b"\xff\xfe", ["not valid JSON"]),
    (b"[1, 2]", ["JSON object"]),
    (b'"general/user"', ["JSON object"]),
    (json.dumps({"general/user": "x"}).encode(), ["Missing mandatory parameters", "general/created", "general/process",
                                                   "general/instrument"]),
    (json.dumps({**PARAMETERS, "general/user": None}).encode(), ["Missing mandatory parameters: general/user"]),
    (json.dumps({**PARAMETERS, "general/user": [1]}).encode(), ["general/user must be a string"]),
    # hostile bodies: were 500 (RecursionError) or accepted (NaN)
    (b"[" * 50_000 + b"]" * 50_000, ["nested too deeply"]),
    (b'{"general/created": "x", "general/user": "x", "general/process": "x", "general/instrument": "x", '
     b'"scan": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", ["nested more than 32 levels"]),
    (json.dumps({**PARAMETERS, "general/created": float("nan")}).encode(), ["NaN is not a JSON value"]),
    (json.dumps({**PARAMETERS, "scan/step": float("inf")}).encode(), ["Infinity is not a JSON value"]),
])
def test_bad_parameters(idle_api, body, words):
    api = idle_api
    assert_error(api, "POST", "/parameters", 400, *words, data=body)
    assert call(api, "GET", "/parameters")[1]["parameters"] == {}


def test_oversize_body(idle_api):
    api = idle_api
    assert_error(api, "POST", "/parameters", 400, "too large", data=b"x" * (1024 * 1024 + 10))


@pytest.mark.parametrize("endpoint", ["start_pulse_id", "stop_pulse_id"])
@pytest.mark.parametrize("value, words", [("abc", "non-negative integer"), ("-5", "negative"),
                                          ("1.5", "non-negative integer"), ("1e3", "non-negative integer"),
                                          (str(2**63), "int64"), ("%20", "non-negative integer")])
def test_bad_pulse_ids(idle_api, endpoint, value, words):
    api = idle_api
    assert_error(api, "PUT", f"/{endpoint}/{value}", 400, endpoint, words)
    assert call(api, "GET", "/status")[1]["status"] == "waiting"


@pytest.mark.parametrize("body, words", [
    (b"{broken", ["not valid JSON"]),
    (b"[]", ["JSON object"]),
    (b'"out.h5"', ["JSON object"]),
    (b'{"output_file": 5}', ["output_file must be a string"]),
    (b'{"output_file": ""}', ["output_file must be a non-empty string"]),
    (b'{"output": "x.h5"}', ["unknown field(s) output"]),
    (b'{"output_file": "../escape.h5"}', ["outside the output root"]),
    (b'{"output_file": "/tmp/escape.h5"}', ["outside the output root"]),
])
@pytest.mark.parametrize("path", ["/start_now", "/start_pulse_id/10"])
def test_bad_start_bodies(idle_api, path, body, words):
    api = idle_api
    assert_error(api, "PUT", path, 400, *words, data=body)
    assert call(api, "GET", "/status")[1]["status"] == "waiting"
    assert api.source.starts == []


def test_existing_output_file_and_symlink_escape_are_refused(api, tmp_path):
    (api.root / "taken.h5").write_bytes(b"an earlier acquisition")
    assert_error(api, "PUT", "/start_now", 400, "already exists", json={"output_file": "taken.h5"})
    (tmp_path / "outside").mkdir()
    (api.root / "link").symlink_to(tmp_path / "outside")
    assert_error(api, "PUT", "/start_now", 400, "outside the output root", json={"output_file": "link/x.h5"})
    assert (api.root / "taken.h5").read_bytes() == b"an earlier acquisition"
    assert not (tmp_path / "outside" / "x.h5").exists()


def test_wrong_state_requests(api):
    assert_error(api, "PUT", "/stop_now", 409, "not started")
    status, body = call(api, "PUT", "/stop_pulse_id/200")  # a stop before the start is fine
    assert (status, body) == (200, {"state": "ok", "status": "waiting"})
    assert_error(api, "PUT", "/start_pulse_id/201", 400, "after the stop_pulse_id 200")
    assert call(api, "PUT", "/start_pulse_id/100") == (200, {"state": "ok", "status": "writing"})
    assert_error(api, "PUT", "/start_pulse_id/100", 409, "already writing")
    assert_error(api, "PUT", "/start_now", 409, "already writing")
    assert_error(api, "POST", "/parameters", 409, "before the start", json=PARAMETERS)
    assert_error(api, "PUT", "/stop_pulse_id/99", 400, "before the start_pulse_id 100")
    assert api.source.starts[0].stop_pulse_id == 200


def test_start_now_with_an_empty_or_null_body(api):
    assert call(api, "PUT", "/start_now", data=b"null") == (200, {"state": "ok", "status": "writing"})
    assert api.source.starts[0].start_time is not None and api.source.starts[0].start_pulse_id is None


def test_a_range_written_through_the_api(api):
    call(api, "POST", "/parameters", json=PARAMETERS)
    assert call(api, "PUT", "/start_pulse_id/100", json={"output_file": "sub/run.h5"})[1]["status"] == "writing"
    api.source.send(98, 99, 100, 101, 102, 104)
    wait_for(lambda: call(api, "GET", "/statistics")[1]["statistics"]["messages_written"] == 4,
             message="4 messages written")
    assert call(api, "PUT", "/stop_pulse_id/105")[1]["status"] == "writing"
    wait_for(lambda: api.source.stops == [(105, None)], message="stop passed to the source")
    api.source.send(105, 106)
    # A start that names its output_file is persistent (as in the original): back to waiting, the
    # statistics of the run that ended stay until the next start.
    wait_for(lambda: call(api, "GET", "/statistics")[1]["statistics"]["runs_finished"] == 1,
             message="the run to end")
    status, body = call(api, "GET", "/statistics")
    statistics = body["statistics"]
    assert body["status"] == "waiting" and statistics["outcome"] == "partial"
    assert {key: statistics[key] for key in ("start_pulse_id", "stop_pulse_id", "last_pulse_id", "first_pulse_id",
                                             "messages_written", "messages_before_start", "missing_pulses",
                                             "progress", "end_reason")} == {
        "start_pulse_id": 100, "stop_pulse_id": 105, "last_pulse_id": 105, "first_pulse_id": 100,
        "messages_written": 5, "messages_before_start": 2, "missing_pulses": 1, "progress": 1.0,
        "end_reason": "stop_reached"}
    assert statistics["missing"] == [{"first_pulse_id": 103, "last_pulse_id": 103, "count": 1,
                                      "reason": "pulse_id_jump"}]
    assert statistics["last_timestamp"] == pytest.approx(1.0e9 + 1.05)
    assert statistics["bytes_written"] > 0 and statistics["output_file"] == str(api.root / "sub" / "run.h5")
    with h5py.File(api.root / "sub" / "run.h5", "r") as file:
        assert list(file["data/VALUE/pulse_id"][()]) == [100, 101, 102, 104, 105]
        assert file["data/VALUE/data"][()].ravel().tolist() == [50.0, 50.5, 51.0, 52.0, 52.5]
        assert file["general/user"][()] == b"e12345"
        assert file.attrs["requested_start_pulse_id"] == 100 and file.attrs["requested_stop_pulse_id"] == 105
        assert file.attrs["end_reason"] == "stop_reached"
        assert file["missing"][()].tolist() == [(103, 103, 1, b"pulse_id_jump")]
    assert_error(api, "PUT", "/stop_now", 409, "has not started")
    assert not api.writer.done.is_set()
    assert call(api, "GET", "/stop") == (200, {"state": "ok", "status": "finished"})
    assert api.writer.done.is_set() and api.writer.exit_code == 3


def test_stop_closes_the_file_and_answers_when_closed(api):
    call(api, "PUT", "/start_pulse_id/10")
    api.source.send(10, 11, 12)
    wait_for(lambda: api.writer.statistics().messages_written == 3, message="3 messages")
    assert call(api, "GET", "/stop") == (200, {"state": "ok", "status": "finished"})
    assert api.writer.done.is_set() and api.source.closed.is_set()
    with h5py.File(api.root / "out.h5", "r") as file:
        assert list(file["data/VALUE/pulse_id"][()]) == [10, 11, 12]
        assert file.attrs["end_reason"] == "stopped" and file.attrs["complete"] == 1
    assert call(api, "GET", "/stop")[1]["status"] == "finished"  # idempotent


def test_kill_before_start_needs_no_file(api):
    assert call(api, "GET", "/kill") == (200, {"state": "ok", "status": "finished"})
    assert api.writer.done.is_set() and api.writer.exit_at_once.is_set()
    assert not (api.root / "out.h5").exists()
    assert call(api, "GET", "/statistics")[1]["statistics"]["end_reason"] == "killed before start"


def test_stop_now_closes_a_silent_source_at_once(api_on_run_clock, run_clock):
    api = api_on_run_clock
    call(api, "PUT", "/start_now")
    api.source.send(1)  # timestamp far in the past: before the start time
    assert call(api, "PUT", "/stop_now")[1]["status"] in ("writing", "finishing", "finished")
    # The source stays quiet; 1 s of the run loop's clock (not the 30 s stop deadline) ends the run.
    wait_for(lambda: run_clock.advance(0.05) or api.writer.done.is_set(), timeout=15,
             message="stop_now on a silent source")
    statistics = api.writer.statistics()
    assert statistics.end_reason == "source_silent" and statistics.messages_before_start == 1
    assert api.source.stops and api.source.stops[0][1] is not None


def test_an_unopenable_file_is_400_and_the_writer_may_try_again(api):
    (api.root / "blocked").write_text("a file where a directory is needed")
    assert_error(api, "PUT", "/start_pulse_id/5", 400, "blocked is a file, not a folder",
                 json={"output_file": "blocked/x.h5"})
    assert_error(api, "PUT", "/start_pulse_id/5", 400, "cannot start writing", "File name too long",
                 json={"output_file": "x" * 300 + ".h5"})
    assert call(api, "GET", "/status")[1]["status"] == "waiting"
    assert call(api, "PUT", "/start_pulse_id/5", json={"output_file": "y" * 252 + ".h5"})[1]["status"] == "writing"


def test_an_internal_error_is_500_json_and_the_server_lives_on(api, monkeypatch):
    def broken():
        raise RuntimeError("statistics exploded")
    monkeypatch.setattr(api.writer, "statistics", broken)
    assert_error(api, "GET", "/statistics", 500, "internal error", "RuntimeError", "statistics exploded")
    assert call(api, "GET", "/status") == (200, {"state": "ok", "status": "waiting"})


# -- the client ------------------------------------------------------------------
def test_client_methods_and_errors(api):
    client = api.client
    assert client.status() == "waiting"
    assert client.set_parameters(PARAMETERS) == PARAMETERS
    with pytest.raises(WriterError) as caught:
        client.stop_now()
    assert caught.value.http_status == 409 and "not started" in caught.value.status
    with pytest.raises(WriterError) as caught:
        client.start_pulse_id(-3)
    assert caught.value.http_status == 400 and "negative" in caught.value.status
    assert client.start_pulse_id(7, output_file="client.h5") == "writing"
    assert client.stop_pulse_id(8) == "writing"
    api.source.send(7, 8)
    # Its own output_file: persistent, so the run's end is "waiting" again, and /stop ends the writer.
    assert client.wait_for("waiting", timeout=20, interval=0.05) == "waiting"
    assert client.statistics()["last_pulse_id"] == 8
    assert (api.root / "client.h5").exists()
    assert client.stop() == "finished"


def test_client_cli(api, capsys):
    def run(*args):
        code = client_module.main([api.url, *args])
        return code, capsys.readouterr().out

    code, out = run("parameters", *(f"{key}={value}" for key, value in PARAMETERS.items()))
    assert code == 0 and json.loads(out)["parameters"] == PARAMETERS
    code, out = run("stop_now")
    assert code == 1 and json.loads(out) == {"state": "error", "http_status": 409,
                                             "status": json.loads(out)["status"]}
    code, out = run("start_pulse_id", "abc")
    assert code == 1 and "non-negative integer" in out
    code, out = run("start_now", "cli.h5")
    assert code == 0 and json.loads(out) == {"state": "ok", "status": "writing"}
    code, out = run("statistics")
    assert code == 0 and json.loads(out)["statistics"]["output_file"] == str(api.root / "cli.h5")
    code, out = run("stop")
    assert code == 0 and json.loads(out)["status"] == "finished"
    assert client_module.main(["http://127.0.0.1:1", "status", "--timeout", "2"]) == 2


# ----------------------------------------- the run loop with a scripted source


def test_a_late_stop_cuts_the_file_and_every_attribute_is_documented(api):
    """start_pulse_id, then a stop behind what was written: the rows after it are removed before the close."""
    call(api, "POST", "/parameters", json=PARAMETERS)
    call(api, "PUT", "/start_pulse_id/10")
    api.source.send(10, 11, 12, 13, 14, 15)
    api.source.events.put(replay.Gap(None, None, "before_buffer", 2))  # unlocated: in the attributes
    wait_for(lambda: api.writer.statistics().gap_notices == 1, message="6 messages and the gap")
    assert call(api, "PUT", "/stop_pulse_id/12")[1]["status"] in ("writing", "finishing", "finished")
    wait_for(api.writer.done.is_set, message="the writer to finish")
    statistics = api.writer.statistics()
    assert (statistics.messages_written, statistics.last_pulse_id, statistics.end_reason) == \
        (3, 12, "stop_reached")
    with h5py.File(api.root / "out.h5", "r") as file:
        assert list(file["data/VALUE/pulse_id"][()]) == [10, 11, 12]
        assert file.attrs["rows_removed_after_stop"] == 3 and file.attrs["last_pulse_id"] == 12
        assert json.loads(file.attrs["unlocated_gaps"])[0]["count"] == 2
        assert set(file.attrs) == set(FILE_ATTRIBUTES) - {"requested_start_time", "requested_stop_time",
                                                          "refused_channels", "pulse_sources"}  # no archive


def _writer(tmp_path, source, output_factory=None, clock=time.time, monotonic=time.monotonic) -> Writer:
    settings = WriterSettings("tcp://127.0.0.1:1", str(tmp_path / "out.h5"), finished_grace=0.0)
    writer = Writer(settings, source_factory=source, output_factory=output_factory, clock=clock,
                    monotonic=monotonic)
    writer.set_parameters(PARAMETERS)
    return writer


def test_a_range_by_time_has_the_documented_attributes(tmp_path, run_clock):
    source, clock = QueuedSource(), FakeClock(1000.0)
    writer = _writer(tmp_path, source, clock=clock, monotonic=run_clock)
    writer.start_now()
    source.send(1, 2, 3, timestamp=1000.0)
    wait_for(lambda: writer.statistics().messages_written == 3, message="3 messages")
    clock.now = 2000.0
    writer.stop_now()  # nothing follows: the silent source ends the run
    wait_for(lambda: run_clock.advance(0.05) or writer.done.is_set(), timeout=30, message="the silent source")
    with h5py.File(tmp_path / "out.h5", "r") as file:
        assert (file.attrs["requested_start_time"], file.attrs["requested_stop_time"]) == (1000.0, 2000.0)
        assert set(file.attrs) == set(FILE_ATTRIBUTES) - {
            "requested_start_pulse_id", "requested_stop_pulse_id", "unlocated_gaps", "rows_removed_after_stop",
            "refused_channels", "pulse_sources"}


class NeverQuietSource(QueuedSource):
    """After its script, the oldest message again and again: never a receive timeout, never a row."""

    def receive(self, timeout: float):
        try:
            return self.events.get_nowait()
        except queue.Empty:
            self.closed.wait(0.001)  # pacing only: a busy source, not a spinning one
            return replay.Data(1, build_message(1, CHANNELS, [0.5]))


@pytest.mark.parametrize("source_class", [QueuedSource, NeverQuietSource], ids=["quiet", "busy_without_rows"])
def test_rows_are_flushed_within_the_interval_without_a_new_row(tmp_path, source_class):
    """The kill -9 guarantee (data at most flush_interval old) holds when no row comes to trigger a flush."""
    source, clock = source_class(), FakeClock(0.0)
    writer = _writer(tmp_path, source, lambda start: H5File(start.output_file, flush_interval=1.0, clock=clock))
    try:
        writer.start_at_pulse(1)
        source.send(1, 2, 3)
        wait_for(lambda: writer.statistics().messages_written == 3, message="3 messages")
        assert writer.statistics().rows_flushed == 0  # the interval has not passed yet
        clock.now = 1.5
        wait_for(lambda: writer.statistics().rows_flushed == 3, message="the idle flush")
        if source_class is NeverQuietSource:
            assert writer.statistics().messages_out_of_order > 0
    finally:
        writer.stop(wait=30)


def test_a_removed_output_folder_ends_the_run_as_an_error(api):
    call(api, "PUT", "/stop_pulse_id/1000")
    assert call(api, "PUT", "/start_pulse_id/1", json={"output_file": "run/x.h5"})[1]["status"] == "writing"
    api.source.send(1, 2, 3)
    wait_for(lambda: api.writer.statistics().rows_flushed == 3, message="3 rows on disk")
    shutil.rmtree(api.root / "run")
    api.source.send(4, 5, 6)  # the next flush finds the file gone
    # A persistent run (its own output_file): the error is the run's, the writer waits for the next start.
    wait_for(lambda: api.writer.statistics().runs_finished == 1, message="the run to end")
    statistics = api.writer.statistics()
    assert api.writer.status() == "waiting" and statistics.outcome == "failed"
    assert "removed while it was written" in statistics.error and statistics.end_reason == "writer_error"
    api.writer.stop()
    assert api.writer.done.is_set() and api.writer.exit_code == 1  # the worst run's outcome


# -- the outcome: complete, partial, failed --------------------------------------
def _run_to_the_end(api, start: int, stop: int, *pulse_ids: int) -> dict:
    call(api, "PUT", f"/stop_pulse_id/{stop}")
    assert call(api, "PUT", f"/start_pulse_id/{start}")[1]["status"] == "writing"
    api.source.send(*pulse_ids)
    wait_for(api.writer.done.is_set, message="the writer to finish")
    return call(api, "GET", "/statistics")[1]["statistics"]


@pytest.mark.parametrize("pulse_ids, outcome, exit_code", [
    ((1, 2, 3, 4), "complete", 0),
    ((1, 2, 4), "partial", 3),  # pulse 3 missing
    ((), "failed", 1),  # nothing of the range arrived: was exit 0 with "0 pulses missing" for a range by time
], ids=["complete", "partial", "failed"])
def test_the_outcome_is_the_same_word_everywhere(api_on_run_clock, run_clock, pulse_ids, outcome, exit_code):
    api = api_on_run_clock
    if not pulse_ids:  # a silent source: the stop deadline (30 s of the run loop's clock) ends the run
        call(api, "PUT", "/stop_pulse_id/3")
        call(api, "PUT", "/start_pulse_id/1")
        wait_for(lambda: run_clock.advance(1.0) or api.writer.done.is_set(), message="the stop deadline")
        statistics = call(api, "GET", "/statistics")[1]["statistics"]
    else:
        statistics = _run_to_the_end(api, 1, 3, *pulse_ids)
    assert statistics["outcome"] == outcome and api.writer.exit_code == exit_code
    with h5py.File(api.root / "out.h5", "r") as file:
        assert file.attrs["outcome"] == outcome and file.attrs["complete"] == 1
    with open(str(api.root / "out.h5") + ".summary.json", encoding="utf-8") as summary_file:
        summary = json.load(summary_file)
    assert summary["outcome"] == outcome and summary["output_file"] == str(api.root / "out.h5")
    assert summary["missing_pulses"] == statistics["missing_pulses"] and "writer" in summary


def test_a_refused_channel_makes_the_outcome_partial(api, monkeypatch):
    """Refusals found at the close (a channel first present in the last block) count too."""
    from sf_bsread_writer.h5 import file as h5_file_module

    monkeypatch.setattr(h5_file_module, "channel_group_name", lambda name: "VALUE" if name == "TWIN" else name)
    call(api, "PUT", "/stop_pulse_id/2")
    call(api, "PUT", "/start_pulse_id/1")
    twin = CHANNELS + [{"name": "TWIN", "type": "float64", "shape": [1]}]
    for pulse_id in (1, 2):
        api.source.events.put(replay.Data(pulse_id, build_message(pulse_id, twin, [0.5, 1.5], timestamp=1.0e9)))
    wait_for(api.writer.done.is_set, message="the writer to finish")
    assert api.writer.statistics().outcome == "partial" and api.writer.exit_code == 3
    with h5py.File(api.root / "out.h5", "r") as file:
        assert file.attrs["outcome"] == "partial" and "TWIN" in file.attrs["refused_channels"]


def test_a_stop_sent_as_a_persistent_run_ends_is_not_applied_to_the_next_run(tmp_path):
    """A stop the run loop never read (posted while the run was ending) belongs to that run only.

    The moment is found through the writer's output seam: run 1's file,
    as its last row reaches it (after the loop's last read, before the end).
    """
    root = tmp_path / "root"
    root.mkdir()
    files: list[H5File] = []
    stopped_while_ending: list[int] = []

    def output(start):
        file = open_output(start, 0.2, str(root))
        if not files:
            flush = file.flush

            def a_stop_arrives_while_ending():
                if file.rows == 3 and writer.state is State.WRITING and not stopped_while_ending:  # a REST thread
                    writer.stop_at_pulse(3)
                    stopped_while_ending.append(3)
                flush()

            file.flush = a_stop_arrives_while_ending
        files.append(file)
        return file

    serving = _serve(root, output_factory=output)
    api = next(serving)
    writer = api.writer
    try:
        call(api, "PUT", "/stop_pulse_id/3")
        call(api, "PUT", "/start_pulse_id/1", json={"output_file": "run1.h5"})
        api.source.send(1, 2, 3)
        wait_for(lambda: writer.statistics().runs_finished == 1, message="run 1 to end")
        assert stopped_while_ending == [3]  # the moment came, and the stop in it
        call(api, "PUT", "/stop_pulse_id/20")
        call(api, "PUT", "/start_pulse_id/10", json={"output_file": "run2.h5"})
        api.source.send(*range(10, 21))
        wait_for(lambda: writer.statistics().runs_finished == 2, message="run 2 to end")
        statistics = writer.statistics()
        assert (statistics.outcome, statistics.messages_written, statistics.stop_pulse_id) == ("complete", 11, 20)
        with h5py.File(api.root / "run2.h5", "r") as file:
            assert file.attrs["requested_stop_pulse_id"] == 20 and file.attrs["number_of_messages"] == 11
    finally:
        serving.close()
