"""A bad clock or a bad channel costs only itself: raw bsread from a PUSH socket -> the real buffer
process -> the real writer process -> the file, opened with h5py.

Every kind of per-channel fault rides in the same messages as good channels
(a declared shape no message can carry, an unknown type, a duplicate name,
a bitshuffle block header claiming 2 GiB, values of the wrong size on some
pulses), and some pulses carry a global timestamp that is no time (NaN,
negative, ns out of range, 2^62 s) or a channel stamp that is none. The
good channels must hold exactly what was sent for every pulse, every
pulse must be a row, the bad values must be absent and counted by reason,
no dataset may be sized by a claim that never decoded, and the outcome
must say ``partial``.
"""
from __future__ import annotations

import json
import math
import struct
import time

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle filter for reading)
import numpy as np
import requests
import zmq

from sf_bsread_writer.bsread.build import build_message
from tests.helpers import Child, wait_for
from tests.test_writer import PARAMETERS, writer_process

DEADLINE = 60.0
FIRST, COUNT = 1000, 30
PULSES = list(range(FIRST, FIRST + COUNT))
BAD_CLOCKS = {1005: {"sec": float("nan"), "ns": 0}, 1010: {"sec": -3, "ns": 0},
              1015: {"sec": 1_700_000_000, "ns": 10 ** 9}, 1020: {"sec": 2 ** 62, "ns": 0}}
STRAY_STAMP = 1012  # GOOD:F64's own timestamp is 2^62 s there (was stored as 0 by int64 overflow)

CHANNELS = [
    {"name": "GOOD:F64", "type": "float64"},
    {"name": "GOOD:WAVE", "type": "int32", "shape": [8]},
    {"name": "GOOD:IMG", "type": "uint16", "shape": [64, 64], "compression": "bitshuffle_lz4"},
    {"name": "GOOD:STR", "type": "string"},
    {"name": "BAD:CLAIM", "type": "uint8", "shape": [2 ** 31], "compression": "bitshuffle_lz4"},
    {"name": "BAD:HUGE", "type": "uint8", "shape": [2 ** 31, 2 ** 31]},
    {"name": "BAD:TYPE", "type": "complex128"},
    {"name": "GOOD:F64", "type": "int32"},  # a duplicate name: the first keeps it
    {"name": "BAD:SIZE", "type": "int32", "shape": [4]},
]
GOOD = ("GOOD:F64", "GOOD:WAVE", "GOOD:IMG", "GOOD:STR")


def values_of(pulse_id: int) -> dict[str, object]:
    rng = np.random.default_rng(pulse_id)
    return {"GOOD:F64": float(pulse_id) / 4, "GOOD:WAVE": np.arange(8, dtype="<i4") * pulse_id,
            "GOOD:IMG": rng.integers(0, 1000, (64, 64)).astype("<u2"), "GOOD:STR": f"pulse {pulse_id}",
            "BAD:SIZE": np.arange(4, dtype="<i4") + pulse_id}


def message(pulse_id: int, now: float) -> list[bytes]:
    values = values_of(pulse_id)
    specs = [{k: v for k, v in entry.items()} for entry in CHANNELS]
    # Build with stand-ins the builder accepts, then put in what a faulty sender sends.
    buildable = [entry if not entry["name"].startswith("BAD:") or entry["name"] == "BAD:SIZE"
                 else {"name": entry["name"], "type": "uint8"} for entry in specs]
    buildable[7] = {"name": "GOOD:F64#", "type": "int32"}
    frames = build_message(pulse_id, buildable,
                           [values["GOOD:F64"], values["GOOD:WAVE"], values["GOOD:IMG"], values["GOOD:STR"],
                            1, 1, 1, 7, values["BAD:SIZE"]], timestamp=now,
                           channel_timestamps=[(2 ** 62, 0) if pulse_id == STRAY_STAMP else None] + [None] * 8)
    header = json.loads(frames[1])
    header["channels"] = specs
    frames[1] = json.dumps(header).encode()
    main = json.loads(frames[0])
    main["hash"] = "badinput"  # one data header for the whole stream
    if pulse_id in BAD_CLOCKS:
        main["global_timestamp"] = BAD_CLOCKS[pulse_id]
    frames[0] = json.dumps(main).encode()  # NaN goes out as the bare token NaN, as a C sender would
    frames[2 + 2 * 4] = struct.pack(">QI", 2 ** 31, 8192) + b"\x00" * 20  # a block header claiming 2 GiB
    if pulse_id % 2:
        frames[2 + 2 * 8] = b"\x01\x02\x03"  # BAD:SIZE: 3 bytes for an int32 [4], every odd pulse
    return frames


