"""Past ranges out of the buffer's replay endpoint, as JSON, npz or HDF5 (the writer's layout).

Blocking code (ZeroMQ, h5py): the service runs it in a worker thread. The
query, its limits and the columns are decided in ``web.range_query``; this
module moves the messages (``replay.client``, the writer's own
client: credit, heartbeats, re-requests after a buffer restart) and encodes.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from sf_bsread_writer.archive.reach_back import ReachBackSource
from sf_bsread_writer.bsread.headers import DataHeader, PerHeader
from sf_bsread_writer.bsread.message import Message, MessageParser
from sf_bsread_writer.bsread.spec import ProtocolError
from sf_bsread_writer.replay.client import ReplayClient, ReplayHandshakeError
from sf_bsread_writer.replay.messages import BufferLost, Data, End, Gap, Refused
from sf_bsread_writer.web.range_query import (
    RangeColumns,
    RangeLimits,
    RangeQuery,
    RangeTooLarge,
)

__all__ = ["RangeFailed", "RangeTimeout", "fetch_range", "as_json", "as_npz", "write_hdf5", "outcome"]

logger = logging.getLogger(__name__)


class RangeFailed(RuntimeError):
    """The buffer could not serve the range (refused, unreachable): HTTP 502; the message says why."""


class RangeTimeout(RuntimeError):
    """The range was not complete within the request's time: HTTP 504."""


@dataclass
class _Subset:
    """The requested channels of one data header: a header and the part positions to keep."""

    header: DataHeader
    indices: tuple[int, ...]


def fetch_range(replay_address: str, query: RangeQuery, limits: RangeLimits, timeout: float,
                on_message: Callable[[Message], None] | None = None, decode: bool = True,
                context: zmq.Context | None = None) -> RangeColumns:
    """Replay ``query`` from the buffer; every message goes to ``columns.add`` (and ``on_message``).

    Raises RangeTooLarge (413), RangeFailed (502), RangeTimeout (504).
    """
    columns = RangeColumns(query, limits, decode=decode)
    parser = MessageParser()
    deadline = time.monotonic() + timeout
    # A buffer with --archive names it in its acceptance: pulses older than the ring come from there.
    # The allocator is left as it is: the web service gives a range's memory back after each request
    # (process.release_free_memory), and a long-running service should not keep its largest range's.
    client = ReachBackSource(replay_address, start_pulse_id=query.start_pulse_id, start_time=query.start_time,
                             stop_pulse_id=query.stop_pulse_id, stop_time=query.stop_time,
                             replay_factory=functools.partial(ReplayClient, context=context,
                                                              keep_receive_memory=False))
    try:
        client.start()
        try:
            client.handshake(min(timeout, 5.0))
        except ReplayHandshakeError as error:
            raise RangeFailed(str(error)) from None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RangeTimeout(f"the range was not complete within {timeout:g} s ({columns.messages} messages "
                                   f"read, last pulse id {client.last_pulse_id}): a range reaching into the future "
                                   "waits for its pulses, and a large one takes ~1 s per 1000-2000 messages of "
                                   "100 channels; ask for a shorter range or fewer channels, or raise --range-timeout")
            event = client.receive(min(remaining, 0.5))
            if isinstance(event, Data):
                try:
                    message = parser.parse(event.frames)
                except ProtocolError as error:  # the buffer validated it on ingest: a bug, said as such
                    raise RangeFailed(f"the buffer replayed a message that does not parse: {error}") from None
                columns.add(message)
                if on_message is not None:
                    on_message(message)
            elif isinstance(event, Gap):
                columns.gap(event)
            elif isinstance(event, End):
                break
            elif isinstance(event, Refused):
                raise RangeFailed(f"the buffer refused the range: {event.reason}: {event.detail}")
            elif isinstance(event, BufferLost):
                logger.warning("range %s: buffer silent for %.1f s, re-requested", query, event.seconds_silent)
    except zmq.ZMQError as error:
        raise RangeFailed(f"replay from {replay_address} failed: {error}") from None
    finally:
        client.close()
    columns.finish()
    return columns


