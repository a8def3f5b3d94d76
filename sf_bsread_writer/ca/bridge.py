"""IOC PVs -> bsread stream: CLI ``sf_bsread_ca_bridge``.

One Channel Access subscription per PV (however many consumers the stream
has), and a bsread stream on ``--port`` at a fixed ``--rate``, like an IOC's
bsread source. Any buffer can ingest it, so IOC PVs are buffered, written to
HDF5 next to the beam data, and served back over CA by that buffer's gateway
(a classic CA gateway: many clients, one upstream subscription).

Each message carries, for every PV, its newest value with its **EPICS
timestamp as the channel timestamp** (so a slow PV repeated in many messages
still says when it was measured), and a pulse id:

* from ``--pulse-id-pv`` when given: a message is sent only when that PV has
  advanced (never the same pulse id twice: a buffer drops duplicates);
* else derived from the clock at the nominal rate,
  ``round(unix_time * rate)``, so ids grow by one per period and a late tick
  shows as a gap, not as a shifted id.

A disconnected PV (and one not yet connected) is sent as an absent value and
counted; reconnection is libca's job and automatic. So is an empty array (an
IOC's waveform after a reboot has NORD 0) and any value that does not fit its
channel: what an IOC sends can cost that PV's value in one message, never the
bridge (a failure to build a whole message is logged, counted and skipped). The CA type of a PV
fixes its bsread type (table in docs/gateway.md); an array PV's length is its
current element count, so the data header changes if that changes.

What the IOC says about a PV travels with it: its units, precision, enum
state strings and DESC go into the PV's data-header entry (``unit``,
``precision``, ``enum_strings``, ``description``: written as HDF5 attributes
by the writer, served as EGU/PREC/states by the gateway), fetched again at
every (re)connection; its alarm severity at each update goes into a
companion channel ``<PV>.SEVR`` (uint16, 0 NO_ALARM .. 3 INVALID, with those
names as its ``enum_strings``), present in every message: INVALID while the
PV is disconnected or its value unusable, so a file says *why* a value is
absent.

The client is pyepics (the real libca): reconnection, beacons and the
EPICS_CA_* environment behave exactly as in any EPICS tool. Secure default:
when the environment names no CA address list, searches go to 127.0.0.1
only (libca would broadcast them); set ``EPICS_CA_ADDR_LIST`` to reach IOCs
on a network.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from sf_bsread_writer import process
from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.ca.camapping import SEVERITY_NAMES, SEVERITY_SUFFIX
from sf_bsread_writer.ca.environment import prepare_client_environment
from sf_bsread_writer.config import BRIDGE_ENV_PREFIX, BRIDGE_OPTIONS, parse_args
from sf_bsread_writer.process import ExitCode

__all__ = ["main", "Bridge", "PVState", "Update", "read_pv_file", "BSREAD_TYPE_BY_CA_TYPE"]

# The import path even when run as ``python -m`` (where __name__ is "__main__").
logger = logging.getLogger(__spec__.name)

#: CA native type (pyepics/libca numbering) -> bsread type. ENUM is sent as its index.
BSREAD_TYPE_BY_CA_TYPE: dict[int, str] = {
    0: "string",   # DBF_STRING
    1: "int16",    # DBF_SHORT
    2: "float32",  # DBF_FLOAT
    3: "uint16",   # DBF_ENUM (index)
    4: "uint8",    # DBF_CHAR
    5: "int32",    # DBF_LONG
    6: "float64",  # DBF_DOUBLE
}

_SUMMARY_INTERVAL_S = 30.0
_METADATA_TIMEOUT_S = 2.0
INVALID_SEVERITY = SEVERITY_NAMES.index("INVALID")
_SEVERITY_SPEC_EXTRA = {"enum_strings": list(SEVERITY_NAMES)}


def read_pv_file(path: str | os.PathLike) -> list[str]:
    """PV names, one per line; ``#`` starts a comment; blank lines ignored."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


@dataclass(frozen=True, slots=True)
class Update:
    """One CA monitor update, replaced whole by the CA callback thread so that the sending
    thread never pairs a value with the timestamp or severity of another update."""

    ca_type: int | None
    value: Any
    sec: int
    ns: int
    severity: int = 0


def display_of(ctrl: dict[str, Any] | None, description: str | None) -> dict[str, Any]:
    """Data-header display metadata from a PV's DBR_CTRL fields (pyepics ``get_ctrlvars``) and DESC."""
    found: dict[str, Any] = {}
    ctrl = ctrl or {}
    units = ctrl.get("units")
    if isinstance(units, bytes):
        units = units.decode("utf-8", "replace")
    if isinstance(units, str) and units.strip():
        found["unit"] = units.strip()
    precision = ctrl.get("precision")
    if isinstance(precision, (int, np.integer)) and 0 <= precision <= 17:
        found["precision"] = int(precision)
    states = ctrl.get("enum_strs")
    if states:
        found["enum_strings"] = [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
                                 for item in states]
    if description:
        found["description"] = description
    return found


