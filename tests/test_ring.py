"""The ring on its own: no sockets, no threads, deterministic.

The randomized test drives the ring and a list-based reference model with
the same operations and compares everything observable after each step.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import zmq

from sf_bsread_writer.process import tune_allocator
from sf_bsread_writer.ring import LARGE_PART_BYTES, AppendStatus, Ring


def message(pulse_id: int, n_channels: int = 2, large: bool = False, header: bytes | None = None) -> list[bytes]:
    """bsread-shaped parts: main header, data header, then value/timestamp pairs (a large value optional)."""
    parts = [b'{"htype":"bsr_m-1.1","pulse_id":%d}' % pulse_id, header or b'{"channels":[%d]}' % n_channels]
    for channel in range(n_channels):
        if large and channel == 0:
            parts.append(bytes([pulse_id % 251]) * LARGE_PART_BYTES * 2)
        else:
            parts.append(pulse_id.to_bytes(8, "little"))
        parts.append(channel.to_bytes(8, "little") + pulse_id.to_bytes(8, "little"))
    return parts


def as_bytes(parts: list) -> list[bytes]:
    return [bytes(part) for part in parts]


def fill(ring: Ring, pulse_ids, **kwargs) -> None:
    for pulse_id in pulse_ids:
        assert ring.append(pulse_id, pulse_id / 100.0, message(pulse_id, **kwargs)).stored


def held_pulse_ids(ring: Ring) -> list[int]:
    result = []
    seq = ring.seek(ring.first_seq)
    while seq < ring.next_seq:
        result.append(ring.pulse_id(seq))
        seq = ring.seek(seq + 1)
    return result


# ---------------------------------------------------------------- eviction

def test_empty_ring():
    ring = Ring(10, 1000)
    assert (ring.n_messages, ring.n_bytes, ring.first_seq, ring.next_seq) == (0, 0, 0, 0)
    assert ring.oldest_pulse_id is None and ring.newest_pulse_id is None
    assert ring.seq_for_pulse_id(5) == 0 and ring.seq_for_time(1.0) == 0 and ring.seek(0) == 0
    with pytest.raises(KeyError):
        ring.frames(0)


def test_eviction_by_count_keeps_the_newest():
    ring = Ring(max_messages=3, max_bytes=10**9)
    fill(ring, range(100, 106))
    assert (ring.first_seq, ring.next_seq) == (3, 6)
    assert held_pulse_ids(ring) == [103, 104, 105]
    assert (ring.oldest_pulse_id, ring.newest_pulse_id) == (103, 105)
    assert ring.counters.evicted == 3
    with pytest.raises(KeyError):
        ring.frames(2)


def test_eviction_by_bytes_keeps_what_fits():
    size = sum(map(len, message(0)))
    ring = Ring(max_messages=100, max_bytes=3 * size + size // 2)
    results = [ring.append(p, 0.0, message(p)) for p in range(10)]
    assert [r.evicted for r in results] == [0, 0, 0] + [1] * 7
    assert held_pulse_ids(ring) == [7, 8, 9]
    assert ring.n_bytes == 3 * size <= ring.max_bytes
    assert ring.counters.evicted_bytes == 7 * size


def test_large_message_evicts_several_small_ones():
    small = sum(map(len, message(0)))
    large = sum(map(len, message(0, large=True)))
    ring = Ring(100, large + 2 * small)
    fill(ring, range(5))
    result = ring.append(5, 0.0, message(5, large=True))
    assert result.stored and result.evicted == 3
    assert held_pulse_ids(ring) == [3, 4, 5]


def test_oversize_message_is_rejected_and_ring_untouched():
    ring = Ring(10, 1000)
    fill(ring, [1, 2])
    before = (held_pulse_ids(ring), ring.n_bytes, ring.next_seq)
    result = ring.append(3, 0.0, [b"x" * 1001])
    assert result.status is AppendStatus.OVERSIZE and not result.stored and result.seq is None
    assert (held_pulse_ids(ring), ring.n_bytes, ring.next_seq) == before
    assert ring.counters.oversize == 1
    assert [event.kind for event in result.events] == ["oversize"] and "max_bytes" in result.events[0].text


def test_bounds_are_validated():
    with pytest.raises(ValueError):
        Ring(0, 10)
    with pytest.raises(ValueError):
        Ring(10, 0)
    with pytest.raises(ValueError):
        Ring(10, 10).append(1, 0.0, [])


# ---------------------------------------------------------------- frames

def test_frames_round_trip_bytes_and_zmq_frames_small_and_large():
    ring = Ring(10, 10**9)
    big = b"I" * (LARGE_PART_BYTES * 3 + 7)
    edge = b"E" * LARGE_PART_BYTES  # exactly the threshold: kept by reference
    below = b"B" * (LARGE_PART_BYTES - 1)  # packed
    messages = [
        [b"main", b"header", b"", b"", b"value", b"tstamp"],  # absent channel: empty parts
        [zmq.Frame(b"main2"), zmq.Frame(b"header"), zmq.Frame(big), zmq.Frame(b"t" * 16)],
        [b"m", zmq.Frame(big), edge, bytearray(below), memoryview(b"mv-part"), zmq.Frame(big)],
        [b"only one part"],
        [big, b"header as second", b"x"],
        [memoryview(bytearray(big[:LARGE_PART_BYTES * 2])).cast("Q"), b"h"],  # a non-byte memoryview counts its bytes
    ]
    seqs = [ring.append(i, float(i), parts).seq for i, parts in enumerate(messages)]
    for seq, parts in zip(seqs, messages):
        expected = [bytes(memoryview(p).cast("B")) if isinstance(p, memoryview) else bytes(p) for p in parts]
        got = ring.frames(seq)
        assert as_bytes(got) == expected
        assert ring.nbytes(seq) == sum(map(len, expected))
        assert as_bytes(ring.frames(seq)) == expected  # repeatable
    assert ring.n_bytes == sum(ring.nbytes(s) for s in seqs)
    # large zmq.Frames are kept by reference (zero-copy), small ones are not
    frame = ring.frames(seqs[1])[2]
    assert frame is messages[1][2]
    assert isinstance(ring.frames(seqs[2])[2], bytes)  # edge-sized bytes: by reference
    assert ring.frames(seqs[2])[2] is edge


def test_mutable_large_buffers_are_copied():
    ring = Ring(10, 10**9)
    buffer = bytearray(b"a" * LARGE_PART_BYTES * 2)
    seq = ring.append(1, 0.0, [b"m", b"h", buffer]).seq
    buffer[:] = b"b" * len(buffer)
    assert bytes(ring.frames(seq)[2]) == b"a" * LARGE_PART_BYTES * 2
    # Any buffer its owner can still write to, not only bytearray and memoryview.
    array = np.full(LARGE_PART_BYTES * 2, ord("a"), dtype=np.uint8)
    seq = ring.append(2, 0.0, [b"m", b"h", array]).seq
    array[:] = ord("b")
    assert bytes(ring.frames(seq)[2]) == b"a" * LARGE_PART_BYTES * 2


def test_frames_can_be_sent_with_pyzmq():
    """The returned list goes straight into send_multipart(copy=False), repeatedly."""
    context = zmq.Context()
    try:
        pull = context.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = context.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        ring = Ring(4, 10**9)
        received = [zmq.Frame(p) for p in message(7, n_channels=3, large=True)]
        seq = ring.append(7, 0.07, received).seq
        for _ in range(3):
            push.send_multipart(ring.frames(seq), copy=False)
        for _ in range(3):
            assert pull.poll(5000)
            assert pull.recv_multipart() == message(7, n_channels=3, large=True)
        push.close(linger=0)
        pull.close(linger=0)
    finally:
        context.term()


def test_unchanged_data_header_is_stored_once():
    ring = Ring(10, 10**9)
    header = b'{"channels": "' + b"c" * 1000 + b'"}'
    for pulse_id in range(3):
        ring.append(pulse_id, 0.0, [b"m", zmq.Frame(header), b"v", b"t"])
    ring.append(3, 0.0, [b"m", b"other header", b"v", b"t"])
    ring.append(4, 0.0, [b"m", header, b"v", b"t"])
    headers = [ring.frames(seq)[1] for seq in range(5)]
    assert [bytes(h) for h in headers] == [header] * 3 + [b"other header", header]
    assert headers[0] is headers[1] is headers[2]
    assert ring.n_bytes == 5 * 3 + 4 * len(header) + len(b"other header")  # logical bytes


def test_evicted_messages_frames_stay_valid():
    ring = Ring(1, 10**9)
    seq = ring.append(1, 0.0, message(1, large=True)).seq
    parts = ring.frames(seq)
    ring.append(2, 0.0, message(2, large=True))
    assert seq not in ring
    assert as_bytes(parts) == message(1, large=True)


# ---------------------------------------------------------------- lookup

def test_lookup_by_pulse_id_with_jumps_and_outside_the_range():
    ring = Ring(100, 10**9)
    fill(ring, [10, 20, 30, 60, 70])  # seqs 0..4
    assert ring.seq_for_pulse_id(10) == 0
    assert ring.seq_for_pulse_id(5) == 0  # before the oldest
    assert ring.seq_for_pulse_id(11) == 1  # absent: the next held
    assert ring.seq_for_pulse_id(40) == 3  # inside a jump
    assert ring.seq_for_pulse_id(70) == 4
    assert ring.seq_for_pulse_id(71) == ring.next_seq == 5  # after the newest


def test_lookup_after_wraparound():
    ring = Ring(7, 10**9)
    fill(ring, range(0, 100, 2))
    assert held_pulse_ids(ring) == list(range(86, 100, 2))
    for pulse_id in range(80, 102):
        expected = next((s for s in range(ring.first_seq, ring.next_seq) if ring.pulse_id(s) >= pulse_id),
                        ring.next_seq)
        assert ring.seq_for_pulse_id(pulse_id) == expected
        assert ring.seq_for_time(pulse_id / 100.0) == expected


def test_lookup_by_time():
    ring = Ring(100, 10**9)
    for pulse_id, t in [(1, 10.0), (2, 10.5), (3, 11.0), (4, 11.0), (5, 12.0)]:
        ring.append(pulse_id, t, message(pulse_id))
    assert ring.seq_for_time(0.0) == 0
    assert ring.seq_for_time(10.2) == 1
    assert ring.seq_for_time(11.0) == 2
    assert ring.seq_for_time(12.0) == 4
    assert ring.seq_for_time(12.1) == 5 == ring.next_seq
    assert ring.timestamp(1) == 10.5


def test_lookup_by_time_survives_non_monotonic_time():
    ring = Ring(100, 10**9)
    times = [10.0, 11.0, 99.0, 12.0, 13.0, 5.0, 14.0, math.nan, 15.0]
    for pulse_id, t in enumerate(times):
        ring.append(pulse_id, t, message(pulse_id))
    # every held message from the answer on has timestamp >= t
    assert ring.seq_for_time(12.5) == 6  # 5.0 at seq 5 is "before" 12.5; 14.0 at seq 6 onwards
    assert ring.seq_for_time(0.0) == 0
    assert ring.seq_for_time(15.0) == 7  # the NaN at seq 7 constrains nothing
    assert ring.seq_for_time(100.0) == ring.next_seq
    assert math.isnan(ring.timestamp(7)) and ring.timestamp(2) == 99.0  # raw values kept


# ---------------------------------------------------------------- resets, duplicates, jumps

def test_duplicate_pulse_id_is_not_stored():
    ring = Ring(10, 10**9)
    fill(ring, [1, 2])
    result = ring.append(2, 0.0, message(2))
    assert result.status is AppendStatus.DUPLICATE and not result.stored
    assert held_pulse_ids(ring) == [1, 2] and ring.next_seq == 2
    assert ring.counters.duplicates == 1


def test_reset_evicts_the_other_timeline_and_leaves_a_hole():
    ring = Ring(100, 10**9, reset_confirm=1)  # act on the first backwards message
    fill(ring, [100, 101, 102, 103, 104])  # seqs 0..4
    result = ring.append(102, 0.0, message(102))
    assert result.stored and result.reset and result.reset_evicted == 3 and result.seq == 5
    assert [event.kind for event in result.events] == ["reset"] and "backwards" in result.events[0].text
    assert held_pulse_ids(ring) == [100, 101, 102]
    assert ring.counters.resets == 1 and ring.counters.reset_evicted == 3
    assert ring.n_messages == 3 and ring.n_bytes == 3 * sum(map(len, message(100)))
    # seqs 2..4 are never reused: a reader there is told where to continue
    assert [ring.seek(s) for s in range(7)] == [0, 1, 5, 5, 5, 5, 6]
    assert 3 not in ring
    with pytest.raises(KeyError):
        ring.frames(3)
    assert as_bytes(ring.frames(5)) == message(102)
    # the index stays sorted
    fill(ring, [103, 104])
    assert ring.seq_for_pulse_id(102) == 5 and ring.seq_for_pulse_id(104) == 7
    assert ring.seq_for_pulse_id(101) == 1


def test_reset_below_everything_empties_the_old_timeline():
    ring = Ring(4, 10**9, reset_confirm=1)
    fill(ring, range(1000, 1010))
    result = ring.append(1, 0.0, message(1))
    assert result.reset_evicted == 4 and held_pulse_ids(ring) == [1]
    assert ring.first_seq == 10 and ring.seek(0) == 10


def test_a_single_backwards_glitch_is_dropped_and_the_ring_untouched():
    ring = Ring(100, 10**9)  # default: a reset needs RESET_CONFIRM_MESSAGES in a row
    fill(ring, range(2_000_000, 2_000_010))
    before = (held_pulse_ids(ring), ring.n_bytes, ring.next_seq)
    assert ring.append(0, 0.0, message(0)).status is AppendStatus.HELD_BACK
    assert held_pulse_ids(ring) == before[0]  # nothing evicted on one message's word
    result = ring.append(2_000_010, 0.0, message(2_000_010))
    assert result.stored and not result.reset
    assert held_pulse_ids(ring) == [*range(2_000_000, 2_000_011)]
    assert ring.counters.resets == 0 and ring.counters.reset_evicted == 0
    assert (ring.counters.held_back, ring.counters.out_of_order) == (1, 1)
    assert [event.kind for event in result.events] == ["out_of_order"]
    assert "out-of-order" in result.events[0].text and "pulse_id 0" in result.events[0].text


def test_a_source_restart_is_confirmed_by_consecutive_messages():
    ring = Ring(100, 10**9, reset_confirm=3)
    fill(ring, [100, 101, 102, 103, 104])  # seqs 0..4
    assert ring.append(10, 1.0, message(10)).status is AppendStatus.HELD_BACK
    assert ring.append(11, 1.0, message(11)).status is AppendStatus.HELD_BACK
    assert held_pulse_ids(ring) == [100, 101, 102, 103, 104]
    result = ring.append(12, 1.0, message(12))
    assert result.stored and result.reset and result.reset_evicted == 5
    assert held_pulse_ids(ring) == [10, 11, 12] and result.seq == 7  # 10 -> 5, 11 -> 6, 12 -> 7
    assert as_bytes(ring.frames(5)) == message(10)
    assert ring.counters.resets == 1 and ring.counters.out_of_order == 0 and ring.counters.held_back == 3
    assert ring.seek(0) == 5 and ring.seq_for_pulse_id(11) == 6
    fill(ring, [13, 14])
    assert ring.usual_step == 1 and ring.counters.jumps == 0


def test_held_back_messages_must_increase_among_themselves():
    ring = Ring(100, 10**9, reset_confirm=3)
    fill(ring, [100, 101])
    assert ring.append(50, 0.0, message(50)).status is AppendStatus.HELD_BACK
    assert ring.append(50, 0.0, message(50)).status is AppendStatus.DUPLICATE
    assert ring.append(40, 0.0, message(40)).status is AppendStatus.HELD_BACK  # 50 was a stray
    assert ring.counters.out_of_order == 1
    ring.append(41, 0.0, message(41))
    assert ring.append(42, 0.0, message(42)).reset
    assert held_pulse_ids(ring) == [40, 41, 42]


def test_reset_confirm_must_be_positive():
    with pytest.raises(ValueError):
        Ring(10, 10, reset_confirm=0)


def test_jumps_are_counted_against_the_usual_step():
    ring = Ring(100, 10**9)
    skipped = [ring.append(p, 0.0, message(p)).skipped_pulses for p in [10, 11, 12, 15, 16, 17]]
    assert skipped == [0, 0, 0, 2, 0, 0]
    assert (ring.counters.jumps, ring.counters.jumped_pulses) == (1, 2)


def test_slow_source_step_is_learned_and_not_a_jump():
    ring = Ring(100, 10**9)
    fill(ring, range(0, 100, 10))
    assert ring.usual_step == 10 and ring.counters.jumps == 0
    assert ring.append(120, 0.0, message(120)).skipped_pulses == 2  # 100 and 110 missing
    # a source changing its rate is re-learned after the step repeats
    fill(ring, [125, 130, 135, 140])
    assert ring.usual_step == 5
    assert (ring.counters.jumps, ring.counters.jumped_pulses) == (1, 2)


# ---------------------------------------------------------------- reference model

@dataclass
class ModelMessage:
    seq: int
    pulse_id: int
    timestamp: float
    parts: list[bytes]


class ModelRing:
    """The obvious list-based ring: the spec, with no cleverness."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.held: list[ModelMessage] = []
        self.next_seq = 0

    def append(self, pulse_id: int, timestamp: float, parts: list[bytes]) -> tuple[str, int, int]:
        size = sum(map(len, parts))
        if size > self.max_bytes:
            return "oversize", 0, 0
        if self.held and pulse_id == self.held[-1].pulse_id:
            return "duplicate", 0, 0
        reset = 0
        if self.held and pulse_id < self.held[-1].pulse_id:
            kept = [m for m in self.held if m.pulse_id < pulse_id]
            reset = len(self.held) - len(kept)
            self.held = kept
        evicted = 0
        while self.held and (len(self.held) >= self.max_messages
                             or sum(sum(map(len, m.parts)) for m in self.held) + size > self.max_bytes):
            self.held.pop(0)
            evicted += 1
        self.held.append(ModelMessage(self.next_seq, pulse_id, timestamp, parts))
        self.next_seq += 1
        return "stored", evicted, reset

    def seq_where(self, ok) -> int:
        return next((m.seq for m in self.held if ok(m)), self.next_seq)

    def seq_for_time(self, t: float) -> int:
        for i, m in enumerate(self.held):
            if all(not (x.timestamp < t) for x in self.held[i:]):  # NaN: no constraint
                return m.seq
        return self.next_seq


