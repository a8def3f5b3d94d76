"""Web service benchmark (issue 12): websocket fan-out, past ranges, and what --web costs the buffer.

    .venv/bin/python benchmarks/bench_web.py [--only fanout forwarding range] [--duration 10]
        [--clients 50x100] [--repeats 3] [--max-repeats N] [--arms without,web,clients]
        [--source simulate|raw] [--range-pulses 10000] [--json FILE]

Scenarios (every process on 127.0.0.1, free ports; simulator -> buffer [--web]):

* ``fanout``     ``sf_bsread_writer.tools.simulate`` (scalars, 500 channels, 100 Hz) -> buffer
  ``--web``; K websocket clients (``--clients KxM``, default 50x100) on M channels each,
  client c on channels c*M .. c*M+M-1 (mod 500: every channel is watched), ``max_rate`` 10.
  All K sockets live in ONE separate Python process (aiohttp, one asyncio loop: this file
  run with ``--client-process``), which records every value's receive time minus its
  timestamp (the source's bsread timestamp: its send time) and counts updates whose own
  timestamp lies in the window (so a client that lagged does not count a backlog as a rate).
  Reported: updates/s per channel (slowest and median client, and the slowest
  client x channel), latency p50/p95/p99, ``dropped`` reports, the CPU share (``/proc/<pid>/stat``)
  of the web service (the buffer's child, found by the buffer's pid), the buffer, the
  simulator, the client process and the whole machine, and the web service's RSS.
  Target (issue 12): ~10 updates/s per channel for every client; p95 latency reported.
* ``forwarding`` the buffer's forwarding rate (``GET /statistics`` ``forwarded``, as
  bench_gateway.py measures it: 2 s warm-up, then the count over ``--duration``) with the
  source flat out (500 channels), in rounds of ``--arms``: ``without`` (no ``--web``), ``web``
  (``--web``, nobody connected), ``clients`` (``--web`` plus the KxM clients); default
  ``without,clients``. ``--source simulate`` (default): the simulator at ``--rate 0``, as
  bench_gateway.py (the simulator is then the bottleneck, at a full core);
  ``--source raw``: benchmarks/common.py's raw ZMTP sender (cheap: the buffer becomes the
  bottleneck). Before each round the benchmark waits (up to 60 s) for an idle machine; the
  share of other work is measured in every window (2 cores shared with other sessions), and
  ``--max-repeats N`` runs up to N rounds until ``--repeats`` of them were quiet. Reported:
  every window, and per arm the ratio to the same round's ``without``. Target: >= 0.95.
* ``range``      a buffer (``-b 12000``) filled with >= 11 000 messages of 100 scalar channels
  (simulator flat out, then stopped so that the ring holds still), then
  ``GET /api/v1/range`` of the newest 10 000 pulses of all 100 channels as json, npz and hdf5,
  ``--repeats`` times each: seconds (request to last byte), MB/s (response bytes / seconds),
  the CPU seconds the web service and the buffer spent on it; the median per format.

Before each scenario the benchmark waits (up to 20 minutes) until no ``bench_ca_fanout`` or
``bench_gateway`` process runs (``--no-wait``: not), and records the load average
(``uptime``) and the commit measured (and whether the product's files differed from it).
Results are printed as Markdown tables (and JSON with ``--json``). Every process started
here is stopped by its pid, whatever happens (``try/finally``; SIGTERM of the benchmark
unwinds the same way).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gateway as bg  # (CPU shares from /proc, latency summary, forwarding rate, SIGTERM)
import numpy as np
import requests
from common import rss_of

from tests.helpers import Child, free_port, wait_for

CHANNEL = "SCALAR:CH{:04d}"  # the simulator's scalars profile
RAW_CHANNEL = "SARFE10-PBPG050:SIGNAL-{:03d}"  # benchmarks/common.py's scalars profile (the raw sender)


# ==========================================================================
# The client process: K websockets in one asyncio loop (``--client-process``)
# ==========================================================================
def _client_slices(n_clients: int, per_client: int, n_channels: int, pattern: str = CHANNEL) -> list[list[str]]:
    """Client c watches per_client consecutive channels from c * per_client on (wrapping round)."""
    return [[pattern.format((c * per_client + i) % n_channels) for i in range(per_client)]
            for c in range(n_clients)]


class _ClientRecord:
    """What one websocket client received: per value (channel index, timestamp, latency); drop reports."""

    def __init__(self, names: list[str]) -> None:
        self.index = {name: i for i, name in enumerate(names)}
        self.channel = array("i")
        self.stamp = array("d")
        self.latency = array("d")
        self.seen: set[str] = set()
        self.subscribed = False
        self.frames = 0
        self.dropped: list[tuple[float, int]] = []  # (receive time, count)
        self.errors: list[str] = []
        self.closed: str | None = None


async def _run_client(session: Any, url: str, names: list[str], max_rate: float, record: _ClientRecord,
                      stop: asyncio.Event) -> None:
    import aiohttp

    loads, now = json.loads, time.time
    channel, stamp, latency, index = record.channel.append, record.stamp.append, record.latency.append, record.index
    try:
        async with session.ws_connect(url, max_msg_size=0, autoping=True) as ws:
            await ws.send_json({"op": "subscribe", "channels": names, "max_rate": max_rate})
            while not stop.is_set():
                message = await ws.receive()
                received = now()
                if message.type != aiohttp.WSMsgType.TEXT:
                    record.closed = f"{message.type.name} {message.data!r}"
                    return
                document = loads(message.data)
                kind = document.get("type")
                if kind == "batch":
                    record.frames += 1
                    for value in document["messages"]:
                        t = value["timestamp"]
                        channel(index.get(value["channel"], -1))
                        stamp(t)
                        latency(received - t)
                    if len(record.seen) < len(names):
                        record.seen.update(value["channel"] for value in document["messages"])
                elif kind == "subscribed":
                    record.subscribed = True
                elif kind == "dropped":
                    record.dropped.append((received, int(document["count"])))
                elif kind == "error":
                    record.errors.append(document.get("status", ""))
    except asyncio.CancelledError:
        raise
    except Exception as error:  # noqa: BLE001  reported, not hidden: a client that died counts 0 updates
        record.closed = f"{type(error).__name__}: {error}"


async def _client_main(options: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    slices = _client_slices(options["clients"], options["per_client"], options["n_channels"], options["pattern"])
    records = [_ClientRecord(names) for names in slices]
    stop = asyncio.Event()
    window_start = window_end = None
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        tasks = [asyncio.create_task(_run_client(session, options["url"], names, options["max_rate"], record, stop))
                 for names, record in zip(slices, records)]
        deadline = started + 120
        while not all(r.subscribed and len(r.seen) >= len(r.index) for r in records):
            if time.monotonic() > deadline or all(task.done() for task in tasks):
                late = sum(1 for r in records if not (r.subscribed and len(r.seen) >= len(r.index)))
                print(f"FAILED {late} clients without every channel's first value; "
                      f"{[r.closed for r in records if r.closed][:3]}", flush=True)
                stop.set()
                break
            await asyncio.sleep(0.1)
        else:
            print(f"SUBSCRIBED {time.monotonic() - started:.2f}", flush=True)
        if not stop.is_set():
            await asyncio.sleep(options["warmup"])
            window_start = time.time()
            print(f"WINDOW_START {window_start:.6f}", flush=True)
            await asyncio.sleep(options["duration"])
            window_end = time.time()
            print(f"WINDOW_END {window_end:.6f}", flush=True)
            await asyncio.sleep(options["grace"])  # the window's last values arrive
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return _summarise_clients(records, window_start, window_end, options)


def _summarise_clients(records: list[_ClientRecord], start: float | None, end: float | None,
                       options: dict[str, Any]) -> dict[str, Any]:
    if start is None or end is None:
        return {"ok": False, "closed": [r.closed for r in records if r.closed][:5]}
    span = end - start
    per_client, latencies, channel_rates = [], [], []
    for record in records:
        stamps = np.frombuffer(record.stamp, dtype=np.float64)
        if options["count_by"] == "receive":  # a source whose timestamps are not its send time (raw sender)
            stamps = stamps + np.frombuffer(record.latency, dtype=np.float64)
        inside = (stamps >= start) & (stamps < end)
        channels = np.frombuffer(record.channel, dtype=np.int32)[inside]
        counts = np.bincount(channels[channels >= 0], minlength=len(record.index))
        latencies.append(np.frombuffer(record.latency, dtype=np.float64)[inside])
        channel_rates.append(counts / span)
        per_client.append({
            "updates_per_channel_s": float(inside.sum()) / span / len(record.index),
            "slowest_channel_per_s": float(counts.min()) / span,
            "dropped_values": sum(count for _, count in record.dropped),
            "dropped_values_in_window": sum(count for t, count in record.dropped if start <= t < end + options["grace"]),
            "dropped_reports": len(record.dropped),
            "frames": record.frames,
            "errors": record.errors[:3],
            "closed": record.closed,
        })
    all_latencies = np.concatenate(latencies) if latencies else np.zeros(0)
    path = options["latency_file"]
    np.save(path, all_latencies)
    return {"ok": True, "window": [start, end], "clients": per_client, "latency_file": path,
            "slowest_channel_any_client_per_s": float(min(rates.min() for rates in channel_rates))}


def client_process(argument: str) -> int:
    """Entry of the client process: options as JSON; prints SUBSCRIBED, WINDOW_START/END, RESULT {json}."""
    options = json.loads(argument)
    result = asyncio.run(_client_main(options))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ==========================================================================
# The benchmark (parent) process
# ==========================================================================
def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def product_state() -> str:
    """The commit measured, and whether the product's files differ from it (others edit the tree meanwhile)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--", "sf_bsread_writer")
    return git("rev-parse", "--short", "HEAD") + (f" + uncommitted: {' '.join(dirty.split())}" if dirty else "")


