"""What the CA gateway decides, in one place (pure: no EPICS, no sockets, no threads, no clock reads).

The gateway has one server (``ca/ioc.py``: pythonSoftIOC records, EPICS
base's rsrv fans out). Everything it decides is here, fed ``now`` by the
shell, and tested on a fake clock (tests/test_gateway_policy.py):

* **the channel plan**: which record serves which bsread channel
  (:class:`ChannelPlan`), how a new data header is served by the running
  records (:meth:`ChannelPlan.adopt`: retired, rebound, or given a spare
  record), and what the next IOC must hold when it cannot
  (:func:`records_for_the_next_ioc`, widened so that a flipping channel
  restarts the IOC once);
* **spare records** (:class:`SparePool`): records exist before ``iocInit``,
  so each IOC starts with a pool of unnamed records; a new channel is served
  by one of them under its own name (an EPICS alias) and no client of any
  other PV notices;
* **a retype no running record holds** (:func:`resolve_unheld`): once the
  data header has been still for a moment (:class:`Settle`), the channel's
  PV name moves to a spare record of the new type inside the running IOC
  (:class:`NameMove`), at most once per channel and IOC; clients of every
  other PV notice nothing;
* **when to restart**: only for what neither a running nor a spare record can
  hold (a second unheld retype of a channel that moved already, a waveform
  longer than a spare, a used-up pool), and only once the header has been
  still, so that a source reconfigured channel by channel costs one restart,
  not one per step;
* **alarms and staleness** of channel PVs (:class:`ChannelState`,
  :func:`absence_overdue`, :func:`stream_stale`);
* **the status PVs' values** and what they show when the buffer's status is
  unavailable (:func:`status_values`: one rule, INVALID/COMM, never a value
  from somewhere else);
* **the update interval** (:func:`update_interval`) and **which older messages
  are kept** for their sparse channels (:func:`keep_sparse`,
  :func:`sparse_rounds`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sf_bsread_writer.ca.camapping import (
    DEFAULT_LONG_STRING_BYTES,
    SEVERITY_SUFFIX,
    IocRecord,
    UnknownTypeError,
    ioc_record_for,
    record_holds,
    widened,
)

__all__ = [
    "STATUS_PVS", "GATEWAY_STATS_PVS", "STALE_AFTER_S", "STATUS_FRESH_S", "ABSENT_PERIODS", "MAX_RECORD_NAME",
    "ServedChannel", "ChannelPlan", "PlanChange", "SparePool", "spare_slots", "spare_record",
    "records_for_the_next_ioc", "NameMove", "Resolution", "resolve_unheld", "as_long_string", "RETYPED_DESC",
    "Settle", "ChannelState", "absence_overdue", "stream_stale", "StatusValue",
    "status_values", "update_interval", "keep_sparse", "sparse_rounds", "unservable_name",
]

# (suffix, CA type, meaning). Counters are DOUBLE: they outgrow a 32-bit LONG.
STATUS_PVS: tuple[tuple[str, str, str], ...] = (
    ("PULSE_ID", "DOUBLE", "newest pulse id in the buffer"),
    ("OLDEST_PULSE_ID", "DOUBLE", "oldest pulse id in the buffer"),
    ("RATE", "DOUBLE", "messages per second the buffer receives"),
    ("N_MESSAGES", "DOUBLE", "messages held in the ring"),
    ("RECEIVED", "DOUBLE", "valid messages received since start"),
    ("REJECTED", "DOUBLE", "malformed messages dropped since start"),
    ("IDLE_S", "DOUBLE", "seconds since the last message from the source"),
    ("N_WRITERS", "LONG", "active replay sessions (writers)"),
    ("CHANNELS", "LONG", "channels in the stream's data header"),
    ("STATE", "STRING", "what the buffer is doing (receiving, source_idle, ...)"),
    ("MAX_RATE", "DOUBLE", "most updates per second of one PV (writable with --writable)"),
)
#: The gateway's own statistics PVs (beside the buffer's status PVs), like EPICS ca-gateway's.
GATEWAY_STATS_PVS: tuple[tuple[str, str, str], ...] = (
    ("CA_CLIENTS", "LONG", "CA clients connected to the gateway"),
    ("CA_CHANNELS", "LONG", "CA channels the clients hold"),
    ("PV_UPDATES_S", "DOUBLE", "record updates per second"),
    ("APPLIED_S", "DOUBLE", "stream messages applied per second"),
    ("SKIPPED", "DOUBLE", "messages received but never applied"),
    ("FEED_REPLACED", "DOUBLE", "feed sockets replaced (a message cut)"),
    ("FEED_OVERSIZE", "DOUBLE", "feed messages over the size limit"),
    ("FEED_RECONNECTS", "DOUBLE", "feed connections made anew"),
    ("FEED_REJECTED", "DOUBLE", "feed messages that do not parse"),
    ("FEED_STATUS_REJECTED", "DOUBLE", "feed status messages unreadable"),
)
#: The status PVs the gateway fills from the stream when it has no buffer status URL.
OWN_STATUS = ("PULSE_ID", "RATE", "IDLE_S")

#: Seconds without a message after which every channel PV is flagged INVALID/COMM.
STALE_AFTER_S = 3.0
#: The buffer's status is used while the last good answer is younger than this (polled at 1 Hz).
STATUS_FRESH_S = 5.0
#: A channel absent from messages is flagged INVALID/TIMEOUT once its last value is this many of its
#: usual intervals old (a channel sent every Nth pulse is absent N-1 times in N: that is not an alarm).
ABSENT_PERIODS = 3.0
MIN_MEASURED_INTERVAL = 0.001  # seconds: shorter gaps between a channel's arrivals say nothing of its period
#: A new IOC keeps a record for at least this many channels the stream no longer sends (``with_retired``).
MIN_RETIRED_KEPT = 100
#: Longest record name EPICS base accepts (PVNAME_STRINGSZ - 1), and characters a record name may not hold.
MAX_RECORD_NAME = 60
_BAD_NAME_CHARACTERS = set(" .\"'$\\{}()\t\n")
_SEVERITY_TYPES = frozenset({"uint8", "uint16", "int16", "int32", "uint32"})


# --------------------------------------------------------------------------
# The channel plan
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedChannel:
    name: str  # bsread channel name
    pv: str
    record: IocRecord
    index: int  # position in the data header
    severity_index: int | None = None  # position of its ``<name>.SEVR`` companion (a bridged IOC PV's alarm)


@dataclass(frozen=True)
class PlanChange:
    """How the running IOC serves a new data header (:meth:`ChannelPlan.adopt`).

    ``plan``: what it serves from now on. ``added``: new channels, each served by a spare record
    (``record`` is the spare's, which holds the channel's type). ``unheld``: channels (as the new
    header wants them) that no running record (nor, for a new channel, a spare) holds; their old record,
    if any, is retired until :func:`resolve_unheld` moves their names to spare records or a new IOC
    serves them.
    """

    plan: "ChannelPlan"
    added: tuple[ServedChannel, ...] = ()
    unheld: tuple[ServedChannel, ...] = ()


@dataclass(frozen=True)
class ChannelPlan:
    """The records of one data header. ``key`` equal: the same records serve both headers.

    ``retired``: channels the running IOC has records for that the stream no longer sends (or sends
    with a type their record cannot hold): served INVALID/DISABLE with their last value, and served
    again if they come back.
    """

    channels: tuple[ServedChannel, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (channel, why not served)
    retired: tuple[ServedChannel, ...] = ()

    @property
    def key(self) -> tuple:
        return tuple((c.pv, c.record) for c in self.channels)

    def rebind(self, new: "ChannelPlan") -> "ChannelPlan | None":
        """``new`` served by this plan's records alone, or None when some channel needs another record."""
        change = self.adopt(new, SparePool.empty())
        return None if change.unheld else change.plan

    def adopt(self, new: "ChannelPlan", spares: "SparePool") -> PlanChange:
        """Serve ``new`` with this plan's records, and spare records from ``spares`` (taken from it).

        A channel that disappeared is retired; one whose type changed keeps its record when that holds
        the new type (``camapping.record_holds``), with the new header's positions, shape, units, DESC
        and precision; a new channel gets a spare record that holds it. The rest is ``unheld``.
        """
        running = {c.pv: c for c in (*self.channels, *self.retired)}
        channels: list[ServedChannel] = []
        added: list[ServedChannel] = []
        unheld: list[ServedChannel] = []
        for channel in new.channels:
            current = running.get(channel.pv)
            if current is None:
                record = spares.take(channel.record)
                if record is None:
                    unheld.append(channel)
                    continue
                served = replace(channel, record=record)
                added.append(served)
                channels.append(served)
                continue
            if not record_holds(current.record, channel.record):
                unheld.append(channel)
                continue
            running.pop(channel.pv)
            record = replace(current.record, shape=channel.record.shape, unit=channel.record.unit,
                             description=channel.record.description, precision=channel.record.precision)
            channels.append(replace(channel, record=record))
        return PlanChange(ChannelPlan(tuple(channels), new.skipped, tuple(running.values())), tuple(added),
                          tuple(unheld))

    def with_retired(self, previous: Mapping[str, IocRecord], prefix: str, reserved: Iterable[str] = (),
                     most: int | None = None) -> "ChannelPlan":
        """This plan, and a record for each channel the last IOC served that this header lacks (retired:
        INVALID/DISABLE until it comes back, then served without a replacement): a new IOC plans from the
        union of the channels seen. At most ``most`` of them (default: as many as the header has, at
        least MIN_RETIRED_KEPT), so that a source that renames its channels cannot grow the records
        without bound from one IOC to the next."""
        limit = most if most is not None else max(MIN_RETIRED_KEPT, len(self.channels))
        taken = set(reserved) | {c.pv for c in self.channels} | {c.pv + "_STR" for c in self.channels}
        taken |= {name for name, _ in self.skipped}
        retired: list[ServedChannel] = []
        for name, record in sorted(previous.items()):
            pv = prefix + name
            if len(retired) >= limit:
                break
            if pv in taken or pv + "_STR" in taken or name in taken or unservable_name(pv) is not None:
                continue
            taken.update((pv, pv + "_STR"))
            retired.append(ServedChannel(name, pv, record, -1))
        return ChannelPlan(self.channels, self.skipped, tuple(retired))

    @classmethod
    def build(cls, header: Any | None, prefix: str, reserved: Iterable[str] = (),
              long_strings: frozenset[str] = frozenset(),
              previous: Mapping[str, IocRecord] | None = None) -> "ChannelPlan":
        """The records for ``header``; ``previous``: the records the last IOC served (by channel name),
        widened to hold both their and the new type (``camapping.widened``)."""
        if header is None:
            return cls(())
        served: list[ServedChannel] = []
        skipped: list[tuple[str, str]] = []
        taken = set(reserved)
        # The CA bridge's severity companions: served as the alarm severity of their PV, not as PVs.
        severity_of = {spec.name[:-len(SEVERITY_SUFFIX)]: index for index, spec in enumerate(header.channels)
                       if spec.name.endswith(SEVERITY_SUFFIX) and spec.type in _SEVERITY_TYPES}
        companions = {header.channels[index].name for name, index in severity_of.items() if name in header.names}
        for index, spec in enumerate(header.channels):
            if spec.refused is not None:  # its header entry was wrong: no values, no PV (nor its stand-in type)
                skipped.append((spec.name, f"refused by the parser: {spec.refused_detail}"))
                continue
            if spec.name in companions:
                continue
            pv = prefix + spec.name
            why = unservable_name(pv)
            if why is None and (pv in taken or pv + "_STR" in taken):
                why = "its PV name is already served"
            if why is None:
                try:
                    record = ioc_record_for(spec.type, spec.shape, long_string=spec.name in long_strings,
                                            display=spec.display)
                    if previous and spec.name in previous:
                        record = widened(previous[spec.name], record)
                except UnknownTypeError as error:
                    why = str(error)
            if why is not None:
                skipped.append((spec.name, why))
                continue
            taken.update((pv, pv + "_STR"))
            served.append(ServedChannel(spec.name, pv, record, index, severity_of.get(spec.name)))
        return cls(tuple(served), tuple(skipped))


