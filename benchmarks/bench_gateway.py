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

Latency is the client's receive time minus the value's bsread timestamp
(the source's send time): source -> buffer -> live output -> gateway -> CA.
Both clocks are this machine's. Results are printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.ca_helpers import Tool, ca_env, start_repeater  # noqa: E402
from tests.helpers import Child, wait_for  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_CAMONITOR_LINE = re.compile(r"^(\S+)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\)")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _gateway_pid(buffer: Child) -> int | None:
    """The process that serves CA under a buffer: the gateway, or (softioc) the IOC child that runs.

    The softioc gateway is a supervisor with a serving IOC child and a standby one (imports done,
    EPICS not started); the serving one is the gateway process with the most threads (EPICS' own).
    """
    candidates = []
    for pid in _children(buffer.process.pid):
        for child in [pid, *_children(pid)]:
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


def _parse_camonitor(lines: list[str]) -> list[tuple[str, float]]:
    """(pv, latency seconds) per update line."""
    parsed = []
    for line in lines:
        match = _CAMONITOR_LINE.match(line)
        if not match:
            continue
        server = datetime.strptime(match.group(2)[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        client = datetime.strptime(match.group(3)[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        parsed.append((match.group(1), client - server))
    return parsed


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


def _cpu_share(pids: list[int | None], seconds: float) -> list[float | None]:
    before = [(_cpu_seconds(pid) if pid else None) for pid in pids]
    time.sleep(seconds)
    after = [(_cpu_seconds(pid) if pid else None) for pid in pids]
    return [None if b is None else (a - b) / seconds * 100 for a, b in zip(after, before)]


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
    camera_port = str(_free_port())
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


def _free_port() -> int:
    from tests.helpers import free_port

    return free_port()


def _forwarding_rate(stack: Stack, seconds: float) -> float:
    first = stack.statistics()
    started = time.monotonic()
    time.sleep(seconds)
    last = stack.statistics()
    return (last["forwarded"] - first["forwarded"]) / (time.monotonic() - started)


def scenario_forwarding(env: dict[str, str], duration: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for ca in (False, True):
        key = "with_ca" if ca else "without_ca"
        stack = Stack(env, "scalars", 0, ca=ca)
        tool = Tool("camonitor", ["SCALAR:CH0000"], env) if ca else None
        try:
            wait_for(lambda: stack.statistics()["forwarded"] > 200, timeout=60, interval=0.2)
            time.sleep(2)  # warm-up, then measure
            result[f"forwarded_per_s_{key}"] = _forwarding_rate(stack, duration)
        finally:
            if tool is not None:
                tool.stop()
            stack.close()
        stack = Stack(env, "scalars", 100, ca=ca)
        tool = Tool("camonitor", ["SCALAR:CH0000"], env) if ca else None
        try:
            wait_for(lambda: stack.statistics()["forwarded"] > 200, timeout=60, interval=0.2)
            gateway = _gateway_pid(stack.buffer) if ca else None
            cpu = _cpu_share([stack.buffer.process.pid, gateway], duration)
            result[f"cpu_buffer_pct_100hz_{key}"] = cpu[0]
            if ca:
                result["cpu_gateway_pct_100hz"] = cpu[1]
        finally:
            if tool is not None:
                tool.stop()
            stack.close()
    result["cost_of_ca_pct"] = (1 - result["forwarded_per_s_with_ca"] / result["forwarded_per_s_without_ca"]) * 100
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
    args = parser.parse_args()
    env = ca_env()
    repeater = start_repeater(env)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}}
    try:
        for name in args.only or list(SCENARIOS):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = SCENARIOS[name](env, args.duration)
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