def wait_for_idle_machine(busy_pct: float = 10.0, timeout: float = 60.0) -> float:
    """Until the machine is (nearly) idle: this benchmark has nothing running between its phases, so what
    is busy is other work on the shared machine. Returns the last busy share (% of one core, 2 s sample)."""
    deadline = time.monotonic() + timeout
    while True:
        window = bg._CpuWindow([])
        time.sleep(2)
        window.shares()
        if window.machine_pct < busy_pct or time.monotonic() > deadline:
            return window.machine_pct


def wait_for_other_benchmarks(timeout: float = 1200.0) -> float:
    """Until no bench_ca_fanout / bench_gateway process runs (they share these 2 cores); seconds waited."""
    started = time.monotonic()
    announced = False
    while True:
        listing = subprocess.run(["ps", "-eo", "pid,cmd"], capture_output=True, text=True, check=True).stdout.splitlines()[1:]
        busy = [line.strip() for line in listing
                if ("bench_ca_fanout" in line or "bench_gateway" in line)
                and int(line.split(None, 1)[0]) != os.getpid()]
        if not busy:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            print(f"still running after {timeout:.0f} s, measuring anyway: {busy[:2]}", file=sys.stderr, flush=True)
            return time.monotonic() - started
        if not announced:
            print(f"waiting for other benchmarks to finish: {busy[:2]}", file=sys.stderr, flush=True)
            announced = True
        time.sleep(10)


