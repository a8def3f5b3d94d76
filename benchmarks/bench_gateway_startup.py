#!/usr/bin/env python
"""The gateway's start-up and resting memory: from ``sf_bsread_gateway``'s process start to the first
``caget`` of a stream PV, and what its processes hold once serving.

    .venv/bin/python benchmarks/bench_gateway_startup.py [--runs 5] [--channels 100]

A bsread source in this process (tests.ca_helpers.Feeder, 10 Hz, ``--channels``
float64 channels) is sending before the gateway starts; every process on
127.0.0.1, free ports, nothing broadcast. ``caget`` (EPICS base) is retried
until it prints the value of the first channel. Memory, 5 s after that:
private (RssAnon) and proportional (Pss) memory of the supervisor, the
serving IOC and its warm standby. The load average is printed: on a shared
machine the figures depend on it.
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

from tests.ca_helpers import VENV_BIN, Feeder, ca_env, start_repeater  # noqa: E402
from tests.helpers import Child, children_of  # noqa: E402


def _memory(pid: int) -> tuple[int, int]:
    """(RssAnon, Pss) in kB."""
    anon = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return anon, pss


def one_run(env: dict[str, str], source: Feeder) -> tuple[float, dict[str, tuple[int, int]]]:
    command = [sys.executable, "-m", "sf_bsread_writer.ca.gateway", source.address, "--ca-prefix", "SU:",
               "--name", "SU", "--parent-pid", str(os.getpid())]
    started = time.monotonic()
    gateway = Child(command, env=env)
    try:
        full_env = dict(os.environ) | env
        while True:
            answer = subprocess.run([str(VENV_BIN / "caget"), "-w", "0.5", "-t", "SU:CH0000"], env=full_env,
                                    capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
            if answer.returncode == 0 and answer.stdout.strip() and "not found" not in answer.stdout:
                elapsed = time.monotonic() - started
                break
            if time.monotonic() - started > 60:
                raise RuntimeError("no caget answer in 60 s:\n" + gateway.output()[-2000:])
        time.sleep(5)
        processes = {"supervisor": gateway.process.pid}
        iocs = children_of(gateway.process.pid, "sf_bsread_writer.ca.gateway")
        for number, pid in enumerate(iocs):
            processes["ioc" if number == 0 else f"standby{number}"] = pid
        return elapsed, {name: _memory(pid) for name, pid in processes.items()}
    finally:
        gateway.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--channels", type=int, default=100)
    args = parser.parse_args()
    env = ca_env()
    repeater = start_repeater(env)
    channels = [{"name": f"CH{i:04d}", "type": "float64"} for i in range(args.channels)]
    source = Feeder(channels, lambda pid: [np.float64(pid)] * args.channels, rate=10.0)
    try:
        times = []
        memory: dict[str, tuple[int, int]] = {}
        for _ in range(args.runs):
            load = os.getloadavg()[0]
            elapsed, memory = one_run(env, source)
            times.append(elapsed)
            print(f"  start -> first caget: {elapsed:5.2f} s (load average {load:.1f})", flush=True)
        print(f"start -> first caget over {args.runs} runs: median {statistics.median(times):.2f} s, "
              f"max {max(times):.2f} s")
        for name, (anon, pss) in memory.items():
            print(f"  {name:10s} RssAnon {anon / 1024:6.1f} MB, Pss {pss / 1024:6.1f} MB")
    finally:
        source.close()
        repeater.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
