"""The web service's pure decisions: latest values, JSON values, subscriptions and bounded queues
(web.live), range queries and their columns (web.range_query). Fed ``now``; no socket."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.replay.messages import Gap
from sf_bsread_writer.web.live import (
    ClientFeed,
    LatestValues,
    SubscriptionError,
    SubscriptionHub,
    json_safe,
    value_document,
)
from sf_bsread_writer.web.range_query import (
    RangeColumns,
    RangeLimits,
    RangeQueryError,
    RangeTooLarge,
    parse_range_query,
)

CHANNELS = [{"name": "A", "type": "float64"}, {"name": "EVERY10", "type": "int32"},
            {"name": "WAVE", "type": "float32", "shape": [4]}, {"name": "TEXT", "type": "string"}]


def message(pulse_id: int, channels=CHANNELS):
    values = [pulse_id / 2, np.int32(pulse_id) if pulse_id % 10 == 0 else None,
              np.arange(4, dtype=np.float32) + pulse_id, f"p{pulse_id}"][:len(channels)]
    stamps = [(1_700_000_000 + pulse_id, 5)] * len(channels)
    return MessageParser().parse(build_message(pulse_id, channels, values, timestamp=(1_700_000_000, 0),
                                               channel_timestamps=stamps))


def test_latest_values_keep_a_sparse_channel_with_its_own_pulse_id():
    latest = LatestValues()
    for pulse_id in range(10, 14):
        latest.update(message(pulse_id))
    assert latest.get("A").pulse_id == 13 and latest.get("EVERY10").pulse_id == 10
    assert latest.get("EVERY10").decoded().tolist() == [10]
    assert latest.get("A").timestamp == 1_700_000_013 + 5e-9
    latest.update(message(14, CHANNELS[:1]))  # a new header without the others: they are gone
    assert latest.get("WAVE") is None and [spec.name for spec in latest.channels] == ["A"]


def test_values_as_json_say_what_json_cannot_hold():
    assert json_safe(np.array([2.5])) == (2.5, {})
    assert json_safe(np.array([np.nan])) == (None, {})
    assert json_safe(np.array([[1.0, np.inf], [2.0, 3.0]])) == ([[1.0, None], [2.0, 3.0]], {})
    assert json_safe("µJ") == ("µJ", {})
    nanoseconds = 1_700_000_000_123_456_789  # a time in ns: beyond what a browser's JSON number holds
    assert json_safe(np.array([nanoseconds], np.uint64)) == (nanoseconds, {"exact": "1700000000123456789"})
    assert json_safe(np.array([-(2**60)], np.int64))[1] == {"exact": str(-(2**60))}
    assert json_safe(np.array([2**53 - 1], np.int64)) == (2**53 - 1, {})  # still exact in JavaScript
    big = json_safe(np.zeros((300, 300), dtype=np.uint16), max_elements=1000)
    assert big == (None, {"too_large": True, "shape": [300, 300], "dtype": "uint16"})
    latest = LatestValues()
    latest.update(message(20))
    document = value_document("WAVE", latest.get("WAVE"))
    assert document == {"type": "value", "channel": "WAVE", "pulse_id": 20, "timestamp": 1_700_000_020 + 5e-9,
                        "value": [20.0, 21.0, 22.0, 23.0]}
    json.dumps(document, allow_nan=False)


def test_a_subscription_keeps_its_rate_on_a_jittery_feed():
    client = ClientFeed()
    client.subscribe(["A"], 5, now=0.0)
    encoded = {"A": '{"type": "value"}'}
    sent = sum(client.offer(encoded, now=t / 50 + (0.004 if t % 2 else -0.004)) for t in range(500))  # 50 Hz, 10 s
    assert 49 <= sent <= 51  # 5 per second
    exact = ClientFeed()
    exact.subscribe(["A"], 10, now=0.0)  # a feed at exactly the rate asked, with jitter: every value
    assert sum(exact.offer(encoded, now=t / 10 + (0.04 if t % 2 else -0.04)) for t in range(1000)) == 1000
    with pytest.raises(SubscriptionError, match="1 to 256"):
        client.subscribe(["x" * 257], 1, now=0.0)
    with pytest.raises(SubscriptionError, match="max_rate"):
        client.subscribe(["A"], -1, now=0.0)
    with pytest.raises(SubscriptionError, match="non-empty list"):
        client.subscribe("A", 1, now=0.0)


def test_a_slow_client_costs_bounded_memory_and_learns_how_many_values_it_lost():
    client = ClientFeed(max_frames=4, max_bytes=10_000)
    client.subscribe(["A", "WAVE"], None, now=0.0)
    for pulse in range(100):  # nobody takes frames: only the newest 4 stay
        client.offer({"A": f'{{"n": {pulse}}}', "WAVE": '{"w": 0}'}, now=float(pulse))
    assert len(client.frames) == 4 and client.queued_bytes < 10_000
    assert json.loads(client.take()) == {"type": "dropped", "count": 192}  # 96 frames x 2 values
    first = json.loads(client.take())
    assert first["type"] == "batch" and first["messages"][0] == {"n": 96}
    client.offer({"A": "x" * 20_000}, now=200.0)  # a frame over the byte bound on its own: dropped, counted
    assert len(client.frames) == 3 and client.dropped_total == 192 + 1
    for _ in range(10):
        client.queue_message({"type": "pong"})  # a client that pings and never reads: bounded too
    assert len(client.frames) == 4 and client.dropped_total == 193 + 3 * 2 + 6  # 3 batches, 6 pongs


def test_the_hub_encodes_each_value_once_for_every_subscriber_and_only_what_is_wanted():
    hub, latest = SubscriptionHub(), LatestValues()
    for key in ("one", "two"):
        hub.clients[key] = ClientFeed()
        hub.clients[key].subscribe(["A", "EVERY10"], None, now=0.0)
    hub.clients["three"] = ClientFeed()
    hub.clients["three"].subscribe(["TEXT"], None, now=0.0)
    for pulse_id in (10, 11):
        latest.update(message(pulse_id))
        woken = hub.publish(latest, latest.message, now=float(pulse_id))
        assert sorted(woken) == ["one", "three", "two"]
    assert hub.values_encoded == 3 + 2  # A, EVERY10, TEXT; then A, TEXT (EVERY10 absent at 11: nothing new)
    frames = [json.loads(hub.clients["one"].take()) for _ in range(2)]
    assert [[m["channel"] for m in f["messages"]] for f in frames] == [["A", "EVERY10"], ["A"]]
    assert hub.subscription_count == 5 and hub.wanted() == {"A", "EVERY10", "TEXT"}


def test_a_malformed_channel_timestamp_neither_stops_nor_hides_a_live_value():
    frames = build_message(21, CHANNELS[:1], [10.5], timestamp=(1_700_000_000, 0),
                           channel_timestamps=[(1_700_000_021, 5)])
    frames[3] = b"bad"
    latest = LatestValues()
    latest.update(MessageParser().parse(frames))
    document = value_document("A", latest.get("A"))
    assert document["value"] == 10.5 and document["timestamp"] == 1_700_000_000 and "error" not in document


def _reusing_hash(frames: list[bytes], of: list[bytes]) -> list[bytes]:
    """``frames`` with the data-header hash of ``of`` (a sender that changed its header but not the hash)."""
    main = json.loads(frames[0])
    main["hash"] = json.loads(of[0])["hash"]
    return [json.dumps(main).encode(), *frames[1:]]


def test_a_new_header_under_a_reused_hash_is_followed_by_live_values_and_ranges():
    ab = [{"name": "A", "type": "float64"}, {"name": "B", "type": "float64"}]
    first = build_message(1, ab, [1.0, 10.0], timestamp=(1_700_000_000, 0))
    swapped = _reusing_hash(build_message(2, ab[::-1], [20.0, 2.0], timestamp=(1_700_000_000, 0)), first)
    short = _reusing_hash(build_message(3, ab[1:], [30.0], timestamp=(1_700_000_000, 0)), first)
    parser = MessageParser()
    messages = [parser.parse(frames) for frames in (first, swapped, short)]
    latest = LatestValues()
    for m in messages[:2]:
        latest.update(m)
    assert latest.get("A").decoded().tolist() == [2.0] and latest.get("B").decoded().tolist() == [20.0]
    latest.update(messages[2])
    assert latest.get("A") is None and latest.get("B").decoded().tolist() == [30.0]
    query = parse_range_query({"channels": "A,B", "start_pulse_id": "1", "stop_pulse_id": "3"}, RangeLimits())
    columns = RangeColumns(query, RangeLimits())
    for m in messages:
        columns.add(m)
    columns.finish()
    assert columns.columns["A"].json_data() == [1.0, 2.0, None]
    assert columns.columns["B"].json_data() == [10.0, 20.0, 30.0]


def test_range_queries_say_what_to_fix():
    limits = RangeLimits(max_pulses=1000)
    query = parse_range_query({"channels": "A,B,A", "start_pulse_id": "10", "stop_pulse_id": "20"}, limits)
    assert query.channels == ("A", "B") and (query.start_pulse_id, query.stop_pulse_id) == (10, 20)
    assert parse_range_query({"channels": "A", "start_time": "1.5", "stop_time": "2", "format": "npz"},
                             limits).format == "npz"
    for params, fix in (({}, "channels=A,B is required"),
                        ({"channels": "A"}, "either start_pulse_id"),
                        ({"channels": "A", "start_pulse_id": "1", "stop_time": "2"}, "either"),
                        ({"channels": "A", "start_pulse_id": "x", "stop_pulse_id": "2"}, "not an integer"),
                        ({"channels": "A", "start_pulse_id": "5", "stop_pulse_id": "2"}, "before"),
                        ({"channels": "A", "start_time": "nan", "stop_time": "2"}, "seconds since 1970"),
                        ({"channels": "A", "start_pulse_id": "1", "stop_pulse_id": "2", "format": "csv"},
                         "json, npz, hdf5")):
        with pytest.raises(RangeQueryError, match=fix):
            parse_range_query(params, limits)
    with pytest.raises(RangeTooLarge, match="at most 1000"):
        parse_range_query({"channels": "A", "start_pulse_id": "0", "stop_pulse_id": "1000"}, limits)


def test_range_columns_hold_rows_gaps_and_their_limits():
    query = parse_range_query({"channels": "A,EVERY10,WAVE,NONE", "start_pulse_id": "10", "stop_pulse_id": "12"},
                              RangeLimits())
    columns = RangeColumns(query, RangeLimits())
    for pulse_id in (10, 11, 12):
        columns.add(message(pulse_id))
    columns.gap(Gap(8, 9, "before_buffer", 2))
    columns.finish()
    every = columns.arrays("EVERY10")
    assert every["pulse_id"].tolist() == [10, 11, 12] and every["is_data_present"].tolist() == [True, False, False]
    assert every["data"].tolist() == [[10], [0], [0]]  # n x 1, as the writer's scalar datasets
    assert columns.arrays("WAVE")["data"].shape == (3, 4)
    # NONE is in no data header of the range: unknown (misspelt?), named apart, not "no value in range".
    assert columns.missing == [{"first_pulse_id": 8, "last_pulse_id": 9, "reason": "before_buffer", "count": 2}]
    assert columns.unknown == ["NONE"] and columns.known == ["A", "EVERY10", "WAVE"]
    small = RangeColumns(query, RangeLimits(max_bytes=30))
    small.add(message(10))  # 8 + 4 + 16 bytes of values
    with pytest.raises(RangeTooLarge, match="30 bytes"):
        small.add(message(11))
    assert math.isclose(columns.arrays("A")["timestamp"][0], 1_700_000_010 + 5e-9)


def test_range_columns_equal_the_per_value_decoding_of_every_kind_of_channel():
    """The columns keep fixed-size values raw and decode them en bloc: what comes out must equal
    Message.value / channel_seconds / json_safe of each message, for every kind of channel and
    every way a row can differ (absent, NaN, big-endian, compressed, string, corrupt, retyped,
    channel time (0, 0) or missing, packed parts as the replay delivers them)."""
    from sf_bsread_writer.bsread.parts import pack
    from sf_bsread_writer.web.ranges import as_json, as_npz

    rng = np.random.default_rng(7)
    first = [{"name": "F", "type": "float64"}, {"name": "BE", "type": "int32", "encoding": "big"},
             {"name": "W", "type": "float32", "shape": [3]}, {"name": "IMG", "type": "uint16", "shape": [4, 2],
                                                                "compression": "bitshuffle_lz4"},
             {"name": "LZ", "type": "int16", "shape": [5], "compression": "lz4"}, {"name": "S", "type": "string"},
             {"name": "B", "type": "bool"}, {"name": "U8", "type": "uint64"}]
    retyped = [dict(spec, type="int16", shape=[2]) if spec["name"] == "F" else spec for spec in first]
    parser = MessageParser()
    messages = []
    for n in range(12):
        specs = retyped if 6 <= n < 9 else first
        values = [np.array([np.nan, 1.5, -np.inf][n % 3]) if n < 6 or n >= 9 else np.array([n, -n], np.int16),
                  np.int32(-n * 1000), np.arange(3, dtype=np.float32) * n, rng.integers(0, 9, (2, 4), np.uint16),
                  np.arange(5, dtype=np.int16) - n, f"row {n} é", np.bool_(n % 2), np.uint64(2**63 + n)]
        if n % 4 == 1:
            values[n % len(values)] = None  # each channel absent somewhere
        stamps = [(1_700_000_000 + n, 7 * n) if (n + i) % 5 else (0, 0) for i in range(len(specs))]
        frames = build_message(100 + n, specs, values, timestamp=(1_690_000_000 + n, 3), channel_timestamps=stamps)
        if n == 10:
            frames[2 + 2 * 4] = b"\x00\x00\x00\x40" + b"corrupt"  # an lz4 value that does not decompress
            frames[3 + 2 * 1] = b"short"  # a channel timestamp of the wrong size: the message's time
        messages.append(parser.parse(pack(frames)))
    names = [spec["name"] for spec in first] + ["NEVER"]
    for fmt in ("json", "npz"):
        query = parse_range_query({"channels": ",".join(names), "start_pulse_id": "100", "stop_pulse_id": "111",
                                   "format": fmt}, RangeLimits())
        columns = RangeColumns(query, RangeLimits())
        for m in messages:
            columns.add(m)
        columns.finish()
        document = json.loads(json.dumps(as_json(columns)))
        with np.load(__import__("io").BytesIO(as_npz(columns))) as npz:
            arrays = {key: npz[key] for key in npz.files}
        # NEVER is in no data header: unknown, without a column (in json and npz alike).
        assert document["missing"] == [] and document["unknown"] == ["NEVER"] and "NEVER" not in document["channels"]
        assert json.loads(str(arrays["unknown"])) == ["NEVER"] and "NEVER/data" not in arrays
        for name in [name for name in names if name != "NEVER"]:
            got = document["channels"][name]
            want_present, want_data, want_stamps = [], [], []
            for m in messages:
                index = m.data_header.index_of(name) if name in m.data_header else None
                try:
                    value = m.value(index) if index is not None else None
                except Exception:
                    value = None  # corrupt: absent
                want_present.append(value is not None)
                want_data.append(json_safe(value, 10**9)[0] if value is not None else None)
                try:
                    want_stamps.append(m.channel_seconds(index) if value is not None else m.timestamp)
                except Exception:
                    want_stamps.append(m.timestamp)
            assert got["pulse_id"] == list(range(100, 112))
            assert got["is_data_present"] == want_present, name
            assert got["data"] == json.loads(json.dumps(want_data)), name
            assert got["timestamp"] == want_stamps, name
            npz_present = arrays[f"{name}/is_data_present"]
            assert arrays[f"{name}/timestamp"].tolist() == want_stamps
            for row, m in enumerate(messages):
                value = json.loads(json.dumps(want_data[row]))
                if name == "F" and 6 <= row < 9:  # the retyped rows: another shape, absent in npz
                    assert not npz_present[row]
                elif not want_present[row]:
                    assert not npz_present[row] and not np.any(arrays[f"{name}/data"][row])
                elif name == "S":
                    assert npz_present[row] and arrays["S/data"][row] == value
                else:
                    stored = arrays[f"{name}/data"][row]
                    assert npz_present[row] and stored.dtype.isnative, name
                    expected = np.asarray(m.value(m.data_header.index_of(name)))
                    np.testing.assert_array_equal(stored, expected.astype(stored.dtype), err_msg=name)
    assert arrays["U8/data"][0].tolist() == [2**63]  # uint64 above int64 exact in npz
    assert arrays["F/data"].shape == (12, 1) and arrays["W/data"].shape == (12, 3)


def test_a_rate_limited_feed_keeps_sparse_channels():
    """At 10 of 100 messages a second a plain grid locks onto pulses where a modulo-10 channel is absent;
    the feed also takes the messages that carry a channel the last one lacked, within a bound."""
    from sf_bsread_writer.bsread.parts import pack
    from sf_bsread_writer.rates import RateGrid, SparseAwareGrid

    with_sparse = pack(build_message(10, CHANNELS, [1.0, np.int32(1), np.zeros(4, np.float32), "x"]))
    without = pack(build_message(11, CHANNELS, [1.0, None, np.zeros(4, np.float32), "x"]))
    assert with_sparse.layout.presence == 0b1111 and without.layout.presence == 0b1101

    def run(sampler, take):
        taken = [p for p in range(1000) if take(sampler, p * 0.01, (with_sparse if p % 10 == 3 else without))]
        return len(taken), sum(1 for p in taken if p % 10 == 3)

    plain = run(RateGrid(10), lambda s, now, parts: s.take(now))
    aware = run(SparseAwareGrid(10), lambda s, now, parts: s.take(now, parts.layout.presence))
    assert plain[1] == 0 and 99 <= plain[0] <= 101  # the sparse channel never seen
    assert aware[1] == 100 and aware[0] <= 202  # every one of its values, bounded in all
    everything_new = SparseAwareGrid(10, extra_factor=1)
    flips = [everything_new.take(p * 0.01, 1 << (p % 50)) for p in range(1000)]
    assert sum(flips) <= 205  # a stream whose every message is "new" stays bounded


def test_an_image_becomes_a_small_colour_mapped_png():
    import struct
    import zlib

    from sf_bsread_writer.web.image import COLORMAP, autoscale, render_png

    frame = np.arange(1024 * 1280, dtype=np.uint16).reshape(1024, 1280)
    png = render_png(frame, max_side=512)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (426, 341)  # a factor of 3 on both axes: at most 512 a side, aspect kept
    start = png.index(b"IDAT") + 4
    length = struct.unpack(">I", png[start - 8:start - 4])[0]
    rows = np.frombuffer(zlib.decompress(png[start:start + length]), dtype=np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all() and rows[0, 1] == 0 and rows[-1, -1] >= 250  # a ramp: dark first, bright last
    assert len(png) < 100_000 and COLORMAP.shape == (256, 3)
    assert (autoscale(np.full((4, 4), 7.0)) == 0).all()
    with pytest.raises(ValueError, match="2 dimensions"):
        render_png(np.zeros(5))


def test_range_queries_refuse_hostile_values_and_ranges_that_cannot_complete():
    """Pure: the bounds of every range parameter, and ranges too far ahead of the newest pulse or of now."""
    limits = RangeLimits(max_pulses=1000)
    for params, fix in (({"channels": "A", "start_pulse_id": str(2**63), "stop_pulse_id": str(2**63)}, "2\\*\\*63"),
                        ({"channels": "A", "start_pulse_id": "+5", "stop_pulse_id": "6"}, "integer pulse id"),
                        ({"channels": "A", "start_pulse_id": "\u0661", "stop_pulse_id": "\u0662"}, "integer pulse id"),
                        ({"channels": "A", "start_time": "1e999", "stop_time": "1e999"}, "seconds since 1970"),
                        ({"channels": "A", "start_time": " 1", "stop_time": "2"}, "seconds since 1970"),
                        ({"channels": "A", "start_time": "1", "stop_time": "2", "fromat": "npz"}, "unknown parameter"),
                        ({"channels": "A" * 257, "start_time": "1", "stop_time": "2"}, "256")):
        with pytest.raises(RangeQueryError, match=fix):
            parse_range_query(params, limits)
    by_pulse = {"channels": "A", "start_pulse_id": "5000", "stop_pulse_id": "5999"}
    assert parse_range_query(by_pulse, limits, newest_pulse_id=5000).stop_pulse_id == 5999  # 999 ahead: waits
    with pytest.raises(RangeQueryError, match="after the newest pulse id"):
        parse_range_query(by_pulse, limits, newest_pulse_id=4000)
    by_time = {"channels": "A", "start_time": "100", "stop_time": "140"}
    assert parse_range_query(by_time, limits, now=120.0, max_wait=30.0).stop_time == 140.0
    with pytest.raises(RangeQueryError, match="in the future"):
        parse_range_query(by_time, limits, now=100.0, max_wait=30.0)
    assert parse_range_query({"channels": "A", "start_time": "1.7e9", "stop_time": "1700000000.25"},
                             limits).start_time == 1.7e9


def test_a_refused_channel_costs_the_live_values_and_ranges_nothing_else():
    """The web service's paths (latest values, past ranges) with a data header the parser refused parts of:
    a bad type, a duplicate name of a good channel, a 2 GiB claim; the good channels as sent."""
    parser = MessageParser()
    entries = [{"name": "A", "type": "int32"}, {"name": "B", "type": "complex128"},
               {"name": "A", "type": "uint8"}, {"name": "H", "type": "uint8", "shape": [2 ** 31, 2 ** 31]}]
    messages = []
    for pulse_id in (1, 2):
        frames = build_message(pulse_id, [{"name": f"X{i}", "type": "int32"} for i in range(4)],
                               [pulse_id, 7, 8, 9])
        frames[1] = json.dumps({"channels": entries}).encode()
        frames[0] = json.dumps({**json.loads(frames[0]), "hash": "refused"}).encode()
        messages.append(parser.parse(frames))
    latest = LatestValues()
    for message in messages:
        latest.update(message)
    assert latest.get("A").decoded().tolist() == [2] and latest.get("B") is None and latest.get("H") is None
    query = parse_range_query({"channels": "A,B,H", "start_pulse_id": "1", "stop_pulse_id": "2"}, RangeLimits())
    columns = RangeColumns(query, RangeLimits())
    for message in messages:
        columns.add(message)
    columns.finish()
    assert columns.columns["A"].json_data() == [1, 2]
    assert columns.columns["B"].json_data() == [None, None] and columns.columns["H"].json_data() == [None, None]