class WebStack:
    """simulate -> buffer [--web]; every process stopped (by its pid) on close."""

    def __init__(self, rate: float, web: bool, n_channels: int = 500, buffer_length: int = 2000,
                 source: str = "simulate") -> None:
        self.children: list[Any] = []
        self.web_url: str | None = None
        try:
            self._start(rate, web, n_channels, buffer_length, source)
        except BaseException:
            self.close()
            raise

    def _start(self, rate: float, web: bool, n_channels: int, buffer_length: int, source: str) -> None:
        if source == "raw":  # benchmarks/common.py's raw ZMTP sender: the cheapest source there is
            port = free_port()
            code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
                    "common.run_raw_sender(f'scalars{sys.argv[2]}', int(sys.argv[3]), float(sys.argv[4]))")
            self.simulator = Child([sys.executable, "-c", code, str(ROOT / "benchmarks"), str(n_channels), str(port),
                                    str(rate)])
            self.children.append(self.simulator)
            self.simulator.wait_for_line("READY", timeout=60)
            address = f"tcp://127.0.0.1:{port}"
        else:
            self.simulator = Child([sys.executable, "-m", "sf_bsread_writer.tools.simulate", "--profile", "scalars",
                                    "--n-channels", str(n_channels), "--rate", str(rate), "--port", "0",
                                    "--log-level", "WARNING"])
            self.children.append(self.simulator)
            address = json.loads(self.simulator.wait_for_line("READY {", timeout=60).split("READY", 1)[1])["address"]
        args = [sys.executable, "-m", "sf_bsread_writer.buffer", address, "-o", "0", "--replay-port", "0",
                "--rest-port", "0", "--log-level", "WARNING", "-b", str(buffer_length)]
        if web:
            web_port = free_port()
            args += ["--web", "--web-port", str(web_port)]
            self.web_url = f"http://127.0.0.1:{web_port}"
        self.buffer = Child(args)
        self.children.append(self.buffer)
        # the web child prints its own READY on the same stdout: the buffer's names "rest"
        line = self.buffer.wait_for_line(lambda text: text.startswith("READY {") and '"rest"' in text, timeout=60)
        self.endpoints = json.loads(line.split("READY", 1)[1])
        if web:
            wait_for(self._web_has_values, timeout=60, interval=0.2, message="the web service's first live values")

    def _web_has_values(self) -> bool:
        try:
            return requests.get(self.web_url + "/api/v1/channels", timeout=2).json().get("status") == "ok"
        except (requests.RequestException, ValueError):
            return False

    def statistics(self) -> dict[str, Any]:
        return requests.get(self.endpoints["rest"] + "/statistics", timeout=5).json()["statistics"]

    def web_pid(self) -> int | None:
        """The web service: the buffer's child process (by the buffer's pid) running sf_bsread_writer.web."""
        for pid in bg._children(self.buffer.process.pid):
            try:
                if "sf_bsread_writer.web" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "):
                    return pid
            except OSError:
                continue
        return None

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()


