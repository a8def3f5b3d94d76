"""The CA gateway's server: real EPICS records in a pythonSoftIOC process, served by EPICS base's rsrv.

Why (docs/dependencies.md; measured: docs/performance.md, "Current figures" ->
"CA fan-out"): Python sets each record once per update and EPICS base's C
server does the fan-out to every client; records bring the fields clients and
Phoebus ask for (.SEVR .STAT .PREC .EGU .DESC .NORD ...), EPICS access
security, and the data types EPICS base tools read right. Every decision
(which record serves which channel, alarms, status values, rates, when to
restart) is in ``ca/policy.py``; this module is the shell that carries them
out.

**Channel set changes without a restart.** Records exist before
``iocInit``, so each IOC starts with a pool of spare records
(``policy.SparePool``) besides the records of its channels, and every
channel's PV names are EPICS aliases of records with internal names
(``NAME:_CH17``). A new channel is served by a spare under its own name, an
alias created at run time (``dbCreateAlias``: only adds a name to the IOC's
lookup table, under its lock); a removed channel stays INVALID/DISABLE; a
retype its record holds is served on; a retype no running record holds moves
the PV name to a spare of the new type once the header has been still
(``policy.resolve_unheld``; :class:`_Names` says why a name is unlinked and
never freed), and the old record keeps its clients, INVALID/DISABLE. No
connected client of any other PV notices. Only what no spare can hold either
(a waveform longer than a spare, a second such retype of a channel that moved
already, a used-up pool) needs a new IOC: the IOC tells the supervisor what
the next IOC must hold, and exits with ``RESTART_EXIT_CODE``.

**The restart protocol** is ``ca/supervisor.py``'s: this process is
started with ``go {state}`` on its stdin (:func:`wait_for_go`), prints
``READY {json}`` once serving and, before it exits with
``RESTART_EXIT_CODE`` to be replaced, ``NEXT {state}``.

Processes: ``sf_bsread_gateway ...`` -> ``supervisor.supervise`` -> ``... --ioc-child``
-> :func:`serve` (ingest thread, status poller, EPICS threads, and the apply
loop in the main thread).
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sf_bsread_writer import process
from sf_bsread_writer.ca.camapping import (
    IocRecord,
    exact_text,
    ioc_value,
    record_from_json,
    record_to_json,
)
from sf_bsread_writer.ca.policy import (
    GATEWAY_STATS_PVS,
    MAX_RECORD_NAME,
    ChannelPlan,
    RETYPED_DESC,
    ChannelState,
    NameMove,
    PlanChange,
    ServedChannel,
    Settle,
    SparePool,
    absence_overdue,
    as_long_string,
    records_for_the_next_ioc,
    resolve_unheld,
    spare_record_specs,
    spare_slots,
    status_values,
    stream_stale,
    update_interval,
)
from sf_bsread_writer.ca.supervisor import RESTART_EXIT_CODE, AccessSecurityError
from sf_bsread_writer.rates import RateEstimator

__all__ = ["serve", "acf_text", "wait_for_go"]

logger = logging.getLogger(__name__)

#: How long a new IOC waits for the stream's first message before it starts with the status PVs only.
FIRST_MESSAGE_WAIT_S = 5.0
# The placeholder value of a record before its channel's first value (shown INVALID/UDF).
_EMPTY = {"ai": 0.0, "longin": 0, "mbbi": 0, "stringin": "", "lsi": ""}
_MBB_PREFIXES = ("ZR", "ON", "TW", "TH", "FR", "FV", "SX", "SV", "EI", "NI", "TE", "EL", "TV", "TT", "FT", "FF")


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


def wait_for_go() -> dict[str, Any] | None:
    """In an IOC child: load EPICS, then wait for the supervisor's ``go {state}`` (None: told to end)."""
    _skip_setuptools_at_import()
    _name_library_callers_by_frame()
    import softioc.asyncio_dispatcher  # noqa: F401  (the slow imports, done while waiting)
    import softioc.builder  # noqa: F401
    import softioc.softioc  # noqa: F401

    _check_fields_at_kept_positions()
    line = sys.stdin.readline().strip()
    if not line.startswith("go"):
        return None
    try:
        state = json.loads(line[2:].strip() or "{}")
    except ValueError:
        logger.warning("unreadable start state from the supervisor: starting without it")
        return {}
    return state if isinstance(state, dict) else {}


def _skip_setuptools_at_import() -> None:
    """Spare the IOC ~1 s of its start: epicscorelibs needs ``setuptools_dso.find_dso`` and friends (its
    ``runtime`` module: standard library only), but that package's ``__init__`` imports setuptools and
    pkg_resources to build extensions, which an IOC never does (``python -X importtime``: 0.93 of the
    1.3 s that importing softioc took). The package is registered with its runtime functions; anything
    else asked of it loads the whole package as before."""
    import importlib
    import importlib.util
    import types

    if "setuptools_dso" in sys.modules:
        return
    spec = importlib.util.find_spec("setuptools_dso")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType("setuptools_dso")
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "setuptools_dso"
    package.__spec__ = spec
    package.__file__ = spec.origin

    def load_all(name: str) -> Any:
        if name.startswith("__"):  # inspect and friends probe every module for these
            raise AttributeError(name)
        del package.__getattr__  # type: ignore[attr-defined]
        spec.loader.exec_module(package)  # the real __init__, into the same module object
        return getattr(package, name)

    package.__getattr__ = load_all  # type: ignore[attr-defined]
    sys.modules["setuptools_dso"] = package
    try:
        runtime = importlib.import_module("setuptools_dso.runtime")
    except ImportError:
        del sys.modules["setuptools_dso"]
        return
    package.find_dso, package.dylink_prepare_dso = runtime.find_dso, runtime.dylink_prepare_dso


