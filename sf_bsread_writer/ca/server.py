"""The caproto pieces of the CA gateway: a hardened server context and PVs that follow a stream.

Three things here are deliberately different from caproto 1.3.0's defaults:

* **A client disconnecting under load must not stop the server.** caproto
  iterates the live ``deque`` of subscriptions of a PV while it awaits the
  per-circuit queue; when a client disconnects in between, the deque shrinks
  and the iteration raises ``RuntimeError: deque mutated during iteration``,
  which ends ``Context.run`` for every client. :class:`GatewayContext`
  iterates over snapshots, skips circuits that are gone, and survives any
  error of a single update. The per-circuit queue of :class:`GatewayCircuit`
  never blocks the shared loop on one slow client: when it is full the
  oldest update is dropped (caproto's own "newest news first" policy).
* **Access rules use the TCP peer address.** A CA client names its host in a
  ``HostNameRequest``; anyone can claim any name. :class:`GatewayCircuit`
  keeps the peer IP address as the host that :class:`AccessPolicy` checks.
* **Values are decoded lazily.** A PV nobody subscribes to only remembers
  *where* its newest value is (message, index); it is decoded when a client
  reads it. So the cost of the gateway grows with what clients watch, not
  with the width of the stream.

Import this module only after the CAPROTO_SERVER_* tuning variables are in
the environment: caproto reads them when ``caproto.server.common`` is first
imported (``gateway.main`` takes care of it).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import caproto as ca
import numpy as np
from caproto import AccessRights, AlarmSeverity, AlarmStatus, SubscriptionType
from caproto.asyncio.server import Context as _AsyncioContext
from caproto.asyncio.server import VirtualCircuit as _AsyncioCircuit
from caproto.server import common as _server_common
from caproto.server.server import (
    ChannelByte,
    ChannelData,
    ChannelDouble,
    ChannelFloat,
    ChannelInteger,
    ChannelShort,
    ChannelString,
)

from sf_bsread_writer.bsread.spec import ProtocolError
from sf_bsread_writer.ca.camapping import (
    MAX_STRING_BYTES,
    CaMapping,
    fits_dbr_string,
    map_channel,
    to_ca_value,
)

__all__ = [
    "AccessPolicy",
    "GatewayContext",
    "GatewayCircuit",
    "StreamPVs",
    "StatusPV",
    "make_pv",
    "EPICS_EPOCH_OFFSET",
    "ALARM_ABSENT",
    "ALARM_REMOVED",
    "ALARM_STALE",
    "ALARM_DECODE_ERROR",
    "ALARM_TRUNCATED",
    "caproto_tuning",
]

logger = logging.getLogger(__name__)

#: Seconds from the Unix epoch (bsread) to the EPICS epoch (1990-01-01).
EPICS_EPOCH_OFFSET = 631152000

# (severity, status) of each way a value can be unfit to be shown as fresh.
ALARM_NONE = (AlarmSeverity.NO_ALARM, AlarmStatus.NO_ALARM)
#: The channel is in the data header but its value is absent from the newest message.
ALARM_ABSENT = (AlarmSeverity.INVALID_ALARM, AlarmStatus.UDF)
#: The channel is no longer in the stream's data header.
ALARM_REMOVED = (AlarmSeverity.INVALID_ALARM, AlarmStatus.DISABLE)
#: No message from the buffer for a while (buffer or source stopped).
ALARM_STALE = (AlarmSeverity.INVALID_ALARM, AlarmStatus.COMM)
#: The value part could not be decoded.
ALARM_DECODE_ERROR = (AlarmSeverity.INVALID_ALARM, AlarmStatus.READ)
#: A text longer than the long-string PV holds was cut.
ALARM_TRUNCATED = (AlarmSeverity.MINOR_ALARM, AlarmStatus.SOFT)

_VALUE_EVENT = SubscriptionType.DBE_VALUE | SubscriptionType.DBE_LOG
_ALARM_EVENT = SubscriptionType.DBE_ALARM


class _QuietRefusedBeacons(logging.Filter):
    """Beacons to a loopback port where no repeater listens are refused: that is normal, not an error.

    caproto logs each such beacon as an ERROR with a traceback; EPICS base
    servers stay silent. Other beacon failures are still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to send beacon") or not record.exc_info:
            return True
        error = record.exc_info[1]
        return not isinstance(getattr(error, "__cause__", None), ConnectionRefusedError)