class Clients:
    """The client process (K websockets in one loop); stopped by its pid."""

    def __init__(self, url: str, clients: tuple[int, int], n_channels: int, duration: float,
                 warmup: float = 2.0, max_rate: float = 10.0, pattern: str = CHANNEL, count_by: str = "stamp") -> None:
        self.directory = tempfile.mkdtemp(prefix="bench_web_")
        options = {"url": url.replace("http://", "ws://") + "/api/v1/ws", "clients": clients[0],
                   "per_client": clients[1], "n_channels": n_channels, "max_rate": max_rate,
                   "warmup": warmup, "duration": duration, "grace": 1.5, "pattern": pattern, "count_by": count_by,
                   "latency_file": os.path.join(self.directory, "latencies.npy")}
        self.child = Child([sys.executable, str(Path(__file__).resolve()), "--client-process", json.dumps(options)])
        self.pid = self.child.process.pid

    def wait_subscribed(self) -> float:
        line = self.child.wait_for_line(lambda text: text.startswith(("SUBSCRIBED", "FAILED")), timeout=150)
        if line.startswith("FAILED"):
            raise RuntimeError(f"clients: {line}")
        return float(line.split()[1])

    def wait_window(self, which: str, timeout: float) -> float:
        return float(self.child.wait_for_line(lambda text: text.startswith(which), timeout=timeout).split()[1])

    def result(self) -> dict[str, Any]:
        line = self.child.wait_for_line(lambda text: text.startswith("RESULT "), timeout=120)
        return json.loads(line[len("RESULT "):])

    def close(self) -> None:
        self.child.stop()
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))
        os.rmdir(self.directory)


def _client_summary(result: dict[str, Any]) -> dict[str, Any]:
    if not result.get("ok"):
        return {"clients_failed": result}
    per_client = result["clients"]
    rates = [c["updates_per_channel_s"] for c in per_client]
    latencies = np.load(result["latency_file"])
    summary = bg._latency_summary(latencies.tolist())
    return {
        "updates_per_channel_s_slowest_client": min(rates),
        "updates_per_channel_s_median_client": statistics.median(rates),
        "updates_per_channel_s_slowest_client_channel": result["slowest_channel_any_client_per_s"],
        "values_in_window": int(latencies.size),
        **{f"latency_{key}": value for key, value in summary.items()},
        "dropped_values_total": sum(c["dropped_values"] for c in per_client),
        "dropped_values_in_window": sum(c["dropped_values_in_window"] for c in per_client),
        "clients_with_drops": sum(1 for c in per_client if c["dropped_values"]),
        "clients_closed": [c["closed"] for c in per_client if c["closed"]][:3],
        "client_errors": [e for c in per_client for e in c["errors"]][:3],
    }


def _problems(child: Any) -> list[str]:
    """The service's own complaints (buffer and web child log to the buffer's output): the last few."""
    lines = child.output().splitlines()
    return [line for line in lines if any(word in line for word in ("ERROR", "Traceback", "Error", "WARNING"))][-8:]


def _web_metrics(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=5).text
    found = {}
    for line in text.splitlines():
        if line.startswith("sf_bsread_web_") and "{" not in line:
            name, value = line.split()
            found[name[len("sf_bsread_web_"):]] = float(value)
    return found


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------
def scenario_fanout(args: argparse.Namespace) -> dict[str, Any]:
    stack = WebStack(100, web=True)
    clients = None
    try:
        clients = Clients(stack.web_url, args.clients, 500, args.duration)
        connected = clients.wait_subscribed()
        web_pid = stack.web_pid()
        clients.wait_window("WINDOW_START", timeout=60)
        metrics_before = _web_metrics(stack.web_url)
        stats_before = stack.statistics()
        window = bg._CpuWindow([web_pid, stack.buffer.process.pid, stack.simulator.process.pid, clients.pid])
        clients.wait_window("WINDOW_END", timeout=args.duration + 60)
        web_cpu, buffer_cpu, simulator_cpu, clients_cpu = window.shares()
        seconds = time.monotonic() - window.started
        stats_after = stack.statistics()
        metrics_after = _web_metrics(stack.web_url)
        result = {
            "clients": f"{args.clients[0]}x{args.clients[1]}", "all_subscribed_after_s": connected,
            "cpu_web_pct": web_cpu, "cpu_buffer_pct": buffer_cpu, "cpu_simulator_pct": simulator_cpu,
            "cpu_clients_pct": clients_cpu, "cpu_machine_pct": window.machine_pct,
            "cpu_others_pct": _others(window.machine_pct, web_cpu, buffer_cpu, simulator_cpu, clients_cpu),
            "rss_web_mb": rss_of(web_pid) / 1e6 if web_pid else None,
            "rss_buffer_mb": rss_of(stack.buffer.process.pid) / 1e6,
            "web_pid_unchanged": stack.web_pid() == web_pid,
            "buffer_forwarded_per_s": (stats_after["forwarded"] - stats_before["forwarded"]) / seconds,
            "web_feed_messages_per_s": (metrics_after.get("feed_messages_total", 0)
                                        - metrics_before.get("feed_messages_total", 0)) / seconds,
            "web_values_sent_per_s": (metrics_after.get("values_sent_total", 0)
                                      - metrics_before.get("values_sent_total", 0)) / seconds,
            "web_values_dropped_total": metrics_after.get("values_dropped_total"),
            "web_clients": metrics_after.get("clients"),
            "web_clients_dropped_total": metrics_after.get("clients_dropped_total"),
            "service_log": _problems(stack.buffer),
        }
        result.update(_client_summary(clients.result()))
        return result
    finally:
        if clients is not None:
            clients.close()
        stack.close()