def unservable_name(pv: str) -> str | None:
    """Why EPICS cannot serve a record named ``pv`` (None: it can)."""
    if len(pv) > MAX_RECORD_NAME:
        return f"PV name longer than {MAX_RECORD_NAME} characters"
    bad = sorted(set(pv) & _BAD_NAME_CHARACTERS)
    if bad:
        return f"PV name holds characters EPICS record names cannot ({''.join(bad)!r})"
    if not pv.isprintable() or not pv.isascii():
        return "PV name is not printable ASCII"
    return None


def records_for_the_next_ioc(plan: ChannelPlan, unheld: Sequence[ServedChannel]) -> dict[str, IocRecord]:
    """By channel name: the records the running IOC serves (retired ones too: planning from the union of
    the channels seen), widened by those it could not serve, so that the next IOC holds both whichever
    header its first message has (no restart loop when a channel flips between two types)."""
    records = {c.name: c.record for c in (*plan.retired, *plan.channels)}
    for channel in unheld:
        before = records.get(channel.name)
        records[channel.name] = widened(before, channel.record) if before is not None else channel.record
    return records


# --------------------------------------------------------------------------
# A retype no running record holds: the PV name moves to a spare record
# --------------------------------------------------------------------------
#: The DESC (39 bytes at most) of a record whose PV name moved to a record of the channel's new type: what
#: a client still connected to it reads (it sees the new type once it reconnects).
RETYPED_DESC = "retyped: reconnect"