@dataclass
class PVState:
    """What the CA callbacks (and the metadata thread) know of one PV."""

    name: str
    connected: bool = False
    latest: Update | None = None
    display: dict[str, Any] = field(default_factory=dict)  # unit, precision, enum_strings, description
    updates: int = 0
    disconnects: int = 0
    absent_sent: int = 0
    unusable: int = 0  # values that could not be sent (empty array, wrong type): sent as absent
    last_count: int = 1  # element count of the last non-empty array: the header keeps it for an empty one

    def connection_changed(self, connected: bool) -> bool:
        """A CA connection callback; True when the PV (re)connected (its metadata is to be read again).

        A disconnect forgets the value (its type and length stay, so the data
        header does not change): pyepics reports the reconnection before the
        IOC's first value arrives, and in between the value from before the
        disconnect (an IOC reboot: the old IOC's waveform) would be sent as
        the PV's current one.
        """
        if connected:
            logger.info("PV %s connected", self.name)
        else:
            if self.connected:
                self.disconnects += 1
                logger.warning("PV %s disconnected; sending it as absent until it is back", self.name)
            latest = self.latest
            if latest is not None and latest.value is not None:
                if latest.ca_type is not None and np.size(latest.value) > 0:
                    self.last_count = int(np.size(latest.value))
                self.latest = replace(latest, value=None, severity=INVALID_SEVERITY)
        self.connected = connected
        return connected

    def updated(self, update: Update) -> None:
        """A CA monitor update (replaces the whole previous one)."""
        self.latest = update
        self.updates += 1
        if not self.connected:  # a value means connected, whatever order callbacks come in
            self.connected = True

    def spec(self, latest: Update | None) -> dict[str, Any]:
        """The data-header entry of this PV's channel (float64 [1] until its type is known)."""
        if latest is None or latest.ca_type is None:
            return {"name": self.name, "type": "float64", "shape": [1], **self.display}
        bsread_type = BSREAD_TYPE_BY_CA_TYPE.get(latest.ca_type, "float64")
        if bsread_type == "string":
            return {"name": self.name, "type": "string", "shape": [1], **self.display}
        count = int(np.size(latest.value)) if latest.value is not None else 0
        if count > 0:
            self.last_count = count
        return {"name": self.name, "type": bsread_type, "shape": [self.last_count], **self.display}

    def channel(self, connected: bool) -> tuple[dict[str, Any], Any]:
        """(data-header entry, value or None = absent) for the next message; never raises for a value."""
        latest = self.latest
        spec = self.spec(latest)
        if latest is None or not connected or latest.value is None:
            return spec, None
        value = latest.value
        try:
            if spec["type"] == "string":
                return spec, str(value)
            array = np.asarray(value, dtype=spec["type"]).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            array = None
        if array is None or array.size != spec["shape"][0]:
            self.unusable += 1  # empty (NORD 0), or not of its channel's type: absent this time
            if self.unusable <= 10 or self.unusable % 1000 == 0:
                logger.warning("PV %s: value %s cannot be sent as %s %s: sent as absent (%d so far)", self.name,
                               "of 0 elements" if array is not None and array.size == 0 else repr(value)[:60],
                               spec["type"], spec["shape"], self.unusable)
            return spec, None
        return spec, array


