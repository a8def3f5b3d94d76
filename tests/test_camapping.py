"""bsread -> Channel Access type mapping (pure): every type, shapes, strings; nothing changes on the way."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sf_bsread_writer.ca.camapping import (
    CA_TYPE_BY_BSREAD_TYPE,
    DEFAULT_LONG_STRING_BYTES,
    MAX_STRING_BYTES,
    UnknownTypeError,
    fits_dbr_string,
    map_channel,
    to_ca_value,
)

# bsread type -> (CA type, the extreme values that must survive the trip exactly)
EXTREMES = {
    "bool": ("CHAR", [False, True]),
    "int8": ("SHORT", [-128, 127]),
    "uint8": ("CHAR", [0, 255]),
    "int16": ("SHORT", [-32768, 32767]),
    "uint16": ("LONG", [0, 65535]),
    "int32": ("LONG", [-2**31, 2**31 - 1]),
    "uint32": ("DOUBLE", [0, 2**32 - 1]),
    "int64": ("DOUBLE", [-2**53, 2**53, 20_000_000_000]),
    "uint64": ("DOUBLE", [0, 2**53, 20_000_000_000]),
    "float32": ("FLOAT", [np.float32(1.1), np.float32(-3.4e38), np.float32(1e-45)]),
    "float64": ("DOUBLE", [0.1, -1.7976931348623157e308, 5e-324]),
}

# What a CA client holds for each CA type (DBR value types are big-endian on the wire; values compare by number).
CA_DTYPES = {"CHAR": np.uint8, "SHORT": np.int16, "LONG": np.int32, "FLOAT": np.float32, "DOUBLE": np.float64}


def test_every_bsread_type_is_mapped():
    assert set(CA_TYPE_BY_BSREAD_TYPE) == set(EXTREMES) | {"string"}


@pytest.mark.parametrize("bsread_type", sorted(EXTREMES))
def test_scalar_extremes_survive_exactly(bsread_type):
    ca_type, values = EXTREMES[bsread_type]
    mapping = map_channel(bsread_type, [1])
    assert (mapping.ca_type, mapping.count, mapping.shape, mapping.is_array) == (ca_type, 1, (), False)
    for value in values:
        original = np.array([value], dtype=np.dtype(bsread_type if bsread_type != "bool" else "?"))
        ca_value, truncated = to_ca_value(mapping, original)
        assert not truncated
        assert isinstance(ca_value, (int, float))
        on_wire = np.array([ca_value], dtype=CA_DTYPES[ca_type])
        assert on_wire[0] == original[0], (bsread_type, value, ca_value)


@pytest.mark.parametrize("bsread_type", sorted(EXTREMES))
def test_arrays_are_waveforms_flattened_in_bsread_order(bsread_type):
    ca_type, values = EXTREMES[bsread_type]
    numpy_type = np.dtype(bsread_type if bsread_type != "bool" else "?")
    # header shape [4, 3]: 4 is the fastest dimension -> numpy (3, 4)
    array = np.resize(np.array(values, dtype=numpy_type), (3, 4))
    mapping = map_channel(bsread_type, [4, 3])
    assert (mapping.ca_type, mapping.count, mapping.shape, mapping.is_array) == (ca_type, 12, (3, 4), True)
    ca_value, truncated = to_ca_value(mapping, array)
    assert not truncated
    assert ca_value.dtype == CA_DTYPES[ca_type] and ca_value.shape == (12,)
    assert ca_value.flags.c_contiguous
    np.testing.assert_array_equal(ca_value.astype(numpy_type).reshape(mapping.shape), array)


def test_big_endian_input_is_converted_by_value_not_by_bytes():
    mapping = map_channel("uint16", [3])
    ca_value, _ = to_ca_value(mapping, np.array([1, 256, 65535], dtype=">u2"))
    assert ca_value.tolist() == [1, 256, 65535]


def test_one_element_shapes_and_image():
    assert map_channel("float64", []).shape == ()
    assert map_channel("float64", [1]).is_array is False
    image = map_channel("uint16", [1280, 1024])
    assert image.shape == (1024, 1280) and image.count == 1280 * 1024 and image.ca_type == "LONG"
    assert "LONG[1310720]" in image.describe()


def test_short_string_is_a_dbr_string():
    mapping = map_channel("string", [1])
    assert (mapping.ca_type, mapping.count, mapping.long_string) == ("STRING", 1, False)
    assert to_ca_value(mapping, "x" * MAX_STRING_BYTES) == ("x" * MAX_STRING_BYTES, False)


def test_long_string_is_flagged_for_a_dbr_string_and_fits_a_char_array():
    text = "é" * 30  # 30 characters, 60 UTF-8 bytes
    assert not fits_dbr_string(text)
    cut, truncated = to_ca_value(map_channel("string"), text)
    assert truncated and len(cut.encode()) <= MAX_STRING_BYTES and text.startswith(cut)
    long_mapping = map_channel("string", long_string=True)
    assert (long_mapping.ca_type, long_mapping.long_string, long_mapping.count) == ("CHAR", True,
                                                                                   DEFAULT_LONG_STRING_BYTES)
    data, truncated = to_ca_value(long_mapping, text)
    assert data == text.encode() and not truncated
    data, truncated = to_ca_value(map_channel("string", long_string=True, long_string_bytes=8), text)
    assert truncated and len(data) == 8


def test_unknown_type_is_an_error():
    with pytest.raises(UnknownTypeError):
        map_channel("complex128", [1])


def test_mappings_compare_by_what_the_pv_needs():
    assert map_channel("int64", [1]) == map_channel("int64", [1])
    assert map_channel("int64", [1]) != map_channel("uint64", [1])  # retype: the PV is replaced
    assert map_channel("float64", [3]) != map_channel("float64", [4])


# --------------------------------------------------------------------------
# EPICS records of the softioc gateway (ca.camapping.ioc_record_for, ca.ioc.ChannelPlan)
# --------------------------------------------------------------------------
from sf_bsread_writer.ca import camapping as _cm


@pytest.mark.parametrize("bsread_type, kind, precision, exact", [
    ("float64", "ai", 6, False), ("float32", "ai", 4, False), ("int64", "ai", 0, True), ("uint64", "ai", 0, True),
    ("uint32", "ai", 0, False), ("uint8", "longin", 0, False), ("int8", "longin", 0, False),
    ("uint16", "longin", 0, False), ("bool", "longin", 0, False), ("string", "stringin", 0, False),
])
def test_scalar_records(bsread_type, kind, precision, exact):
    record = _cm.ioc_record_for(bsread_type)
    assert (record.kind, record.precision, record.exact_text) == (kind, precision, exact)


def test_waveform_records_keep_every_value_exact_and_unsigned_bytes_unsigned():
    assert _cm.ioc_record_for("uint8", [4]).ftvl == "UCHAR"
    assert _cm.ioc_record_for("int8", [4]).ftvl == "SHORT"
    assert _cm.ioc_record_for("uint16", [3, 4]).ftvl == "LONG"
    image = _cm.ioc_record_for("uint16", [3, 4])
    assert image.length == 12 and image.shape == (4, 3)
    value, truncated = _cm.ioc_value(image, np.full((4, 3), 65000, dtype=np.uint16))
    assert value.dtype == np.int32 and value.tolist() == [65000] * 12 and not truncated
    empty, _ = _cm.ioc_value(image, np.zeros(0, dtype=np.uint16))  # NORD 0 after an IOC reboot
    assert empty.size == 0


def test_strings_become_long_strings_only_when_asked_and_are_cut_on_character_boundaries():
    short = _cm.ioc_record_for("string")
    value, truncated = _cm.ioc_value(short, "ü" * 30)
    assert truncated and len(value.encode()) <= 39 and value == "ü" * 19
    long = _cm.ioc_record_for("string", long_string=True)
    assert long.kind == "lsi" and _cm.ioc_value(long, "x" * 100) == ("x" * 100, False)
    assert _cm.exact_text(np.array([2**62 + 1], dtype=np.int64)) == str(2**62 + 1)


def test_channel_plan_skips_names_epics_cannot_serve_and_detects_a_changed_channel_set():
    from sf_bsread_writer.bsread.headers import DataHeader
    from sf_bsread_writer.bsread.spec import ChannelSpec
    from sf_bsread_writer.ca.ioc import acf_text
    from sf_bsread_writer.ca.policy import ChannelPlan

    def header(*specs):
        return DataHeader("h" + str(len(specs)), tuple(specs))

    first = ChannelPlan.build(header(ChannelSpec("A"), ChannelSpec("BAD.NAME"), ChannelSpec("X" * 70)), "P:",
                              reserved=["P:STATUS"])
    assert [c.pv for c in first.channels] == ["P:A"] and len(first.skipped) == 2
    same = ChannelPlan.build(header(ChannelSpec("A"), ChannelSpec("BAD.NAME"), ChannelSpec("X" * 70)), "P:")
    assert same.key == first.key
    retyped = ChannelPlan.build(header(ChannelSpec("A", "int16")), "P:")
    assert retyped.key != first.key
    assert "RULE(1, WRITE)" not in acf_text(False, ())
    writable = acf_text(True, ("10.0.0.1",))
    assert "HAG(ALLOWED)" in writable and "10.0.0.1" in writable and "ASG(WRITABLE)" in writable


def test_display_metadata_becomes_record_fields():
    """EGU, PREC, DESC and enum states from the data header (the CA bridge sends an IOC's)."""
    from sf_bsread_writer.bsread.spec import ChannelSpec

    ai = _cm.ioc_record_for("float64", display=ChannelSpec.from_header(
        {"name": "A", "unit": "mm", "precision": 2, "description": "beam x"}).display)
    assert (ai.kind, ai.unit, ai.precision, ai.description) == ("ai", "mm", 2, "beam x")
    states = _cm.ioc_record_for("uint16", display=(("enum_strings", ("Off", "On")),))
    assert (states.kind, states.enum_strings) == ("mbbi", ("Off", "On"))
    too_many = _cm.ioc_record_for("uint16", display=(("enum_strings", tuple(f"s{i}" for i in range(17))),))
    assert too_many.kind == "longin"  # an mbbi holds 16 states
    cut = _cm.ioc_record_for("int32", display=(("unit", "ü" * 10), ("description", "d" * 80)))
    assert cut.unit == "ü" * 7 and cut.description == "d" * 39  # the fields' sizes, at character boundaries
    assert _cm.ioc_record_for("float32", [4], display=(("precision", 1),)).precision == 1  # waveforms too


def test_severity_companions_are_the_alarm_of_their_pv_not_pvs():
    from sf_bsread_writer.bsread.headers import DataHeader
    from sf_bsread_writer.bsread.spec import ChannelSpec
    from sf_bsread_writer.ca.policy import ChannelPlan

    header = DataHeader("h", (ChannelSpec("IOC:X"), ChannelSpec("IOC:X.SEVR", "uint16"),
                              ChannelSpec("ORPHAN.SEVR", "uint16")))
    plan = ChannelPlan.build(header, "P:")
    assert [(c.pv, c.severity_index) for c in plan.channels] == [("P:IOC:X", 1)]
    assert [name for name, _ in plan.skipped] == ["ORPHAN.SEVR"]  # no PV of that name: a bad name, logged


def test_a_record_holds_a_new_type_only_when_every_value_and_its_meaning_survive():
    record = _cm.ioc_record_for
    assert _cm.record_holds(record("float64"), record("int16"))  # DOUBLE holds every int up to 32 bits
    assert _cm.record_holds(record("int64"), record("float64"))  # ... and the exact twin shows a float too
    assert not _cm.record_holds(record("float64"), record("int64"))  # no _STR twin to show it exactly
    assert not _cm.record_holds(record("int32"), record("float64"))
    assert _cm.record_holds(record("int32"), record("uint16")) and not _cm.record_holds(record("int32"), record("string"))
    assert _cm.record_holds(record("float64", [8]), record("int32", [5]))  # wider elements, NORD 5 of 8
    assert not _cm.record_holds(record("float64", [8]), record("float64", [9]))
    assert not _cm.record_holds(record("float32", [8]), record("int32", [8]))  # a FLOAT is not exact for int32
    assert not _cm.record_holds(record("float64", [4, 2]), record("float64", [8]))  # the number of dimensions
    states = record("uint16", display=(("enum_strings", ("Off", "On")),))
    assert not _cm.record_holds(record("float64"), states)  # an ENUM's states would be lost
    assert _cm.record_holds(record("string", long_string=True), record("string"))


def test_widened_records_hold_both_types_and_survive_the_state_file():
    record = _cm.ioc_record_for
    both = _cm.widened(record("int32"), record("float64"))
    assert both.kind == "ai" and _cm.record_holds(both, record("int32"))
    waves = _cm.widened(record("int16", [4]), record("float32", [6]))
    assert waves.ftvl == "FLOAT" and waves.length == 6
    assert _cm.widened(record("int32"), record("string")).kind == "stringin"  # nothing holds both: the new one
    text = _cm.widened(record("string"), record("string", long_string=True))
    assert text.kind == "lsi"
    for value in (both, waves, text, record("uint16", display=(("enum_strings", ("a", "b")), ("unit", "mm")))):
        assert _cm.record_from_json(json.loads(json.dumps(_cm.record_to_json(value)))) == value
    with pytest.raises((TypeError, ValueError)):
        _cm.record_from_json({"bsread_type": "float64", "kind": "bogus"})
    assert _cm.exact_text(np.array([2.5])) == "2.5" and _cm.exact_text(np.array([2**62], dtype=np.int64)) == str(2**62)


def test_a_new_header_is_rebound_to_the_running_records_or_needs_a_restart():
    from sf_bsread_writer.bsread.headers import DataHeader
    from sf_bsread_writer.bsread.spec import ChannelSpec
    from sf_bsread_writer.ca.policy import ChannelPlan

    def plan(*specs, previous=None):
        return ChannelPlan.build(DataHeader("h", tuple(specs)), "P:", previous=previous)

    running = plan(ChannelSpec("A"), ChannelSpec("B"), ChannelSpec("D", "int32"))
    removed_and_retyped = running.rebind(plan(ChannelSpec("D", "int16"), ChannelSpec("A", "int32")))
    assert [(c.pv, c.index, c.record.kind) for c in removed_and_retyped.channels] == [
        ("P:D", 0, "longin"), ("P:A", 1, "ai")]  # new positions, the running records
    assert [c.pv for c in removed_and_retyped.retired] == ["P:B"]
    back = removed_and_retyped.rebind(plan(ChannelSpec("A"), ChannelSpec("B"), ChannelSpec("D", "int32")))
    assert back is not None and not back.retired
    assert running.rebind(plan(ChannelSpec("A"), ChannelSpec("D", "float64"))) is None  # longin cannot hold it
    assert running.rebind(plan(ChannelSpec("A"), ChannelSpec("NEW"))) is None  # no record for it
    # The next IOC: the record that holds both, whichever type its first message has.
    previous = {"D": _cm.widened(_cm.ioc_record_for("int32"), _cm.ioc_record_for("float64"))}
    assert plan(ChannelSpec("D", "int32"), previous=previous).channels[0].record.kind == "ai"


def test_a_refused_channel_is_no_pv_and_costs_no_other():
    """A data-header entry the parser refused (bsread.protocol: ChannelSpec.refused) is skipped with its reason,
    never served as its float64 stand-in; a refused duplicate never takes the good channel's PV."""
    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.ca.ioc import ChannelPlan

    frames = build_message(1, [{"name": "A", "type": "int32"}, {"name": "B", "type": "uint8"},
                               {"name": "C", "type": "uint8"}], [1, 2, 3])
    entries = [{"name": "A", "type": "int32"}, {"name": "B", "type": "complex128"}, {"name": "A", "type": "uint8"}]
    frames[1] = json.dumps({"channels": entries}).encode()
    header = MessageParser().parse(frames).data_header
    plan = ChannelPlan.build(header, "P:")
    assert [(c.pv, c.index) for c in plan.channels] == [("P:A", 0)]
    assert [(name, "refused" in why) for name, why in plan.skipped] == [("B", True), ("A", True)]