@dataclass(frozen=True)
class NameMove:
    """A channel's PV names move from the record that served it (``old``, as the running IOC served it) to
    a spare record that holds its new type (``new``: the spare's record, the new header's position).

    ``old``'s record keeps the clients connected to it (a CA channel points at its record, not at the
    name): INVALID/DISABLE with its last value and DESC ``RETYPED_DESC``; a client that connects (or
    reconnects) finds ``new``.
    """

    old: ServedChannel
    new: ServedChannel


@dataclass(frozen=True)
class Resolution:
    """What the running IOC does with the channels it could not serve, once the header has been still
    (:func:`resolve_unheld`): move their names (``moves``, ``plan`` is served from then on), or, when
    ``replace``, nothing here: a new IOC serves them all."""

    plan: "ChannelPlan"
    moves: tuple[NameMove, ...] = ()
    replace: bool = False


def as_long_string(channel: ServedChannel) -> ServedChannel:
    """A STRING channel that sent a value over 39 bytes, as it wants to be served: a long string."""
    return replace(channel, record=replace(channel.record, kind="lsi", length=DEFAULT_LONG_STRING_BYTES))


def resolve_unheld(plan: "ChannelPlan", waiting: Sequence[ServedChannel], spares: "SparePool",
                   moved: Iterable[str] = ()) -> Resolution:
    """The channels of ``waiting`` (as the new header wants them: the unheld ones of
    :meth:`ChannelPlan.adopt`, and :func:`as_long_string` ones) served by moving each one's PV name to a
    spare record of its new type, when every one of them can be: it has a running record (served or
    retired), it has not moved yet in this IOC (``moved``: channel names), and the pool has a spare
    for it. Else ``replace``: a new IOC, which serves them all, and nothing is taken from ``spares``.

    All or nothing, because a replacement serves every channel anyway (a move before it would only
    cost a spare). At most one move per channel and IOC: a channel flipping between two types no record
    holds does not move its name at every flip; its second unheld retype replaces the IOC, whose record
    holds both where one can (``records_for_the_next_ioc``). The moves are bounded by the pool, so are
    the names an IOC ever had.
    """
    if not waiting:
        return Resolution(plan)
    already = set(moved)
    running = {c.pv: c for c in (*plan.channels, *plan.retired)}
    trial = spares.copy()
    moves: list[NameMove] = []
    for channel in waiting:
        if any(move.new.pv == channel.pv for move in moves):
            continue  # listed twice (unheld, and a long string): the first, the newer header's, wins
        old = running.get(channel.pv)
        if old is None or channel.name in already:
            return Resolution(plan, replace=True)
        record = trial.take(channel.record)
        if record is None:
            return Resolution(plan, replace=True)
        moves.append(NameMove(old, replace(channel, record=record)))
    spares.free = trial.free
    new_by_pv = {move.new.pv: move.new for move in moves}
    channels = [new_by_pv.pop(c.pv, c) for c in plan.channels]
    channels = sorted((*channels, *new_by_pv.values()), key=lambda c: c.index)
    moved_pvs = {move.new.pv for move in moves}
    retired = tuple(c for c in plan.retired if c.pv not in moved_pvs)
    return Resolution(ChannelPlan(tuple(channels), plan.skipped, retired), tuple(moves))


