"""The packed form of a message (bsread.parts): pure, no sockets."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sf_bsread_writer.bsread.parts import (
    LARGE_PART_BYTES,
    LayoutCache,
    PackedParts,
    encode_lengths,
    pack,
)


def _frames(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 8, 16, 100, LARGE_PART_BYTES - 1, LARGE_PART_BYTES, LARGE_PART_BYTES + 5]),
                min_size=1, max_size=12))
def test_a_packed_message_is_the_sequence_of_its_parts(lengths):
    frames = _frames(lengths)
    parts = pack(frames)
    assert len(parts) == len(frames)
    assert parts.nbytes == sum(lengths)
    assert [bytes(p) for p in parts] == frames
    assert [bytes(parts[i]) for i in range(len(frames))] == frames
    assert [bytes(p) for p in parts.frames()] == frames
    assert [bytes(p) for p in parts[1:3]] == frames[1:3]
    # the small parts (not part 1) are concatenated; large ones (at the threshold too) are kept apart
    small = [f for i, f in enumerate(frames) if i != 1 and len(f) < LARGE_PART_BYTES]
    assert parts.small == b"".join(small)
    assert len(parts.large) == sum(1 for i, n in enumerate(lengths) if i != 1 and n >= LARGE_PART_BYTES)
    assert parts.header == (frames[1] if len(frames) > 1 else None)


def test_large_bytes_parts_are_kept_by_reference_and_mutable_buffers_copied():
    image = bytes(LARGE_PART_BYTES * 2)
    mutable = bytearray(LARGE_PART_BYTES)
    parts = pack([b"main", b"header", image, b"t" * 16, mutable, b"t" * 16])
    assert parts.large[0] is image
    assert type(parts.large[1]) is bytes
    mutable[0] = 1  # the owner changes its buffer: the packed message does not
    assert parts[4][0] == 0


def test_small_parts_are_read_only_views():
    parts = pack([b"main", b"header", b"value"])
    view = parts[2]
    assert isinstance(view, memoryview) and view.readonly and bytes(view) == b"value"


def test_consecutive_messages_share_layout_and_header():
    layouts = LayoutCache()
    first = pack([b"main1", b"the data header", b"v1"], layouts)
    second = pack([b"main2", bytearray(b"the data header"), b"v2"], layouts, previous_header=first.header)
    assert second.layout is first.layout
    assert second.header is first.header  # equal bytes: one object for the stream
    third = pack([b"main3", b"another header!", b"v3"], layouts, previous_header=first.header)
    assert third.header == b"another header!" and third.layout is first.layout  # same lengths


def test_the_layout_cache_keeps_alternating_layouts():
    layouts = LayoutCache(max_entries=4)
    a = layouts.get(encode_lengths([4, 10, 8, 16]))
    b = layouts.get(encode_lengths([4, 10, 0, 0]))
    assert layouts.get(encode_lengths([4, 10, 8, 16])) is a
    assert layouts.get(encode_lengths([4, 10, 0, 0])) is b
    for n in range(10):  # more distinct layouts than it keeps: the oldest go
        layouts.get(encode_lengths([n]))
    assert layouts.get(encode_lengths([4, 10, 8, 16])) is not a


def test_pack_returns_a_packed_message_unchanged_and_refuses_an_empty_one():
    parts = pack([b"x"])
    assert pack(parts) is parts
    with pytest.raises(ValueError):
        pack([])


def test_memoryviews_of_other_formats_count_their_bytes():
    values = np.arange(4, dtype=np.float64)
    parts = pack([b"main", b"header", memoryview(values)])
    assert parts.nbytes == 4 + 6 + 32 and bytes(parts[2]) == values.tobytes()
    assert isinstance(parts, PackedParts)
