"""The CA gateway's decisions (ca/policy.py), pure, on a fake clock: no EPICS, no sockets."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from sf_bsread_writer.bsread.headers import DataHeader
from sf_bsread_writer.bsread.spec import ChannelSpec
from sf_bsread_writer.ca import policy
from sf_bsread_writer.ca.camapping import ioc_record_for
from sf_bsread_writer.ca.policy import (
    ABSENT_PERIODS,
    STALE_AFTER_S,
    STATUS_FRESH_S,
    ChannelPlan,
    ChannelState,
    Settle,
    SparePool,
    StatusValue,
    absence_overdue,
    keep_sparse,
    RETYPED_DESC,
    as_long_string,
    records_for_the_next_ioc,
    resolve_unheld,
    spare_slots,
    sparse_rounds,
    status_values,
    stream_stale,
    update_interval,
)

BUFFER = {"PULSE_ID": 1000, "OLDEST_PULSE_ID": 10, "RATE": 100.0, "N_MESSAGES": 990, "RECEIVED": 5000,
          "REJECTED": 1, "IDLE_S": 0.01, "N_WRITERS": 2, "STATE": "receiving"}
OWN = {"PULSE_ID": 999, "RATE": 9.5, "IDLE_S": 0.2, "CHANNELS": 7}


def plan(*specs: ChannelSpec, previous=None) -> ChannelPlan:
    return ChannelPlan.build(DataHeader("h", tuple(specs)), "P:", previous=previous)


# --------------------------------------------------------------------------
# Status PVs: one rule
# --------------------------------------------------------------------------
def test_status_pvs_show_the_buffers_values_while_its_status_is_fresh():
    shown = status_values(BUFFER, STATUS_FRESH_S - 0.1, True, OWN)
    assert shown["PULSE_ID"] == StatusValue(1000.0) and shown["N_WRITERS"] == StatusValue(2)
    assert shown["STATE"] == StatusValue("receiving") and shown["CHANNELS"] == StatusValue(7)
    assert "MAX_RATE" not in shown  # the gateway's own setting, not a status


@pytest.mark.parametrize("age", [STATUS_FRESH_S + 0.1, None])
def test_a_stale_or_missing_buffer_status_is_invalid_comm_never_the_gateways_own_view(age):
    """The caproto server showed the gateway's own PULSE_ID, RATE and IDLE_S here, the IOC INVALID/COMM:
    operators saw different status PVs depending on --server. One rule now: INVALID/COMM."""
    shown = status_values(BUFFER if age else None, age, True, OWN)
    for suffix in ("PULSE_ID", "RATE", "IDLE_S", "OLDEST_PULSE_ID", "STATE", "N_WRITERS"):
        assert shown[suffix] == StatusValue(None, "COMM"), suffix
    assert shown["CHANNELS"] == StatusValue(7)  # what the gateway serves: always known


def test_without_a_status_url_the_stream_gives_what_it_can_and_the_rest_is_undefined():
    shown = status_values(None, None, False, OWN)
    assert (shown["PULSE_ID"], shown["RATE"], shown["IDLE_S"]) == (StatusValue(999.0), StatusValue(9.5),
                                                                   StatusValue(0.2))
    for suffix in ("OLDEST_PULSE_ID", "N_MESSAGES", "RECEIVED", "REJECTED", "N_WRITERS", "STATE"):
        assert shown[suffix] == StatusValue(None, "UDF"), suffix
    assert status_values(None, None, False, {"CHANNELS": 0})["PULSE_ID"] == StatusValue(None, "UDF")


def test_status_values_are_typed_for_their_records_and_bad_ones_are_undefined():
    odd = dict(BUFFER, STATE="x" * 80, N_WRITERS="two", RATE=float("nan"))
    shown = status_values(odd, 0.0, True, OWN)
    assert shown["STATE"].value == "x" * 39
    assert shown["N_WRITERS"] == StatusValue(None, "UDF") and shown["RATE"] == StatusValue(None, "UDF")


# --------------------------------------------------------------------------
# Channel alarms on a fake clock
# --------------------------------------------------------------------------
def test_an_absent_channel_is_overdue_after_three_of_its_own_intervals_and_flagged_once():
    state = ChannelState()
    assert not absence_overdue(state, 100.0)  # never seen: UDF already, nothing to flag
    state.present(1.0, 5.0, arrived=10.0)
    assert not absence_overdue(state, 10.0 + STALE_AFTER_S - 0.01)  # one value: as long as a stopped stream
    assert absence_overdue(state, 10.0 + STALE_AFTER_S + 0.01)
    state.present(2.0, 6.0, arrived=11.0)  # every second: overdue after 3 s
    state.present(3.0, 7.0, arrived=12.0)
    assert state.interval == pytest.approx(1.0) and not state.flagged
    assert not absence_overdue(state, 12.0 + ABSENT_PERIODS * 1.0 - 0.01)
    assert absence_overdue(state, 12.0 + ABSENT_PERIODS * 1.0 + 0.01)
    assert not absence_overdue(state, 100.0)  # flagged once
    state.present(4.0, 8.0, arrived=12.0005)  # a kept older message applied late says nothing of the period
    assert state.interval == pytest.approx(1.0)


def test_the_stream_is_stale_after_three_seconds_without_a_message():
    assert not stream_stale(None, 1000.0)  # nothing received yet: UDF, not COMM
    assert not stream_stale(10.0, 10.0 + STALE_AFTER_S)
    assert stream_stale(10.0, 10.0 + STALE_AFTER_S + 0.01)


def test_update_interval_is_the_per_pv_limit_or_the_total_budget():
    assert update_interval(10.0, 20000.0, 500) == pytest.approx(0.1)
    assert update_interval(10.0, 20000.0, 4000) == pytest.approx(0.2)
    assert update_interval(0.0, 0.0, 100) == 0.0


# --------------------------------------------------------------------------
# Channel set changes: spare records, retirement, restarts
# --------------------------------------------------------------------------
def test_new_channels_take_spare_records_and_nobody_is_disconnected():
    running = plan(ChannelSpec("A"), ChannelSpec("B"))
    spares = SparePool({"ai": 1, "longin": 1, "stringin": 1, "waveform:LONG": 1, "shape": 1})
    change = running.adopt(plan(ChannelSpec("A"), ChannelSpec("N", "int16"), ChannelSpec("X", "int64"),
                                ChannelSpec("W", "int32", [3]), ChannelSpec("M", "uint8")), spares)
    assert [c.pv for c in change.added] == ["P:N", "P:X", "P:W"]
    assert [c.pv for c in change.plan.channels] == ["P:A", "P:N", "P:X", "P:W"]
    assert [c.pv for c in change.plan.retired] == ["P:B"]
    assert [c.pv for c in change.unheld] == ["P:M"]  # the one longin spare went to N
    wave = change.added[2].record
    assert (wave.kind, wave.ftvl, wave.length, wave.shape) == ("waveform", "LONG", policy.SPARE_ARRAY_LENGTH, (3,))
    assert spares.free == {"ai": 0, "longin": 0, "stringin": 0, "waveform:LONG": 0, "shape": 0}  # X took a twin


def test_what_no_spare_holds_waits_for_the_next_ioc():
    assert spare_slots(ioc_record_for("float64", [policy.SPARE_ARRAY_LENGTH + 1])) is None
    assert spare_slots(ioc_record_for("int64")) == ("ai", "stringin")
    assert spare_slots(ioc_record_for("float32", [2, 3])) == ("waveform:FLOAT", "shape")
    running = plan(ChannelSpec("A"), ChannelSpec("D", "int32"))
    change = running.adopt(plan(ChannelSpec("A"), ChannelSpec("D", "string"),
                                ChannelSpec("IMG", "uint16", [1280, 1024])), SparePool.default())
    assert [c.pv for c in change.unheld] == ["P:D", "P:IMG"] and not change.added
    assert [c.pv for c in change.plan.retired] == ["P:D"]  # its record shows INVALID/DISABLE until then
    nxt = records_for_the_next_ioc(change.plan, change.unheld)
    assert nxt["D"].kind == "stringin" and nxt["IMG"].length == 1280 * 1024 and nxt["A"].kind == "ai"


def test_the_next_ioc_plans_from_the_union_of_channels_seen_and_widens_flipping_ones():
    running = plan(ChannelSpec("A"), ChannelSpec("B"), ChannelSpec("D", "int32"))
    change = running.adopt(plan(ChannelSpec("A"), ChannelSpec("D", "float64")), SparePool.empty())
    nxt = records_for_the_next_ioc(change.plan, change.unheld)
    assert set(nxt) == {"A", "B", "D"}  # B, no longer sent, is kept: it may come back
    assert nxt["D"].kind == "ai"  # holds int32 and float64: flipping back costs nothing
    again = plan(ChannelSpec("A"), ChannelSpec("D", "int32"), previous=nxt)
    assert again.adopt(plan(ChannelSpec("A"), ChannelSpec("D", "float64")), SparePool.empty()).unheld == ()


def test_a_retype_no_record_holds_moves_the_pv_name_to_a_spare_of_the_new_type():
    """Issue 22: number -> string, int32 in a longin -> float, scalar -> array, a longer waveform, an enum
    with new states: each PV name moves to a spare record of its new type in the running IOC (no
    replacement); the old record is kept for its connected clients, and the moved channels are served."""
    running = plan(ChannelSpec("A"), ChannelSpec("S"), ChannelSpec("L", "int32"), ChannelSpec("V"),
                   ChannelSpec("W", "int32", [3]), ChannelSpec("E", "uint8", display=(("enum_strings", ("a", "b")),)))
    retyped = plan(ChannelSpec("A"), ChannelSpec("S", "string"), ChannelSpec("L", "float64"),
                   ChannelSpec("V", "float64", [5]), ChannelSpec("W", "int32", [10]),
                   ChannelSpec("E", "uint8", display=(("enum_strings", ("a", "b", "c")),)))
    spares = SparePool.default()
    change = running.adopt(retyped, spares)
    assert [c.pv for c in change.unheld] == ["P:S", "P:L", "P:V", "P:W", "P:E"]
    resolution = resolve_unheld(change.plan, change.unheld, spares)
    assert not resolution.replace
    assert [(m.old.record.kind, m.new.record.kind) for m in resolution.moves] == [
        ("ai", "stringin"), ("longin", "ai"), ("ai", "waveform"), ("waveform", "waveform"), ("mbbi", "mbbi")]
    assert resolution.moves[3].new.record.length == policy.SPARE_ARRAY_LENGTH
    assert resolution.moves[4].new.record.enum_strings == ("a", "b", "c")
    served = resolution.plan
    assert [c.pv for c in served.channels] == ["P:A", "P:S", "P:L", "P:V", "P:W", "P:E"] and served.retired == ()
    assert spares.free["stringin"] == policy.SPARE_COUNTS["stringin"] - 1
    assert spares.free["shape"] == policy.SPARE_COUNTS["shape"] - 2  # V and W: a ":SHAPE" each
    # The next header as it is now: served by the records the names moved to, nothing unheld.
    assert served.adopt(retyped, spares).unheld == ()
    assert len(RETYPED_DESC.encode()) <= 39


def test_a_channel_moves_once_per_ioc_and_what_no_spare_holds_replaces_the_ioc():
    """The bound: a channel flipping between two types no record holds does not move its name at every
    flip: its second unheld retype replaces the IOC (whose record holds both where one can); a move
    is all or nothing, takes nothing from the pool when the IOC is replaced anyway."""
    running = plan(ChannelSpec("A"), ChannelSpec("D", "int32"))
    spares = SparePool.default()
    first = running.adopt(plan(ChannelSpec("A"), ChannelSpec("D", "float64")), spares)
    moved = resolve_unheld(first.plan, first.unheld, spares)
    assert [m.new.name for m in moved.moves] == ["D"] and not moved.replace
    back = moved.plan.adopt(plan(ChannelSpec("A"), ChannelSpec("D", "int32")), spares)  # an ai holds int32
    assert back.unheld == ()
    flip = back.plan.adopt(plan(ChannelSpec("A"), ChannelSpec("D", "string")), spares)
    again = resolve_unheld(flip.plan, flip.unheld, spares, moved=["D"])
    assert again.replace and again.moves == ()
    assert records_for_the_next_ioc(flip.plan, flip.unheld)["D"].kind == "stringin"
    # What no spare holds (longer than a spare waveform), or a used-up pool: replaced, pool untouched.
    before = dict(spares.free)
    wide = back.plan.adopt(plan(ChannelSpec("A", "float64", [policy.SPARE_ARRAY_LENGTH + 1]),
                                ChannelSpec("D", "int32")), spares)
    assert resolve_unheld(wide.plan, wide.unheld, spares).replace and spares.free == before
    empty = SparePool({"ai": 0})
    assert resolve_unheld(first.plan, first.unheld, empty).replace
    # A new channel that found no spare has no name to move: replaced.
    none_left = running.adopt(plan(ChannelSpec("A"), ChannelSpec("D", "int32"), ChannelSpec("N")), SparePool.empty())
    assert resolve_unheld(none_left.plan, none_left.unheld, SparePool.default()).replace
    assert resolve_unheld(running, (), spares) == policy.Resolution(running)


def test_a_string_value_over_39_bytes_moves_its_name_to_a_long_string_spare():
    running = plan(ChannelSpec("A"), ChannelSpec("T", "string"))
    text = running.channels[1]
    spares = SparePool.default()
    resolution = resolve_unheld(running, [as_long_string(text)], spares)
    assert not resolution.replace and resolution.moves[0].new.record.kind == "lsi"
    assert spares.free["lsi"] == policy.SPARE_COUNTS["lsi"] - 1
    assert [c.record.kind for c in resolution.plan.channels] == ["ai", "lsi"]


def test_a_restart_waits_until_the_header_has_been_still():
    settle = Settle(quiet_s=1.0, most_s=5.0)
    assert not settle.due(0.0)
    for now in (0.0, 0.5, 0.9):  # a source reconfigured channel by channel
        settle.wanted(now)
    assert not settle.due(1.8) and settle.due(1.95)
    settle.cancel()  # back to what the records hold
    assert not settle.due(10.0)
    for now in range(6):  # changing every second, for ever: at most most_s
        settle.wanted(float(now) * 0.9)
    assert settle.due(5.0)


# --------------------------------------------------------------------------
# Sparse channels
# --------------------------------------------------------------------------
def test_each_sparse_channel_is_applied_once_from_its_newest_kept_message():
    # channels A=1, B=2, C=4. Newest has C; kept (oldest first): A+B, A, C.
    assert sparse_rounds(0b100, [0b011, 0b001, 0b100]) == [0b010, 0b001, 0b000]


def test_kept_messages_are_useful_and_bounded():
    kept = [SimpleNamespace(presence=0b001, nbytes=10), SimpleNamespace(presence=0b010, nbytes=10)]
    candidate = SimpleNamespace(presence=0b001, nbytes=10)
    after = keep_sparse(kept, candidate, newest_presence=0b100, max_count=8, max_bytes=1000)
    assert after == [kept[1], candidate]  # the older A-only message is useless beside the candidate
    many = [SimpleNamespace(presence=1 << i, nbytes=10) for i in range(10)]
    bounded = keep_sparse(many, SimpleNamespace(presence=1 << 20, nbytes=10), 0, max_count=4, max_bytes=1000)
    assert len(bounded) == 4 and bounded[-1].presence == 1 << 20
    assert len(keep_sparse(many, SimpleNamespace(presence=1 << 20, nbytes=500), 0, 8, max_bytes=515)) == 2


def test_the_policy_is_pure():
    """No EPICS, socket, thread, subprocess or clock in ca/policy.py: the shell feeds it ``now``."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(policy))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "collections.abc", "dataclasses", "typing",
                        "sf_bsread_writer.ca.camapping"}, imported


def test_a_new_ioc_keeps_records_for_channels_no_longer_sent_but_not_without_bound():
    previous = {"A": ioc_record_for("float64"), "GONE": ioc_record_for("int32"), "BAD NAME": ioc_record_for("int32")}
    new = plan(ChannelSpec("A"), ChannelSpec("NEW")).with_retired(previous, "P:", reserved=["P:STATUS"])
    assert [c.pv for c in new.channels] == ["P:A", "P:NEW"]
    assert [(c.pv, c.record.kind, c.index) for c in new.retired] == [("P:GONE", "longin", -1)]
    back = new.adopt(plan(ChannelSpec("A"), ChannelSpec("GONE", "int16")), SparePool.empty())
    assert back.unheld == () and [c.pv for c in back.plan.channels] == ["P:A", "P:GONE"]
    renamed = {f"OLD{i:04d}": ioc_record_for("float64") for i in range(5000)}  # a source renaming its channels
    assert len(plan(ChannelSpec("A")).with_retired(renamed, "P:").retired) == policy.MIN_RETIRED_KEPT