def outcome(columns: RangeColumns) -> str:
    """complete: every requested pulse and channel is there; partial: ``missing`` and ``unknown`` say what is
    not."""
    return "complete" if not columns.missing and not columns.unknown else "partial"


def as_json(columns: RangeColumns) -> dict[str, Any]:
    """The JSON answer: columns per channel (non-finite floats as null: see docs/web-api.md)."""
    channels = {}
    pulse_ids = columns.pulse_ids.tolist()
    for name in columns.known:
        column = columns.columns[name]
        channels[name] = {
            "pulse_id": pulse_ids,
            "timestamp": columns.timestamps(name).tolist(),
            "is_data_present": column.present().tolist(),
            "data": column.json_data(),
        }
    return {"state": "ok", "status": outcome(columns), "messages": columns.messages, "channels": channels,
            "missing": columns.missing, "unknown": columns.unknown}


def as_npz(columns: RangeColumns) -> bytes:
    """numpy's npz: ``<channel>/pulse_id``, ``/timestamp``, ``/is_data_present``, ``/data`` of every known
    channel, ``missing`` (the gaps as JSON text) and ``unknown`` (the unknown names as JSON text)."""
    arrays: dict[str, np.ndarray] = {"missing": np.array(json.dumps(columns.missing)),
                                     "unknown": np.array(json.dumps(columns.unknown))}
    for name in columns.known:
        for key, array in columns.arrays(name).items():
            arrays[f"{name}/{key}"] = array
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


class Hdf5Range:
    """The range as a file in the writer's layout (``h5.file.H5File``), requested channels only."""

    def __init__(self, query: RangeQuery, directory: str | None = None) -> None:
        from sf_bsread_writer.h5.file import (
            H5File,  # h5py: only where a file is written
        )

        # A directory of its own: the writer's file placement never overwrites, so the name must be new.
        self.directory = tempfile.mkdtemp(prefix="sf_bsread_range-", dir=directory)
        self.path = os.path.join(self.directory, "range.h5")
        self.query = query
        try:
            self._file = H5File(self.path, {"general/process": "sf_bsread_web",
                                            "general/created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except BaseException:
            remove_range_file(self.path)
            raise
        self._subset = PerHeader(self._make_subset)

    def add(self, message: Message) -> None:
        subset = self._subset(message.data_header)
        frames = [message.frames[0], message.frames[1]]
        for index in subset.indices:
            frames += (message.frames[2 + 2 * index], message.frames[3 + 2 * index])
        self._file.append(Message(message.main, subset.header, tuple(frames)))

    def _make_subset(self, header: DataHeader) -> _Subset:
        indices = tuple(header.index_of(name) for name in self.query.channels if name in header)
        return _Subset(DataHeader(f"{header.hash}/{','.join(self.query.channels)}",
                                  tuple(header.channels[index] for index in indices)), indices)

    def close(self, columns: RangeColumns) -> str:
        for gap in columns.missing:
            if gap.get("first_pulse_id") is not None and gap.get("last_pulse_id") is not None:
                self._file.record_missing(gap["first_pulse_id"], gap["last_pulse_id"], gap["reason"])
        self._file.close({"outcome": outcome(columns)})
        return self.path

    def discard(self) -> None:
        try:
            self._file.abandon()
        except Exception:  # already closed or never opened: the file goes anyway
            logger.debug("range file %s: abandon failed", self.path, exc_info=True)
        remove_range_file(self.path)


def remove_range_file(path: str) -> None:
    """Remove a range file and its private directory (after it was streamed, or on failure)."""
    for remove, target in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
        try:
            remove(target)
        except OSError:
            pass


def write_hdf5(replay_address: str, query: RangeQuery, limits: RangeLimits, timeout: float,
               directory: str | None = None) -> tuple[str, RangeColumns]:
    """The range as an HDF5 file (a temporary path the caller streams and removes)."""
    output = Hdf5Range(query, directory)
    try:
        columns = fetch_range(replay_address, query, limits, timeout, on_message=output.add, decode=False)
        return output.close(columns), columns
    except BaseException:
        output.discard()
        raise


__all__ += ["Hdf5Range", "RangeTooLarge"]
