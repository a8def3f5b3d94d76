"""The CA gateway on pythonSoftIOC: real EPICS records, served by EPICS base's own CA server (rsrv).

Why (docs/dependencies.md, docs/performance.md "CA fan-out"): caproto's
server fans every update out to every subscriber in Python; at 10 clients x
500 PVs it delivered 3.7 of 10 updates per PV and second, 0.7 s late, and 50
clients x 100 PVs got 2.3 updates, 4.5 s late. Here Python sets each record
once per update and EPICS base's C server does the fan-out: the same loads
get their 10 updates at 1-7 ms. Records also bring the fields clients and
Phoebus ask for (.SEVR .STAT .PREC .EGU .DESC .NORD ...), EPICS access
security, and the data types EPICS base tools read right.

Records exist before ``iocInit``, so the channel set is fixed for the life
of an IOC process: when the data header changes the records (a channel
added, removed or retyped), the process exits with ``RESTART_EXIT_CODE`` and
:func:`supervise` (the gateway command's parent process, which owns no EPICS
state) starts a fresh one at once. Clients see a disconnect and reconnect by
themselves. A header change that keeps every record (new hash, same
channels and types) needs no restart.

Processes: ``sf_bsread_gateway ...`` -> :func:`supervise` -> ``... --ioc-child``
-> :func:`serve` (ingest thread, status poller, EPICS threads, and the apply
loop in the main thread).
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sf_bsread_writer import process
from sf_bsread_writer.ca.camapping import (
    SEVERITY_SUFFIX,
    IocRecord,
    UnknownTypeError,
    exact_text,
    ioc_record_for,
    ioc_value,
    record_from_json,
    record_holds,
    record_to_json,
    widened,
)
from sf_bsread_writer.rates import RateEstimator

__all__ = ["RESTART_EXIT_CODE", "supervise", "serve", "ChannelPlan", "acf_text"]

logger = logging.getLogger(__name__)

#: Exit code of an IOC process whose channel set changed: the supervisor starts a new one at once
#: (an internal code of the table in process.ExitCode: the supervisor never exits with it).
RESTART_EXIT_CODE = process.ExitCode.IOC_RESTART
#: How long a new IOC waits for the stream's first message before it starts with the status PVs only.
FIRST_MESSAGE_WAIT_S = 5.0
#: Seconds without a message after which every channel PV is flagged INVALID/COMM.
STALE_AFTER_S = 3.0
#: A channel absent from messages is flagged INVALID/TIMEOUT once its last value is this many of its
#: usual intervals old (a channel sent every Nth pulse is absent N-1 times in N: that is not an alarm).
ABSENT_PERIODS = 3.0
MIN_MEASURED_INTERVAL = 0.001  # seconds: shorter gaps between a channel's arrivals say nothing of its period
# The placeholder value of a record before its channel's first value (shown INVALID/UDF).
_EMPTY = {"ai": 0.0, "longin": 0, "mbbi": 0, "stringin": "", "lsi": ""}
#: The gateway's own statistics PVs (beside the buffer's status PVs), like EPICS ca-gateway's.
GATEWAY_STATS_PVS: tuple[tuple[str, str, str], ...] = (
    ("CA_CLIENTS", "LONG", "CA clients connected to the gateway"),
    ("CA_CHANNELS", "LONG", "CA channels the clients hold"),
    ("PV_UPDATES_S", "DOUBLE", "record updates per second"),
    ("APPLIED_S", "DOUBLE", "stream messages applied per second"),
    ("SKIPPED", "DOUBLE", "messages received but never applied"),
)

#: Where an IOC leaves what its successor must know (the channels that need the long-string form).
STATE_VARIABLE = "SF_BSREAD_GATEWAY_STATE"
#: Longest record name EPICS base accepts (PVNAME_STRINGSZ - 1), and characters a record name may not hold.
MAX_RECORD_NAME = 60
_BAD_NAME_CHARACTERS = set(" .\"'$\\{}()\t\n")
_SEVERITY_TYPES = frozenset({"uint8", "uint16", "int16", "int32", "uint32"})


# --------------------------------------------------------------------------
# What to serve (pure)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedChannel:
    name: str  # bsread channel name
    pv: str
    record: IocRecord
    index: int  # position in the data header
    severity_index: int | None = None  # position of its ``<name>.SEVR`` companion (a bridged IOC PV's alarm)


@dataclass(frozen=True)
class ChannelPlan:
    """The records of one data header. ``key`` equal: the same IOC can serve both headers.

    ``retired``: channels the running IOC has records for that the stream no longer sends
    (served INVALID/DISABLE until the next restart, and served again if they come back).
    """

    channels: tuple[ServedChannel, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (channel, why not served)
    retired: tuple[ServedChannel, ...] = ()

    @property
    def key(self) -> tuple:
        return tuple((c.pv, c.record) for c in self.channels)

    def rebind(self, new: "ChannelPlan") -> "ChannelPlan | None":
        """``new`` served by this plan's records, or None when it needs an IOC restart.

        A channel that disappeared is retired; one whose type changed keeps its record when that
        holds the new type (``camapping.record_holds``), with the new header's positions,
        shape, units and DESC. A new channel, or a type its record cannot hold, needs records
        that do not exist yet: None.
        """
        running = {c.pv: c for c in (*self.channels, *self.retired)}
        channels = []
        for channel in new.channels:
            current = running.pop(channel.pv, None)
            if current is None or not record_holds(current.record, channel.record):
                return None
            record = replace(current.record, shape=channel.record.shape, unit=channel.record.unit,
                             description=channel.record.description, precision=channel.record.precision)
            channels.append(replace(channel, record=record))
        return ChannelPlan(tuple(channels), new.skipped, tuple(running.values()))

    @classmethod
    def build(cls, header: Any | None, prefix: str, reserved: Sequence[str] = (),
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
            why = _unservable_name(pv)
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


def _unservable_name(pv: str) -> str | None:
    if len(pv) > MAX_RECORD_NAME:
        return f"PV name longer than {MAX_RECORD_NAME} characters"
    bad = sorted(set(pv) & _BAD_NAME_CHARACTERS)
    if bad:
        return f"PV name holds characters EPICS record names cannot ({''.join(bad)!r})"
    if not pv.isprintable() or not pv.isascii():
        return "PV name is not printable ASCII"
    return None


def acf_text(writable: bool, allow_hosts: Sequence[str]) -> str:
    """The EPICS access-security file: everything read-only; with --writable the WRITABLE group too.

    ``allow_hosts`` are peer IP addresses (the IOC checks the address the
    connection comes from, ``asCheckClientIP``, never the host name a client
    claims).
    """
    lines = ["ASG(DEFAULT) {", "    RULE(1, READ)", "}"]
    if writable:
        if allow_hosts:
            lines += ["HAG(ALLOWED) {", "    " + ", ".join(allow_hosts), "}"]
            lines += ["ASG(WRITABLE) {", "    RULE(1, READ)", "    RULE(1, WRITE) {", "        HAG(ALLOWED)",
                      "    }", "}"]
        else:
            lines += ["ASG(WRITABLE) {", "    RULE(1, READ)", "    RULE(1, WRITE)", "}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# The supervisor: restarts the IOC when its channel set changes
# --------------------------------------------------------------------------
def supervise(argv: Sequence[str]) -> int:
    """Run the IOC as a child (``--ioc-child``) and start the next one whenever it asks to be restarted.

    The next IOC is always started in advance and waits, its imports done
    (loading EPICS takes seconds on a busy machine), until it is told to go
    (a line on its stdin): a restart costs the new IOC's ``iocInit``, not a
    Python start. Each child dies with this process.
    """
    stopping = threading.Event()
    children: list[subprocess.Popen] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def spawn() -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-m", "sf_bsread_writer.ca.gateway", *argv, "--ioc-child"],
                                 stdin=subprocess.PIPE, preexec_fn=process.supervised_child, env=env,
                                 pass_fds=state.pass_fds)
        children.append(child)
        return child

    def go(child: subprocess.Popen) -> None:
        assert child.stdin is not None
        try:
            child.stdin.write(b"go\n")
            child.stdin.flush()
        except BrokenPipeError:  # it died while waiting: its exit code tells
            pass

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    restarts = 0
    state = _StateFile()
    env = {**os.environ, STATE_VARIABLE: state.path}
    try:
        current = spawn()
        go(current)
        standby = spawn()
        while True:
            code = current.wait()
            children.remove(current)
            if code == RESTART_EXIT_CODE and not stopping.is_set():
                restarts += 1
                logger.info("gateway IOC restarts to serve the new channel set (restart %d)", restarts)
                current, standby = standby, None
                go(current)
                standby = spawn()
                continue
            if code < 0:  # the IOC was killed by a signal: a fault (sys.exit would make 256 - N of it)
                return process.ExitCode.FAILED
            return process.ExitCode.OK if code == RESTART_EXIT_CODE else code  # a restart asked for while stopping
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        state.close()


class _StateFile:
    """Where the IOCs of one supervisor leave the records they served for the next (``_load_state``).

    An anonymous file (``memfd_create``) the children inherit and open as
    ``/proc/self/fd/N``: it vanishes with the last process holding it, so a
    supervisor killed with SIGKILL leaves nothing behind in /tmp. Where
    there is no memfd, a temporary file removed at the supervisor's exit.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self.pass_fds: tuple[int, ...] = ()
        try:
            fd = os.memfd_create("sf_bsread_gateway-state")  # pass_fds makes it the children's
        except (AttributeError, OSError):
            fd = None
        if fd is not None and os.path.exists(f"/proc/self/fd/{fd}"):  # reachable by path only through /proc
            self._fd, self.path, self.pass_fds = fd, f"/proc/self/fd/{fd}", (fd,)
        else:
            if fd is not None:
                os.close(fd)
            handle, self.path = tempfile.mkstemp(prefix="sf_bsread_gateway-", suffix=".json")
            os.close(handle)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        else:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _import_softioc() -> None:
    """Import pythonSoftIOC without its build tools' warnings.

    epicscorelibs loads setuptools_dso, which imports ``wheel.bdist_wheel``;
    wheel >= 0.44 under a setuptools older than 70.1 warns twice on import
    (FutureWarning, "no longer the canonical location"). A build-time matter
    that says nothing about the IOC: on an operator's stderr it reads as a
    fault. Only that warning is silenced, only during this import.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The 'wheel' package is no longer the canonical location",
                                category=FutureWarning)
        import softioc.asyncio_dispatcher  # noqa: F401  (the slow imports)
        import softioc.builder  # noqa: F401
        import softioc.softioc  # noqa: F401


def wait_for_go() -> bool:
    """In an IOC child: load EPICS, then wait for the supervisor's go (False: told to end instead)."""
    _import_softioc()  # the slow imports, done while waiting

    return sys.stdin.readline().strip() == "go"