def _name_library_callers_by_frame() -> None:
    """Spare each IOC process ~0.12 s of CPU at its start (of 0.27 s for loading softioc): where a library
    name is relative, setuptools_dso's ``find_dso`` and ``dylink_prepare_dso`` find the caller's package by
    ``inspect.stack()[2]`` (``_auto_pkg``), which reads the source file of every frame on the stack and
    matches it to a module, nine times while softioc loads and starts. The caller's module is the name in
    that frame's globals, as ``inspect.getmodule`` finds it for any imported module; looked up directly.
    A setuptools_dso without ``_auto_pkg`` is left as it is."""
    try:
        from setuptools_dso import runtime
    except ImportError:
        return
    if callable(getattr(runtime, "_auto_pkg", None)):
        runtime._auto_pkg = _caller_package


def _caller_package() -> str:
    # 0: this function, 1: find_dso / dylink_prepare_dso / import_dsoinfo, 2: their caller (inspect.stack()[2]).
    return sys._getframe(2).f_globals["__name__"]


def _check_fields_at_kept_positions() -> None:
    """Spare each IOC ~0.09 s of CPU at its start (of 0.11 s for building 100 channels' records and the
    spares): epicsdbbuilder checks every field value a record is built with by EPICS' ``dbVerify``, after
    walking its record type's field list to that field, one ctypes call per field passed, for every field of
    every record. Here the entry positioned at a field is kept, one per record type and field, and
    ``dbVerify`` runs on it: the same check (an unknown field name raises AttributeError, a value EPICS
    refuses AssertionError), without the walks. An epicsdbbuilder without this validator is left as it is."""
    try:
        from epicsdbbuilder import dbd, mydbstatic
    except ImportError:
        return
    validator = getattr(dbd, "ValidateDbField", None)
    if validator is None or not hasattr(validator, "ValidFieldValue") or not hasattr(dbd, "DBEntry"):
        return

    def valid_field_value(self: Any, name: str, value: Any) -> None:
        self.ValidFieldName(name)
        kept = self.__dict__.setdefault("_sf_field_entries", {})
        entry = kept.get(name)
        if entry is None:
            entry = dbd.DBEntry(self.dbEntry)  # a copy on the same record type
            for field_name in entry.iterate_fields():
                if field_name == name:
                    break
            kept[name] = entry
        value = str(value)
        message = mydbstatic.dbVerify(entry, value)
        assert message is None, f"Can't write {value!r} to field {name}: {message}"  # as epicsdbbuilder's own

    validator.ValidFieldValue = valid_field_value


def _records_in(state: Mapping[str, Any]) -> dict[str, IocRecord]:
    """The records earlier IOCs served, by channel name (a bad entry is skipped: it only costs a restart)."""
    found = {}
    for name, data in (state.get("records") or {}).items():
        try:
            found[name] = record_from_json(data)
        except (TypeError, ValueError):
            logger.warning("start state: record of %s unreadable, ignored", name)
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
class _EllNode(ctypes.Structure):
    _fields_ = [("next", ctypes.c_void_p), ("previous", ctypes.c_void_p)]


class _EllList(ctypes.Structure):
    _fields_ = [("node", _EllNode), ("count", ctypes.c_int)]