logging.getLogger("caproto.ctx").addFilter(_QuietRefusedBeacons())


def caproto_tuning() -> dict[str, float]:
    """The batching constants caproto actually uses (read at its import)."""
    return {
        "CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC": _server_common.HIGH_LOAD_TIMEOUT,
        "CAPROTO_SERVER_MAX_LATENCY_SEC": _server_common.MAX_LATENCY,
    }


def epics_timestamp(sec: int, ns: int) -> ca.TimeStamp:
    """A bsread (Unix) timestamp as an EPICS TimeStamp (same instant)."""
    return ca.TimeStamp(int(sec) - EPICS_EPOCH_OFFSET, int(ns))


# --------------------------------------------------------------------------
# Access
# --------------------------------------------------------------------------
@dataclass
class AccessPolicy:
    """Who may write: nobody unless ``writable``; then only ``allow_hosts`` (IP addresses) if given.

    Only PVs created with ``writable=True`` (the gateway's controls such as
    ``NAME:MAX_RATE``) can ever be written: stream PVs mirror the stream,
    a put would be overwritten by the next message.
    """

    writable: bool = False
    allow_hosts: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.allow_hosts = frozenset(_normalize_host(host) for host in self.allow_hosts)

    def rights(self, peer_host: str | None, pv_writable: bool) -> AccessRights:
        if not (self.writable and pv_writable):
            return AccessRights.READ
        if self.allow_hosts and _normalize_host(peer_host or "") not in self.allow_hosts:
            return AccessRights.READ
        return AccessRights.READ | AccessRights.WRITE