def random_parts(rng: random.Random, pulse_id: int) -> list:
    n_channels = rng.choice([0, 1, 3, 5])
    header = rng.choice([b"header-a", b"header-b" * 50])
    parts: list = [b"main %d" % pulse_id, header]
    for _ in range(n_channels):
        kind = rng.random()
        if kind < 0.1:
            value = bytes([rng.randrange(256)]) * rng.choice([LARGE_PART_BYTES, LARGE_PART_BYTES + 3])
        elif kind < 0.2:
            value = b""
        else:
            value = rng.randbytes(rng.choice([1, 8, 16, 300]))
        parts += [value, rng.randbytes(16)]
    if rng.random() < 0.3:
        parts = [zmq.Frame(p) for p in parts]
    return parts


@pytest.mark.parametrize("seed", range(12))
def test_ring_matches_reference_model(seed):
    rng = random.Random(seed)
    max_messages = rng.choice([1, 2, 5, 17])
    max_bytes = rng.choice([400, 3000, 5 * LARGE_PART_BYTES, 10**9])
    # the model resets on the first backwards message; confirmation has tests of its own
    ring, model = Ring(max_messages, max_bytes, reset_confirm=1), ModelRing(max_messages, max_bytes)
    pulse_id, t = 1000, 100.0
    for _ in range(300):
        roll = rng.random()
        if roll < 0.05:
            pulse_id -= rng.choice([0, 1, 3, 50, 2000])  # duplicate or reset
        elif roll < 0.15:
            pulse_id += rng.choice([2, 7, 40])  # jump
        else:
            pulse_id += 1
        pulse_id = max(pulse_id, 0)
        roll = rng.random()
        t = (math.nan if roll < 0.03 else t - rng.random() * 3 if roll < 0.1 else t + 0.01)
        parts = random_parts(rng, pulse_id)
        result = ring.append(pulse_id, t, parts)
        status, evicted, reset = model.append(pulse_id, t, as_bytes(parts))
        assert (result.status.value, result.evicted, result.reset_evicted) == (status, evicted, reset)

        assert ring.n_messages == len(model.held)
        assert ring.next_seq == model.next_seq
        assert ring.first_seq == (model.held[0].seq if model.held else model.next_seq)
        assert ring.n_bytes == sum(sum(map(len, m.parts)) for m in model.held)
        assert ring.n_bytes <= max_bytes and ring.n_messages <= max_messages
        assert ring.oldest_pulse_id == (model.held[0].pulse_id if model.held else None)
        assert ring.newest_pulse_id == (model.held[-1].pulse_id if model.held else None)
        for m in model.held:
            assert as_bytes(ring.frames(m.seq)) == m.parts
            assert ring.pulse_id(m.seq) == m.pulse_id
            assert ring.nbytes(m.seq) == sum(map(len, m.parts))
        held_seqs = {m.seq for m in model.held}
        for seq in range(max(0, model.next_seq - 40), model.next_seq + 2):
            assert (seq in ring) == (seq in held_seqs)
            assert ring.seek(seq) == next((s for s in sorted(held_seqs) if s >= seq), model.next_seq)
        probes = {pulse_id + d for d in (-60, -3, -1, 0, 1, 5)}
        probes |= {m.pulse_id for m in model.held[:3]}
        for probe in probes:
            assert ring.seq_for_pulse_id(probe) == model.seq_where(lambda m: m.pulse_id >= probe)
        time_probes = {t - 2, t, t + 1, 0.0} | {m.timestamp for m in model.held[-4:]}
        for probe in time_probes:
            if probe == probe:
                assert ring.seq_for_time(probe) == model.seq_for_time(probe), (probe, seed)
    counters = ring.counters
    assert counters.stored == model.next_seq