def _load_state() -> dict[str, Any]:
    path = os.environ.get(STATE_VARIABLE)
    try:
        with open(path or "") as state:
            return json.load(state)
    except (OSError, ValueError):
        return {}


def _save_state(state: dict[str, Any]) -> None:
    path = os.environ.get(STATE_VARIABLE)
    if path:
        try:
            with open(path, "w") as out:
                json.dump(state, out)
        except OSError as error:  # the state only saves the next IOC a restart: never a reason to stop
            logger.warning("IOC state not saved to %s: %s", path, error)


def _records_in(state: Mapping[str, Any]) -> dict[str, IocRecord]:
    """The records earlier IOCs served, by channel name (a bad entry is skipped: it only costs a restart)."""
    found = {}
    for name, data in (state.get("records") or {}).items():
        try:
            found[name] = record_from_json(data)
        except (TypeError, ValueError):
            logger.warning("state file: record of %s unreadable, ignored", name)
    return found


def _long_strings_in(message: Any) -> set[str]:
    """String channels of ``message`` whose value does not fit a DBR_STRING (39 bytes)."""
    found = set()
    for index, spec in enumerate(message.data_header.channels):
        if spec.is_string and message.is_present(index):
            try:
                value = message.value(index)
            except Exception:
                continue
            if isinstance(value, str) and len(value.encode("utf-8")) > 39:
                found.add(spec.name)
    return found