def _normalize_host(host: str) -> str:
    """``::ffff:10.0.0.1`` and ``10.0.0.1`` are the same peer."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# --------------------------------------------------------------------------
# Server context and circuit (the narrow patches of caproto 1.3.0)
# --------------------------------------------------------------------------
class _NewestWinsQueue(asyncio.Queue):
    """A bounded queue whose ``put`` never waits: when full, the oldest item is dropped.

    caproto awaits ``circuit.subscription_queue.put`` from the one loop that
    serves every client; with a plain bounded queue, one client that does not
    read makes that loop wait, and every other client with it.
    """

    dropped = 0

    async def put(self, item: Any) -> None:
        while True:
            try:
                self.put_nowait(item)
                return
            except asyncio.QueueFull:
                self.get_nowait()
                self.dropped += 1

    def clear(self) -> None:
        """caproto calls ``clear()`` on this queue when it gives up a backlog."""
        while not self.empty():
            self.get_nowait()


class GatewayCircuit(_AsyncioCircuit):
    """One client connection; its host for access rules is the TCP peer address."""

    def __init__(self, circuit: ca.VirtualCircuit, client: Any, context: "GatewayContext", **kwargs: Any):
        super().__init__(circuit, client, context, **kwargs)
        self.subscription_queue = _NewestWinsQueue(ca.MAX_TOTAL_SUBSCRIPTION_BACKLOG)
        self.peer_host = _normalize_host(str(self.circuit.address[0]))
        self.claimed_host: str | None = None
        # caproto passes client_hostname to check_access: make it the peer address.
        self.client_hostname = self.peer_host

    async def _process_command(self, command: Any) -> Any:
        if isinstance(command, ca.HostNameRequest):
            # Remember the claim for logs only; never let it replace the peer address.
            self.claimed_host = command.name
            self.client_hostname = self.peer_host
            return []
        return await super()._process_command(command)

    async def _on_disconnect(self) -> None:
        if self.connected:
            await self._release_subscriptions()
        await super()._on_disconnect()

    async def _release_subscriptions(self) -> None:
        """Unsubscribe everything of this circuit, iterating over snapshots (see module docstring)."""
        context = self.context
        queue = context.subscription_queue
        for sub_spec, subs in list(self.subscriptions.items()):
            shared = context.subscriptions.get(sub_spec)
            for sub in list(subs):
                context.last_dead_band.pop(sub, None)
                context.last_sync_edge_update.pop(sub, None)
                if shared is not None:
                    try:
                        shared.remove(sub)
                    except ValueError:
                        pass
            if not context.subscriptions.get(sub_spec):
                context.subscriptions.pop(sub_spec, None)
                await sub_spec.db_entry.unsubscribe(queue, sub_spec)
        self.subscriptions.clear()
        self.unexpired_updates.clear()

    async def disconnect_channels(self, db_entry: ChannelData) -> int:
        """Tell this client that its channels to ``db_entry`` are gone (it will search again)."""
        channels = [chan for chan in list(self.circuit.channels.values())
                    if self._entry_of(chan.name) is db_entry]
        if not channels:
            return 0
        await self._cull_subscriptions(db_entry, lambda sub: any(sub.channel is chan for chan in channels))
        for chan in channels:
            try:
                await self.send(chan.disconnect())
            except Exception:  # the client may be gone already
                logger.debug("could not disconnect channel %s of %s", chan.name, self.peer_host,
                             exc_info=True)
        return len(channels)

    def _entry_of(self, name: str) -> Any:
        return self.context.entry_for_name(name)


class GatewayContext(_AsyncioContext):
    """caproto's asyncio server context with the subscription fan-out made disconnect-safe."""

    CircuitClass = GatewayCircuit

    def __init__(self, pvdb: dict[str, ChannelData], interfaces: list[str] | None = None) -> None:
        super().__init__(pvdb, interfaces)
        self.update_errors = 0
        # Names resolved to an entry (e.g. ``PV.VAL``, ``PV$``) keep the entry they
        # resolved to, so that a replaced PV can find and drop them.
        self._resolved: dict[str, ChannelData] = {}

    def __getitem__(self, pvname: str) -> ChannelData:
        entry = super().__getitem__(pvname)
        self._resolved[pvname] = entry
        return entry

    def entry_for_name(self, name: str) -> ChannelData | None:
        # Not ``or``: a ChannelData with an empty array value is falsy.
        entry = self._resolved.get(name)
        return entry if entry is not None else self.pvdb.get(name)

    async def subscription_queue_loop(self) -> None:
        # caproto's loop lets one failing update end the server: log and go on.
        while True:
            item = await self.subscription_queue.get()
            try:
                await self._subscription_queue_iteration(*item)
            except Exception:
                self.update_errors += 1
                if self.update_errors <= 10 or self.update_errors % 1000 == 0:
                    logger.exception("subscription update failed (%d so far); server continues",
                                     self.update_errors)

    async def _subscription_queue_iteration(self, sub_specs: Any, metadata: Any, values: Any,
                                            flags: int, sub: Any) -> None:
        if sub is not None:
            if sub.circuit.connected:
                await super()._subscription_queue_iteration(sub_specs, metadata, values, flags, sub)
            return
        for sub_spec in sub_specs:
            # A snapshot: the deque loses members when a client disconnects
            # while we await below (caproto 1.3.0 crashed here).
            for one in tuple(self.subscriptions.get(sub_spec, ())):
                if one.circuit.connected:
                    await self._subscription_queue_send(sub_spec, one, metadata=metadata, values=values,
                                                        flags=flags)

    async def replace_entry(self, name: str, new_entry: ChannelData | None) -> int:
        """Put ``new_entry`` under ``name`` (None: remove) and disconnect clients of the old one.

        Returns how many client channels were disconnected. Clients such as
        libca search again and connect to the new entry with its new type.
        """
        old_entry = self.pvdb.get(name)
        if new_entry is None:
            self.pvdb.pop(name, None)
        else:
            self.pvdb[name] = new_entry
        if old_entry is None or old_entry is new_entry:
            return 0
        for key in [key for key, entry in self.pvdb.items() if entry is old_entry]:
            del self.pvdb[key]
        disconnected = 0
        for circuit in list(self.circuits):
            if circuit.connected:
                disconnected += await circuit.disconnect_channels(old_entry)
        for key in [key for key, entry in self._resolved.items() if entry is old_entry]:
            del self._resolved[key]
        return disconnected

    def forget_queues(self) -> None:
        """Detach every PV from this context's queue (after the context ended, before a new one)."""
        for entry in list(self.pvdb.values()):
            queues = getattr(entry, "_queues", None)
            if queues is not None:
                queues.pop(self.subscription_queue, None)


