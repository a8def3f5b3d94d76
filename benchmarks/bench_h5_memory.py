"""Writer memory while writing a long run: H5File alone, no ZeroMQ, no REST.

Appends ``--rows`` demo-profile messages (``simulate.channel_metadata("demo")``:
a 1280x1024 uint16 bitshuffle_lz4 camera stored by ``write_direct_chunk``,
an lz4 spectrum, a counter, a string, 8 float64 scalars) to one
:class:`H5File` in a temporary directory and samples, every
``--sample-every`` rows: VmRSS, Python memory (tracemalloc), the C heap in
use (glibc ``mallinfo2().uordblks``), HDF5's free lists
(``H5get_free_list_sizes``) and the metadata cache size. The clock given to
H5File advances 1/``--rate`` s per row, so the file is flushed as often as
the writer flushes it at that rate (every second: every 100 rows at
100 Hz), deterministically.

Messages are built once (``--variants`` of them, with
``simulate.expected_values`` and ``build_message``); each row reuses
one with a fresh main header (pulse id, timestamp). ``--noise`` adds random
noise to a patch of each variant's image so that compressed chunk sizes vary
like a real camera's (the demo ramp compresses to nearly the same size
every time).

Experiments (to bisect a growth; all off by default = the writer as is):

    --rdcc-nbytes N     file-level raw data chunk cache per dataset (h5py.File(rdcc_nbytes=N));
                        H5File's own is h5.file.CHUNK_CACHE_BYTES (0); HDF5's default,
                        i.e. H5File before the fix: --rdcc-nbytes 1048576 --rdcc-nslots 521
    --rdcc-nslots N     ... and its hash slots
    --mdc-max BYTES     metadata cache: fixed max size, adaptive resize off
    --libver LOW        h5py.File(libver=(LOW, "latest")), e.g. v110 (chunk index not a v1 B-tree)
    --free-lists        H5set_free_list_limits(all 64 KiB global / 16 KiB per list)
    --gc-every ROWS     H5garbage_collect() every ROWS rows
    --trim-every ROWS   malloc_trim(0) every ROWS rows
    --no-tracemalloc    (tracemalloc costs time; RSS does not depend on it)

Allocator experiments are environment variables, e.g.
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=...``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_h5_memory.py --rows 60000
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # bitshuffle's OpenMP is slow on small machines

import h5py  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.message import Message, MessageParser
from sf_bsread_writer.h5 import file as h5_file_module  # noqa: E402
from sf_bsread_writer.h5.file import H5File  # noqa: E402
from sf_bsread_writer.tools import simulate  # noqa: E402

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


_libc.mallinfo2.restype = _Mallinfo2


def _hdf5_library() -> ctypes.CDLL:
    """The libhdf5 that h5py loaded (its wheel bundles one in h5py.libs)."""
    import h5py.h5  # noqa: F401  (loads the library)
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if "/libhdf5-" in path or path.endswith("/libhdf5.so") or "/libhdf5.so." in path:
                return ctypes.CDLL(path)
    raise RuntimeError("libhdf5 not found in /proc/self/maps")


HDF5 = _hdf5_library()


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def free_list_bytes() -> tuple[int, int, int, int]:
    """Bytes held by HDF5's free lists: (regular, array, block, factory)."""
    sizes = [ctypes.c_size_t() for _ in range(4)]
    if HDF5.H5get_free_list_sizes(*[ctypes.byref(s) for s in sizes]) < 0:
        return (-1, -1, -1, -1)
    return tuple(s.value for s in sizes)  # type: ignore[return-value]