# --------------------------------------------------------------------------
# The IOC process
# --------------------------------------------------------------------------
class _Records:
    """The EPICS records of one IOC: status PVs and one record (plus twins) per served channel."""

    def __init__(self, builder: Any, plan: ChannelPlan, name: str, status_pvs: Sequence[tuple[str, str, str]],
                 max_rate: float, writable: bool, on_max_rate: Any) -> None:
        self.plan = plan
        self.status: dict[str, Any] = {}
        self.status_text: dict[str, Any] = {}
        for suffix, ca_type, doc in status_pvs:
            pv = f"{name}:{suffix}"
            desc = doc[:39]
            if suffix == "MAX_RATE":
                fields = {"ASG": "WRITABLE"} if writable else {}
                self.status[suffix] = builder.aOut(pv, initial_value=max_rate, PREC=3, DESC=desc, EGU="Hz",
                                                   on_update=on_max_rate, always_update=True, **fields)
            elif ca_type == "STRING":
                self.status[suffix] = builder.stringIn(pv, DESC=desc)
            elif ca_type == "LONG":
                self.status[suffix] = builder.longIn(pv, DESC=desc)
            else:
                precision = 0 if "PULSE_ID" in suffix or suffix in ("N_MESSAGES", "RECEIVED", "REJECTED") else 3
                self.status[suffix] = builder.aIn(pv, PREC=precision, DESC=desc)
            if "PULSE_ID" in suffix:  # the exact number as text: caget shows a DOUBLE as 1.79602e+11
                self.status_text[suffix] = builder.stringIn(pv + "_STR", DESC=(desc + " (exact)")[:39])
        self.stats: dict[str, Any] = {}
        for suffix, ca_type, doc in GATEWAY_STATS_PVS:
            pv = f"{name}:{suffix}"
            self.stats[suffix] = (builder.longIn(pv, DESC=doc[:39]) if ca_type == "LONG"
                                  else builder.aIn(pv, PREC=1 if suffix.endswith("_S") else 0, DESC=doc[:39]))
        self.channels: list[tuple[ServedChannel, Any, Any]] = []  # (channel, record, twin) of the served plan
        self.by_pv: dict[str, tuple[Any, Any]] = {}  # every channel record of this IOC: (record, twin)
        self.shapes: dict[str, Any] = {}  # pv -> its ":SHAPE" record
        for channel in plan.channels:
            record = self._channel_record(builder, channel)
            if channel.record.kind == "waveform" and len(channel.pv) + len(":SHAPE") <= MAX_RECORD_NAME:
                # The numpy shape of one value (the row shape in the HDF5 file), as the caproto server served it.
                self.shapes[channel.pv] = builder.WaveformIn(channel.pv + ":SHAPE", length=len(channel.record.shape),
                                                             datatype=np.int32,
                                                             DESC=f"numpy shape of {channel.name}"[:39])
            twin = (builder.stringIn(channel.pv + "_STR", DESC=channel.name[:39], TSE=-2)
                    if channel.record.exact_text else None)
            self.channels.append((channel, record, twin))
            self.by_pv[channel.pv] = (record, twin)

    def show_shape(self, channel: ServedChannel) -> None:
        shape_record = self.shapes.get(channel.pv)
        if shape_record is not None:
            shape_record.set(np.asarray(channel.record.shape, dtype=np.int32))

    def relabel(self, channel: ServedChannel, before: ServedChannel | None) -> None:
        """A running record takes the units, DESC, precision and shape of a new data header."""
        record, _ = self.by_pv[channel.pv]
        old = before.record if before is not None else None
        new = channel.record
        if old is None or old.shape != new.shape:
            self.show_shape(channel)
        if new.kind in ("ai", "longin", "waveform") and (old is None or old.unit != new.unit):
            record.set_field("EGU", new.unit)
        if old is None or old.description != new.description:
            record.set_field("DESC", new.description or channel.name.encode("utf-8")[:39].decode("utf-8", "ignore"))
        if new.kind in ("ai", "waveform") and (old is None or old.precision != new.precision):
            record.set_field("PREC", new.precision)

    @staticmethod
    def _channel_record(builder: Any, channel: ServedChannel) -> Any:
        spec = channel.record
        # TSE -2: the record's time is the one handed to set() (the bsread timestamp), not the IOC's clock.
        common = {"DESC": spec.description or channel.name.encode("utf-8")[:39].decode("utf-8", errors="ignore"),
                  "TSE": -2}
        if spec.unit and spec.kind in ("ai", "longin", "waveform"):  # the records with an EGU field
            common["EGU"] = spec.unit
        # Every update is posted, also an unchanged value: a new pulse is a new sample (MDEL -1, MPST Always),
        # but by an mbbi (no such field): a state is an event.
        if spec.kind == "ai":
            return builder.aIn(channel.pv, PREC=spec.precision, MDEL=-1, ADEL=-1, **common)
        if spec.kind == "longin":
            return builder.longIn(channel.pv, MDEL=-1, ADEL=-1, **common)
        if spec.kind == "mbbi":
            return builder.mbbIn(channel.pv, *spec.enum_strings, **common)  # posts on change: no MPST
        if spec.kind == "stringin":
            return builder.stringIn(channel.pv, MPST="Always", APST="Always", **common)
        if spec.kind == "lsi":
            return builder.longStringIn(channel.pv, length=spec.length, MPST="Always", APST="Always", **common)
        return builder.WaveformIn(channel.pv, length=spec.length, datatype=spec.numpy_dtype, MPST="Always",
                                  APST="Always", PREC=spec.precision, **common)