def test_tune_allocator_is_harmless():
    assert tune_allocator() in (True, False)
    assert tune_allocator() in (True, False)  # idempotent


def test_a_stray_pulse_id_far_ahead_is_dropped_and_counters_stay_meaningful():
    """One pulse id near 2^63 in a stream at 10: was stored, jumped_pulses 6.9e19, then a reset evicting it."""
    ring = Ring(100, 10**9)
    for pulse_id in range(1, 11):
        ring.append(pulse_id, 0.0, [b"m", b"h"])
    result = ring.append(2**63 - 5, 0.0, [b"stray", b"h"])
    assert result.status is AppendStatus.HELD_BACK and ring.newest_pulse_id == 10
    for pulse_id in range(11, 21):
        assert ring.append(pulse_id, 0.0, [b"m", b"h"]).stored
    counters = ring.counters
    assert (counters.strays, counters.jumps, counters.jumped_pulses, counters.resets) == (1, 0, 0, 0)
    assert [ring.pulse_id(seq) for seq in range(ring.first_seq, ring.next_seq)] == list(range(1, 21))


def test_a_real_jump_far_ahead_is_stored_once_the_stream_goes_on_above_it():
    ring = Ring(100, 10**9)
    for pulse_id in range(1, 11):
        ring.append(pulse_id, 0.0, [b"m", b"h"])
    assert ring.append(1_000_000, 0.0, [b"m", b"h"]).status is AppendStatus.HELD_BACK  # a source back after a pause?
    result = ring.append(1_000_001, 0.0, [b"m", b"h"])  # yes: it goes on from there
    assert result.stored and ring.newest_pulse_id == 1_000_001
    assert [ring.pulse_id(seq) for seq in range(ring.first_seq, ring.next_seq)][-3:] == [10, 1_000_000, 1_000_001]
    assert (ring.counters.jumps, ring.counters.jumped_pulses, ring.counters.strays) == (1, 999_989, 0)
    # A jump of a few steps is stored at once, as always.
    assert ring.append(1_000_005, 0.0, [b"m", b"h"]).stored


