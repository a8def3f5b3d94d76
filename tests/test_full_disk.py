"""A full disk: the writer stops before it, keeps every row it wrote, and says what is missing and why.

Real parts: a buffer fed by bsread's Sender, the writer's CLI as a child
process, and a small tmpfs of its own as the disk (``mount -t tmpfs -o
size=...``; root only: skipped with the reason otherwise; CI runs as
root). Each case writes a past range that does not fit, and checks the
file with plain h5py against what the source sent for each pulse
(``simulate.expected_values``), ``/missing`` against the range, and the
summary JSON and the exit code against the file's ``outcome``.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle filter for reading)
import numpy as np
import pytest

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.h5.file import DiskFull, H5File
from sf_bsread_writer.h5.placement import FileSlot
from sf_bsread_writer.replay.messages import Data, Gap
from sf_bsread_writer.tools.simulate import channel_metadata, expected_values
from sf_bsread_writer.writer.pulse_range import PulseRange
from sf_bsread_writer.writer.run_loop import RunCounters, RunLoop
from tests.helpers import FakeClock, ScriptedSource, Stream, writer_process

DEADLINE = 60.0
FIRST_PULSE_ID = 80_000_000
PARAMETERS = {"general/created": "2024-05-01T12:00:00", "general/user": "e12345",
              "general/process": "test_full_disk", "general/instrument": "simulation"}
EXIT_CODES = {"complete": 0, "partial": 3, "failed": 1}
IMAGE_SHAPE = (256, 256)
N_CHANNELS = 100  # the scalars profile


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (this test's own), unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)])


def check_rows(path: Path, profile: str, rows: int) -> None:
    """Every channel has ``rows`` rows, pulse ids FIRST_PULSE_ID... in order, each value as the source sent it."""
    names = [entry["name"] for entry in channel_metadata(profile, "bitshuffle_lz4", N_CHANNELS, IMAGE_SHAPE)]
    with h5py.File(path, "r") as file:
        columns = {}
        for name in names:
            group = file["data"][name]
            assert group["pulse_id"].shape == (rows,), name
            columns[name] = (group["is_data_present"][()], group["pulse_id"][()], group["data"][()])
    for row in range(rows):
        pulse_id = FIRST_PULSE_ID + row
        sent = expected_values(profile, pulse_id, N_CHANNELS, IMAGE_SHAPE)
        for name, (present, stored_pulse_ids, data) in columns.items():
            expected = sent[name]
            if expected is None:
                assert present[row] == 0, (name, pulse_id)
                continue
            assert present[row] == 1 and stored_pulse_ids[row] == pulse_id, (name, pulse_id)
            value = data[row]
            if isinstance(expected, str):
                assert (value.decode() if isinstance(value, bytes) else value) == expected, (name, pulse_id)
            else:
                assert np.array_equal(np.asarray(value).reshape(expected.shape), expected), (name, pulse_id)


@pytest.mark.parametrize("profile, count, disk, at_least", [
    # The disks hold the writer's two reserves (2 MiB: the close's and the spare, h5/file.py) besides the data.
    # 1000-row blocks of ~4.5 KB images: the first block (4.5 MB) does not fit on 4 MB ...
    ("camera", 1500, "4m", 100),
    # ... and on 8 MB the first does, the second not.
    ("camera", 3000, "8m", 1000),
    # 100 float64 channels: ~2.5 MB of chunks per 1024 rows (4 datasets per channel).
    ("scalars", 2500, "8m", 1000),
    # scalars of every type, a big-endian one, a string, arrays, a small image, a channel mostly absent.
    ("mixed", 4000, "6m", 1000),
], ids=["camera-first-block", "camera-mid-run", "scalars", "mixed"])
def test_a_full_disk_keeps_every_row_written_and_says_what_is_missing(tmp_path, profile, count, disk, at_least):
    stream = Stream(count=count, rate=0.0, first_pulse_id=FIRST_PULSE_ID, profile=profile, n_channels=N_CHANNELS,
                    image_shape=IMAGE_SHAPE)
    stop = FIRST_PULSE_ID + count - 1
    try:
        stream.wait_for_pulse(stop)
        with small_disk(tmp_path / "disk", disk) as folder:
            output = folder / "run.h5"
            child, client = writer_process(stream.replay, output)
            with child:
                client.set_parameters(PARAMETERS)
                client.stop_pulse_id(stop)
                client.start_pulse_id(FIRST_PULSE_ID)
                exit_code = child.wait(timeout=DEADLINE)
            log = child.output()
            with h5py.File(output, "r") as file:  # opens, whatever HDF5 had to write at the close
                attributes = dict(file.attrs)
                missing = file["missing"][()].tolist() if "missing" in file else []
            rows = int(attributes["number_of_messages"])
            check_rows(output, profile, rows)
            summary = json.loads(Path(f"{output}.summary.json").read_text())
    finally:
        stream.close()

    assert rows >= at_least, f"only {rows} rows kept of {count}:\n{log}"
    assert rows < count
    assert attributes["outcome"] == ("partial" if rows else "failed")
    assert attributes["end_reason"] == "disk_full" and attributes["complete"] == 1
    # Every requested pulse that is not in the file is in /missing, with a reason.
    assert missing, "nothing recorded as missing"
    covered = set()
    for first, last, number, reason in missing:
        assert reason == b"disk_full", missing
        assert number == last - first + 1
        covered.update(range(first, last + 1))
    assert covered == set(range(FIRST_PULSE_ID + rows, stop + 1))
    assert attributes["missing_pulses"] == count - rows
    # The summary agrees with the file; the exit code with the outcome.
    assert summary["outcome"] == attributes["outcome"]
    assert summary["messages_written"] == rows and summary["rows_flushed"] == rows
    assert summary["missing_pulses"] == count - rows and summary["missing_by_reason"] == {"disk_full": count - rows}
    assert summary["end_reason"] == "disk_full"
    assert exit_code == EXIT_CODES[attributes["outcome"]], log
    assert "disk full" in log.lower(), log
    assert child.process.poll() is not None


def test_a_write_that_finds_no_room_after_the_check_keeps_the_rows_of_the_last_flush(tmp_path, monkeypatch):
    """HDF5 itself hits ENOSPC (another process took the room between the check and the write, a quota).

    The check cannot be raced on purpose, so here it is told there is room
    (the one stand-in of this module); the disk, the write that fails and
    the close are real. The reserve is given back, the block cut off again,
    and the file closes with the rows of the last flush.
    """
    monkeypatch.setattr(FileSlot, "free_bytes", lambda self: 1 << 40)
    channels = channel_metadata("camera", "bitshuffle_lz4", image_shape=IMAGE_SHAPE)
    parser = MessageParser()
    with small_disk(tmp_path / "disk", "3m") as folder:
        output = folder / "run.h5"
        h5 = H5File(output, block_rows=100, flush_interval=1e9)
        flushed = 0
        with pytest.raises(DiskFull) as caught:
            for pulse_id in range(FIRST_PULSE_ID, FIRST_PULSE_ID + 2000):
                image = expected_values("camera", pulse_id, image_shape=IMAGE_SHAPE)["CAMERA:FPICTURE"]
                h5.append(parser.parse(build_message(pulse_id, channels, [image],
                                                              timestamp=1_700_000_000 + pulse_id / 100)))
                flushed = h5.rows_flushed
        # The block whose write found no room: cut off again (the spare not enough), or written whole with the
        # spare reserve (h5/file.py SPARE_BYTES); either way a whole number of flushed blocks, nothing after it.
        kept = caught.value.rows_kept
        assert kept in (flushed, flushed + 100) and flushed > 0 and flushed % 100 == 0
        flushed = kept
        with pytest.raises(DiskFull):
            h5.append(parser.parse(build_message(1, channels, [image])))  # no more rows
        h5.record_missing(FIRST_PULSE_ID + flushed, FIRST_PULSE_ID + 1999, "disk_full")
        h5.close({"end_reason": "disk_full", "outcome": "partial"})
        with h5py.File(output, "r") as file:
            assert file.attrs["number_of_messages"] == flushed and file.attrs["complete"] == 1
            assert file["missing"][()].tolist() == [(FIRST_PULSE_ID + flushed, FIRST_PULSE_ID + 1999,
                                                     2000 - flushed, b"disk_full")]
        check_rows(output, "camera", flushed)


def test_the_run_loop_on_a_full_disk_records_one_list_in_the_file_and_the_statistics(tmp_path):
    """The run loop's full-disk path with a real file on a small disk: a gap and a jump before the disk
    fills, then the rows that did not fit and the rest of the range, each once, in /missing as in the range."""
    channels = channel_metadata("camera", "bitshuffle_lz4", image_shape=IMAGE_SHAPE)
    stop = FIRST_PULSE_ID + 1999
    # Pulses +10..+14 come as the buffer's gap notice, +20 never comes (a jump).
    sent = [pulse_id for pulse_id in range(FIRST_PULSE_ID, stop + 1)
            if not (10 <= pulse_id - FIRST_PULSE_ID <= 14 or pulse_id - FIRST_PULSE_ID == 20)]

    def message(pulse_id: int) -> Data:
        image = expected_values("camera", pulse_id, image_shape=IMAGE_SHAPE)["CAMERA:FPICTURE"]
        return Data(pulse_id, build_message(pulse_id, channels, [image], timestamp=1_700_000_000 + pulse_id / 100))

    events = [lambda pulse_id=pulse_id: message(pulse_id) for pulse_id in sent]
    events.insert(10, Gap(FIRST_PULSE_ID + 10, FIRST_PULSE_ID + 14, "evicted", 5))
    clock = FakeClock()
    with small_disk(tmp_path / "disk", "3m") as folder:
        output = H5File(folder / "run.h5", block_rows=100, flush_interval=1e9, clock=clock)
        loop = RunLoop(ScriptedSource(clock, events), output, PulseRange(FIRST_PULSE_ID, None, stop, None),
                       RunCounters(), queue.SimpleQueue(), 10.0, lambda reason: None, clock)
        assert loop.run() == "disk_full"
        output.close({"end_reason": "disk_full"})
        with h5py.File(folder / "run.h5", "r") as file:
            rows = int(file.attrs["number_of_messages"])
            table = [(first, last, count, reason.decode()) for first, last, count, reason in file["missing"][()]]
            missing_pulses = int(file.attrs["missing_pulses"])
    assert 100 <= rows < len(sent) and loop.counters.messages_written == rows == loop.range.rows
    assert table == [tuple(vars(item).values()) for item in loop.range.missing]
    assert missing_pulses == loop.range.missing_count == 5 + 1 + len(sent) - rows
    assert table[:2] == [(FIRST_PULSE_ID + 10, FIRST_PULSE_ID + 14, 5, "evicted"),
                         (FIRST_PULSE_ID + 20, FIRST_PULSE_ID + 20, 1, "pulse_id_jump")]
    # The rows appended but not kept, then the rest of the range: disk_full, contiguous up to the stop.
    assert [reason for *_, reason in table[2:]] == ["disk_full"] * len(table[2:]) and len(table) == 4
    assert table[2][0] == sent[rows] and table[2][1] + 1 == table[3][0] and table[3][1] == stop


@pytest.mark.parametrize("disk", ["3100k", "3300k", "3600k", "4m"])
def test_no_room_inside_a_flush_of_scalars_keeps_the_rows_flushed_and_the_close(tmp_path, monkeypatch, disk):
    """ENOSPC while HDF5 rewrites committed metadata (journaled first) and chunks of later flushes.

    As above, the check is told there is room, so that the disk fills
    wherever the writes happen to be: in the undo journal, in a block write
    or in ``H5Fflush`` itself. Whatever write finds no room, the writer
    must end with a file that opens, holds every row it says it holds, and
    is closed (``complete = 1``), never a writer error.
    """
    monkeypatch.setattr(FileSlot, "free_bytes", lambda self: 1 << 40)
    channels = channel_metadata("scalars", n_channels=N_CHANNELS)
    parser = MessageParser()
    with small_disk(tmp_path / "disk", disk) as folder:
        output = folder / "run.h5"
        h5 = H5File(output, block_rows=1000, flush_interval=1e9)
        flushed = 0
        with pytest.raises(DiskFull) as caught:
            for pulse_id in range(FIRST_PULSE_ID, FIRST_PULSE_ID + 20_000):
                values = expected_values("scalars", pulse_id, N_CHANNELS)
                h5.append(parser.parse(build_message(pulse_id, channels, [values[c["name"]] for c in channels],
                                                     timestamp=1_700_000_000 + pulse_id / 100)))
                if pulse_id % 50 == 49:
                    h5.flush()
                    flushed = h5.rows_flushed
        kept = caught.value.rows_kept
        assert kept >= flushed  # the rows of every flush that returned, and those of the block written if it fit
        h5.record_missing(FIRST_PULSE_ID + kept, FIRST_PULSE_ID + 19_999, "disk_full")
        h5.close({"end_reason": "disk_full", "outcome": "partial"})
        with h5py.File(output, "r") as file:
            assert file.attrs["number_of_messages"] == kept and file.attrs["complete"] == 1
        check_rows(output, "scalars", kept)