def build_variants(n: int, noise: bool, image_shape: tuple[int, int]) -> list[Message]:
    channels = simulate.channel_metadata("demo", image_shape=image_shape)
    parser = MessageParser()
    rng = np.random.default_rng(7)
    messages = []
    for k in range(n):
        pulse_id = 1 + k
        values = simulate.expected_values("demo", pulse_id, image_shape=image_shape)
        if noise:
            image = values["DEMO:CAMERA"].copy()
            height, width = image.shape
            rows = int(rng.integers(height // 16, height // 4))  # a patch of varying size ...
            patch = rng.poisson(20, size=(rows, width)).astype(np.uint16)  # ... of shot noise
            image[:rows] += patch
            values["DEMO:CAMERA"] = image
        frames = build_message(pulse_id, channels, [values[c["name"]] for c in channels],
                                        timestamp=1_700_000_000.0 + pulse_id / 100)
        messages.append(parser.parse(frames))
    return messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--sample-every", type=int, default=5_000)
    parser.add_argument("--warmup", type=int, default=10_000, help="rows before the growth is measured")
    parser.add_argument("--rate", type=float, default=100.0, help="simulated message rate (flush every second)")
    parser.add_argument("--variants", type=int, default=16)
    parser.add_argument("--noise", action="store_true", help="noise patch of varying size in each image")
    parser.add_argument("--image-shape", default="1280x1024")
    parser.add_argument("--dir", default=None, help="directory for the file (default: a temp dir)")
    parser.add_argument("--rdcc-nbytes", type=int, default=None)
    parser.add_argument("--rdcc-nslots", type=int, default=None)
    parser.add_argument("--mdc-max", type=int, default=None)
    parser.add_argument("--libver", default=None)
    parser.add_argument("--free-lists", action="store_true")
    parser.add_argument("--gc-every", type=int, default=0)
    parser.add_argument("--trim-every", type=int, default=0)
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument("--top", type=int, default=0, help="print tracemalloc's top N lines at the end")
    parser.add_argument("--json", default=None, help="write the samples here")
    args = parser.parse_args(argv)

    shape = simulate.parse_image_shape(args.image_shape)
    messages = build_variants(args.variants, args.noise, shape)
    camera = messages[0].data_header.channels[0]
    chunk_sizes = [len(m.value_part(0)) for m in messages]
    print(f"# {args.rows} rows, demo profile, camera {camera.array_shape} {camera.type} "
          f"{camera.compression}, chunk {min(chunk_sizes)}..{max(chunk_sizes)} bytes, "
          f"{args.variants} variants, noise={args.noise}, flush every {args.rate:g} rows")
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"# experiments: rdcc_nbytes={args.rdcc_nbytes} rdcc_nslots={args.rdcc_nslots} mdc_max={args.mdc_max} libver={args.libver} "
          f"free_lists={args.free_lists} gc_every={args.gc_every} trim_every={args.trim_every} env={env}")

    if args.free_lists:
        HDF5.H5set_free_list_limits(65536, 16384, 65536, 16384, 65536, 16384, 65536, 16384)
    file_kwargs: dict = {}
    if args.rdcc_nbytes is not None:
        file_kwargs["rdcc_nbytes"] = args.rdcc_nbytes
    if args.rdcc_nslots is not None:
        file_kwargs["rdcc_nslots"] = args.rdcc_nslots
    if args.libver:
        file_kwargs["libver"] = (args.libver, "latest")
    if file_kwargs:
        real_file = h5py.File

        def patched_file(*a, **kw):  # the experiment's file access settings, only for this run
            return real_file(*a, **{**kw, **file_kwargs})

        h5_file_module.h5py.File = patched_file  # type: ignore[attr-defined]

    tmp = Path(tempfile.mkdtemp(prefix="h5mem-", dir=args.dir))
    clock_now = [0.0]
    if not args.no_tracemalloc:
        tracemalloc.start()
    samples = []
    t0 = time.perf_counter()
    try:
        h5 = H5File(tmp / "run.h5", {"user": "bench"}, clock=lambda: clock_now[0])
        if args.mdc_max is not None:
            config = h5._file.id.get_mdc_config()
            config.set_initial_size = True
            config.initial_size = args.mdc_max
            config.max_size = args.mdc_max
            config.min_size = min(config.min_size, args.mdc_max)
            config.incr_mode = 0  # H5C_incr__off
            config.flash_incr_mode = 0
            config.decr_mode = 0
            h5._file.id.set_mdc_config(config)
        step = 1.0 / args.rate
        n_variants = len(messages)

        def sample(row: int) -> None:
            gc.collect()
            info = _libc.mallinfo2()
            py = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
            mdc = h5._file.id.get_mdc_size()  # (max, min_clean, cur, n_entries)
            samples.append({"row": row, "rss": rss_bytes(), "python": py, "heap_in_use": info.uordblks,
                            "heap_free": info.fordblks, "mmapped": info.hblkhd,
                            "free_lists": sum(lists := free_list_bytes()), "free_lists_by_kind": lists, "mdc_max": mdc[0], "mdc_cur": mdc[2],
                            "seconds": time.perf_counter() - t0})

        sample(0)
        for i in range(args.rows):
            message = messages[i % n_variants]
            pulse_id = 1_000_000 + i
            sec, ns = divmod(1_700_000_000_000_000_000 + i * 10_000_000, 1_000_000_000)
            h5.append(dataclasses.replace(
                message, main=dataclasses.replace(message.main, pulse_id=pulse_id, sec=sec, ns=ns)))
            clock_now[0] += step
            row = i + 1
            if args.gc_every and row % args.gc_every == 0:
                HDF5.H5garbage_collect()
            if args.trim_every and row % args.trim_every == 0:
                _libc.malloc_trim(0)
            if row % args.sample_every == 0 or row == args.rows:
                sample(row)
        if args.top and tracemalloc.is_tracing():
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:args.top]:
                print("#", stat)
        h5.close()
        rss_closed = rss_bytes()
        _libc.malloc_trim(0)
        rss_trimmed = rss_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mb = 1e6
    print("| rows | RSS (MB) | Python (MB) | C heap in use (MB) | heap free (MB) | mmapped (MB) "
          "| HDF5 free lists (MB): reg/arr/blk/fac | mdc cur/max (MB) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in samples:
        print(f"| {s['row']} | {s['rss'] / mb:.1f} | {s['python'] / mb:.2f} | {s['heap_in_use'] / mb:.1f} "
              f"| {s['heap_free'] / mb:.1f} | {s['mmapped'] / mb:.1f} | {s['free_lists'] / mb:.2f}: "
              f"{'/'.join(f'{x / mb:.1f}' for x in s['free_lists_by_kind'])} "
              f"| {s['mdc_cur'] / mb:.2f}/{s['mdc_max'] / mb:.2f} | {s['seconds']:.0f} |")
    base = min((s for s in samples if s["row"] >= args.warmup), key=lambda s: s["row"], default=samples[0])
    last = samples[-1]
    rows = last["row"] - base["row"]
    if rows > 0:
        def per_row(key: str) -> float:
            return (last[key] - base[key]) / rows
        print(f"growth rows {base['row']}..{last['row']}: RSS {per_row('rss'):.0f} B/row, "
              f"Python {per_row('python'):.0f} B/row, C heap in use {per_row('heap_in_use'):.0f} B/row, "
              f"heap free {per_row('heap_free'):.0f} B/row, HDF5 free lists {per_row('free_lists'):.0f} B/row")
    print(f"after close: RSS {rss_closed / mb:.1f} MB, after malloc_trim {rss_trimmed / mb:.1f} MB; "
          f"{args.rows / last['seconds']:.0f} rows/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