def test_a_stray_far_ahead_does_not_end_the_confirmation_of_a_reset():
    ring = Ring(100, 10**9, reset_confirm=3)
    for pulse_id in range(100, 110):
        ring.append(pulse_id, 0.0, [b"m", b"h"])
    results = [ring.append(pulse_id, 0.0, [b"m", b"h"]) for pulse_id in (10, 11, 2**63 - 1, 12)]
    assert results[-1].stored and ring.counters.resets == 1  # 10, 11, 12 confirmed the restart
    assert (ring.counters.strays, ring.counters.out_of_order) == (1, 0)
    assert [ring.pulse_id(s) for s in range(ring.first_seq, ring.next_seq) if s in ring][-3:] == [10, 11, 12]


def test_the_result_of_a_confirmed_far_jump_tells_its_skipped_pulses():
    ring = Ring(100, 10**9)
    for pulse_id in range(1, 11):
        ring.append(pulse_id, 0.0, [b"m", b"h"])
    ring.append(1_000_000, 0.0, [b"m", b"h"])
    assert ring.append(1_000_001, 0.0, [b"m", b"h"]).skipped_pulses == 999_989


def test_the_ring_tells_what_happened_and_logs_nothing(caplog):
    """The pure ring returns its events; the shell logs them (rate limited): nothing at message rate from here."""
    ring = Ring(100, 10**9)
    with caplog.at_level(logging.DEBUG, logger="sf_bsread_writer"):
        fill(ring, range(100, 110))
        ring.append(0, 0.0, message(0))
        events = ring.append(110, 0.0, message(110)).events
    assert [event.kind for event in events] == ["out_of_order"]
    assert caplog.records == []
