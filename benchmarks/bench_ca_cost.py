#!/usr/bin/env python
"""What ``--ca`` costs the buffer: its CPU per received message, without and with the CA gateway.

    .venv/bin/python benchmarks/bench_ca_cost.py [--profile scalars500] [--seconds 8] [--repeat 2]

The source is the benchmarks' raw sender (``common.run_raw_sender``: a PUSH
peer speaking ZMTP over a plain socket, pre-encoded frames, as fast as the
buffer takes them), so the figure is the buffer's, not a Python sender's
rate. The buffer's live output (PUSH) is drained by the raw consumer. Per
run, over ``--seconds`` after a warm-up: messages the buffer received (its
``/statistics``), the buffer process's own CPU (not its children's) per
message, and the CPU share of the gateway's IOC process. Every process on
127.0.0.1; the gateway in a loopback EPICS environment. Runs alternate
without/with ``--ca`` so that machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402

from tests.ca_helpers import ca_env  # noqa: E402
from tests.helpers import children_of  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _received(rest: str) -> int:
    with urllib.request.urlopen(rest + "/statistics", timeout=5) as answer:
        return int(json.loads(answer.read())["statistics"]["received"])


def one_run(profile: str, ca: bool, seconds: float) -> dict[str, float]:
    source_port = common.free_port()
    sender = common.Child([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import common;"
                           " common.run_raw_sender(sys.argv[2], int(sys.argv[3]))", str(HERE), profile,
                           str(source_port)])
    env = ca_env() if ca else None
    command = [sys.executable, "-m", "sf_bsread_writer.buffer", f"tcp://127.0.0.1:{source_port}", "-o", "0",
               "--output-mode", "push", "--replay-port", "0", "--rest-port", "0", "--log_level", "WARNING"]
    if ca:
        command += ["--ca", "--ca-prefix", "COST:", "--name", "COST"]
    try:
        with common.Child(command, ready="READY", env=env, timeout=60) as buffer:
            endpoints = json.loads(buffer.ready_line.split(" ", 1)[1])
            rest = f"http://127.0.0.1:{endpoints['rest_port']}" if "rest_port" in endpoints else endpoints["rest"]
            consumer = common.consumer_for(int(endpoints["output"].rsplit(":", 1)[1]))
            stop = threading.Event()

            def drain() -> None:
                while not stop.is_set():
                    consumer.receive(0.5)

            drainer = threading.Thread(target=drain, daemon=True)
            drainer.start()
            try:
                time.sleep(3.0 if not ca else 8.0)  # warm-up: the gateway's IOC up and applying
                gateway = [pid for pid in children_of(buffer.process.pid, "sf_bsread_writer.ca.gateway")]
                iocs = [pid for parent in gateway for pid in children_of(parent, "sf_bsread_writer.ca.gateway")]
                received0, cpu0 = _received(rest), _cpu_seconds(buffer.process.pid)
                ioc0 = [_cpu_seconds(pid) for pid in iocs]
                started = time.monotonic()
                time.sleep(seconds)
                elapsed = time.monotonic() - started
                received = _received(rest) - received0
                cpu = _cpu_seconds(buffer.process.pid) - cpu0
                ioc_cpu = max([(_cpu_seconds(pid) - before) for pid, before in zip(iocs, ioc0)] or [0.0])
            finally:
                stop.set()
                drainer.join(5)
                consumer.close()
        return {"rate": received / elapsed, "us_per_message": 1e6 * cpu / max(1, received),
                "buffer_cpu": 100 * cpu / elapsed, "ioc_cpu": 100 * ioc_cpu / elapsed}
    finally:
        sender.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="scalars500")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"# {common.machine_note()}; profile {args.profile}; load average {os.getloadavg()[0]:.1f}")
    print("| --ca | messages/s received | buffer CPU per message | buffer CPU | gateway IOC CPU |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeat):
        for ca in (False, True):
            result = one_run(args.profile, ca, args.seconds)
            print(f"| {'yes' if ca else 'no'} | {result['rate']:.0f} | {result['us_per_message']:.1f} us | "
                  f"{result['buffer_cpu']:.0f} % | {result['ioc_cpu']:.0f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