# --------------------------------------------------------------------------
# Spare records: a new channel without a restart
# --------------------------------------------------------------------------
#: Elements of a spare waveform (and bytes of a spare long string): a new array channel up to this long
#: is served without a restart; a longer one waits for the next IOC.
SPARE_ARRAY_LENGTH = 4096
#: Spare records of each kind an IOC starts with (``SparePool.default``); a record is a few hundred
#: bytes, a spare waveform SPARE_ARRAY_LENGTH elements.
SPARE_COUNTS: dict[str, int] = {
    "ai": 32, "longin": 32, "stringin": 32, "lsi": 2, "mbbi": 8, "shape": 16,
    "waveform:UCHAR": 4, "waveform:SHORT": 4, "waveform:LONG": 4, "waveform:FLOAT": 4, "waveform:DOUBLE": 8,
}
_SHAPE_DIMENSIONS = 8  # a spare ":SHAPE" record holds this many dimensions


def spare_slots(record: IocRecord) -> tuple[str, ...] | None:
    """The spare records a channel that needs ``record`` takes: its own, a ``_STR`` twin (a stringin)
    for 64-bit integers, a ``:SHAPE`` record for waveforms. None: no spare holds it."""
    if record.kind == "waveform":
        if record.length > SPARE_ARRAY_LENGTH or len(record.shape) > _SHAPE_DIMENSIONS:
            return None
        return (f"waveform:{record.ftvl}", "shape")
    if record.kind == "lsi":
        return ("lsi",) if record.length <= SPARE_ARRAY_LENGTH else None
    if record.kind == "mbbi":
        return ("mbbi",)
    return (record.kind, "stringin") if record.exact_text else (record.kind,)