class _DbEntry(ctypes.Structure):  # DBENTRY, dbStaticLib.h (public)
    _fields_ = [("pdbbase", ctypes.c_void_p), ("precordType", ctypes.c_void_p), ("pflddes", ctypes.c_void_p),
                ("precnode", ctypes.c_void_p), ("pinfonode", ctypes.c_void_p), ("pfield", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("indfield", ctypes.c_short)]


class _RecordNode(ctypes.Structure):  # dbRecordNode, dbBase.h (public)
    _fields_ = [("node", _EllNode), ("precord", ctypes.c_void_p), ("recordname", ctypes.c_char_p),
                ("infoList", _EllList), ("flags", ctypes.c_int), ("order", ctypes.c_uint),
                ("aliasedRecnode", ctypes.c_void_p)]


class _DbBase(ctypes.Structure):  # dbBase, dbBase.h (public), up to its name table
    _fields_ = [("lists", _EllList * 10), ("pathPvt", ctypes.c_void_p), ("ppvd", ctypes.c_void_p)]


class _PvdEntry(ctypes.Structure):  # PVDENTRY, dbStaticPvt.h
    _fields_ = [("node", _EllNode), ("precordType", ctypes.c_void_p), ("precnode", ctypes.c_void_p)]


class _PvdBucket(ctypes.Structure):  # dbPvdBucket, private to dbPvdLib.c (unchanged since EPICS 3.15)
    _fields_ = [("list", _EllList), ("lock", ctypes.c_void_p)]


class _Pvd(ctypes.Structure):  # dbPvd, private to dbPvdLib.c (unchanged since EPICS 3.15)
    _fields_ = [("size", ctypes.c_uint), ("mask", ctypes.c_uint), ("buckets", ctypes.POINTER(ctypes.c_void_p))]


_IS_ALIAS = 2  # DBRN_FLAGS_ISALIAS, dbBase.h


def _epics_base_version() -> str:
    from epicscorelibs import version

    return str(version.base_version)


def _names_layout_known() -> bool:
    """True for the EPICS base series whose dbBase/dbPvd layout the structures above copy (7.0: unchanged
    since 3.15). Another series: names are never unlinked (reading a moved field could crash the IOC), and a
    retype no record holds replaces the IOC as before."""
    return _epics_base_version().startswith("7.0.")


class _Names:
    """The PV names of the IOC's records (its record-name table, EPICS base ``dbPvdLib.c``): aliases are
    added (``dbCreateAlias``) and, to move a retyped channel's PV name to another record, unlinked.

    **Adding** (``dbCreateAlias``) puts a name in the table under its per-bucket lock; a CA search that
    comes later finds it.

    **Removing is not something EPICS offers a running IOC**, so names are unlinked, never freed:

    * ``dbDeleteRecord`` (and ``dbDeleteAliases``, which calls it) on an alias frees the table entry and
      the alias node, and frees the link fields of the record the alias names
      (``dbDeleteRecordLinks(precordType, precnode->precord)``: an alias node's ``precord`` is its
      record's), which a running record still uses;
    * a name lookup takes no lock but the table bucket's, and only while it walks the bucket:
      ``dbPvdFind`` returns the entry after unlocking, and its callers (``dbFindRecordPart``, under
      ``dbChannelTest``: rsrv's UDP search and QSRV's; ``dbChannelCreate``: a client's channel) then read
      the entry and the node it points at. No other lock (``dbLockSetGblLock`` orders lock sets, the
      scan lock a record) is held there, so whatever is freed may be read after it is freed.

    ``unlink`` takes the name's entry out of its bucket under that bucket's lock (the lock ``dbPvdFind``
    walks it under: no lookup sees a half-changed list) and frees nothing: a lookup that found the
    entry just before reads valid memory and connects to the old record (a client that searched in the
    same microseconds as the move: it sees the old record, INVALID/DISABLE, as a client connected before
    does). Each unlinked name keeps ~100 bytes (its table entry, alias node and name) for the rest of
    the IOC; ``policy.resolve_unheld`` moves a channel at most once per IOC and only onto a spare, so
    that is bounded by the spare pool. Only aliases are unlinked (every channel PV is one: a channel's
    record has an internal name, ``NAME:_CH17``), never a record's own name (its ``NAME`` field, by which
    pythonSoftIOC's ``set_field`` finds it, stays its). The bucket layout is private to ``dbPvdLib.c``;
    it is checked (table size a power of two, mask, the entry found under the lock points at the node
    ``dbFindRecord`` found) and a mismatch refuses the move (the IOC is replaced, as before).
    """

    def __init__(self) -> None:
        from epicscorelibs.ioc import Com, dbCore

        self._db = dbCore
        self._com = Com
        self._base = ctypes.c_void_p.in_dll(dbCore, "pdbbase")
        dbCore.dbAllocEntry.restype = ctypes.c_void_p
        dbCore.dbAllocEntry.argtypes = [ctypes.c_void_p]
        dbCore.dbFindRecord.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        dbCore.dbFindRecord.restype = ctypes.c_long
        dbCore.dbCreateAlias.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        dbCore.dbCreateAlias.restype = ctypes.c_long
        dbCore.dbFreeEntry.argtypes = [ctypes.c_void_p]
        Com.epicsStrHash.argtypes = [ctypes.c_char_p, ctypes.c_uint]
        Com.epicsStrHash.restype = ctypes.c_uint
        Com.epicsMutexLock.argtypes = [ctypes.c_void_p]
        Com.epicsMutexLock.restype = ctypes.c_int
        Com.epicsMutexUnlock.argtypes = [ctypes.c_void_p]
        Com.ellDelete.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

    def add(self, record_name: str, alias: str) -> bool:
        entry = self._db.dbAllocEntry(self._base)
        try:
            if self._db.dbFindRecord(entry, record_name.encode()) != 0:
                return False
            return self._db.dbCreateAlias(entry, alias.encode()) == 0
        finally:
            self._db.dbFreeEntry(entry)

    def _node(self, name: str) -> _RecordNode | None:
        entry = self._db.dbAllocEntry(self._base)
        try:
            if self._db.dbFindRecord(entry, name.encode()) != 0:
                return None
            address = _DbEntry.from_address(entry).precnode
            return _RecordNode.from_address(address) if address else None
        finally:
            self._db.dbFreeEntry(entry)

    def unlink(self, alias: str) -> bool:
        """Take the alias ``alias`` out of the name table (nothing freed: see the class docstring); True when
        it is gone. False, and nothing changed, for a record's own name or a table this code does not know."""
        node = self._node(alias)
        if node is None:
            return True
        if not node.flags & _IS_ALIAS:
            return False
        if not _names_layout_known():
            logger.error("EPICS base %s: its record-name table's layout is not the one this code knows (EPICS 7.0): "
                         "%s not moved", _epics_base_version(), alias)
            return False
        table = _DbBase.from_address(self._base.value).ppvd
        if not table:
            return False
        pvd = _Pvd.from_address(table)
        size = pvd.size
        if size < 256 or size & (size - 1) or pvd.mask != size - 1:
            logger.error("EPICS record-name table not as expected (size %d, mask %d): %s not moved", size,
                         pvd.mask, alias)
            return False
        bucket_address = pvd.buckets[self._com.epicsStrHash(alias.encode(), 0) & pvd.mask]
        if not bucket_address:
            return False
        bucket = _PvdBucket.from_address(bucket_address)
        node_address = ctypes.addressof(node)
        if self._com.epicsMutexLock(bucket.lock) != 0:  # epicsMutexLockOK
            return False
        try:
            current = bucket.list.node.next
            for _ in range(bucket.list.count):
                if not current:
                    break
                found = _PvdEntry.from_address(current)
                if found.precnode == node_address:
                    self._com.ellDelete(bucket_address + _PvdBucket.list.offset, current)
                    return True
                current = found.node.next
        finally:
            self._com.epicsMutexUnlock(bucket.lock)
        logger.error("EPICS record-name table: %s not found in its bucket: not moved", alias)
        return False


class _Records:
    """The EPICS records of one IOC: status PVs, one record (plus twins) per served channel, and spares."""

    def __init__(self, builder: Any, plan: ChannelPlan, name: str, status_pvs: Sequence[tuple[str, str, str]],
                 max_rate: float, writable: bool, on_max_rate: Any, spares: SparePool) -> None:
        self.builder = builder
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
        # A channel's records have internal names and its PV names are aliases (given by ``link_names``): an
        # alias can move to another record when the channel is retyped beyond its record (``move``).
        self.pv_names: list[tuple[str, str]] = []  # (record name, PV name)
        for number, channel in enumerate((*plan.channels, *plan.retired)):
            internal = f"{name}:_CH{number}"
            record = self._channel_record(builder, internal, channel.record,
                                          channel.record.description or _desc(channel.name))
            self.pv_names.append((internal, channel.pv))
            if channel.record.kind == "waveform" and len(channel.pv) + len(":SHAPE") <= MAX_RECORD_NAME:
                # The numpy shape of one value (the row shape in the HDF5 file).
                self.shapes[channel.pv] = builder.WaveformIn(internal + ":SHAPE", length=len(channel.record.shape),
                                                             datatype=np.int32,
                                                             DESC=_desc(f"numpy shape of {channel.name}"))
                self.pv_names.append((internal + ":SHAPE", channel.pv + ":SHAPE"))
            twin = (builder.stringIn(internal + "_STR", DESC=_desc(channel.name), TSE=-2)
                    if channel.record.exact_text else None)
            if twin is not None:
                self.pv_names.append((internal + "_STR", channel.pv + "_STR"))
            if channel.index >= 0:
                self.channels.append((channel, record, twin))
            self.by_pv[channel.pv] = (record, twin)
        # The spare records (policy.SparePool): unnamed until a new channel takes one.
        self.spares: dict[str, list[Any]] = {}
        for number, (slot, spec) in enumerate(spare_record_specs(spares.free)):
            spare_name = f"{name}:_SPARE{number}"
            if spec is None:
                record = builder.WaveformIn(spare_name, length=8, datatype=np.int32, DESC="spare shape record")
            else:
                record = self._channel_record(builder, spare_name, spec, "spare record")
            self.spares.setdefault(slot, []).append(record)
        self.names: _Names | None = None  # once the database is loaded (link_names)

    def link_names(self) -> None:
        """Give the channels' records their PV names (aliases), once the database is loaded, before iocInit."""
        self.names = _Names()
        for record_name, pv in self.pv_names:
            if not self.names.add(record_name, pv):
                logger.error("EPICS refused the alias %s of %s: not served", pv, record_name)

    def all_spares(self) -> list[tuple[str, Any]]:
        return [(slot, record) for slot, records in self.spares.items() for record in records]

    def show_shape(self, channel: ServedChannel) -> None:
        shape_record = self.shapes.get(channel.pv)
        if shape_record is not None:
            shape_record.set(np.asarray(channel.record.shape, dtype=np.int32))

    def serve_with_spare(self, channel: ServedChannel) -> bool:
        """A new channel served by spare records under its own names (aliases); False if EPICS refused."""
        return self._give_spares(channel)

    def move(self, move: NameMove) -> bool:
        """A retyped channel's PV names (``pv``, and ``pv_STR``, ``pv:SHAPE`` where its new type has them) move
        to spare records of its new type (``policy.resolve_unheld``); the old records keep their clients,
        INVALID/DISABLE (set by the caller), with DESC ``RETYPED_DESC``. False if EPICS refused a name."""
        old_record, old_twin = self.by_pv[move.old.pv]
        old_shape = self.shapes.get(move.old.pv)
        if move.new.record.kind != "waveform":
            self.shapes.pop(move.new.pv, None)  # its ":SHAPE" name stays on the old record, as its "_STR" does
        if not self._give_spares(move.new):
            return False
        for record in (old_record, old_twin, old_shape):
            if record is not None:
                record.set_field("DESC", RETYPED_DESC)
        return True

    def _give_spares(self, channel: ServedChannel) -> bool:
        """Spare records for ``channel`` (as ``policy.SparePool.take`` counted them), under its PV names."""
        if self.names is None:
            self.names = _Names()
        slots = spare_slots(channel.record)
        assert slots is not None, "the policy gives spares only to channels a spare holds"
        record = self.spares[slots[0]].pop()  # policy.SparePool.take counted them: they are there
        twin = self.spares["stringin"].pop() if channel.record.exact_text else None
        shape = self.spares["shape"].pop() if "shape" in slots else None
        names = [(record, channel.pv)]
        if twin is not None:
            names.append((twin, channel.pv + "_STR"))
        if shape is not None and len(channel.pv) + len(":SHAPE") <= MAX_RECORD_NAME:
            names.append((shape, channel.pv + ":SHAPE"))
        for target, alias in names:
            # A name another record has (a retyped channel's): unlinked first, then given to the spare.
            if not self.names.unlink(alias) or not self.names.add(target.name, alias):
                logger.error("EPICS refused the alias %s of %s: channel %s not served", alias, target.name,
                             channel.name)
                return False
        self.by_pv[channel.pv] = (record, twin)
        if shape is not None:
            self.shapes[channel.pv] = shape
        if twin is not None:
            twin.set_field("DESC", _desc(channel.name))
        if channel.record.kind == "mbbi":
            for number, prefix in enumerate(_MBB_PREFIXES):
                states = channel.record.enum_strings
                record.set_field(prefix + "ST", states[number] if number < len(states) else "")
        self.relabel(channel, None)
        return True

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
            record.set_field("DESC", new.description or _desc(channel.name))
        if new.kind in ("ai", "waveform") and (old is None or old.precision != new.precision):
            record.set_field("PREC", new.precision)

    @staticmethod
    def _channel_record(builder: Any, pv: str, spec: IocRecord, description: str) -> Any:
        # TSE -2: the record's time is the one handed to set() (the bsread timestamp), not the IOC's clock.
        common = {"DESC": description, "TSE": -2}
        if spec.unit and spec.kind in ("ai", "longin", "waveform"):  # the records with an EGU field
            common["EGU"] = spec.unit
        # Every update is posted, also an unchanged value: a new pulse is a new sample (MDEL -1, MPST Always),
        # but by an mbbi (no such field): a state is an event.
        if spec.kind == "ai":
            return builder.aIn(pv, PREC=spec.precision, MDEL=-1, ADEL=-1, **common)
        if spec.kind == "longin":
            return builder.longIn(pv, MDEL=-1, ADEL=-1, **common)
        if spec.kind == "mbbi":  # a spare mbbi gets 16 states, named when a channel takes it
            return builder.mbbIn(pv, *(spec.enum_strings or [""] * len(_MBB_PREFIXES)), **common)
        if spec.kind == "stringin":
            return builder.stringIn(pv, MPST="Always", APST="Always", **common)
        if spec.kind == "lsi":
            return builder.longStringIn(pv, length=spec.length, MPST="Always", APST="Always", **common)
        return builder.WaveformIn(pv, length=spec.length, datatype=spec.numpy_dtype, MPST="Always",
                                  APST="Always", PREC=spec.precision, **common)


def _desc(text: str) -> str:
    """A DESC field's 39 bytes of ``text``, cut at a character boundary."""
    return text.encode("utf-8")[:39].decode("utf-8", errors="ignore")


def serve(settings: Any, status_pvs: Sequence[tuple[str, str, str]], ingest: Any, poller: Any,
          state: Mapping[str, Any]) -> int:
    """The IOC process: build the records from the first message, iocInit, apply until stopped or replaced."""
    from softioc import alarm, asyncio_dispatcher, builder, softioc

    stop = threading.Event()
    restore = process.stop_on_signals(lambda name: stop.set())
    try:
        message = _first_message(ingest, stop)
        long_strings = set(state.get("long_strings", []))
        previous = _records_in(state)
        if message is not None:
            long_strings |= _long_strings_in(message)
        reserved = [f"{settings.name}:{suffix}" for suffix, _, _ in (*status_pvs, *GATEWAY_STATS_PVS)]
        plan = ChannelPlan.build(message.data_header if message else None, settings.prefix, reserved,
                                 frozenset(long_strings), previous).with_retired(previous, settings.prefix, reserved)
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
        spares = SparePool.default()
        records = _Records(builder, plan, settings.name, status_pvs, settings.max_rate,
                           settings.writable or settings.acf is not None, on_max_rate, spares)
        builder.LoadDatabase()
        records.link_names()
        try:
            acf = _install_access_security(settings.writable, settings.allow_hosts, settings.acf)
        except AccessSecurityError as error:
            logger.error("%s", error)
            return process.ExitCode.CONFIGURATION
        dispatcher = asyncio_dispatcher.AsyncioDispatcher()
        softioc.iocInit(dispatcher)
        if acf != settings.acf:
            os.unlink(acf)
        loop = _ApplyLoop(settings, records, plan, ingest, poller, alarm, long_strings, spares)
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
            "restarts": int(state.get("restarts", 0)),
            # How the ai/longin records are set: "batch" (C) unless asked for "set" or the poster is unusable.
            "record_updates": "batch" if loop.batch is not None else "set",
        })
        logger.info("gateway IOC serving %d channel PVs and %d status PVs", len(plan.channels),
                    len(records.status) + len(records.status_text))
        loop.mark_undefined()
        if message is not None:
            loop.header = message.data_header
            loop.apply(message)
        code = loop.run(stop)
        if code == RESTART_EXIT_CODE:
            next_state = {"long_strings": sorted(loop.long_strings),
                          "records": {name: record_to_json(record)
                                      for name, record in loop.records_for_the_next_ioc().items()}}
            sys.stdout.write("NEXT " + json.dumps(next_state) + "\n")
            sys.stdout.flush()
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