class Bridge:
    """CA subscriptions in, bsread messages out; see the module docstring."""

    def __init__(self, pv_names: Sequence[str], port: int, bind: str = "127.0.0.1", mode: str = "push",
                 rate: float = 100.0, pulse_id_pv: str | None = None) -> None:
        if not pv_names:
            raise ValueError("no PV given (--pv NAME or --pv-file FILE)")
        if rate <= 0:
            raise ValueError("--rate must be > 0")
        self.pv_names = list(dict.fromkeys(pv_names))  # unique, in order
        self.port = port
        self.bind = bind
        self.mode = mode
        self.rate = rate
        self.pulse_id_pv = pulse_id_pv
        self.states = {name: PVState(name) for name in self.pv_names}
        self._pulse_state = PVState(pulse_id_pv) if pulse_id_pv else None
        self._pvs: list[Any] = []
        self._stop = threading.Event()
        self._metadata_wanted: queue.SimpleQueue[Any] = queue.SimpleQueue()  # PVs (re)connected
        self._metadata_thread: threading.Thread | None = None
        self.metadata_fetches = 0
        self.metadata_failures = 0
        self.context: zmq.Context | None = None
        self.socket: zmq.Socket | None = None
        self.address: str | None = None
        self.sent = 0
        self.send_drops = 0
        self.build_errors = 0
        self.waiting_for_pulse_id = 0
        self.last_pulse_id: int | None = None

    # -- CA side ---------------------------------------------------------------
    def connect(self) -> None:
        import epics  # after the environment is prepared: libca reads it once

        pv_by_name: dict[str, Any] = {}

        def on_connection(pvname: str | None = None, conn: bool | None = None, **_: Any) -> None:
            state = self._state_of(pvname)
            if state is None:
                return
            if state.connection_changed(bool(conn)) and state is not self._pulse_state:
                self._metadata_wanted.put(pv_by_name.get(pvname))  # never a CA call in a callback

        def on_value(pvname: str | None = None, value: Any = None, ftype: int | None = None,
                     posixseconds: int = 0, nanoseconds: int = 0, severity: int | None = 0, **_: Any) -> None:
            state = self._state_of(pvname)
            if state is None:
                return
            native = epics.dbr.native_type(ftype) if ftype is not None else None
            if isinstance(value, np.ndarray):
                value = value.copy()  # libca reuses its buffer
            state.updated(Update(native, value, int(posixseconds), int(nanoseconds),
                                 int(severity) if severity is not None else INVALID_SEVERITY))

        names = self.pv_names + ([self.pulse_id_pv] if self.pulse_id_pv else [])
        for name in names:
            pv = epics.PV(name, form="time", auto_monitor=True, callback=on_value,
                          connection_callback=on_connection)
            pv_by_name[name] = pv
            self._pvs.append(pv)
        self._metadata_thread = threading.Thread(target=self._fetch_metadata, name="pv-metadata", daemon=True)
        self._metadata_thread.start()
        logger.info("subscribed to %d PV(s)", len(names))

    def _fetch_metadata(self) -> None:
        """Units, precision, enum strings and DESC of each PV at each (re)connection.

        Its own thread: a CA get must not run in a CA callback, and an IOC that
        goes away half-way costs this thread a timeout, never a message.
        """
        import epics

        while not self._stop.is_set():
            try:
                pv = self._metadata_wanted.get(timeout=0.5)
            except queue.Empty:
                continue
            if pv is None or self._stop.is_set():
                continue
            state = self.states.get(pv.pvname)
            if state is None:
                continue
            try:
                ctrl = pv.get_ctrlvars(timeout=_METADATA_TIMEOUT_S)
                record = pv.pvname.split(".", 1)[0]
                description = None
                if "." not in pv.pvname:
                    description = epics.caget(record + ".DESC", timeout=_METADATA_TIMEOUT_S, as_string=True)
                state.display = display_of(ctrl, description or None)
                self.metadata_fetches += 1
                logger.info("PV %s metadata: %s", pv.pvname, state.display or "none")
            except Exception:  # a disconnect half-way, an odd field: the PV keeps its old metadata
                self.metadata_failures += 1
                logger.warning("PV %s: metadata not read", pv.pvname, exc_info=True)

    def _state_of(self, name: str | None) -> PVState | None:
        if name is None:
            return None
        if self._pulse_state is not None and name == self.pulse_id_pv:
            return self._pulse_state
        return self.states.get(name)

    # -- bsread side -----------------------------------------------------------
    def open(self) -> str:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH if self.mode == "push" else zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.SNDHWM, 1000)
        if self.port == 0:
            port = self.socket.bind_to_random_port(f"tcp://{self.bind}")
        else:
            self.socket.bind(f"tcp://{self.bind}:{self.port}")
            port = self.port
        self.address = f"tcp://{self.bind}:{port}"
        return self.address

    def next_pulse_id(self, now: float) -> int | None:
        """The pulse id of a message sent at ``now``, or None when there is no new one yet."""
        if self._pulse_state is not None:
            latest = self._pulse_state.latest
            if latest is None or latest.value is None or not self._pulse_state.connected:
                return None
            value = latest.value
            try:
                pulse_id = int(np.asarray(value).reshape(-1)[0])
            except (TypeError, ValueError, IndexError):
                return None
        else:
            pulse_id = int(round(now * self.rate))
        if pulse_id < 0 or (self.last_pulse_id is not None and pulse_id <= self.last_pulse_id):
            return None
        return pulse_id

    def build(self, pulse_id: int, now: float) -> list[bytes]:
        """One message: per PV its channel and its ``.SEVR`` companion (INVALID when the value is absent)."""
        channels, values, stamps = [], [], []
        now_stamp = (int(now), int(round((now % 1) * 1e9)) % 1_000_000_000)
        for name in self.pv_names:
            state = self.states[name]
            latest = state.latest  # one read: value, timestamp and severity of the same update
            spec, value = state.channel(state.connected)
            if value is None:
                state.absent_sent += 1
            present = value is not None and latest is not None
            channels += (spec, {"name": name + SEVERITY_SUFFIX, "type": "uint16", **_SEVERITY_SPEC_EXTRA})
            values += (value, np.uint16(latest.severity if present else INVALID_SEVERITY))
            stamps += ((latest.sec, latest.ns) if present else None,
                       (latest.sec, latest.ns) if present else now_stamp)
        return build_message(pulse_id, channels, values, timestamp=now, channel_timestamps=stamps)

    def run(self, duration: float | None = None) -> None:
        """Send at ``rate`` until :meth:`stop` (or ``duration`` seconds)."""
        assert self.socket is not None
        period = 1.0 / self.rate
        started = time.monotonic()
        next_tick = started
        next_summary = started + _SUMMARY_INTERVAL_S
        while not self._stop.is_set():
            now = time.time()
            pulse_id = self.next_pulse_id(now)
            if pulse_id is None:
                self.waiting_for_pulse_id += 1
            else:
                try:
                    frames = self.build(pulse_id, now)
                except Exception:  # a bug or a value nobody foresaw: this message, never the bridge
                    self.build_errors += 1
                    logger.exception("message for pulse id %d not built (%d so far)", pulse_id, self.build_errors)
                    frames = None
                if frames is not None:
                    try:
                        self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
                        self.sent += 1
                    except zmq.Again:
                        self.send_drops += 1  # PUSH without a consumer: drop, never block the bridge
                self.last_pulse_id = pulse_id
            monotonic = time.monotonic()
            if monotonic >= next_summary:
                logger.info("%s", self.summary())
                next_summary = monotonic + _SUMMARY_INTERVAL_S
            if duration is not None and monotonic - started >= duration:
                break
            next_tick += period
            if next_tick < monotonic:  # late: skip the missed ticks (the pulse ids show the gap)
                next_tick = monotonic + period - (monotonic - next_tick) % period
            self._stop.wait(max(0.0, next_tick - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._metadata_wanted.put(None)

    def summary(self) -> str:
        connected = sum(1 for state in self.states.values() if state.connected)
        absent = sum(state.absent_sent for state in self.states.values())
        disconnects = sum(state.disconnects for state in self.states.values())
        return (f"sent {self.sent} messages (last pulse id {self.last_pulse_id}), {connected}/{len(self.states)} "
                f"PVs connected, {absent} absent values sent, {disconnects} disconnects, "
                f"{self.send_drops} messages dropped (no consumer)")

    def close(self) -> None:
        self.stop()
        if self._metadata_thread is not None:
            self._metadata_thread.join(timeout=2 * _METADATA_TIMEOUT_S + 1)
        for pv in self._pvs:
            try:
                pv.clear_callbacks()
                pv.disconnect()
            except Exception:  # libca may already be finalizing
                logger.debug("could not disconnect %s", getattr(pv, "pvname", pv), exc_info=True)
        self._pvs.clear()
        if self.socket is not None:
            self.socket.close()
        if self.context is not None:
            self.context.term()


def main(argv: Sequence[str] | None = None) -> int:
    """``sf_bsread_ca_bridge --pv NAME ... --port P``; returns the exit code."""
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    args = parse_args("sf_bsread_ca_bridge", "Bring EPICS Channel Access PVs into a bsread stream.",
                      BRIDGE_OPTIONS, BRIDGE_ENV_PREFIX, argv)
    process.configure_logging(args.log_level)
    names = list(args.pvs or [])
    if args.pv_file:
        try:
            names += read_pv_file(args.pv_file)
        except OSError as error:
            logger.error("cannot read --pv-file: %s", error)
            return ExitCode.CONFIGURATION
    if args.port is None:
        logger.error("--port is required")
        return ExitCode.CONFIGURATION
    changes = prepare_client_environment(os.environ)
    if changes:
        logger.info("no CA address list configured: searching loopback only (%s)", ", ".join(changes))
    try:
        bridge = Bridge(names, args.port, args.bind, args.mode, args.rate, args.pulse_id_pv)
    except ValueError as error:
        logger.error("%s", error)
        return ExitCode.CONFIGURATION

    process.stop_on_signals(lambda name: bridge.stop())
    process.survive_hangup("the terminal is gone: the bridge goes on (SIGTERM stops it)")
    try:
        address = bridge.open()
    except zmq.ZMQError as error:
        logger.error("cannot bind: %s", error)
        return process.start_error_code(error)  # a port in use: 2 (process.ExitCode)
    try:
        bridge.connect()
        process.print_ready({"address": address, "mode": args.mode, "rate": args.rate,
                             "pvs": bridge.pv_names, "pulse_id_pv": args.pulse_id_pv})
        bridge.run()
        logger.info("%s", bridge.summary())
    finally:
        bridge.close()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