class _ChannelState:
    """What the apply loop remembers of one channel: its last value and when values come."""

    __slots__ = ("value", "stamp", "last_present", "interval", "flagged")

    def __init__(self) -> None:
        self.value: Any = None
        self.stamp: float | None = None
        self.last_present: float | None = None  # monotonic
        self.interval: float | None = None  # between its last two values
        self.flagged = False


def serve(settings: Any, status_pvs: Sequence[tuple[str, str, str]], ingest: Any, poller: Any) -> int:
    """The IOC process: build the records from the first message, iocInit, apply until stopped or restarted."""
    _import_softioc()
    from softioc import alarm, asyncio_dispatcher, builder, softioc

    stop = threading.Event()
    restore = process.stop_on_signals(lambda name: stop.set())
    try:
        message = _first_message(ingest, stop)
        state = _load_state()
        long_strings = set(state.get("long_strings", []))
        previous = _records_in(state)
        if message is not None:
            long_strings |= _long_strings_in(message)
        reserved = [f"{settings.name}:{suffix}" for suffix, _, _ in (*status_pvs, *GATEWAY_STATS_PVS)]
        plan = ChannelPlan.build(message.data_header if message else None, settings.prefix, reserved,
                                 frozenset(long_strings), previous)
        for channel, why in plan.skipped:
            logger.warning("channel %s not served: %s", channel, why)

        def on_max_rate(value: Any) -> None:
            try:
                rate = float(value)
            except (TypeError, ValueError):
                return
            if rate > 0 and math.isfinite(rate):
                logger.info("max rate per PV set to %.3g Hz over CA", rate)
                settings.max_rate = rate

        builder.SetSimpleRecordNames(prefix="", separator="")
        records = _Records(builder, plan, settings.name, status_pvs, settings.max_rate,
                           settings.writable or settings.acf is not None,
                           on_max_rate)
        builder.LoadDatabase()
        try:
            acf = _install_access_security(settings.writable, settings.allow_hosts, settings.acf)
        except AccessSecurityError as error:
            logger.error("%s", error)
            return process.ExitCode.CONFIGURATION
        dispatcher = asyncio_dispatcher.AsyncioDispatcher()
        softioc.iocInit(dispatcher)
        if acf != settings.acf:
            os.unlink(acf)
        process.print_ready({
            "ca_port": int(os.environ.get("EPICS_CAS_SERVER_PORT") or os.environ.get("EPICS_CA_SERVER_PORT")
                           or 5064),
            "interfaces": os.environ.get("EPICS_CAS_INTF_ADDR_LIST", "").split(),
            "beacons": [f"{host}:{os.environ.get('EPICS_CAS_BEACON_PORT') or 5065}"
                        for host in os.environ.get("EPICS_CAS_BEACON_ADDR_LIST", "").split()],
            "status_pvs": reserved + [f"{settings.name}:{s}_STR" for s in records.status_text],
            "gateway_pvs": [f"{settings.name}:{suffix}" for suffix, _, _ in GATEWAY_STATS_PVS],
            "prefix": settings.prefix,
            "server": "softioc",
            "channels": len(plan.channels),
        })
        logger.info("gateway IOC serving %d channel PVs and %d status PVs", len(plan.channels),
                    len(records.status) + len(records.status_text))
        loop = _ApplyLoop(settings, records, plan, ingest, poller, alarm, long_strings)
        loop.mark_undefined()
        if message is not None:
            loop.apply(message)
        code = loop.run(stop)
        if code == RESTART_EXIT_CODE:
            _save_state({"long_strings": sorted(loop.long_strings),
                         "records": {name: record_to_json(record)
                                     for name, record in loop.records_for_the_next_ioc().items()}})
        return code
    finally:
        restore()