class _ScalarBatch:
    """The ``ai`` and ``longin`` records, updated in one call per message from C (``ca/_recordpost.c``); the
    default (``--record-updates batch``, docs/gateway.md).

    pythonSoftIOC's ``set`` processes the record: EPICS' callback thread takes the GIL from this loop and
    runs the device support in Python (~100 us and two thread switches a record update). Here the apply
    loop stages (value, alarm, timestamp) per record and ``flush`` hands the round to the C Poster, which
    merges it into what its own EPICS thread has not posted yet (the newest value of a record wins, as a
    monitor queue does) and returns at once: the loop never waits for EPICS. That thread runs at the
    priority of the thread that processes records in softioc's path, above rsrv's threads, so that where
    EPICS threads are real-time ten busy clients cannot starve the posting (docs/performance.md, issue 22).
    The last staged values are kept, so that a record EPICS processes for another reason (a field set by
    ``relabel``: softioc's device support then writes its own stale copy) is put right at once
    (``repost``).
    """

    def __init__(self, records: Sequence[Any]) -> None:
        from sf_bsread_writer.ca import _recordpost

        _check_abi(getattr(_recordpost, "EPICS_ABI", ""))
        self.index = {id(record): number for number, record in enumerate(records)}
        self.poster = _recordpost.Poster([record.name for record in records])
        count = len(records)
        self.values = np.zeros(count)
        self.severities = np.zeros(count, dtype=np.int16)
        self.statuses = np.zeros(count, dtype=np.int16)
        self.stamps = np.full(count, np.nan)
        self.staged: list[int] = []

    @classmethod
    def of(cls, records: Sequence[Any]) -> "_ScalarBatch | None":
        """A batch of ``records``, or None where the compiled part is not built or was built for another
        EPICS ABI (softioc's set then, record by record)."""
        try:
            return cls(records)
        except ImportError as error:
            logger.warning("record updates: the compiled poster is not usable (%s); records are set one by one "
                           "through pythonSoftIOC (more CPU a record update)", error)
            return None

    def stage(self, number: int, value: Any, severity: int, status: int, stamp: float | None) -> None:
        self.values[number] = value
        self.severities[number] = severity
        self.statuses[number] = status
        self.stamps[number] = np.nan if stamp is None else stamp
        self.staged.append(number)

    def flush(self) -> int:
        """Hand what was staged to the Poster's thread (merged with what it has not posted yet)."""
        if not self.staged:
            return 0
        numbers = np.asarray(self.staged, dtype=np.int32)
        self.staged.clear()
        return self.poster.post(numbers, self.values[numbers], self.severities[numbers], self.statuses[numbers],
                                self.stamps[numbers])

    def wait_posted(self, timeout: float = 5.0) -> bool:
        """Until everything flushed has been posted (benchmarks and tests; the apply loop never waits)."""
        return self.poster.wait_posted(timeout)

    def repost(self, record: Any) -> None:
        number = self.index.get(id(record))
        if number is not None and not np.isnan(self.stamps[number]):
            self.staged.append(number)
            self.flush()