def spare_record(record: IocRecord) -> IocRecord:
    """``record`` as a spare serves it: arrays and long strings with the spare's length."""
    if record.kind in ("waveform", "lsi"):
        return replace(record, length=SPARE_ARRAY_LENGTH)
    return record


@dataclass
class SparePool:
    """How many spare records of each slot are free (``spare_slots``); ``take`` claims them."""

    free: dict[str, int] = field(default_factory=dict)

    @classmethod
    def default(cls) -> "SparePool":
        return cls(dict(SPARE_COUNTS))

    @classmethod
    def empty(cls) -> "SparePool":
        return cls({})

    def take(self, record: IocRecord) -> IocRecord | None:
        """The spare's record for a new channel that needs ``record`` (the slots taken), or None."""
        slots = spare_slots(record)
        if slots is None:
            return None
        wanted: dict[str, int] = {}
        for slot in slots:
            wanted[slot] = wanted.get(slot, 0) + 1
        if any(self.free.get(slot, 0) < count for slot, count in wanted.items()):
            return None
        for slot, count in wanted.items():
            self.free[slot] -= count
        return spare_record(record)

    def copy(self) -> "SparePool":
        return SparePool(dict(self.free))


def spare_record_specs(counts: Mapping[str, int]) -> list[tuple[str, IocRecord | None]]:
    """(slot, record) of every spare an IOC creates: the records a slot's channels get
    (bsread type and labels are set when a channel takes it); "shape" slots have no IocRecord."""
    kinds = {"ai": IocRecord("float64", "ai"), "longin": IocRecord("int32", "longin"),
             "stringin": IocRecord("string", "stringin", 40), "lsi": IocRecord("string", "lsi", SPARE_ARRAY_LENGTH),
             "mbbi": IocRecord("uint16", "mbbi")}
    specs: list[tuple[str, IocRecord | None]] = []
    for slot, count in counts.items():
        if slot == "shape":
            record = None
        elif slot.startswith("waveform:"):
            ftvl = slot.split(":", 1)[1]
            record = IocRecord("float64", "waveform", SPARE_ARRAY_LENGTH, ftvl, shape=(SPARE_ARRAY_LENGTH,))
        else:
            record = kinds[slot]
        specs += [(slot, record)] * count
    return specs


