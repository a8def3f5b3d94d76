#!/usr/bin/env python
"""What a channel set change costs the gateway's clients (issue 22).

    .venv/bin/python benchmarks/bench_gateway_changes.py [--clients 10] [--channels 100]

A bsread source in this process (tests.ca_helpers.Feeder, 10 Hz, ``--channels``
float64 channels) feeds a standalone gateway; ``--clients`` libca clients
(pyepics, ``tests.ca_helpers.PYEPICS_MULTI_WATCHER``) each monitor 10 channels
that are never changed and the status PVs ``NAME:PULSE_ID``, ``NAME:CHANNELS``
and ``NAME:RATE``. Then, one step at a time: 20 channel additions (scalars of
several types, a 64-bit integer, a string, a waveform, an enum), 5 removals,
5 retypes the records hold (float64 -> int16/int32). After every addition,
EPICS base's ``caget`` (loopback environment, nothing else configured) is
retried until it reads the new PV: the time from the header change to that
answer. Reported: the monitored clients' disconnects, IOC replacements, and
the times to readable. Then 5 retypes no record holds (float64 -> string,
float64 -> float32[8] waveform, an int32 channel in a longin -> float64, an
int32[4] waveform -> int32[64], an enum whose states changed), each channel
first added as its old type and settled: the PV name moves to a spare record
of the new type in the running IOC. Reported: the disconnects they cost, IOC
replacements, and the time from the header change until ``cainfo`` shows the
new native type and ``caget`` a valid value. Every process on 127.0.0.1, free
ports, nothing broadcast.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tests.ca_helpers import (  # noqa: E402
    PYEPICS_MULTI_WATCHER,
    VENV_BIN,
    Feeder,
    ca_env,
    start_gateway,
    start_repeater,
)
from tests.helpers import Child  # noqa: E402

NEW_KINDS = [
    ({"type": "float64"}, lambda pid: float(pid)),
    ({"type": "int32"}, lambda pid: np.int32(pid)),
    ({"type": "int16"}, lambda pid: np.int16(pid % 1000)),
    ({"type": "int64"}, lambda pid: np.int64(2**40 + pid)),
    ({"type": "string"}, lambda pid: f"p{pid}"),
    ({"type": "float32", "shape": [4]}, lambda pid: np.arange(4, dtype=np.float32) + pid),
    ({"type": "uint8", "enum_strings": ["Off", "On"]}, lambda pid: np.uint8(pid % 2)),
]


class Source:
    """The channel set as a list of (header entry, value function); the feeder follows every change."""

    def __init__(self, n_channels: int) -> None:
        self.channels: list[tuple[dict, object]] = [({"name": f"CH{i:04d}", "type": "float64"},
                                                      lambda pid, i=i: float(pid + i)) for i in range(n_channels)]
        self.feeder = Feeder(*self._both(), rate=10.0)

    def _both(self) -> tuple[list[dict], object]:
        entries = [dict(entry) for entry, _ in self.channels]
        functions = [function for _, function in self.channels]
        return entries, lambda pid: [function(pid) for function in functions]

    def apply(self) -> float:
        self.feeder.set(*self._both())
        return time.monotonic()

    def close(self) -> None:
        self.feeder.close()


def caget_until(pv: str, env: dict[str, str], since: float, timeout: float = 30.0) -> float:
    full_env = dict(os.environ) | env
    while time.monotonic() - since < timeout:
        answer = subprocess.run([str(VENV_BIN / "caget"), "-w", "0.5", "-t", pv + ".SEVR"], env=full_env,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        if answer.returncode == 0 and answer.stdout.strip() == "NO_ALARM":
            return time.monotonic() - since
    return float("inf")


def native_until(pv: str, native: str, env: dict[str, str], since: float, timeout: float = 30.0) -> float:
    """Seconds from ``since`` until ``cainfo`` shows ``pv``'s native type ``native`` and ``caget`` a valid value."""
    full_env = dict(os.environ) | env
    while time.monotonic() - since < timeout:
        info = subprocess.run([str(VENV_BIN / "cainfo"), "-w", "0.5", pv], env=full_env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, check=False)
        if f"Native data type: {native}" in info.stdout:
            return caget_until(pv, env, since, timeout)
    return float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--channels", type=int, default=100)
    args = parser.parse_args()
    env = ca_env()
    repeater = start_repeater(env)
    source = Source(args.channels)
    gateway = None
    watchers: list[Child] = []
    try:
        gateway, _ = start_gateway(source.feeder.address, env, "--ca-prefix", "CHG:", "--name", "CHG")
        caget_until("CHG:CH0000", env, time.monotonic(), timeout=60)
        status = ["CHG:PULSE_ID", "CHG:CHANNELS", "CHG:RATE"]
        for client in range(args.clients):
            names = [f"CHG:CH{(client * 10 + k) % 50:04d}" for k in range(10)] + status
            watchers.append(Child([sys.executable, "-c", PYEPICS_MULTI_WATCHER, *names], env=env))
        for watcher in watchers:
            watcher.wait_for_line(lambda line: line.startswith("CONNECTED") and line.endswith("True"), timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                watcher.output().count(" True") >= 13 for watcher in watchers):
            time.sleep(0.2)

        def disconnects() -> int:
            return sum(line.startswith("CONNECTED") and line.endswith("False")
                       for watcher in watchers for line in watcher.output().splitlines())

        readable = []
        for number in range(20):
            entry, function = NEW_KINDS[number % len(NEW_KINDS)]
            name = f"NEW{number:02d}"
            source.channels.append(({"name": name, **entry}, function))
            changed = source.apply()
            readable.append(caget_until(f"CHG:{name}", env, changed))
        for number in range(5):  # removals: channels nobody monitors
            source.channels = [c for c in source.channels if c[0]["name"] != f"CH{90 + number:04d}"]
            source.apply()
            time.sleep(0.5)
        for number in range(5):  # retypes the records hold: float64 -> int16 / int32 into an ai
            name = f"CH{80 + number:04d}"
            kind = "int16" if number % 2 else "int32"
            source.channels = [({"name": name, "type": kind}, (lambda pid: np.int16(pid % 1000)) if number % 2
                                else (lambda pid: np.int32(pid))) if c[0]["name"] == name else c
                               for c in source.channels]
            source.apply()
            time.sleep(0.5)
        time.sleep(3)
        replacements = gateway.output().count("the IOC is replaced")
        print(f"{args.clients} libca clients x (10 channels + 3 status PVs), load average {os.getloadavg()[0]:.1f}")
        print(f"20 additions, 5 removals, 5 held retypes: {disconnects()} disconnects of monitored PVs, "
              f"{replacements} IOC replacements")
        finite = [t for t in readable if t != float("inf")]
        print(f"new channel readable by caget: median {statistics.median(finite):.2f} s, max {max(readable):.2f} s"
              f" ({sum(t <= 3.0 for t in readable)} of 20 within 3 s)")

        # Retypes no record holds: each channel added as its old type (a spare), then retyped at once.
        retypes = [
            ("RT0", {"type": "float64"}, lambda pid: float(pid), {"type": "string"}, lambda pid: f"s{pid}",
             "DBF_STRING"),
            ("RT1", {"type": "float64"}, lambda pid: float(pid), {"type": "float32", "shape": [8]},
             lambda pid: np.arange(8, dtype=np.float32) + pid, "DBF_FLOAT"),
            ("RT2", {"type": "int32"}, lambda pid: np.int32(pid), {"type": "float64"}, lambda pid: pid + 0.5,
             "DBF_DOUBLE"),
            ("RT3", {"type": "int32", "shape": [4]}, lambda pid: np.arange(4, dtype=np.int32) + pid,
             {"type": "int32", "shape": [64]}, lambda pid: np.arange(64, dtype=np.int32) + pid, "DBF_LONG"),
            ("RT4", {"type": "uint8", "enum_strings": ["Off", "On"]}, lambda pid: np.uint8(pid % 2),
             {"type": "uint8", "enum_strings": ["A", "B", "C"]}, lambda pid: np.uint8(pid % 3), "DBF_ENUM"),
        ]
        for name, old_entry, old_function, _, _, _ in retypes:
            source.channels.append(({"name": name, **old_entry}, old_function))
        caget_until(f"CHG:{retypes[-1][0]}", env, source.apply())
        time.sleep(2)  # settled: the next change is a retype of channels the IOC serves
        before = disconnects()
        replacements_before = gateway.output().count("the IOC is replaced")
        new_entries = {name: ({"name": name, **entry}, function) for name, _, _, entry, function, _ in retypes}
        source.channels = [new_entries.get(c[0]["name"], c) for c in source.channels]
        changed = source.apply()
        retyped = [native_until(f"CHG:{name}", native, env, changed) for name, *_, native in retypes]
        time.sleep(3)
        finite = [t for t in retyped if t != float("inf")]
        print(f"5 retypes no record holds: {disconnects() - before} disconnects of monitored PVs, "
              f"{gateway.output().count('the IOC is replaced') - replacements_before} IOC replacements; new type "
              f"readable by caget: median {statistics.median(finite) if finite else float('inf'):.2f} s, "
              f"max {max(retyped):.2f} s ({sum(t <= 3.0 for t in retyped)} of 5 within 3 s)")
    finally:
        for watcher in watchers:
            watcher.stop()
        if gateway is not None:
            gateway.stop()
        source.close()
        repeater.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