# --------------------------------------------------------------------------
# PVs
# --------------------------------------------------------------------------
class _GatewayPV:
    """Mixin for caproto ChannelData: access by policy, subscriber tracking, lazy values.

    ``pending`` is a zero-argument callable that yields the newest
    ``(value, timestamp, alarm)`` of a PV nobody subscribes to; it runs when
    a client reads the PV (or subscribes), so unwatched PVs cost no decoding.
    """

    policy: AccessPolicy
    writable: bool
    pending: Callable[[], tuple[Any, ca.TimeStamp, tuple[int, int]]] | None

    def _gateway_init(self, policy: AccessPolicy, writable: bool) -> None:
        self.policy = policy
        self.writable = writable
        self.pending = None
        self._watchers: set[Any] = set()
        self.on_put: Callable[[Any], Any] | None = None

    @property
    def watched(self) -> bool:
        return bool(self._watchers)

    def check_access(self, hostname: str, username: str) -> AccessRights:
        return self.policy.rights(hostname, self.writable)

    async def subscribe(self, queue: Any, sub_spec: Any, sub: Any) -> None:
        if self.pending is not None:
            await self._materialize()
        self._watchers.add(sub_spec)
        await super().subscribe(queue, sub_spec, sub)

    async def unsubscribe(self, queue: Any, sub_spec: Any) -> None:
        self._watchers.discard(sub_spec)
        await super().unsubscribe(queue, sub_spec)

    async def _read(self, data_type: Any) -> Any:
        if self.pending is not None:
            await self._materialize()
        return await super()._read(data_type)

    async def _materialize(self) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return
        value, stamp, alarm = pending()
        self._store(value, stamp)
        await self._set_alarm(alarm)

    def _store(self, value: Any, stamp: ca.TimeStamp) -> None:
        self._content.clear()  # caproto's cache of converted values (used by subscribe)
        if value is not None:
            self._data["value"] = value
        self._data["timestamp"] = stamp

    async def _set_alarm(self, alarm: tuple[int, int]) -> int:
        severity, status = alarm
        current = self.alarm
        if current.severity == severity and current.status == status:
            return 0
        await current.write(severity=severity, status=status, publish=False)
        return _ALARM_EVENT

    async def set_value(self, value: Any, stamp: ca.TimeStamp, alarm: tuple[int, int] = ALARM_NONE) -> None:
        """Store a value already converted by camapping (``None``: keep the old value) and publish it.

        One event carries value, timestamp and alarm, so a monitor never sees
        a fresh timestamp with a stale alarm or the other way round.
        """
        self.pending = None
        self._store(value, stamp)
        flags = _VALUE_EVENT | await self._set_alarm(alarm)
        if self._watchers:
            await self.publish(flags)

    async def set_lazy(self, pending: Callable[[], tuple[Any, ca.TimeStamp, tuple[int, int]]]) -> None:
        """Remember how to get the newest value; a watched PV is updated at once."""
        if self._watchers:
            value, stamp, alarm = pending()
            await self.set_value(value, stamp, alarm)
        else:
            self.pending = pending

    async def set_alarm_only(self, alarm: tuple[int, int], stamp: ca.TimeStamp | None = None) -> None:
        """Flag the PV (e.g. stale) without pretending there is a new value."""
        if self.pending is not None:
            await self._materialize()
        if stamp is not None:
            self._data["timestamp"] = stamp
            self._content.clear()
        flags = await self._set_alarm(alarm)
        if flags and self._watchers:
            await self.publish(flags | _VALUE_EVENT)

    async def write(self, value: Any, **kwargs: Any) -> Any:
        result = await super().write(value, **kwargs)
        if self.on_put is not None:
            self.on_put(self.value)
        return result