def _check_abi(built_for: str) -> None:
    """ImportError unless the compiled poster was built for the epicscorelibs ABI in use (it writes into
    EPICS' record structures: another EPICS release may lay them out differently)."""
    from epicscorelibs.version import base_version

    running = ".".join(base_version.split(".")[:5])
    if built_for != running:
        raise ImportError(f"built for epicscorelibs ABI {built_for or 'unknown'}, running {running}")


class _ApplyLoop:
    """The main thread of the IOC: newest message -> records, at most max_rate times a second; status at 1 Hz."""

    def __init__(self, settings: Any, records: _Records, plan: ChannelPlan, ingest: Any, poller: Any, alarm: Any,
                 long_strings: set[str], spares: SparePool) -> None:
        self.settings = settings
        self.long_strings = set(long_strings)
        self.records = records
        self.plan = plan
        self.spares = spares
        self.unheld: tuple[ServedChannel, ...] = ()  # what the running records cannot serve (a restart is due)
        self.long_pending: tuple[ServedChannel, ...] = ()  # STRING channels that sent a value over 39 bytes
        self.settle = Settle()
        self.moved: set[str] = set()  # channels whose PV names moved in this IOC (at most once each)
        self.ingest = ingest
        self.poller = poller
        self.alarm = alarm
        self.header: Any = None  # the data header applied last (compared with DataHeader.same_as)
        self.states = {channel.name: ChannelState() for channel in plan.channels}
        self.stale = False
        self.newest_pulse_id: int | None = None
        self.decode_errors = 0
        self.rates = RateEstimator(window=5.0)
        self.applied = 0
        self.record_sets = 0
        self.own_rates = RateEstimator(window=5.0)
        scalars = [records.by_pv[channel.pv][0] for channel in (*plan.channels, *plan.retired)
                   if channel.record.kind in ("ai", "longin")]
        scalars += [record for slot, record in records.all_spares() if slot in ("ai", "longin")]
        self.batch = _ScalarBatch.of(scalars) if settings.record_updates == "batch" else None

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
            if self.settle.due(now) and not self.move_names():
                waiting = (*self.unheld, *self.long_pending)
                logger.info("%d channel(s) need records this IOC does not have (%s): the IOC is replaced",
                            len(waiting), ", ".join(c.name for c in waiting[:5]))
                return RESTART_EXIT_CODE
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
                self.follow(message.data_header, started)
            for older, older_received_at, indices in messages[:-1]:
                if older.data_header.same_as(self.header):
                    self.apply(older, only=indices, received_at=older_received_at)
            self.apply(message, received_at=received_at)
            next_due = started + update_interval(self.settings.max_rate, self.settings.total_rate,
                                                 len(self.plan.channels))
        return process.ExitCode.OK

    def follow(self, header: Any, now: float) -> None:
        """A new data header: served by the running and spare records where they hold it; for the rest a
        replacement IOC is due once the header has been still (``policy.Settle``)."""
        reserved = [f"{self.settings.name}:{s}" for s in (*self.records.status, *self.records.stats)]
        wanted = ChannelPlan.build(header, self.settings.prefix, reserved, frozenset(self.long_strings))
        self.header = header
        if wanted.key == self.plan.key:
            return
        change = self.plan.adopt(wanted, self.spares)
        self.serve(change)
        self.unheld = change.unheld
        if change.unheld:
            self.settle.wanted(now)
        elif not self.long_pending:
            self.settle.cancel()

    def move_names(self) -> bool:
        """The channels this IOC's records cannot serve, served by moving their PV names to spare records of
        their new types (``policy.resolve_unheld``); False when the IOC must be replaced instead.

        A moved channel's old records keep the clients connected to them, INVALID/DISABLE with their last
        values; its new record is INVALID/UDF until its first value, which the next message brings."""
        waiting = (*self.unheld, *(as_long_string(channel) for channel in self.long_pending))
        resolution = resolve_unheld(self.plan, waiting, self.spares, self.moved)
        if resolution.replace:
            return False
        now = time.time()
        invalid, disabled = self.alarm.INVALID_ALARM, self.alarm.DISABLE_ALARM
        for move in resolution.moves:
            old_record, old_twin = self.records.by_pv[move.old.pv]
            old_shape = self.records.shapes.get(move.old.pv)
            if not self.records.move(move):
                return False
            state = self.states.get(move.old.name)
            if state is not None and state.value is not None:
                self._set(old_record, state.value, invalid, disabled, state.stamp)
            for target in (old_twin, old_shape):
                if target is not None:
                    self._set(target, target.get(), invalid, disabled, now)
            self.states[move.new.name] = ChannelState()  # the old type's values are not the new record's
            record, twin = self.records.by_pv[move.new.pv]
            self._set(record, self._empty(move.new.record), invalid, self.alarm.UDF_ALARM, now)
            if twin is not None:
                self._set(twin, "", invalid, self.alarm.UDF_ALARM, now)
            self.records.show_shape(move.new)
            logger.info("channel %s retyped beyond its record (%s -> %s): its PV name moved to a spare record "
                        "(%s); clients connected to the old record see it INVALID/DISABLE until they reconnect",
                        move.new.name, move.old.record.kind, move.new.record.kind, record.name)
        self._flush()
        self.moved |= {move.new.name for move in resolution.moves}
        self.plan = resolution.plan
        self.records.channels = [(channel, *self.records.by_pv[channel.pv]) for channel in self.plan.channels]
        self.unheld, self.long_pending = (), ()
        self.settle.cancel()
        return True

    def mark_undefined(self) -> None:
        """Every channel and spare INVALID/UDF until its first value: a record's initial 0 must not look like data."""
        now = time.time()
        targets = []
        for channel, record, twin in self.records.channels:
            self.records.show_shape(channel)
            targets += [(record, self._empty(channel.record)), (twin, "")]
        for channel in self.plan.retired:  # no longer sent when this IOC started: served if it comes back
            record, twin = self.records.by_pv[channel.pv]
            self.records.show_shape(channel)
            self._set(record, self._empty(channel.record), self.alarm.INVALID_ALARM, self.alarm.DISABLE_ALARM, now)
            if twin is not None:
                self._set(twin, "", self.alarm.INVALID_ALARM, self.alarm.DISABLE_ALARM, now)
        for slot, record in self.records.all_spares():
            if slot != "shape":
                targets.append((record, "" if slot in ("stringin", "lsi") else
                                np.zeros(0) if slot.startswith("waveform") else 0))
        for target, value in targets:
            if target is not None:
                self._set(target, value, self.alarm.INVALID_ALARM, self.alarm.UDF_ALARM, now)
        self._flush()

    @staticmethod
    def _empty(record: IocRecord) -> Any:
        if record.kind == "waveform":
            return np.zeros(0, dtype=record.numpy_dtype)
        return _EMPTY.get(record.kind, 0)

    def serve(self, change: PlanChange) -> None:
        """Serve ``change.plan``: new channels by spare records (aliases), the rest by the records this IOC has.
        No client is disconnected. Channels no longer sent (or retyped beyond their record) go
        INVALID/DISABLE with their last value."""
        plan = change.plan
        added = {channel.pv for channel in change.added}
        refused = {channel.pv for channel in change.added if not self.records.serve_with_spare(channel)}
        before = {channel.pv: channel for channel in self.plan.channels}
        for channel in plan.channels:
            if channel.pv not in added and before.get(channel.pv) != channel:
                self.records.relabel(channel, before.get(channel.pv))
                if self.batch is not None:  # setting a field processed the record: softioc wrote its stale copy
                    self.batch.repost(self.records.by_pv[channel.pv][0])
            self.states.setdefault(channel.name, ChannelState())
        for channel in plan.retired:
            if channel.pv in before:
                record, _ = self.records.by_pv[channel.pv]
                state = self.states[channel.name]
                self._set(record, state.value, self.alarm.INVALID_ALARM, self.alarm.DISABLE_ALARM, state.stamp)
        if refused:
            plan = ChannelPlan(tuple(c for c in plan.channels if c.pv not in refused), plan.skipped, plan.retired)
        self.records.channels = [(channel, *self.records.by_pv[channel.pv]) for channel in plan.channels]
        for channel in change.added:
            if channel.pv not in refused:
                record, twin = self.records.by_pv[channel.pv]
                self._set(record, self._empty(channel.record), self.alarm.INVALID_ALARM, self.alarm.UDF_ALARM,
                          time.time())
        self._flush()
        logger.info("the stream's channels changed: %d served by the running IOC (%d new on spare records, "
                    "%d no longer sent, %d waiting for records: a spare, or a new IOC)", len(plan.channels), len(change.added) - len(refused),
                    len(plan.retired), len(change.unheld))
        self.plan = plan

    def records_for_the_next_ioc(self) -> dict[str, IocRecord]:
        return records_for_the_next_ioc(self.plan, (*self.unheld, *self.long_pending))

    def apply(self, message: Any, only: frozenset[int] | None = None, received_at: float | None = None) -> None:
        """Every served channel of ``message`` into its record (absent values keep the last one).

        ``only``: of an older message of the same header, just these channel indices (sparse channels
        the newer messages lack, ``_Ingest.take_messages``), in their pulses' order.
        ``received_at``: when the ingest received it (monotonic): a channel's period is measured in
        arrival times, whenever its values get applied.
        """
        alarm = self.alarm
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
                self._absent(record, state, now)
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
                self._absent(record, state, now)
                continue
            served, truncated = ioc_value(channel.record, value)
            if truncated and channel.record.kind == "stringin" and channel.name not in self.long_strings:
                self.long_strings.add(channel.name)  # the next IOC serves it whole (a long string)
                self.long_pending = (*self.long_pending, channel)
                self.settle.wanted(now)
            severity, status = (alarm.MINOR_ALARM, alarm.SOFT_ALARM) if truncated else (alarm.NO_ALARM,
                                                                                        alarm.NO_ALARM)
            upstream = self._upstream_severity(message, channel)
            if upstream > severity:  # the IOC's own alarm, carried by the bridge: LINK, as a record reading it
                severity, status = upstream, alarm.LINK_ALARM
            self._set(record, served, severity, status, stamp)
            if twin is not None:
                self._set(twin, exact_text(value), severity, status, stamp)
            state.present(served, stamp, arrived)
        self._flush()
        if only is None:
            self.newest_pulse_id = message.pulse_id
            self.applied += 1

    def _flush(self) -> None:
        if self.batch is not None:
            try:
                self.batch.flush()
            except Exception:  # a record EPICS cannot take must not stop the others of the next round
                logger.exception("posting the scalar records failed")

    def _upstream_severity(self, message: Any, channel: ServedChannel) -> int:
        """The severity (0..3) in the channel's ``.SEVR`` companion, 0 when it has none or it is unreadable."""
        index = channel.severity_index
        if index is None or not message.is_present(index):
            return 0
        try:
            return min(3, max(0, int(np.asarray(message.value(index)).reshape(-1)[0])))
        except Exception:  # a malformed companion costs the alarm, not the value
            return 0

    def _absent(self, record: Any, state: ChannelState, now: float) -> None:
        """The latest present value stays, with its own timestamp, until it is older than expected."""
        if absence_overdue(state, now):
            self._set(record, state.value, self.alarm.INVALID_ALARM, self.alarm.TIMEOUT_ALARM, state.stamp)

    def _set(self, record: Any, value: Any, severity: int, status: int, stamp: float | None) -> None:
        if value is None:
            return
        number = self.batch.index.get(id(record)) if self.batch is not None else None
        if number is not None:  # sent with the others of this round by _flush
            self.batch.stage(number, value, severity, status, stamp)
            self.record_sets += 1
            return
        try:
            record.set(value, severity=severity, alarm=status, timestamp=stamp)
            self.record_sets += 1
        except Exception:  # one record's trouble must not stop the others
            logger.exception("record %s: set failed", record.name)

    def _status(self, now: float) -> None:
        alarm = self.alarm
        last = self.ingest.last_receive_monotonic
        if stream_stale(last, now) and not self.stale:
            self.stale = True
            for channel, record, twin in self.records.channels:
                state = self.states[channel.name]
                if state.value is not None:
                    self._set(record, state.value, alarm.INVALID_ALARM, alarm.COMM_ALARM, state.stamp)
            self._flush()
        self.rates.add(now, self.ingest.received)
        own = {"PULSE_ID": self.newest_pulse_id, "CHANNELS": len(self.plan.channels),
               "IDLE_S": None if last is None else now - last, "RATE": self.rates.rate()}
        poller = self.poller
        buffer = age = None
        if poller is not None and poller.latest is not None and poller.latest_monotonic is not None:
            buffer, age = poller.latest.status_pv_values(), now - poller.latest_monotonic
        stamp = time.time()
        self._gateway_statistics(now, stamp)
        max_rate = self.records.status.get("MAX_RATE")
        if max_rate is not None and max_rate.get() != self.settings.max_rate:
            max_rate.set(self.settings.max_rate, process=False)
        alarms = {"COMM": alarm.COMM_ALARM, "UDF": alarm.UDF_ALARM}
        for suffix, shown in status_values(buffer, age, poller is not None and poller.expected, own).items():
            record = self.records.status.get(suffix)
            if record is None:
                continue
            text_record = self.records.status_text.get(suffix)
            if shown.value is None:
                for target in (record, text_record):
                    current = target.get() if target is not None else None
                    if current is not None:
                        target.set(current, severity=alarm.INVALID_ALARM, alarm=alarms[shown.alarm], timestamp=stamp)
                continue
            record.set(shown.value, timestamp=stamp)
            if text_record is not None:
                text_record.set(str(int(shown.value)), timestamp=stamp)

    def _gateway_statistics(self, now: float, stamp: float) -> None:
        """NAME:CA_CLIENTS ... from EPICS base's own CA server counters and this loop's."""
        clients, channels = _ca_server_counts()
        self.own_rates.add(now, self.applied, self.record_sets)
        rates = self.own_rates.rates() or (0.0, 0.0)
        values = {"CA_CLIENTS": clients, "CA_CHANNELS": channels, "APPLIED_S": rates[0],
                  "PV_UPDATES_S": rates[1], "SKIPPED": float(max(0, self.ingest.received - self.applied)),
                  "FEED_REPLACED": float(self.ingest.sockets_replaced), "FEED_OVERSIZE": float(self.ingest.oversize),
                  "FEED_RECONNECTS": float(self.ingest.reconnects), "FEED_REJECTED": float(self.ingest.rejected),
                  "FEED_STATUS_REJECTED": float(self.ingest.status_rejected)}
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
