#!/usr/bin/env python
"""RSS of the forwarding process over a long run at a fixed rate: it must stay flat once the ring is full.

    .venv/bin/python benchmarks/bench_soak.py --minutes 10 --profile camera --target buffer

A raw sender sends the profile at ``--rate`` messages/s into the target
(``buffer``: the real sf_bsread_buffer, live output push; ``ring``: the
ring-tuned forwarding loop of bench_forwarding.py), a raw consumer drains
its output. The target's RSS is sampled every ``--interval`` seconds. The
ring is sized to fill within the first minute; the verdict compares the RSS
growth after that with the raw bytes held.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--profile", default="camera", choices=common.PROFILES)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--target", default="buffer", choices=("buffer", "ring"))
    parser.add_argument("--ring-messages", type=int, default=3000, help="30 s at 100 Hz")
    parser.add_argument("--ring-bytes", type=int, default=1024**3)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    args = parser.parse_args(argv)

    here = Path(__file__).resolve().parent
    source_port = common.free_port()
    sender = common.Child([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import common;"
                           " common.run_raw_sender(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))",
                           str(here), args.profile, str(source_port), str(args.rate)])
    try:
        if args.target == "buffer":
            target = common.Child([str(Path(sys.executable).parent / "sf_bsread_buffer"),
                                   f"tcp://127.0.0.1:{source_port}", "-o", "0", "--output-mode", "push",
                                   "--replay-port", "0", "--rest-port", "0", "-b", str(args.ring_messages),
                                   "--buffer-bytes", str(args.ring_bytes), "--log_level", "WARNING"])
            out_port = int(json.loads(target.ready_line.split(" ", 1)[1])["output"].rsplit(":", 1)[1])
        else:
            out_port = common.free_port()
            target = common.Child([sys.executable, str(here / "bench_forwarding.py"), "--_middle", "ring-tuned",
                                   str(source_port), str(out_port), str(args.ring_messages),
                                   str(args.ring_bytes), "0"])
        with target:
            consumer = common.RawConsumer(out_port)
            received = [0]
            stop = threading.Event()

            def drain() -> None:
                while not stop.is_set():
                    if consumer.receive(1.0):
                        received[0] += 1

            thread = threading.Thread(target=drain, daemon=True)
            thread.start()
            size = common.message_nbytes(args.profile)
            held_bytes = min(args.ring_messages, args.ring_bytes // size) * size
            fill_seconds = min(args.ring_messages, args.ring_bytes // size) / args.rate
            print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}")
            print(f"# target={args.target} profile={args.profile} rate={args.rate}/s minutes={args.minutes}; "
                  f"ring full after ~{fill_seconds:.0f} s holding ~{held_bytes / 1e6:.0f} MB raw")
            print("| t (s) | received | rate (msg/s) | RSS (MB) |")
            print("|---|---|---|---|")
            start = time.monotonic()
            samples: list[tuple[float, int]] = []
            last_count, last_time = 0, start
            while True:
                now = time.monotonic()
                rss = target.rss_bytes()
                rate = f"{(received[0] - last_count) / (now - last_time):.1f}" if samples else "-"
                last_count, last_time = received[0], now
                samples.append((now - start, rss))
                print(f"| {now - start:.0f} | {received[0]} | {rate} | {rss / 1e6:.1f} |", flush=True)
                if now - start >= args.minutes * 60:
                    break
                time.sleep(min(args.interval, max(0.1, start + args.minutes * 60 - now)))
            stop.set()
            thread.join(5)
            consumer.close()
        settled = [rss for t, rss in samples if t >= max(60.0, 2 * fill_seconds)]
        if len(settled) >= 2:
            growth = settled[-1] - settled[0]
            print(f"\nRSS after the ring filled: {settled[0] / 1e6:.1f} -> {settled[-1] / 1e6:.1f} MB "
                  f"(growth {growth / 1e6:+.1f} MB, {growth / held_bytes:+.2%} of the raw bytes held; "
                  f"max {max(settled) / 1e6:.1f} MB)")
        else:
            print("\nrun too short for a verdict (needs samples after the first minute)")
    finally:
        sender.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
