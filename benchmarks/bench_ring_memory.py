#!/usr/bin/env python
"""Memory a filled ring really costs, against the raw bytes it holds (target: <= 1.2x).

    .venv/bin/python benchmarks/bench_ring_memory.py [--scale 1.0] [--no-tune]

For each profile, in a fresh child process: messages arrive over a real
ZeroMQ TCP socket (received as the buffer receives them: ``transport.partsio``, so large
parts are libzmq-allocated and kept zero-copy), are appended to a ring until it is full (bounded by
count), and the RSS growth is compared with ``ring.n_bytes`` (the sum of
the part lengths held). The scalar stream sends the same data header in every
message, which the ring stores once: its ratio is far below 1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FILL = {"camera": 200, "scalars": 5000, "mixed": 500}  # about 0.4-0.5 GB of raw bytes each


def fill_and_measure(profile: str, n_messages: int, tune: bool) -> dict:
    import gc

    import zmq

    from sf_bsread_writer.bsread.headers import parse_main_header
    from sf_bsread_writer.process import tune_allocator
    from sf_bsread_writer.ring import Ring

    if tune:
        tune_allocator()
    template = common.profile_message(profile)
    headers = common.HeaderFactory(template[0])
    frames = [zmq.Frame(part) for part in template[1:]]
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 5)  # keep what is in flight (and later freed, not returned) small
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 5)
    push.connect(f"tcp://127.0.0.1:{port}")
    total = n_messages + 50

    def send() -> None:
        for i in range(total):
            push.send(headers(common.FIRST_PULSE_ID + i, time.time()), zmq.SNDMORE)
            push.send_multipart(frames, copy=False)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    for _ in range(50):  # warm up sockets and allocator before the baseline
        pull.recv_multipart(copy=False)
    gc.collect()
    ring = Ring(n_messages, 1 << 40)
    try:  # as the buffer receives: whole messages packed (issue 10); before it, pyzmq frames
        from sf_bsread_writer.transport.partsio import PartsReceiver

        receive_packed = PartsReceiver().receive

        def receive():
            return receive_packed(pull)[1]
    except ImportError:
        def receive():
            return pull.recv_multipart(copy=False)
    baseline = common.rss_of()
    for _ in range(n_messages):
        received = receive()
        header = parse_main_header(received[0])
        ring.append(header.pulse_id, header.timestamp, received)
        del received
    sender.join()
    gc.collect()
    after = common.rss_of()
    result = {"profile": profile, "messages": ring.n_messages, "ring_bytes": ring.n_bytes,
              "rss_delta": after - baseline, "ratio": (after - baseline) / ring.n_bytes}
    push.close(linger=0)
    pull.close(linger=0)
    context.term()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default=",".join(common.PROFILES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of messages per profile")
    parser.add_argument("--no-tune", action="store_true", help="leave the glibc allocator at its defaults")
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        profile, n, tune = args._child
        print(json.dumps(fill_and_measure(profile, int(n), tune == "1")))
        return 0
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}, tune_allocator={not args.no_tune}")
    print("| profile | messages held | raw bytes held (n_bytes) | RSS growth | RSS / raw |")
    print("|---|---|---|---|---|")
    for profile in args.profiles.split(","):
        n = max(1, int(FILL[profile] * args.scale))
        output = subprocess.run([sys.executable, __file__, "--_child", profile, str(n), "0" if args.no_tune else "1"],
                                capture_output=True, text=True, check=True,
                                env={**common.os.environ, "OMP_NUM_THREADS": "1"}).stdout
        result = json.loads(output.strip().splitlines()[-1])
        print(f"| {profile} | {result['messages']} | {result['ring_bytes'] / 1e6:.1f} MB | "
              f"{result['rss_delta'] / 1e6:.1f} MB | {result['ratio']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
