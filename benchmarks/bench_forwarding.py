#!/usr/bin/env python
"""Messages/s from a source through a forwarding process to a consumer, per profile and variant.

    .venv/bin/python benchmarks/bench_forwarding.py --seconds 5 --repeat 3

Every variant runs as its own process between the same fast raw sender
(a PUSH peer speaking ZMTP over a plain TCP socket, pre-encoded frames, one
sendmsg per message) and the same raw consumer (this process, a PULL peer
that only walks frame headers), all on 127.0.0.1. Variants (run interleaved, repeat after repeat, so that machine
noise hits them alike):

  relay        bare zero-copy relay: recv_multipart(copy=False) -> send_multipart(copy=False)
  relay-compiled  bare relay through the compiled whole-message I/O (transport.partsio): the ceiling
  original     the original design: bsread Source decode -> bsread Sender re-encode per message
               (one thread; the original used two threads and a deque, never faster)
  ring         recv + protocol.parse_main_header + Ring.append + send ring.frames(seq),
               glibc allocator at its defaults
  ring-tuned   the same after ring.tune_allocator()
  ring-backlog fill a ring (ingest only), then send its whole backlog from the ring
               (the serving half of a replay, without the replay protocol)
  buffer       the real sf_bsread_buffer, live output (--output-mode push)
  replay       the real sf_bsread_buffer, a ReplayClient from the oldest held pulse while
               the source keeps sending (ingest -> replay)
  buffer-python, replay-python   the same with SF_BSREAD_NO_EXTENSION=1 (the pure pyzmq fallback)
  buffer-baseline, replay-baseline   the buffer of another checkout (--baseline-tree DIR, e.g. a git
               worktree of the commit before a change), for before/after in one run

The consumer is the compiled whole-message receive where the extension is
built (a Python walk over 1000+ frame headers would be slower than the
middles measured), the raw ZMTP consumer otherwise.

Rates are medians over the repeats; ratios are against relay and original
measured in the same run. Absolute numbers depend on the machine (2 cores
shared with other work gives noisy numbers): compare within a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets OMP_NUM_THREADS first)

VARIANTS = ("relay", "relay-compiled", "original", "ring", "ring-tuned", "ring-backlog", "buffer", "replay",
            "buffer-python", "replay-python", "buffer-baseline", "replay-baseline")
HWM = 50


# ---------------------------------------------------------------- middles (child processes)

def middle(variant: str, in_port: int, out_port: int, ring_messages: int, ring_bytes: int,
           backlog: int) -> None:
    import signal

    import zmq

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if variant == "original":
        return middle_original(in_port, out_port)
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, HWM)
    pull.connect(f"tcp://127.0.0.1:{in_port}")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, HWM)
    push.bind(f"tcp://127.0.0.1:{out_port}")
    print("READY", flush=True)
    if variant == "relay":
        while True:
            push.send_multipart(pull.recv_multipart(copy=False), copy=False)
    if variant == "relay-compiled":
        from sf_bsread_writer.transport import partsio

        receive = partsio.PartsReceiver(implementation="compiled").receive
        while True:
            partsio.send_parts(push, receive(pull)[1], implementation="compiled")

    from sf_bsread_writer.process import tune_allocator
    from sf_bsread_writer.ring import Ring

    try:
        from sf_bsread_writer.bsread.headers import parse_main_header

        def pulse_and_time(frame):
            header = parse_main_header(frame)
            return header.pulse_id, header.timestamp
    except ImportError:  # before protocol.py existed
        def pulse_and_time(frame):
            header = json.loads(bytes(frame))
            stamp = header["global_timestamp"]
            return header["pulse_id"], stamp["sec"] + stamp["ns"] * 1e-9

    if variant in ("ring-tuned", "ring-backlog"):
        tune_allocator()
    ring = Ring(ring_messages, ring_bytes)
    try:  # the packed I/O of issue 10; before it, pyzmq per part
        from sf_bsread_writer.transport import partsio

        receive_message = partsio.PartsReceiver().receive

        def receive():
            return receive_message(pull)[1]

        def send(seq):
            partsio.send_parts(push, ring.message(seq))
    except ImportError:
        def receive():
            return pull.recv_multipart(copy=False)

        def send(seq):
            push.send_multipart(ring.frames(seq), copy=False)
    if variant == "ring-backlog":
        for _ in range(backlog):
            frames = receive()
            pulse_id, timestamp = pulse_and_time(frames[0])
            ring.append(pulse_id, timestamp, frames)
        pull.close(linger=0)
        while True:  # serve the backlog over and over (the consumer counts)
            for seq in range(ring.first_seq, ring.next_seq):
                send(seq)
    while True:
        frames = receive()
        pulse_id, timestamp = pulse_and_time(frames[0])
        result = ring.append(pulse_id, timestamp, frames)
        if result.seq is not None:
            send(result.seq)


def middle_original(in_port: int, out_port: int) -> None:
    """What the original sf_bsread_buffer did per message: decode with bsread, re-encode with its Sender."""
    from bsread import PULL, source
    from bsread.sender import PUSH, Sender

    with source(host="127.0.0.1", port=in_port, mode=PULL, receive_timeout=-1, queue_size=HWM) as stream:
        out = Sender(port=out_port, address="tcp://127.0.0.1", mode=PUSH, queue_size=HWM, block=True)
        out.open()
        print("READY", flush=True)
        while True:
            message = stream.receive()
            if message is None:
                continue
            data = {name: value.value for name, value in message.data.data.items()}
            out.send(timestamp=time.time(), pulse_id=message.data.pulse_id, data=data, check_data=True)


# ---------------------------------------------------------------- one measurement
#
# Sender and consumer are raw ZMTP ends (benchmarks/common.py): with pyzmq on
# both ends, they would cost as much CPU per part as the middle being measured.

def count_messages(receive, seconds: float, count: int, warmup: int, timeout: float = 30.0) -> tuple[float, int]:
    """Skip ``warmup`` messages, then count for ``seconds`` (or until ``count``); return (msg/s, n)."""
    for _ in range(warmup):
        if not receive(timeout):
            raise RuntimeError("no message during warm-up")
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while n < count:
        if not receive(timeout):
            raise RuntimeError(f"stalled after {n} messages")
        n += 1
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return n / elapsed, n


def measure(profile: str, variant: str, args: argparse.Namespace) -> tuple[float, int]:
    import zmq

    source_port = common.free_port()
    with common.Child([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import common;"
                       " common.run_raw_sender(sys.argv[2], int(sys.argv[3]))",
                       str(Path(__file__).resolve().parent), profile, str(source_port)]):
        context = zmq.Context()
        try:
            if variant.startswith(("buffer", "replay")):
                return measure_buffer(context, profile, variant, source_port, args)
            out_port = common.free_port()
            with common.Child([sys.executable, __file__, "--_middle", variant, str(source_port), str(out_port),
                               str(args.ring_messages), str(args.ring_bytes), str(args.backlog)]):
                consumer = common.consumer_for(out_port)
                try:
                    warmup = args.warmup if variant != "ring-backlog" else 0
                    return count_messages(consumer.receive, args.seconds, args.count, warmup)
                finally:
                    consumer.close()
        finally:
            context.destroy(linger=0)


def measure_buffer(context, profile: str, variant: str, source_port: int,
                   args: argparse.Namespace) -> tuple[float, int]:
    command = [sys.executable, "-m", "sf_bsread_writer.buffer", f"tcp://127.0.0.1:{source_port}",
               "-o", "0", "--output-mode", "push", "--replay-port", "0", "--rest-port", "0",
               "-b", str(args.ring_messages), "--buffer-bytes", str(args.ring_bytes), "--log_level", "WARNING"]
    env = None
    if variant.endswith("-python"):
        env = {"SF_BSREAD_NO_EXTENSION": "1"}
    elif variant.endswith("-baseline"):
        if not args.baseline_tree:
            raise RuntimeError("--baseline-tree DIR is needed for the -baseline variants")
        env = {"PYTHONPATH": str(common.baseline_site(args.baseline_tree))}
    with common.Child(command, ready="READY", env=env) as buffer:
        endpoints = json.loads(buffer.ready_line.split(" ", 1)[1])
        consumer = common.consumer_for(int(endpoints["output"].rsplit(":", 1)[1]))
        if variant.startswith("buffer"):
            try:
                return count_messages(consumer.receive, args.seconds, args.count, args.warmup)
            finally:
                consumer.close()

        from sf_bsread_writer.replay.client import ReplayClient
        from sf_bsread_writer.replay.messages import Data

        # let the ring fill (the live consumer keeps the output drained), then replay from its oldest pulse
        for _ in range(args.warmup):
            consumer.receive(30.0)
        consumer.close()
        client = ReplayClient(endpoints["replay"], start_pulse_id=0, context=context)
        client.start()
        try:
            def receive(timeout: float) -> bool:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    event = client.receive(timeout=1.0)
                    if isinstance(event, Data):
                        return True
                return False

            return count_messages(receive, args.seconds, args.count, 0)
        finally:
            client.close()


# ---------------------------------------------------------------- table

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default=",".join(common.PROFILES))
    parser.add_argument("--variants", default="relay,original,ring,ring-tuned,ring-backlog,buffer,replay")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per run (after warm-up)")
    parser.add_argument("--count", type=int, default=10**9, help="stop a run after this many messages")
    parser.add_argument("--warmup", type=int, default=300, help="messages skipped before measuring")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ring-messages", type=int, default=1000)
    parser.add_argument("--ring-bytes", type=int, default=512 * 1024**2,
                        help="ring bound; the default makes a camera ring evict after ~200 images")
    parser.add_argument("--backlog", type=int, default=150, help="messages in the ring for ring-backlog")
    parser.add_argument("--baseline-tree", metavar="DIR", default=None,
                        help="the checkout whose buffer the -baseline variants run (e.g. a git worktree)")
    parser.add_argument("--_middle", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._middle:
        variant, in_port, out_port, messages, nbytes, backlog = args._middle
        middle(variant, int(in_port), int(out_port), int(messages), int(nbytes), int(backlog))
        return 0

    profiles = args.profiles.split(",")
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}", flush=True)
    print(f"# seconds={args.seconds} count={args.count} warmup={args.warmup} repeat={args.repeat} "
          f"ring={args.ring_messages} msgs/{args.ring_bytes} B", flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    for profile in profiles:
        size = common.message_nbytes(profile)
        for repeat in range(args.repeat):
            for variant in variants:
                try:
                    rate, n = measure(profile, variant, args)
                except Exception as error:  # report and go on: one broken variant must not hide the others
                    print(f"  {profile:8s} {variant:12s} run {repeat + 1}: FAILED {error}", flush=True)
                    continue
                results.setdefault((profile, variant), []).append(rate)
                print(f"  {profile:8s} {variant:12s} run {repeat + 1}: {rate:9.1f} msg/s "
                      f"({rate * size / 1e6:8.1f} MB/s, {n} messages)", flush=True)
    print()
    print("| profile | message | variant | msg/s (median) | runs | MB/s | vs relay | vs original |")
    print("|---|---|---|---|---|---|---|---|")
    for profile in profiles:
        size = common.message_nbytes(profile)
        relay = results.get((profile, "relay"))
        original = results.get((profile, "original"))
        for variant in variants:
            rates = results.get((profile, variant))
            if not rates:
                print(f"| {profile} | {size / 1e3:.0f} kB | {variant} | failed | | | | |")
                continue
            median = statistics.median(rates)
            vs_relay = f"{median / statistics.median(relay):.2f}x" if relay else "-"
            vs_original = f"{median / statistics.median(original):.2f}x" if original else "-"
            spread = " / ".join(f"{r:.0f}" for r in rates)
            print(f"| {profile} | {size / 1e3:.0f} kB | {variant} | {median:.0f} | {spread} | "
                  f"{median * size / 1e6:.0f} | {vs_relay} | {vs_original} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