ARMS = {"without": "without --web", "web": "--web, no client", "clients": "--web + clients"}


def scenario_forwarding(args: argparse.Namespace) -> dict[str, Any]:
    """The buffer's forwarding rate, source flat out, without and with --web (+ clients), alternating.

    Arms (``--arms``): ``without`` (no --web), ``web`` (--web, nobody connected), ``clients`` (--web and the
    KxM clients). One repeat runs every arm once, in that order, after waiting for an idle machine.
    """
    runs: list[dict[str, Any]] = []
    quiet_repeats = 0
    raw = args.source == "raw"  # its values carry a fixed timestamp: client updates counted by receive time
    for repeat in range(args.max_repeats or args.repeats):
        if quiet_repeats >= args.repeats:
            break
        idle = wait_for_idle_machine()
        for arm in args.arms:
            web = arm != "without"
            stack = WebStack(0, web=web, source=args.source)
            clients = None
            try:
                run: dict[str, Any] = {"repeat": repeat + 1, "arm": arm, "web": web, "machine_busy_before_pct": idle}
                web_pid = stack.web_pid() if web else None
                if arm == "clients":
                    clients = Clients(stack.web_url, args.clients, 500, args.duration,
                                      pattern=RAW_CHANNEL if raw else CHANNEL, count_by="receive" if raw else "stamp")
                    run["all_subscribed_after_s"] = clients.wait_subscribed()
                    web_pid = stack.web_pid()
                wait_for(lambda stack=stack: stack.statistics()["forwarded"] > 200, timeout=60, interval=0.2,
                         message="200 messages forwarded")
                if clients is not None:
                    clients.wait_window("WINDOW_START", timeout=60)  # its own 2 s warm-up
                else:
                    time.sleep(2)  # warm-up, then measure (as bench_gateway.py)
                metrics_before = _web_metrics(stack.web_url) if clients is not None else {}
                window = bg._CpuWindow([stack.simulator.process.pid, stack.buffer.process.pid, web_pid,
                                        clients.pid if clients else None])
                run["forwarded_per_s"] = bg._forwarding_rate(stack, args.duration)
                shares = window.shares()
                run.update(zip(["cpu_simulator_pct", "cpu_buffer_pct", "cpu_web_pct", "cpu_clients_pct"], shares))
                run["cpu_machine_pct"] = window.machine_pct
                run["cpu_others_pct"] = _others(window.machine_pct, *shares)
                run["buffer_cpu_us_per_msg"] = shares[1] / 100 / run["forwarded_per_s"] * 1e6
                if web:
                    run["web_pid_unchanged"] = stack.web_pid() == web_pid
                if clients is not None:
                    metrics = _web_metrics(stack.web_url)
                    run.update({"web_clients_at_end": metrics.get("clients"),
                                "web_clients_dropped_total": metrics.get("clients_dropped_total"),
                                **{f"web_{name}_in_window": metrics.get(name, 0) - metrics_before.get(name, 0)
                                   for name in ("feed_messages_total", "values_sent_total", "values_dropped_total")}})
                    summary = _client_summary(clients.result())
                    run.update({key: summary.get(key) for key in (
                        "updates_per_channel_s_slowest_client", "updates_per_channel_s_median_client",
                        *(() if raw else ("latency_p50_ms", "latency_p95_ms")), "dropped_values_total",
                        "clients_failed", "clients_closed", "client_errors") if key in summary})
                    run["service_log"] = _problems(stack.buffer)
                runs.append(run)
                print(f"  forwarding repeat {repeat + 1} {arm}: {run['forwarded_per_s']:.0f} msg/s "
                      f"(other work {run['cpu_others_pct']:.0f} % of a core)", file=sys.stderr, flush=True)
            finally:
                if clients is not None:
                    clients.close()
                stack.close()
        quiet_repeats += max(run["cpu_others_pct"] or 0 for run in runs[-len(args.arms):]) < QUIET_PCT
    return {"clients": f"{args.clients[0]}x{args.clients[1]}", "source": args.source, "arms": args.arms,
            "runs": runs, **_forwarding_summary(runs, args.arms)}


