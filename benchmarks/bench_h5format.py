"""h5format throughput: H5File against the original writer's pattern and against bare HDF5.

Run by hand on a quiet machine (numbers on a shared 2-core box are noisy):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_h5format.py [--quick]

Cases (messages are built and parsed before the clock starts: this measures
the file layer only, not ZeroMQ or parsing):

- scalars/H5File: a 500-channel float64 stream through ``H5File.append``
  (block writes), including ``close``.
- scalars/original: the original writer's pattern for the same messages:
  for every message and channel, resize ``data``, ``pulse_id`` and
  ``is_data_present`` by one row and write one element into each
  (chunks ``(100,) + shape``, no compression).
- images/H5File direct: bitshuffle_lz4 1024x1280 uint16 images through
  ``H5File`` (``write_direct_chunk``, no decompression).
- images/H5File decode+filter: the same messages with the direct path
  refused, so each image is decoded and recompressed by the HDF5 filter (the
  fallback path, and what a writer without direct chunks does).
- images/bare write_direct_chunk: the floor: a loop of resize-free
  ``write_direct_chunk`` calls into a preallocated dataset.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # bitshuffle's OpenMP is slow on small machines

import h5py  # noqa: E402
import hdf5plugin  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OriginalPatternWriter  # noqa: E402

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.message import Message, MessageParser
from sf_bsread_writer.h5 import columns  # noqa: E402
from sf_bsread_writer.h5.file import H5File  # noqa: E402


def scalar_messages(n_messages: int, n_channels: int) -> list[Message]:
    channels = [{"name": f"SCALAR{i:03d}", "type": "float64", "shape": [1]} for i in range(n_channels)]
    parser = MessageParser()
    return [parser.parse(build_message(
        pulse_id, channels, [pulse_id + i * 0.5 for i in range(n_channels)], timestamp=pulse_id / 100))
        for pulse_id in range(1, n_messages + 1)]


def image_messages(n_messages: int, distinct: int = 8) -> list[Message]:
    spec = {"name": "CAMERA", "type": "uint16", "shape": [1280, 1024], "compression": "bitshuffle_lz4"}
    rng = np.random.default_rng(1)
    images = [rng.poisson(30, size=(1024, 1280)).astype("<u2") for _ in range(distinct)]
    parser = MessageParser()
    return [parser.parse(build_message(pulse_id, [spec], [images[pulse_id % distinct]],
                                                timestamp=pulse_id / 100))
            for pulse_id in range(1, n_messages + 1)]


def run_h5file(path: Path, messages: list[Message]) -> float:
    start = time.perf_counter()
    h5 = H5File(path, {})
    for message in messages:
        h5.append(message)
    h5.close()
    return time.perf_counter() - start


def run_original_pattern(path: Path, messages: list[Message]) -> float:
    """Element by element, as the original writer did (resize + write per channel per message)."""
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        original = OriginalPatternWriter(f)
        for message in messages:
            original.append(message)
    return time.perf_counter() - start


def run_decode_and_filter(path: Path, messages: list[Message]) -> float:
    original = columns.direct_chunk_compatible
    columns.direct_chunk_compatible = lambda spec, part: False  # type: ignore[assignment]
    try:
        return run_h5file(path, messages)
    finally:
        columns.direct_chunk_compatible = original  # type: ignore[assignment]


def run_bare_direct_chunk(path: Path, messages: list[Message]) -> float:
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        dataset = f.create_dataset("data", (len(messages), 1024, 1280), chunks=(1, 1024, 1280), dtype="<u2",
                                   **hdf5plugin.Bitshuffle(cname="lz4"))
        write = dataset.id.write_direct_chunk
        for row, message in enumerate(messages):
            write((row, 0, 0), message.value_part(0))
    return time.perf_counter() - start


def measure(name: str, run: Callable[[Path, list[Message]], float], messages: list[Message],
            directory: Path, repeats: int) -> tuple[str, int, float, float]:
    best = float("inf")
    size = 0.0
    for attempt in range(repeats):
        path = directory / f"{name.replace('/', '_').replace(' ', '_')}-{attempt}.h5"
        best = min(best, run(path, messages))
        size = path.stat().st_size / 1e6
        path.unlink()
    return name, len(messages), best, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    parser.add_argument("--channels", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()
    n_scalar, n_original, n_images = (200, 50, 40) if args.quick else (2000, 200, 300)

    directory = Path(args.dir or tempfile.mkdtemp(prefix="bench_h5format-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building messages ({args.channels} scalar channels; 1024x1280 uint16 bitshuffle_lz4 images) ...",
              flush=True)
        scalars = scalar_messages(n_scalar, args.channels)
        images = image_messages(n_images)
        compressed_mb = sum(len(m.value_part(0)) for m in images) / len(images) / 1e6
        results = [
            measure("scalars/H5File", run_h5file, scalars, directory, args.repeats),
            measure("scalars/original element-by-element", run_original_pattern, scalars[:n_original],
                    directory, 1),
            measure("images/H5File direct chunk", run_h5file, images, directory, args.repeats),
            measure("images/H5File decode+filter", run_decode_and_filter, images, directory, args.repeats),
            measure("images/bare write_direct_chunk", run_bare_direct_chunk, images, directory, args.repeats),
        ]
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)

    print(f"\nimage: 1024x1280 uint16 = 2.62 MB raw, {compressed_mb:.2f} MB compressed; "
          f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'case':40s} {'messages':>8s} {'seconds':>8s} {'msg/s':>10s} {'file MB':>8s}")
    rates = {}
    for name, count, seconds, size in results:
        rates[name] = count / seconds
        print(f"{name:40s} {count:8d} {seconds:8.3f} {count / seconds:10.1f} {size:8.1f}")
    print(f"\nscalars: H5File / original = {rates['scalars/H5File'] / rates['scalars/original element-by-element']:.0f}x")
    print(f"images: direct / decode+filter = "
          f"{rates['images/H5File direct chunk'] / rates['images/H5File decode+filter']:.1f}x; "
          f"direct / bare loop = {rates['images/H5File direct chunk'] / rates['images/bare write_direct_chunk']:.2f}")


if __name__ == "__main__":
    main()
