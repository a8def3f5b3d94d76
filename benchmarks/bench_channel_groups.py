"""The writer's per-channel HDF5 cost, stage by stage: channel groups, the first block, a later block, the close.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_channel_groups.py --channels 2000,12000 --repeat 3 \
        --baseline-tree /tmp/before

In-process ``H5File`` on a real file (no sockets, no parsing in the timed
parts), a stream of N float64 scalar channels: one message is built and
parsed once and appended as every row (the file does not look at the
values). Per channel, in microseconds of process CPU (user + system; wall
time in brackets):

- groups: ``settle_channels()`` after the first row: every channel's group
  (``ColumnMaker``: a copy of its kind's template, its ``name``, its four
  datasets opened), the cost a fresh writer pays before its first block;
- first block: the ``flush()`` of 100 rows (every dataset's first chunk
  allocated and filled);
- later block: the ``flush()`` of the next 100 rows (4 ``H5Dset_extent`` +
  4 ``H5Dwrite`` per channel: what a live writer pays every flush interval);
- close: ``close()`` (every object closed, the file's metadata written).

Each (tree, N) runs in a fresh child process; with ``--baseline-tree DIR``
(a checkout of another commit, its compiled parts built; given twice or
more, several: "baseline", "baseline 2", ...) the children alternate
between the trees, repeat after repeat, and the medians are printed side by
side.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("groups", "first block", "later block", "close")


def run_once(channels: int, rows: int) -> dict[str, list[float]]:
    """Per channel (us): [CPU, wall] of each stage."""
    import sf_bsread_writer
    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.h5.file import H5File

    specs = [{"name": f"SF-CH{i:05d}:VALUE", "type": "float64", "shape": [1]} for i in range(channels)]
    message = MessageParser().parse(build_message(1, specs, [i * 0.5 for i in range(channels)], timestamp=1e9))
    result: dict[str, list[float]] = {}

    def clocks() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime, time.perf_counter()

    def stage(name: str, work) -> None:
        cpu, wall = clocks()
        work()
        cpu_end, wall_end = clocks()
        result[name] = [1e6 * (cpu_end - cpu) / channels, 1e6 * (wall_end - wall) / channels]

    with tempfile.TemporaryDirectory(prefix="bench_groups-") as folder:
        h5 = H5File(os.path.join(folder, "groups.h5"), block_rows=10 ** 9, block_bytes=10 ** 15, clock=lambda: 0.0)
        h5.append(message)
        stage("groups", h5.settle_channels)
        for _ in range(rows - 1):
            h5.append(message)
        stage("first block", h5.flush)
        for _ in range(rows):
            h5.append(message)
        stage("later block", h5.flush)
        stage("close", h5.close)
    result["tree"] = [str(Path(sf_bsread_writer.__file__).resolve().parent.parent)]  # type: ignore[list-item]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="2000,12000", help="comma-separated channel counts")
    parser.add_argument("--rows", type=int, default=100, help="rows per block (100: 1 s at 100 Hz)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-tree", action="append", default=[],
                        help="another checkout to run interleaved (repeat the option for more)")
    parser.add_argument("--_child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_tree", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        if args._tree:  # common put this checkout first on sys.path: the other one goes before it
            sys.path.insert(0, args._tree)
        print(json.dumps(run_once(args._child, args.rows)))
        return 0
    import common  # here: it imports the package (tests/helpers), which a child must import from its tree

    variants = {"this tree": None}
    for number, tree in enumerate(args.baseline_tree, 1):
        variants["baseline" if number == 1 else f"baseline {number}"] = str(Path(tree).resolve())
    counts = [int(n) for n in args.channels.split(",") if n]
    results: dict[tuple[str, int], list[dict]] = {(name, n): [] for name in variants for n in counts}
    print(f"# {common.machine_note()}", flush=True)
    for repeat in range(args.repeat):
        for n in counts:
            for name, tree in (list(variants.items()) if repeat % 2 == 0 else reversed(variants.items())):
                env = None if tree is None else {**os.environ, "PYTHONPATH": str(common.baseline_site(tree))}
                out = subprocess.run([sys.executable, __file__, "--_child", str(n), "--rows", str(args.rows),
                                      *(["--_tree", tree] if tree else [])],
                                     capture_output=True, text=True, env=env, check=True)
                times = json.loads(out.stdout.strip().splitlines()[-1])
                results[(name, n)].append(times)
                print(f"  {name:10s} {n:6d} ch, run {repeat + 1} ({times['tree'][0]}): " + ", ".join(
                    f"{stage} {times[stage][0]:.0f} ({times[stage][1]:.0f})" for stage in STAGES)
                    + f" us/ch; load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n# {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}; medians of {args.repeat}, "
          "us per channel, CPU (wall)")
    print("| channels | variant | " + " | ".join(STAGES) + " |")
    print("|---|---|" + "---|" * len(STAGES))
    for (name, n), runs in results.items():
        print(f"| {n} | {name} | " + " | ".join(
            f"{statistics.median(r[s][0] for r in runs):.0f} ({statistics.median(r[s][1] for r in runs):.0f})"
            for s in STAGES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
