#!/usr/bin/env python
"""The largest scalar stream a buffer and a writer sustain at 100 Hz on this machine, in channels.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_capacity.py --channels 500,1000,2000,4000 --seconds 10

For each channel count N (float64 scalars, 2 + 2N parts per message): a raw
ZMTP sender (benchmarks/common.py, one ``sendmsg`` per message, paced to
--rate) feeds a real buffer (``python -m sf_bsread_writer.buffer``); after
--settle seconds a real writer (``python -m sf_bsread_writer.writer``, REST
start/stop by pulse id) records the next --seconds of pulses while they
arrive. Reported per N:

* buffer: messages received against sent over the window, rejects, pulse-id
  jumps (losses at ingest), its CPU share and RSS;
* writer: rows written, pulses missing, and its lag: how long after the last
  pulse of the range was sent the file was closed (a writer that keeps up
  closes within about its flush interval; one that does not falls behind by
  more every second);
* sustained: every pulse buffered and written, lag under --max-lag.

Each N runs once (pass N twice to repeat); the machine's load is printed
per row, as the other benchmarks do. The case of issue 24 (a writer busy
creating its groups lost its session and, re-requesting, found the range
evicted):

    .venv/bin/python benchmarks/bench_capacity.py --channels 6000,12000 --buffer-length 1500 --lead 1 \
        --baseline-tree /path/to/a/worktree/of/the/commit/before
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

PY = sys.executable
PARAMETERS = {"general/created": "2026-11-30T00:00:00", "general/user": "bench", "general/process": "bench_capacity",
              "general/instrument": "loopback"}


def http(method: str, url: str, body: object = None, timeout: float = 10.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used, VmRSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, common.rss_of(pid)


def statistics(rest: str) -> dict:
    return http("GET", rest + "/statistics")["statistics"]


def run_one(channels: int, args: argparse.Namespace, workdir: Path, variant: str = "this") -> dict:
    profile = f"scalars{channels}"
    port = common.free_port()
    sender = common.Child([PY, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import common;"
                           " common.run_raw_sender(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))",
                           str(HERE), profile, str(port), str(args.rate)])
    buffer = writer = None
    try:
        message_bytes = common.message_nbytes(profile)
        ring_messages = args.buffer_length or int(args.rate * (args.settle + args.seconds + 30))
        buffer = common.Child([PY, "-m", "sf_bsread_writer.buffer", f"tcp://127.0.0.1:{port}", "-o", "0",
                               "--replay-port", "0", "--rest-port", "0", "-b", str(ring_messages),
                               "--buffer-bytes", str(ring_messages * message_bytes * 2 + 2**26),
                               "--log_level", "WARNING"], timeout=60)
        endpoints = json.loads(buffer.ready_line.split(" ", 1)[1])
        rest = endpoints["rest"]
        deadline = time.monotonic() + 60
        while statistics(rest)["received"] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the buffer received nothing")
            time.sleep(0.1)
        time.sleep(args.settle)  # the stream runs; the ring fills (what a buffer does all day)

        env = {"PYTHONPATH": str(common.baseline_site(args.baseline_tree))} if variant == "baseline" else None
        writer = common.Child([PY, "-m", "sf_bsread_writer.writer", endpoints["replay"],
                               str(workdir / f"capacity-{channels}-{variant}.h5"), "-1", "0", "--log_level",
                               # its REST stays 3 s after the file is closed: time to read its statistics
                               "WARNING", "--finished-grace", "3", *args.writer_args.split()],
                              timeout=60, env=env)
        writer_rest = json.loads(writer.ready_line.split(" ", 1)[1])["rest"]
        http("POST", writer_rest + "/parameters", PARAMETERS)
        before = statistics(rest)
        cpu_before, _ = proc_stat(buffer.process.pid)
        t0 = time.monotonic()
        start = before["pulse_ids"]["last"] + 1 + int(args.rate * args.lead)
        stop = start + int(args.rate * args.seconds) - 1
        http("PUT", f"{writer_rest}/start_pulse_id/{start}")
        http("PUT", f"{writer_rest}/stop_pulse_id/{stop}")
        # The stop pulse is sent at about t0 + lead + seconds: wait for it at the buffer, then for the writer.
        rss_samples: list[tuple[float, float]] = []  # (seconds since the start request, writer RSS MB)
        next_sample = t0
        while (statistics(rest)["pulse_ids"]["last"] or 0) < stop:
            now = time.monotonic()
            if now - t0 > (args.lead + args.seconds) * 3 + 30:
                raise RuntimeError("the buffer never saw the stop pulse")
            if args.rss_every and now >= next_sample:
                rss_samples.append((now - t0, common.rss_of(writer.process.pid) / 1e6))
                next_sample += args.rss_every
            time.sleep(0.05)
        stop_seen = time.monotonic()
        after = statistics(rest)
        cpu_after, rss = proc_stat(buffer.process.pid)
        writer_cpu, writer_rss = proc_stat(writer.process.pid)
        state = None
        while time.monotonic() - stop_seen < args.max_lag * 4 + 30:
            state = http("GET", writer_rest + "/status")["status"]
            if state in ("finished", "error"):
                break
            time.sleep(0.02)
        lag = time.monotonic() - stop_seen
        wstats = http("GET", writer_rest + "/statistics")["statistics"]
        elapsed = stop_seen - t0
        received = after["received"] - before["received"]
        expected = after["pulse_ids"]["last"] - before["pulse_ids"]["last"]
        result = {
            "channels": channels, "variant": variant, "parts": 2 + 2 * channels, "message_kB": message_bytes / 1e3,
            "received": received, "sent": expected, "rate": received / elapsed,
            "rejected": after["rejected_total"] - before["rejected_total"],
            "jumps": after["pulse_ids"]["jumps"] - before["pulse_ids"]["jumps"],
            "buffer_cpu": (cpu_after - cpu_before) / elapsed, "buffer_rss_MB": rss / 1e6,
            "ring_MB": after["ring"]["bytes"] / 1e6,
            "writer_state": state, "written": wstats["messages_written"], "missing": wstats["missing_pulses"],
            "lag": lag, "writer_cpu_s": writer_cpu, "writer_rss_MB": writer_rss / 1e6,
            "restarts": wstats.get("buffer_lost", 0), "rss_samples": rss_samples,
            "load": os.getloadavg()[0],
        }
        result["sustained"] = (received == expected and result["jumps"] == 0 and state == "finished"
                               and result["missing"] == 0 and result["written"] == stop - start + 1
                               and lag <= args.max_lag)
        return result
    finally:
        for child in (writer, buffer, sender):
            if child is not None:
                child.stop()


def rss_report(samples: list[tuple[float, float]]) -> str:
    """The writer's RSS over the run: first, middle and last sample, and the growth over the second half
    (a writer whose memory is flat grows by its per-row bookkeeping only)."""
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    (t_mid, rss_mid), (t_end, rss_end) = half[0], half[-1]
    slope = (rss_end - rss_mid) / max(t_end - t_mid, 1e-9) * 60
    points = ", ".join(f"{t:.0f} s {rss:.0f} MB" for t, rss in samples)
    return (f"#   writer RSS: {samples[0][1]:.0f} -> {rss_mid:.0f} (half-way) -> {rss_end:.0f} MB; second half "
            f"{slope:+.2f} MB/min ({points})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="500,1000,2000,4000", help="comma-separated channel counts")
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second from the source")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the written range")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of stream before the writer starts")
    parser.add_argument("--writer-args", default="", help="extra writer options, e.g. '--flush-interval 5'")
    parser.add_argument("--buffer-length", type=int, default=0,
                        help="the buffer's -b (ring messages); 0: enough for the whole run")
    parser.add_argument("--lead", type=float, default=0.0,
                        help="the range starts this many seconds after the newest pulse (issue 24: 1 s)")
    parser.add_argument("--baseline-tree", metavar="DIR", default=None,
                        help="also run the writer of the checkout in DIR (variant baseline) before this one, "
                             "per channel count: before/after in one run")
    parser.add_argument("--rss-every", type=float, default=0.0, metavar="SECONDS",
                        help="sample the writer's RSS this often while it writes and report its growth over the "
                             "second half of the run (issue 24: flat over 10 minutes: --seconds 600 --rss-every 30)")
    parser.add_argument("--max-lag", type=float, default=3.0,
                        help="most seconds from the last pulse to the closed file that still count as keeping up")
    args = parser.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}; rate {args.rate:g} Hz, "
          f"{args.seconds:g} s written per run, starting {args.lead:g} s ahead; ring "
          f"{args.buffer_length or 'the whole run'} messages", flush=True)
    print("| channels | variant | parts | message | buffer received / sent | rejects, jumps | buffer CPU | buffer RSS (ring) "
          "| writer rows, missing | writer lag | writer CPU | writer RSS | sustained | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    variants = (["baseline"] if args.baseline_tree else []) + ["this"]
    with tempfile.TemporaryDirectory(prefix="bench_capacity-") as workdir:
        for channels, variant in ((int(c), v) for c in args.channels.split(",") for v in variants):
            try:
                r = run_one(channels, args, Path(workdir), variant)
            except Exception as error:  # one failing size must not hide the others
                print(f"| {channels} | {variant} | FAILED: {error} |", flush=True)
                continue
            print(f"| {r['channels']} | {variant} | {r['parts']} | {r['message_kB']:.0f} kB | {r['received']} / {r['sent']} "
                  f"({r['rate']:.1f} msg/s) | {r['rejected']}, {r['jumps']} | {r['buffer_cpu'] * 100:.0f}% "
                  f"| {r['buffer_rss_MB']:.0f} MB ({r['ring_MB']:.0f} MB) | {r['written']}, {r['missing']} "
                  f"({r['writer_state']}; buffer lost {r['restarts']}) | {r['lag']:.2f} s | {r['writer_cpu_s']:.1f} s | {r['writer_rss_MB']:.0f} MB "
                  f"| {'yes' if r['sustained'] else 'NO'} | {r['load']:.2f} |", flush=True)
            if r["rss_samples"]:
                print(rss_report(r["rss_samples"]), flush=True)
            for path in Path(workdir).glob("*.h5"):
                path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