def _first_message(ingest: Any, stop: threading.Event) -> Any:
    deadline = time.monotonic() + FIRST_MESSAGE_WAIT_S
    while not stop.is_set() and time.monotonic() < deadline:
        message = ingest.take_message(0.2)
        if message is not None:
            return message
    return None


class AccessSecurityError(RuntimeError):
    """The access-security file cannot be used: the gateway does not start (it would not be what was asked)."""


def check_access_security_file(path: str) -> None:
    """Parse ``path`` with EPICS' own parser (``asInitFile``), in the supervisor, before any IOC starts:
    a syntax error ends the gateway at once with EPICS' message (iocInit would only print it and serve).

    Only in a process that runs no IOC: it leaves the access-security tables of this process set up.
    """
    from epicscorelibs.ioc import dbCore

    dbCore.asInitFile.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    dbCore.asInitFile.restype = ctypes.c_long
    sys.stderr.flush()
    if dbCore.asInitFile(path.encode(), None) != 0:
        raise AccessSecurityError(f"EPICS access security file {path} cannot be used (its error is printed above)")


def _install_access_security(writable: bool, allow_hosts: Sequence[str], site_file: str | None = None) -> str:
    """Tell the IOC which ACF to use (``site_file``, checked by the supervisor, else one written from
    --writable/--allow-host) and to check clients by their address (before iocInit); returns its path."""
    from epicscorelibs.ioc import dbCore

    if site_file is None:
        handle, path = tempfile.mkstemp(prefix="sf_bsread_gateway-", suffix=".acf")
        with os.fdopen(handle, "w") as acf:
            acf.write(acf_text(writable, allow_hosts))
    else:
        path = site_file
    ctypes.c_int.in_dll(dbCore, "asCheckClientIP").value = 1
    dbCore.asSetFilename.argtypes = [ctypes.c_char_p]
    if dbCore.asSetFilename(path.encode()) != 0:
        raise AccessSecurityError(f"EPICS access security file {path} refused")
    return path