def _forwarding_summary(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per arm: median rate and buffer CPU per message; per --web arm: its rate over the same repeat's
    ``without``, for every repeat and for the quiet ones (other work under QUIET_PCT in the whole repeat)."""
    summary: dict[str, Any] = {"median": {}, "buffer_cpu_us_per_msg_median": {}, "ratios": {}, "quiet_ratios": {}}
    for arm in arms:
        mine = [run for run in runs if run["arm"] == arm]
        summary["median"][arm] = statistics.median(run["forwarded_per_s"] for run in mine)
        summary["buffer_cpu_us_per_msg_median"][arm] = statistics.median(run["buffer_cpu_us_per_msg"] for run in mine)
    by_repeat: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_repeat.setdefault(run["repeat"], {})[run["arm"]] = run
    for arm in arms:
        if arm == "without" or "without" not in arms:
            continue
        ratios, quiet = [], []
        for group in by_repeat.values():
            if arm in group and "without" in group:
                ratio = group[arm]["forwarded_per_s"] / group["without"]["forwarded_per_s"]
                ratios.append(ratio)
                if max(run["cpu_others_pct"] or 0 for run in group.values()) < QUIET_PCT:
                    quiet.append(ratio)
        summary["ratios"][arm], summary["quiet_ratios"][arm] = ratios, quiet
    return summary


def scenario_range(args: argparse.Namespace) -> dict[str, Any]:
    held = args.range_pulses + 1000
    stack = WebStack(0, web=True, n_channels=100, buffer_length=held + 1000)
    try:
        wait_for(lambda: stack.statistics()["ring"]["messages"] >= held, timeout=180 + held / 100, interval=0.5,
                 message=f"{held} messages in the ring")
        stack.simulator.stop()  # the ring holds still from here on
        time.sleep(0.5)
        status = requests.get(stack.web_url + "/api/v1/status", timeout=10).json()
        look_back = status["look_back"]
        stop_pulse = look_back["newest_pulse_id"]
        start_pulse = stop_pulse - args.range_pulses + 1
        if start_pulse < look_back["oldest_pulse_id"]:
            raise RuntimeError(f"ring too short: {look_back}")
        channels = ",".join(CHANNEL.format(i) for i in range(100))
        web_pid, buffer_pid = stack.web_pid(), stack.buffer.process.pid
        runs: list[dict[str, Any]] = []
        rss_before = rss_of(web_pid) / 1e6
        for repeat in range(args.repeats):
            for fmt in ("json", "npz", "hdf5"):
                cpu_before = [bg._cpu_seconds(pid) for pid in (web_pid, buffer_pid)]
                started = time.monotonic()
                answer = requests.get(stack.web_url + "/api/v1/range",
                                      params={"channels": channels, "start_pulse_id": start_pulse,
                                              "stop_pulse_id": stop_pulse, "format": fmt}, timeout=300)
                body = answer.content
                seconds = time.monotonic() - started
                cpu_after = [bg._cpu_seconds(pid) for pid in (web_pid, buffer_pid)]
                run = {"format": fmt, "repeat": repeat + 1, "http_status": answer.status_code,
                       "seconds": seconds, "bytes": len(body), "mb_per_s": len(body) / 1e6 / seconds,
                       "cpu_web_s": cpu_after[0] - cpu_before[0], "cpu_buffer_s": cpu_after[1] - cpu_before[1],
                       "rss_web_mb": rss_of(web_pid) / 1e6,
                       "check": _check_range(fmt, body, answer.status_code, args.range_pulses)}
                runs.append(run)
                print(f"  range {fmt} #{repeat + 1}: {answer.status_code} {seconds:.2f} s {len(body) / 1e6:.1f} MB "
                      f"({run['check']})", file=sys.stderr, flush=True)
        result: dict[str, Any] = {"pulses": args.range_pulses, "channels": 100, "runs": runs,
                                  "rss_web_mb_before": rss_before,
                                  "rss_web_mb_after": rss_of(web_pid) / 1e6 if web_pid else None}
        for fmt in ("json", "npz", "hdf5"):
            mine = [run for run in runs if run["format"] == fmt]
            result[fmt] = {key: statistics.median(run[key] for run in mine)
                           for key in ("seconds", "bytes", "mb_per_s", "cpu_web_s", "cpu_buffer_s")}
            result[fmt]["checks"] = sorted({run["check"] for run in mine})
        return result
    finally:
        stack.close()


def _check_range(fmt: str, body: bytes, status: int, pulses: int) -> str:
    """A short verdict on the answer: complete and the expected rows, or what is wrong."""
    import io

    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        if fmt == "json":
            document = json.loads(body)
            rows = {len(column["pulse_id"]) for column in document["channels"].values()}
            return f"{document['status']}, {document['messages']} messages, {len(document['channels'])} ch, rows {rows}"
        if fmt == "npz":
            with np.load(io.BytesIO(body)) as archive:
                rows = {archive[name].shape[0] for name in archive.files if name.endswith("/pulse_id")}
                missing = json.loads(str(archive["missing"]))
                return f"{'complete' if not missing else 'partial'}, {len(archive.files)} arrays, rows {rows}"
        import h5py

        with h5py.File(io.BytesIO(body), "r") as file:
            names = list(file["data"])
            rows = {file[f"data/{name}/pulse_id"].shape[0] for name in names}
            return f"{file.attrs.get('outcome', '?')}, {len(names)} ch, rows {rows}"
    except Exception as error:  # noqa: BLE001  a verdict, not a crash: the timing is still reported
        return f"unreadable: {type(error).__name__}: {error}"


QUIET_PCT = 10.0  # forwarding: a pair counts as quiet when other work used less than this (% of a core)

SCENARIOS = {"fanout": scenario_fanout, "forwarding": scenario_forwarding, "range": scenario_range}


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------
def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} %"


def _others(machine: float | None, *mine: float | None) -> float | None:
    """The machine's busy share not used by the processes measured (other work on the machine)."""
    return None if machine is None else machine - sum(share or 0 for share in mine)


def markdown(results: dict[str, Any]) -> str:
    out = []
    if "fanout" in results:
        r = results["fanout"]
        out += ["### fanout", "", f"load before: `{results['load']['fanout']}`", "",
                ("| clients x channels | all subscribed after | updates/s per channel (slowest / median client; "
                 "slowest client x channel) | latency p50 / p95 / p99 | dropped values | web CPU | web RSS | "
                 "buffer CPU | simulator CPU | client process CPU | machine (of it others) |"),
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        if "clients_failed" in r:
            out.append(f"| {r['clients']} | failed: {r['clients_failed']} |")
        else:
            out.append(
                f"| {r['clients']} | {_f(r['all_subscribed_after_s'])} s | "
                f"{_f(r['updates_per_channel_s_slowest_client'], 2)} / {_f(r['updates_per_channel_s_median_client'], 2)}; "
                f"{_f(r['updates_per_channel_s_slowest_client_channel'], 2)} | "
                f"{_f(r.get('latency_p50_ms'), 0)} / {_f(r.get('latency_p95_ms'), 0)} / {_f(r.get('latency_p99_ms'), 0)} ms | "
                f"{r['dropped_values_total']} | {_pct(r['cpu_web_pct'])} | {_f(r['rss_web_mb'], 0)} MB | "
                f"{_pct(r['cpu_buffer_pct'])} | {_pct(r['cpu_simulator_pct'])} | {_pct(r['cpu_clients_pct'])} | "
                f"{_pct(r['cpu_machine_pct'])} ({_pct(r['cpu_others_pct'])}) |")
        out += ["", (f"web service: {_f(r['web_feed_messages_per_s'])} feed msg/s, "
                     f"{_f(r['web_values_sent_per_s'], 0)} values sent/s; buffer forwarded "
                     f"{_f(r['buffer_forwarded_per_s'])} msg/s; web pid unchanged: {r['web_pid_unchanged']}"), ""]
    if "forwarding" in results:
        r = results["forwarding"]
        out += ["### forwarding", "",
                f"load before: `{results['load']['forwarding']}`; flat-out source: {r['source']}", "",
                ("| repeat | arm | forwarded msg/s | buffer CPU per message | source CPU | buffer CPU | web CPU | "
                 "client process CPU | machine (of it others) | client updates/s per channel (slowest / median) | "
                 "client p50 / p95 |"),
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for run in r["runs"]:
            clients = (f"{_f(run.get('updates_per_channel_s_slowest_client'), 2)} / "
                       f"{_f(run.get('updates_per_channel_s_median_client'), 2)}" if run["arm"] == "clients" else "-")
            latency = (f"{_f(run.get('latency_p50_ms'), 0)} / {_f(run.get('latency_p95_ms'), 0)} ms"
                       if run.get("latency_p50_ms") is not None else "-")
            arm = ARMS[run["arm"]] + (f" {r['clients']}" if run["arm"] == "clients" else "")
            out.append(f"| {run['repeat']} | {arm} | "
                       f"{_f(run['forwarded_per_s'], 0)} | {_f(run['buffer_cpu_us_per_msg'], 0)} us | "
                       f"{_pct(run['cpu_simulator_pct'])} | {_pct(run['cpu_buffer_pct'])} | {_pct(run['cpu_web_pct'])} | "
                       f"{_pct(run['cpu_clients_pct'])} | {_pct(run['cpu_machine_pct'])} ({_pct(run['cpu_others_pct'])}) | "
                       f"{clients} | {latency} |")
        starved = [run["repeat"] for run in r["runs"] if run["arm"] == "clients"
                   and (run.get("updates_per_channel_s_slowest_client") or 0) < 1]
        if starved:
            out += ["", f"**WARNING**: in repeat(s) {starved} clients got (almost) no updates: see the JSON"]
        out += ["", ("| arm | median forwarded msg/s | median buffer CPU per message | over `without`, per repeat | "
                     f"the same, repeats with other work under {QUIET_PCT:.0f} % of a core | median of those |"),
                "|---|---|---|---|---|---|"]
        for arm in r["arms"]:
            ratios, quiet = r["ratios"].get(arm, []), r["quiet_ratios"].get(arm, [])
            out.append(f"| {ARMS[arm]} | {r['median'][arm]:.0f} | {r['buffer_cpu_us_per_msg_median'][arm]:.0f} us | "
                       f"{', '.join(f'{x:.3f}' for x in ratios) or '-'} | {', '.join(f'{x:.3f}' for x in quiet) or '-'} | "
                       f"{f'**{statistics.median(quiet):.3f}x**' if quiet else '-'} |")
        out.append("")
    if "range" in results:
        r = results["range"]
        out += ["### range", "", f"load before: `{results['load']['range']}`", "",
                f"{r['pulses']} pulses x {r['channels']} scalar channels, median of the repeats:", "",
                "| format | seconds | response | MB/s | web CPU s | buffer CPU s | answer |",
                "|---|---|---|---|---|---|---|"]
        for fmt in ("json", "npz", "hdf5"):
            m = r[fmt]
            out.append(f"| {fmt} | {m['seconds']:.2f} | {m['bytes'] / 1e6:.1f} MB | {m['mb_per_s']:.1f} | "
                       f"{m['cpu_web_s']:.2f} | {m['cpu_buffer_s']:.2f} | {'; '.join(m['checks'])} |")
        out += ["", "all runs (s): " + ", ".join(f"{run['format']} {run['seconds']:.2f}" for run in r["runs"]), "",
                (f"web service RSS: {r['rss_web_mb_before']:.0f} MB before the first request, after each: "
                 + ", ".join(f"{run['rss_web_mb']:.0f}" for run in r["runs"]) + " MB"), ""]
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--client-process":
        return client_process(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="Run only these scenarios.")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds measured per window.")
    parser.add_argument("--clients", default="50x100", help="K websocket clients x M channels each (of 500).")
    parser.add_argument("--repeats", type=int, default=3,
                        help="forwarding: rounds of the arms (alternating); range: requests per format.")
    parser.add_argument("--max-repeats", type=int, default=0,
                        help="forwarding: run up to this many repeats until --repeats of them were quiet (other work "
                             f"under {QUIET_PCT:.0f} %% of a core in every arm); 0: exactly --repeats.")
    parser.add_argument("--arms", default="without,clients",
                        help=f"forwarding: comma-separated arms per repeat, of {', '.join(ARMS)}.")
    parser.add_argument("--source", choices=("simulate", "raw"), default="simulate",
                        help="forwarding: the flat-out source: sf_bsread_writer.tools.simulate (as bench_gateway.py), "
                             "or benchmarks/common.py's raw ZMTP sender (cheap: the buffer becomes the bottleneck; "
                             "client updates counted by receive time, no latency: its timestamps are fixed).")
    parser.add_argument("--range-pulses", type=int, default=10000, help="range: pulses requested.")
    parser.add_argument("--no-wait", action="store_true", help="Do not wait for other CA benchmarks to finish.")
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args()
    args.clients = tuple(int(x) for x in args.clients.split("x"))
    args.arms = args.arms.split(",")
    if not set(args.arms) <= set(ARMS):
        parser.error(f"--arms: each of {', '.join(ARMS)}")
    bg.stop_on_sigterm()
    results: dict[str, Any] = {"started": datetime.now().isoformat(timespec="seconds"),
                               "machine": {"cpus": os.cpu_count()}, "load": {}, "waited_s": {}}
    results["product"] = {}
    for name in args.only or list(SCENARIOS):
        if not args.no_wait:
            results["waited_s"][name] = wait_for_other_benchmarks()
        results["load"][name] = uptime()
        results["product"][name] = product_state()
        print(f"running {name} ... ({results['load'][name]})", file=sys.stderr, flush=True)
        results[name] = SCENARIOS[name](args)
        print(f"{name}: {json.dumps(results[name], default=float)}", file=sys.stderr, flush=True)
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    results["load"]["after"] = uptime()
    results["product"]["after"] = product_state()
    print(f"product measured: {json.dumps(results['product'])}\n")
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
