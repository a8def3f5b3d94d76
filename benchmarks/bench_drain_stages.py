"""The scalar drain's per-message Python, stage by stage, in-process (issue 24).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_drain_stages.py --channels 500 --messages 1000

What the writer's run thread does with one message between the replay
client's receive and the file's block write, each stage timed alone (CPU
time, ``time.process_time``, microseconds per message) over the same packed
messages (``bsread.parts.pack``: what the compiled receiver hands out):
the replay kind frame (``parse_buffer_parts``), the main header, the whole
``MessageParser.parse`` (main header, data header by hash, ``Message``),
the pulse range (``classify`` + ``written``), the run loop's rate, the
file's ``append`` (the packed gather, no HDF5), and the flush (the scatter
into columns, the channel groups, the block write: HDF5). No sockets: the
receive itself is ``bench_writer.py``'s ``replay-receive`` variant.
``--baseline-tree DIR`` runs the same in a child importing another checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def stages(channels: int, messages: int) -> dict[str, float]:
    """Microseconds of CPU per message of each stage (module docstring)."""
    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.bsread.headers import parse_main_header
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.bsread.parts import LayoutCache, pack
    from sf_bsread_writer.h5.file import H5File
    from sf_bsread_writer.rates import RateEstimator
    from sf_bsread_writer.replay.messages import parse_buffer_parts
    from sf_bsread_writer.writer.pulse_range import PulseRange

    first = 10_000_000_000
    specs = [{"name": f"SARFE10-PBPG050:SIGNAL-{i:03d}", "type": "float64"} for i in range(channels)]
    layouts = LayoutCache()
    packed, header = [], None
    for k in range(messages):
        frames = build_message(first + k, specs, [float(i) + k * 0.25 for i in range(channels)],
                               timestamp=1_700_000_000.0 + k * 0.01)
        parts = pack(frames, layouts, header)
        header = parts.header
        packed.append(parts)
    kinds = [f"data {first + k} {1_700_000_000.0 + k * 0.01!r}".encode() for k in range(messages)]
    result: dict[str, float] = {}

    def timed(name: str, body) -> None:
        start = time.process_time()
        body()
        result[name] = (time.process_time() - start) / messages * 1e6

    timed("replay kind frame (parse_buffer_parts)",
          lambda: [parse_buffer_parts(kind, parts) for kind, parts in zip(kinds, packed)])
    timed("main header (parse_main_header)", lambda: [parse_main_header(parts[0]) for parts in packed])
    parser = MessageParser()
    parser.parse(packed[0])  # the data header parsed once, as in a run
    parsed: list = []
    timed("MessageParser.parse (main header, data header by hash, Message)",
          lambda: parsed.extend(parser.parse(parts) for parts in packed))
    pulse_range = PulseRange(first, None, first + messages - 1, None)

    def range_body() -> None:
        for message in parsed:
            pulse_range.classify(message.pulse_id, message.timestamp)
            for _ in pulse_range.written(message.pulse_id, message.timestamp):
                pass
    timed("pulse range (classify + written)", range_body)
    rate = RateEstimator(1.0, resolution=0.1)

    def rate_body() -> None:
        now = time.monotonic
        for k in range(messages):
            if rate.add(now(), k) is not False:  # a checkout whose add returns None reads the rate every time
                if rate.rate() is not None and rate.span >= 0.5:
                    pass
    timed("run loop rate (RateEstimator.add + rate)", rate_body)
    with tempfile.TemporaryDirectory() as folder:
        output = H5File(os.path.join(folder, "stages.h5"), flush_interval=1e9, block_rows=10 * messages,
                        block_bytes=1 << 40)
        try:
            timed("H5File.append (packed gather, no HDF5)",
                  lambda: [output.append(message, message.timestamp) for message in parsed])
            timed("H5File.flush (scatter, channel groups, first block: HDF5)", output.flush)
        finally:
            output.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=500)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-tree", metavar="DIR", default=None,
                        help="also run the stages in a child that imports sf_bsread_writer from DIR")
    parser.add_argument("--_json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._json:
        print(json.dumps(stages(args.channels, args.messages)))
        return 0
    import common

    runs: dict[str, list[dict[str, float]]] = {"now": []}
    if args.baseline_tree:
        runs["baseline"] = []
    for _ in range(args.repeat):  # alternating, so both sides see the same load
        for side in runs:
            env = dict(os.environ)
            if side == "baseline":
                env["PYTHONPATH"] = str(common.baseline_site(args.baseline_tree))
            else:
                env["PYTHONPATH"] = str(HERE.parent)
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_json", "--channels",
                                  str(args.channels), "--messages", str(args.messages)],
                                 env=env, cwd=tempfile.gettempdir(), check=True, capture_output=True, text=True)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# {common.machine_note()}; {args.channels} float64 channels, {args.messages} messages; "
          f"us of CPU per message, median of {args.repeat} (runs)")
    sides = list(runs)
    print("| stage | " + " | ".join(sides) + " |")
    print("|---|" + "---|" * len(sides))
    for name in runs["now"][0]:
        cells = []
        for side in sides:
            values = sorted(run[name] for run in runs[side])
            cells.append(f"{values[len(values) // 2]:.1f} ({' / '.join(f'{run[name]:.1f}' for run in runs[side])})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