class _ApplyLoop:
    """The main thread of the IOC: newest message -> records, at most max_rate times a second; status at 1 Hz."""

    def __init__(self, settings: Any, records: _Records, plan: ChannelPlan, ingest: Any, poller: Any, alarm: Any,
                 long_strings: set[str]) -> None:
        self.settings = settings
        self.long_strings = set(long_strings)
        self.needs_restart = False
        self.wanted: ChannelPlan | None = None  # the plan this IOC could not serve (it restarts)
        self.records = records
        self.plan = plan
        self.ingest = ingest
        self.poller = poller
        self.alarm = alarm
        self.header: Any = None  # the data header applied last (compared with DataHeader.same_as)
        self.states = {channel.name: _ChannelState() for channel in plan.channels}
        self.stale = False
        self.newest_pulse_id: int | None = None
        self.decode_errors = 0
        self.rates = RateEstimator(window=5.0)
        self.applied = 0
        self.record_sets = 0
        self.own_rates = RateEstimator(window=5.0)

    def run(self, stop: threading.Event) -> int:
        next_due = 0.0
        next_status = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_status:
                self._status(now)
                next_status = now + 1.0
                if self.settings.parent_pid and not process.pid_alive(self.settings.parent_pid):
                    logger.warning("parent process %d is gone; gateway exits", self.settings.parent_pid)
                    return process.ExitCode.OK
            if self.ingest.error is not None:
                logger.error("ingest failed: %s", self.ingest.error)
                return process.ExitCode.FAILED
            if now < next_due:
                stop.wait(min(next_due, next_status) - now)  # the rate limit, not synchronisation
                continue
            messages = self.ingest.take_messages(max(0.0, min(0.2, next_status - now)))
            if not messages:
                continue
            message, received_at, _ = messages[-1]  # the newest; older ones carry sparse channels it lacks
            started = time.monotonic()
            if not message.data_header.same_as(self.header):
                plan = ChannelPlan.build(message.data_header, self.settings.prefix,
                                         [f"{self.settings.name}:{s}" for s in (*self.records.status,
                                                                                 *self.records.stats)],
                                         frozenset(self.long_strings))
                if plan.key != self.plan.key:
                    rebound = self.plan.rebind(plan)
                    if rebound is None:
                        logger.info("the stream's channels changed (%d -> %d served) beyond what the records hold: "
                                    "the IOC restarts to serve them", len(self.plan.channels), len(plan.channels))
                        self.wanted = plan
                        return RESTART_EXIT_CODE
                    self.rebind(rebound)
                self.header = message.data_header
            for older, older_received_at, indices in messages[:-1]:
                if older.data_header.same_as(self.header):
                    self.apply(older, only=indices, received_at=older_received_at)
            self.apply(message, received_at=received_at)
            if self.needs_restart:
                logger.info("a string longer than 39 bytes: the IOC restarts to serve it whole (long string)")
                return RESTART_EXIT_CODE
            next_due = started + self._interval()
        return 0

    def mark_undefined(self) -> None:
        """Every channel INVALID/UDF until its first value: a record's initial 0 must not look like data."""
        now = time.time()
        for channel, record, twin in self.records.channels:
            self.records.show_shape(channel)
            empty = _EMPTY.get(channel.record.kind, 0)
            if channel.record.kind == "waveform":
                empty = np.zeros(0, dtype=channel.record.numpy_dtype)
            for target, value in ((record, empty), (twin, "")):
                if target is not None:
                    self._set(target, value, self.alarm.INVALID_ALARM, self.alarm.UDF_ALARM, now)

    def rebind(self, plan: ChannelPlan) -> None:
        """Serve ``plan`` (``ChannelPlan.rebind`` of a new header) with the records this IOC has: no restart,
        no client disconnected. Channels no longer sent go INVALID/DISABLE with their last value."""
        before = {channel.pv: channel for channel in self.plan.channels}
        for channel in plan.channels:
            if before.get(channel.pv) != channel:
                self.records.relabel(channel, before.get(channel.pv))
            self.states.setdefault(channel.name, _ChannelState())
        for channel in plan.retired:
            if channel.pv in before:
                record, twin = self.records.by_pv[channel.pv]
                state = self.states[channel.name]
                self._set(record, state.value, self.alarm.INVALID_ALARM, self.alarm.DISABLE_ALARM, state.stamp)
        self.records.channels = [(channel, *self.records.by_pv[channel.pv]) for channel in plan.channels]
        logger.info("the stream's channels changed: %d served by the running IOC (%d no longer sent)",
                    len(plan.channels), len(plan.retired))
        self.plan = plan

    def records_for_the_next_ioc(self) -> dict[str, IocRecord]:
        """By channel name: the records this IOC served, widened by those it could not serve, so that
        the next IOC holds both whichever header its first message has (no restart loop when a
        channel flips between two types)."""
        records = {c.name: c.record for c in (*self.plan.retired, *self.plan.channels)}
        for channel in self.wanted.channels if self.wanted is not None else ():
            before = records.get(channel.name)
            records[channel.name] = widened(before, channel.record) if before is not None else channel.record
        return records

    def _interval(self) -> float:
        per_pv = 1.0 / self.settings.max_rate if self.settings.max_rate > 0 else 0.0
        budget = len(self.plan.channels) / self.settings.total_rate if self.settings.total_rate > 0 else 0.0
        return max(per_pv, budget)

    def apply(self, message: Any, only: frozenset[int] | None = None, received_at: float | None = None) -> None:
        """Every served channel of ``message`` into its record (absent values keep the last one).

        ``only``: of an older message of the same header, just these channel indices (sparse channels
        the newer messages lack, ``_Ingest.take_messages``), in their pulses' order.
        ``received_at``: when the ingest received it (monotonic): a channel's period is measured in
        arrival times, whenever its values get applied.
        """
        alarm = self.alarm
        self.header = message.data_header
        main = message.main
        message_time = main.sec + main.ns * 1e-9
        now = time.monotonic()
        arrived = received_at if received_at is not None else now
        self.stale = False
        for channel, record, twin in self.records.channels:
            state = self.states[channel.name]
            index = channel.index
            if only is not None and index not in only:
                continue
            if not message.is_present(index):
                self._absent(channel, record, state, now)
                continue
            try:
                value = message.value(index)
                stamp = message.channel_seconds(index)
            except Exception as error:  # a malformed part must not stop the gateway
                self.decode_errors += 1
                if self.decode_errors <= 10:
                    logger.warning("cannot decode %s at pulse %s: %s", channel.name, message.pulse_id, error)
                self._set(record, state.value, alarm.INVALID_ALARM, alarm.READ_ALARM, message_time)
                continue
            if value is None:
                self._absent(channel, record, state, now)
                continue
            served, truncated = ioc_value(channel.record, value)
            if truncated and channel.record.kind == "stringin":
                self.long_strings.add(channel.name)
                self.needs_restart = True
            severity, status = (alarm.MINOR_ALARM, alarm.SOFT_ALARM) if truncated else (alarm.NO_ALARM,
                                                                                        alarm.NO_ALARM)
            upstream = self._upstream_severity(message, channel)
            if upstream > severity:  # the IOC's own alarm, carried by the bridge: LINK, as a record reading it
                severity, status = upstream, alarm.LINK_ALARM
            self._set(record, served, severity, status, stamp)
            if twin is not None:
                self._set(twin, exact_text(value), severity, status, stamp)
            # The channel's own period, from when its values arrived here (a source's timestamps may be old or
            # synthetic, and an older kept message may be applied late: apply times would say 0 s).
            if state.last_present is not None and arrived - state.last_present > MIN_MEASURED_INTERVAL:
                state.interval = arrived - state.last_present
            state.value, state.stamp, state.last_present, state.flagged = served, stamp, arrived, False
        if only is None:
            self.newest_pulse_id = message.pulse_id
            self.applied += 1

    def _upstream_severity(self, message: Any, channel: ServedChannel) -> int:
        """The severity (0..3) in the channel's ``.SEVR`` companion, 0 when it has none or it is unreadable."""
        index = channel.severity_index
        if index is None or not message.is_present(index):
            return 0
        try:
            return min(3, max(0, int(np.asarray(message.value(index)).reshape(-1)[0])))
        except Exception:  # a malformed companion costs the alarm, not the value
            return 0

    def _absent(self, channel: ServedChannel, record: Any, state: _ChannelState, now: float) -> None:
        """The latest present value stays, with its own timestamp, until it is older than expected."""
        if state.flagged or state.last_present is None:
            return
        # Its usual interval once two values were seen; until then, as long as a stopped stream is given.
        overdue_after = ABSENT_PERIODS * state.interval if state.interval else STALE_AFTER_S
        if now - state.last_present > overdue_after:
            state.flagged = True
            self._set(record, state.value, self.alarm.INVALID_ALARM, self.alarm.TIMEOUT_ALARM, state.stamp)

    def _set(self, record: Any, value: Any, severity: int, status: int, stamp: float | None) -> None:
        if value is None:
            return
        try:
            record.set(value, severity=severity, alarm=status, timestamp=stamp)
            self.record_sets += 1
        except Exception:  # one record's trouble must not stop the others
            logger.exception("record %s: set failed", record.name)

    def _status(self, now: float) -> None:
        alarm = self.alarm
        last = self.ingest.last_receive_monotonic
        if last is not None and now - last > STALE_AFTER_S and not self.stale:
            self.stale = True
            for channel, record, twin in self.records.channels:
                state = self.states[channel.name]
                for target, value in ((record, state.value), (twin, None)):
                    if target is not None and value is not None:
                        self._set(target, value, alarm.INVALID_ALARM, alarm.COMM_ALARM, state.stamp)
        statistics = self.poller.latest if self.poller is not None else None
        fresh = (self.poller is not None and self.poller.latest_monotonic is not None
                 and now - self.poller.latest_monotonic < 5.0)
        self.rates.add(now, self.ingest.received)
        own = {"PULSE_ID": self.newest_pulse_id, "CHANNELS": len(self.plan.channels),
               "IDLE_S": None if last is None else now - last, "RATE": self.rates.rate()}
        from_buffer = {} if statistics is None or not fresh else statistics.status_pv_values()
        stamp = time.time()
        self._gateway_statistics(now, stamp)
        for suffix, record in self.records.status.items():
            if suffix == "MAX_RATE":
                if record.get() != self.settings.max_rate:
                    record.set(self.settings.max_rate, process=False)
                continue
            if suffix == "CHANNELS":
                value = own["CHANNELS"]
            elif self.poller is not None:
                value = from_buffer.get(suffix)
            else:
                value = own.get(suffix)
            if value is None:
                status = alarm.COMM_ALARM if self.poller is not None and not fresh else alarm.UDF_ALARM
                current = record.get()
                if current is not None:
                    record.set(current, severity=alarm.INVALID_ALARM, alarm=status, timestamp=stamp)
                continue
            if suffix == "STATE":
                value = str(value)[:39]
            elif suffix in ("N_WRITERS", "CHANNELS"):
                value = int(value)
            else:
                value = float(value)
            record.set(value, timestamp=stamp)
            text_record = self.records.status_text.get(suffix)
            if text_record is not None:
                text_record.set(str(int(value)), timestamp=stamp)


    def _gateway_statistics(self, now: float, stamp: float) -> None:
        """NAME:CA_CLIENTS ... from EPICS base's own CA server counters and this loop's."""
        clients, channels = _ca_server_counts()
        self.own_rates.add(now, self.applied, self.record_sets)
        rates = self.own_rates.rates() or (0.0, 0.0)
        values = {"CA_CLIENTS": clients, "CA_CHANNELS": channels, "APPLIED_S": rates[0],
                  "PV_UPDATES_S": rates[1], "SKIPPED": float(max(0, self.ingest.received - self.applied))}
        for suffix, record in self.records.stats.items():
            value = values.get(suffix)
            if value is not None:
                record.set(value, timestamp=stamp)


def _ca_server_counts() -> tuple[int | None, int | None]:
    """(clients, channels) of the IOC's CA server (rsrv's casStatsFetch); (None, None) if unavailable."""
    try:
        from epicscorelibs.ioc import dbCore

        channels, circuits = ctypes.c_uint(0), ctypes.c_uint(0)
        dbCore.casStatsFetch(ctypes.byref(channels), ctypes.byref(circuits))
        return int(circuits.value), int(channels.value)
    except (ImportError, AttributeError, OSError):
        return None, None