def test_bad_clocks_and_bad_channels_cost_only_themselves(tmp_path):
    context = zmq.Context()
    source = context.socket(zmq.PUSH)
    source.setsockopt(zmq.LINGER, 0)
    source.setsockopt(zmq.SNDTIMEO, int(DEADLINE * 1000))
    source.bind("tcp://127.0.0.1:0")
    sent_at: dict[int, float] = {}
    output = tmp_path / "bad.h5"
    try:
        with Child.python_module("sf_bsread_writer.buffer", source.getsockopt_string(zmq.LAST_ENDPOINT),
                                 "-o", "0", "--replay-port", "0", "-b", "100",
                                 env={"SF_BSREAD_BUFFER_REST_PORT": "0"}) as buffer:
            endpoints = json.loads(buffer.wait_for_line("READY ", timeout=DEADLINE).split("READY ", 1)[1])
            for pulse_id in PULSES:
                sent_at[pulse_id] = time.time()
                source.send_multipart(message(pulse_id, sent_at[pulse_id]))
            statistics = wait_for(
                lambda: (s := requests.get(endpoints["rest"] + "/statistics", timeout=5).json()["statistics"])
                ["received"] + s["rejected_total"] == COUNT and s, timeout=DEADLINE,
                message="every pulse handled by the buffer")
            metrics = requests.get(endpoints["rest"] + "/metrics", timeout=5).text
            writer, client = writer_process(endpoints["replay"], output)
            with writer:
                client.set_parameters(PARAMETERS)
                client.stop_pulse_id(PULSES[-1])
                client.start_pulse_id(PULSES[0])
                assert writer.wait(timeout=DEADLINE) == 3, writer.output()  # 3: partial
    finally:
        source.close()
        context.term()

    # The buffer: nothing rejected, the bad clocks and the refused channel values counted by reason.
    assert statistics["rejected_total"] == 0, statistics["rejected"]
    assert statistics["source"]["invalid_timestamps"] == len(BAD_CLOCKS)
    assert statistics["source"]["timed_by_receive"] == len(BAD_CLOCKS)
    assert statistics["refused_channel_values"] == {"data_header_invalid": 2 * COUNT, "unknown_type": COUNT}
    assert f'sf_bsread_buffer_source_invalid_timestamps_total{{buffer="BSBUFFER"}} {len(BAD_CLOCKS)}' in metrics
    assert 'sf_bsread_buffer_refused_channel_values_total{buffer="BSBUFFER",reason="unknown_type"} 30' in metrics

    # The writer's statistics (as left beside the file) say the same as the file, per channel and reason.
    writer_statistics = json.loads((tmp_path / "bad.h5.summary.json").read_text())
    assert writer_statistics["outcome"] == "partial" and writer_statistics["missing_pulses"] == 0
    assert writer_statistics["refused_values"] == {
        "BAD:CLAIM": {"value_invalid": COUNT}, "BAD:HUGE": {"data_header_invalid": COUNT},
        "BAD:TYPE": {"unknown_type": COUNT}, "GOOD:F64": {"data_header_invalid": COUNT},
        "BAD:SIZE": {"value_invalid": COUNT // 2}}

    with h5py.File(output, "r") as file:
        attrs = file.attrs
        # Every pulse is a row: a bad clock is no pulse_id_jump, nothing is missing.
        assert attrs["number_of_messages"] == COUNT and attrs["missing_pulses"] == 0 and "missing" not in file
        assert attrs["outcome"] == "partial" and attrs["end_reason"] == "stop_reached" and attrs["complete"] == 1
        # The bad clocks' rows are timed by the buffer's receive time: the file says its times are mixed.
        assert attrs["time_base"] == "mixed"
        # The good channels hold exactly what was sent, for every pulse.
        for name in GOOD:
            group = file["data"][name]
            assert group["pulse_id"][()].tolist() == PULSES, name
            assert group["is_data_present"][()].tolist() == [1] * COUNT, name
            for row, pulse_id in enumerate(PULSES):
                expected = values_of(pulse_id)[name]
                stored = group["data"][row]
                if isinstance(expected, str):
                    assert stored.decode() == expected
                else:
                    assert np.array_equal(np.asarray(stored).reshape(np.shape(expected)), expected), (name, row)
        assert file["data/GOOD:F64"].attrs["type"] == "float64"  # the duplicate's int32 took nothing
        stamps = file["data/GOOD:F64/timestamp"][()]
        for row, pulse_id in enumerate(PULSES):
            if pulse_id == STRAY_STAMP:
                assert stamps[row] == 0  # no time: "not given", never a wrapped int64
            else:  # the channel's own stamp is kept where it is a time, also beside a bad global one
                assert abs(stamps[row] / 1e9 - sent_at[pulse_id]) < 1e-6, row
        # The bad channels: absent, counted by reason, and never sized by what they claimed.
        refused = {(entry["channel"], entry["reason"]): entry.get("values")
                   for entry in json.loads(attrs["refused_channels"])}
        assert refused == {("BAD:CLAIM", "value_invalid"): COUNT, ("BAD:HUGE", "data_header_invalid"): COUNT,
                           ("BAD:TYPE", "unknown_type"): COUNT, ("GOOD:F64", "data_header_invalid"): COUNT,
                           ("BAD:SIZE", "value_invalid"): COUNT // 2}
        assert set(file["data"]) == {*GOOD, "BAD:SIZE"}
        size = file["data/BAD:SIZE"]
        assert size["data"].shape == (COUNT, 4)
        assert size["is_data_present"][()].tolist() == [1 - p % 2 for p in PULSES]
        for row, pulse_id in enumerate(PULSES):
            if not pulse_id % 2:
                assert size["data"][row].tolist() == values_of(pulse_id)["BAD:SIZE"].tolist()
        assert attrs["absent_values"] == 4 * COUNT + COUNT // 2
        for name in file["data"]:
            for dataset in ("data", "pulse_id", "is_data_present", "timestamp"):
                shape = file["data"][name][dataset].shape
                assert shape[0] == COUNT and math.prod(shape[1:]) <= 64 * 64, (name, dataset, shape)