def _pv_class(base: type) -> type:
    return type(f"Gateway{base.__name__}", (_GatewayPV, base), {})


_CLASSES = {
    "DOUBLE": _pv_class(ChannelDouble),
    "FLOAT": _pv_class(ChannelFloat),
    "LONG": _pv_class(ChannelInteger),
    "SHORT": _pv_class(ChannelShort),
    "CHAR": _pv_class(ChannelByte),
    "STRING": _pv_class(ChannelString),
}


def make_pv(ca_type: str, count: int, value: Any, policy: AccessPolicy, *, writable: bool = False,
            alarm: tuple[int, int] = ALARM_NONE, stamp: ca.TimeStamp | None = None,
            precision: int = 0) -> ChannelData:
    """A caproto PV of CA type ``ca_type`` holding up to ``count`` elements."""
    cls = _CLASSES[ca_type]
    kwargs: dict[str, Any] = {
        "value": value,
        "max_length": count,
        "alarm": ca.ChannelAlarm(severity=alarm[0], status=alarm[1]),
        "reported_record_type": "bsread",
    }
    if stamp is not None:
        kwargs["timestamp"] = stamp
    if ca_type == "STRING":
        kwargs["string_encoding"] = "utf-8"
    elif ca_type == "CHAR":
        kwargs["strip_null_terminator"] = False
    if ca_type in ("DOUBLE", "FLOAT"):
        kwargs["precision"] = precision
    pv = cls(**kwargs)
    pv._gateway_init(policy, writable)
    return pv


def _initial_value(mapping: CaMapping) -> Any:
    if mapping.ca_type == "STRING":
        return ""
    if mapping.long_string:
        return np.zeros(0, dtype=np.uint8)
    if mapping.is_array:
        return np.zeros(mapping.count, dtype=mapping.numpy_dtype)
    return 0.0 if mapping.ca_type in ("DOUBLE", "FLOAT") else 0


# --------------------------------------------------------------------------
# The stream's channels as PVs
# --------------------------------------------------------------------------
@dataclass
class _ChannelPV:
    name: str              # bsread channel name
    pv_name: str
    mapping: CaMapping
    pv: Any                # a _GatewayPV
    shape_pv: Any = None   # <pv>:SHAPE for waveforms
    in_header: bool = True
    wants_long_string: bool = False


@dataclass
class StreamStats:
    """What the gateway did with the stream (for the NAME: status PVs and logs)."""

    messages_applied: int = 0
    header_changes: int = 0
    pvs_created: int = 0
    pvs_retyped: int = 0
    pvs_removed_from_header: int = 0
    clients_disconnected_by_retype: int = 0
    decode_errors: int = 0
    unknown_types: int = 0
    truncated_strings: int = 0
    updates_published: int = 0
    channel_names: tuple[str, ...] = ()