# --------------------------------------------------------------------------
# When to restart
# --------------------------------------------------------------------------
@dataclass
class Settle:
    """What the running records cannot serve waits until the data header has been still for ``quiet_s``
    (at most ``most_s`` after the first change that needs it), then its names move to spare records
    (:func:`resolve_unheld`) or the IOC is replaced: a source reconfigured channel by channel costs one
    replacement, not one per step, and a channel that flips back within ``quiet_s`` costs nothing."""

    quiet_s: float = 1.0
    most_s: float = 5.0
    first: float | None = None
    last: float | None = None

    def wanted(self, now: float) -> None:
        """A change the running records cannot serve was seen at ``now``."""
        if self.first is None:
            self.first = now
        self.last = now

    def cancel(self) -> None:
        """The header went back to what the running records hold (or the names moved): nothing is due."""
        self.first = self.last = None

    def due(self, now: float) -> bool:
        if self.first is None or self.last is None:
            return False
        return now - self.last >= self.quiet_s or now - self.first >= self.most_s


# --------------------------------------------------------------------------
# Alarms of channel PVs
# --------------------------------------------------------------------------
class ChannelState:
    """What the gateway remembers of one channel: its last value and when values come (monotonic)."""

    __slots__ = ("value", "stamp", "last_present", "interval", "flagged")

    def __init__(self) -> None:
        self.value: Any = None
        self.stamp: float | None = None
        self.last_present: float | None = None
        self.interval: float | None = None  # between its last two values
        self.flagged = False

    def present(self, value: Any, stamp: float | None, arrived: float) -> None:
        """A value arrived (``arrived``: when the ingest received its message, monotonic).

        The channel's own period is measured in arrival times: a source's timestamps may be old or
        synthetic, and an older kept message may be applied late (apply times would say 0 s).
        """
        if self.last_present is not None and arrived - self.last_present > MIN_MEASURED_INTERVAL:
            self.interval = arrived - self.last_present
        self.value, self.stamp, self.last_present, self.flagged = value, stamp, arrived, False


def absence_overdue(state: ChannelState, now: float) -> bool:
    """True once, when an absent channel's latest value has become older than expected: three of its
    usual intervals once two values were seen, until then as long as a stopped stream is given. The
    caller flags it INVALID/TIMEOUT (and ``state.flagged`` is set here, so it is flagged once)."""
    if state.flagged or state.last_present is None:
        return False
    overdue_after = ABSENT_PERIODS * state.interval if state.interval else STALE_AFTER_S
    if now - state.last_present > overdue_after:
        state.flagged = True
        return True
    return False


def stream_stale(last_receive: float | None, now: float) -> bool:
    """No message for STALE_AFTER_S: every channel PV goes INVALID/COMM."""
    return last_receive is not None and now - last_receive > STALE_AFTER_S


