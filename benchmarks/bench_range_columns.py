#!/usr/bin/env python
"""Collecting a past range into columns (web.range_query) and encoding it, without sockets.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_range_columns.py --messages 10000 --channels 100
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_range_columns.py --baseline-tree /tmp/before

The web service's ``GET /api/v1/range`` replays messages from the buffer and
hands each to ``RangeColumns.add``; the answer is then ``as_json`` (plus
``json.dumps``) or ``as_npz``. This times those steps alone on messages
built once with ``protocol.build_message`` and packed as the compiled
receiver delivers them (``bsread.parts.pack``), parsed once beforehand (the
parse is the same whatever collects): float64 scalars, every 10th message
without the last channel (a modulo channel), plus one 64-element waveform.
``--baseline-tree DIR`` runs the same in a child importing the package of
another checkout (a git worktree of the commit before), alternating, so the
two are compared in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402


def run_once(messages: int, channels: int) -> dict[str, float]:
    import numpy as np

    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.bsread.parts import pack
    from sf_bsread_writer.web.range_query import (
        RangeColumns,
        RangeLimits,
        parse_range_query,
    )
    from sf_bsread_writer.web.ranges import as_json, as_npz

    specs = [{"name": f"SAR:CH{i:04d}", "type": "float64"} for i in range(channels - 1)]
    specs.append({"name": "SAR:WAVE", "type": "float32", "shape": [64]})
    parser = MessageParser()
    parsed = []
    for n in range(messages):
        values = [float(n + i) for i in range(channels - 1)] + [np.arange(64, dtype=np.float32) + n]
        if n % 10 == 3:
            values[channels - 2] = None
        parsed.append(parser.parse(pack(build_message(10_000 + n, specs, values, timestamp=1.7e9 + n / 100))))
    names = ",".join(s["name"] for s in specs)
    limits = RangeLimits(max_json_bytes=2**31, max_bytes=2**31)
    import sf_bsread_writer
    times: dict[str, float] = {}
    print(f"# package from {Path(sf_bsread_writer.__file__).parent.parent}", file=sys.stderr)
    for fmt in ("json", "npz"):
        query = parse_range_query({"channels": names, "start_pulse_id": "10000",
                                   "stop_pulse_id": str(10_000 + messages - 1), "format": fmt}, limits)
        start = time.perf_counter()
        columns = RangeColumns(query, limits)
        for message in parsed:
            columns.add(message)
        columns.finish()
        times[f"{fmt} collect"] = time.perf_counter() - start
        start = time.perf_counter()
        if fmt == "json":
            text = json.dumps(as_json(columns))
            size = len(text)
        else:
            size = len(as_npz(columns))
        times[f"{fmt} encode"] = time.perf_counter() - start
        times[f"{fmt} bytes"] = size
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-tree", default=None)
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_tree", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        if args._tree:  # common put this checkout first on sys.path: the other one goes before it
            sys.path.insert(0, args._tree)
        print(json.dumps(run_once(args.messages, args.channels)))
        return 0
    variants = {"this tree": None}
    if args.baseline_tree:
        variants["baseline"] = str(Path(args.baseline_tree).resolve())
    results: dict[str, list[dict]] = {name: [] for name in variants}
    print(f"# {common.machine_note()}; {args.messages} messages x {args.channels} channels", flush=True)
    for repeat in range(args.repeat):
        for name, tree in (variants.items() if repeat % 2 == 0 else reversed(variants.items())):
            env = None if tree is None else {**os.environ, "PYTHONPATH": str(common.baseline_site(tree))}
            out = subprocess.run([sys.executable, __file__, "--_child", "--messages", str(args.messages),
                                  "--channels", str(args.channels), *(["--_tree", tree] if tree else [])],
                                 capture_output=True, text=True, env=env, check=True)
            times = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(times)
            print(f"  {name:9s} run {repeat + 1}: " + ", ".join(
                f"{k} {v:.2f} s" if "bytes" not in k else f"{k} {v / 1e6:.1f} MB" for k, v in times.items()),
                flush=True)
    print(f"\n# {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}; medians of {args.repeat}")
    keys = [k for k in results["this tree"][0] if "bytes" not in k]
    print("| variant | " + " | ".join(f"{k} (s)" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, runs in results.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(r[k] for r in runs):.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