class StreamPVs:
    """The PVs of one bsread stream inside one :class:`GatewayContext`.

    ``apply(message)`` follows the data header (new channel: new PV; channel
    gone: PV flagged INVALID/DISABLE; type or shape changed: PV replaced and
    its clients disconnected so that they reconnect with the new type) and
    hands every PV its newest value, lazily when nobody watches it.
    """

    def __init__(self, context_getter: Callable[[], GatewayContext | None], pvdb: dict[str, ChannelData],
                 prefix: str, policy: AccessPolicy) -> None:
        self._context_getter = context_getter
        self.pvdb = pvdb
        self.prefix = prefix
        self.policy = policy
        self.channels: dict[str, _ChannelPV] = {}
        self._order: list[_ChannelPV | None] = []
        self._header: Any = None  # the data header followed last (compared with DataHeader.same_as)
        self._long_strings: set[str] = set()
        self.stats = StreamStats()
        self.stale = False

    @property
    def n_watched(self) -> int:
        return sum(1 for channel in self.channels.values() if channel.pv.watched)

    async def apply(self, message: Any) -> None:
        header = message.data_header
        if not header.same_as(self._header):
            await self._follow_header(header)
        main = message.main
        message_stamp = epics_timestamp(main.sec, main.ns)
        self.stale = False
        for index, channel in enumerate(self._order):
            if channel is None:
                continue
            if channel.mapping.ca_type == "STRING" and not channel.wants_long_string:
                channel.wants_long_string = self._too_long_for_string(message, index)
            pending = self._pending(channel, message, index, message_stamp)
            if channel.pv.watched:
                self.stats.updates_published += 1
            await channel.pv.set_lazy(pending)
        self.stats.messages_applied += 1
        retype = [channel for channel in self._order if channel is not None and channel.wants_long_string]
        if retype:
            for channel in retype:
                self._long_strings.add(channel.name)
            self._header = None  # rebuild on the next message with the long-string form

    @staticmethod
    def _too_long_for_string(message: Any, index: int) -> bool:
        """Whether a string value needs the long-string form, decided even if nobody reads it.

        A client learns a PV's type when it connects, before it reads; so the
        switch cannot wait for a lazy decode. Uncompressed: the part's length
        says it; compressed strings are rare and decoded.
        """
        if not message.is_present(index):
            return False
        spec = message.data_header.channels[index]
        try:
            if spec.compression == "none":
                size = len(message.value_part(index))
                if size <= MAX_STRING_BYTES:
                    return False
                return not fits_dbr_string(bytes(message.value_part(index)).decode("utf-8", errors="replace"))
            value = message.value(index)
        except Exception:
            return False
        return isinstance(value, str) and not fits_dbr_string(value)

    def _pending(self, channel: _ChannelPV, message: Any, index: int,
                 message_stamp: ca.TimeStamp) -> Callable[[], tuple[Any, ca.TimeStamp, tuple[int, int]]]:
        mapping = channel.mapping
        stats = self.stats

        def decode() -> tuple[Any, ca.TimeStamp, tuple[int, int]]:
            if not message.is_present(index):
                return None, message_stamp, ALARM_ABSENT
            try:
                value = message.value(index)
            except Exception as error:  # a malformed part must not stop the gateway
                stats.decode_errors += 1
                if stats.decode_errors <= 10:
                    logger.warning("cannot decode %s at pulse %s: %s", channel.name, message.pulse_id, error)
                return None, message_stamp, ALARM_DECODE_ERROR
            if value is None:
                return None, message_stamp, ALARM_ABSENT
            try:
                channel_time = message.channel_timestamp(index)
            except ProtocolError:  # a malformed timestamp costs the value its own time, not the value
                channel_time = None
            stamp = epics_timestamp(*channel_time) if channel_time and any(channel_time) else message_stamp
            ca_value, truncated = to_ca_value(mapping, value)
            alarm = ALARM_NONE
            if truncated:
                stats.truncated_strings += 1
                if mapping.ca_type == "STRING":
                    channel.wants_long_string = True  # becomes a CHAR array from the next message on
                alarm = ALARM_TRUNCATED
            if mapping.long_string:
                ca_value = np.frombuffer(ca_value, dtype=np.uint8)
            return ca_value, stamp, alarm

        return decode

    async def _follow_header(self, header: Any) -> None:
        self.stats.header_changes += 1
        self._header = header
        seen: set[str] = set()
        order: list[_ChannelPV | None] = []
        for spec in header.channels:
            if spec.name in seen or spec.refused is not None:  # a duplicate name: serve the first; refused: none
                order.append(None)
                continue
            seen.add(spec.name)
            try:
                mapping = map_channel(spec.type, spec.shape, long_string=spec.name in self._long_strings)
            except ValueError as error:
                self.stats.unknown_types += 1
                logger.warning("channel %s not served: %s", spec.name, error)
                order.append(None)
                continue
            order.append(await self._ensure(spec.name, mapping))
        for name, channel in self.channels.items():
            if name not in seen and channel.in_header:
                channel.in_header = False
                self.stats.pvs_removed_from_header += 1
                logger.info("channel %s left the stream; PV %s flagged INVALID", name, channel.pv_name)
                await channel.pv.set_alarm_only(ALARM_REMOVED)
        self._order = order
        self.stats.channel_names = tuple(spec.name for spec in header.channels)
        logger.info("data header %s: %d channels, %d PVs served (%d created, %d retyped so far)",
                    header.hash, len(header.channels), len(self.channels), self.stats.pvs_created,
                    self.stats.pvs_retyped)

    async def _ensure(self, name: str, mapping: CaMapping) -> _ChannelPV | None:
        channel = self.channels.get(name)
        if channel is not None and channel.mapping == mapping:
            channel.in_header = True
            channel.wants_long_string = False
            return channel
        pv_name = self.prefix + name
        if channel is None and pv_name in self.pvdb:
            logger.warning("channel %s not served: PV %s already exists", name, pv_name)
            return None
        pv = make_pv(mapping.ca_type, mapping.count, _initial_value(mapping), self.policy,
                     alarm=ALARM_ABSENT)
        shape_pv = None
        if mapping.is_array:
            shape_pv = make_pv("LONG", len(mapping.shape), list(mapping.shape), self.policy)
        context = self._context_getter()
        if channel is None:
            self.stats.pvs_created += 1
            logger.debug("new PV %s (%s)", pv_name, mapping.describe())
            self.pvdb[pv_name] = pv
        else:
            self.stats.pvs_retyped += 1
            logger.info("PV %s retyped: %s -> %s", pv_name, channel.mapping.describe(), mapping.describe())
            if context is not None:
                self.stats.clients_disconnected_by_retype += await context.replace_entry(pv_name, pv)
            else:
                self.pvdb[pv_name] = pv
        shape_pv = await self._set_shape_pv(pv_name + ":SHAPE", channel.shape_pv if channel else None,
                                            shape_pv, context)
        new_channel = _ChannelPV(name, pv_name, mapping, pv, shape_pv)
        self.channels[name] = new_channel
        return new_channel

    async def _set_shape_pv(self, name: str, old: Any, new: Any, context: GatewayContext | None) -> Any:
        """Serve ``new`` as ``name`` unless ``old`` already says the same; returns the PV in use."""
        if old is not None and new is not None and np.atleast_1d(old.value).tolist() == np.atleast_1d(new.value).tolist():
            return old
        if old is None and new is not None and name in self.pvdb:
            logger.warning("shape PV %s not served: name already exists", name)
            return None
        if old is not None and context is not None:
            await context.replace_entry(name, new)
        elif new is not None:
            self.pvdb[name] = new
        else:
            self.pvdb.pop(name, None)
        return new

    async def mark_stale(self, stamp: ca.TimeStamp) -> None:
        """No message for a while: flag every channel PV (values are no longer current)."""
        if self.stale:
            return
        self.stale = True
        for channel in self.channels.values():
            if channel.in_header:
                await channel.pv.set_alarm_only(ALARM_STALE)


@dataclass
class StatusPV:
    """One ``NAME:...`` status PV and where its value comes from."""

    suffix: str
    ca_type: str
    doc: str
    pv: Any = field(default=None, repr=False)

    def create(self, policy: AccessPolicy, writable: bool = False, value: Any = 0) -> Any:
        self.pv = make_pv(self.ca_type, 1, value, policy, writable=writable, alarm=ALARM_ABSENT,
                          precision=3 if self.ca_type == "DOUBLE" else 0)
        return self.pv


def now_stamp() -> ca.TimeStamp:
    return ca.TimeStamp.from_unix_timestamp(time.time())