# --------------------------------------------------------------------------
# Status PVs
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class StatusValue:
    """What one status PV shows: ``value`` (typed for its record), or None with ``alarm`` ("COMM":
    the buffer's status is unavailable, "UDF": nothing says) and the record keeps its last value."""

    value: Any = None
    alarm: str = "NO_ALARM"


def status_values(buffer: Mapping[str, Any] | None, buffer_age: float | None, has_status_url: bool,
                  own: Mapping[str, Any]) -> dict[str, StatusValue]:
    """Every status PV but MAX_RATE (the gateway's own setting).

    ``buffer``: the buffer's last ``BufferStatus.status_pv_values()``, ``buffer_age`` seconds old;
    ``own``: what the gateway sees on the stream (PULSE_ID, RATE, IDLE_S, CHANNELS). One rule: with a
    status URL, the buffer's values while fresh, else INVALID/COMM (the gateway's own view of the stream
    is not the buffer's: never passed off as it); without one, the gateway's own PULSE_ID, RATE,
    IDLE_S, and INVALID/UDF for what only the buffer knows. CHANNELS is always the gateway's: the
    channels it serves.
    """
    fresh = has_status_url and buffer is not None and buffer_age is not None and buffer_age < STATUS_FRESH_S
    values: dict[str, StatusValue] = {}
    for suffix, ca_type, _ in STATUS_PVS:
        if suffix == "MAX_RATE":
            continue
        if suffix == "CHANNELS":
            value = own.get("CHANNELS")
        elif has_status_url:
            if not fresh:
                values[suffix] = StatusValue(None, "COMM")
                continue
            value = (buffer or {}).get(suffix)
        else:
            value = own.get(suffix) if suffix in OWN_STATUS else None
        if value is None:
            values[suffix] = StatusValue(None, "UDF")
            continue
        try:
            typed = str(value)[:39] if ca_type == "STRING" else int(value) if ca_type == "LONG" else float(value)
        except (TypeError, ValueError, OverflowError):
            values[suffix] = StatusValue(None, "UDF")
            continue
        if isinstance(typed, float) and not math.isfinite(typed) and suffix != "IDLE_S":
            values[suffix] = StatusValue(None, "UDF")
            continue
        values[suffix] = StatusValue(typed)
    return values


# --------------------------------------------------------------------------
# Rates and sparse channels
# --------------------------------------------------------------------------
def update_interval(max_rate: float, total_rate: float, served: int) -> float:
    """Seconds between two applied messages: the per-PV limit, or the overall budget for ``served`` PVs."""
    per_pv = 1.0 / max_rate if max_rate > 0 else 0.0
    budget = served / total_rate if total_rate > 0 else 0.0
    return max(per_pv, budget)


def keep_sparse(kept: Sequence[Any], candidate: Any, newest_presence: int, max_count: int,
                max_bytes: int) -> list[Any]:
    """The older messages to keep (oldest first) once ``candidate`` (replaced as the newest by a message
    with ``newest_presence``) is added. Each has ``presence`` (bits of its present channels) and
    ``nbytes``. A kept message is useful while it has a channel that neither a newer kept one nor the
    newest has; whatever a stream's channels do, at most ``max_count`` and ``max_bytes`` stay."""
    result = [old for old in kept if old.presence & ~newest_presence & ~candidate.presence]
    result.append(candidate)
    while len(result) > max_count or (len(result) > 1 and sum(old.nbytes for old in result) > max_bytes):
        result.pop(0)
    return result


def sparse_rounds(newest_presence: int, kept_presences: Sequence[int]) -> list[int]:
    """For each kept message (oldest first), the channel bits to apply from it: those that neither the
    newest nor a newer kept message has, so every channel is applied at most once a round."""
    covered = newest_presence
    wanted: list[int] = []
    for presence in reversed(kept_presences):
        wanted.append(presence & ~covered)
        covered |= presence
    wanted.reverse()
    return wanted
