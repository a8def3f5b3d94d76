"""The one-shot writer: one pulse range from the buffer (or a live stream) into one HDF5 file.

Three layers, each readable and testable on its own:

* :class:`WriterControl` — the pure state machine of one acquisition: what
  the DAQ asked for (parameters, start and stop by pulse id or by time) and
  which request is legal in which state. No threads, sockets or clock: every
  REST call is one method call that either returns a command for the run
  loop or raises :class:`BadRequest` (400) / :class:`WrongState` (409).
* :class:`PulseRange` — the pure pulse-range logic: which message belongs in
  the file, when the range is complete, and which pulses are missing and why.
* :class:`Writer` — the I/O shell. REST threads change the control under a
  lock and post commands on a queue; **one run thread owns the source and the
  file** (nobody else touches them) and reports back through the same lock.

States::

    waiting --start--> writing --stop reached / silent source / stop, kill, signal--> finishing --> finished
       |   ^                  `-- an exception while writing ----------------------> finishing --> error
       |   `-- the file or the source cannot be opened (400; the DAQ may try again)
       `-- /stop, /kill, SIGTERM before any start (no file) --------------------------------> finished

In ``finished`` and ``error`` the file is closed; the process answers
``/status`` for ``--finished-grace`` seconds, then :func:`main` returns 0
(finished) or 1 (error). Nothing here calls ``os._exit``.
"""
from __future__ import annotations

import bisect
import enum
import json
import logging
import os
import pwd
import queue
import re
import signal
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import config, replay
from sf_bsread_writer.h5format import H5File, MissingRange
from sf_bsread_writer.protocol import IgnoredMessage, MessageParser, ProtocolError

__all__ = [
    "State",
    "RequestError",
    "BadRequest",
    "WrongState",
    "OutsideRoot",
    "REQUIRED_PARAMETERS",
    "MAX_PULSE_ID",
    "parse_pulse_id",
    "resolve_output_file",
    "Start",
    "SetStop",
    "Close",
    "WriterControl",
    "Verdict",
    "PulseRange",
    "WriterSettings",
    "NullOutput",
    "DirectSource",
    "Writer",
    "drop_privileges",
    "serve",
    "main",
]

logger = logging.getLogger(__name__)

REQUIRED_PARAMETERS = ("general/created", "general/user", "general/process", "general/instrument")
MAX_PULSE_ID = 2**63 - 1  # pulse ids are int64 on the wire and in the file
DEV_NULL = "/dev/null"

# How long one receive waits: the latency of commands (stop, kill) and of the
# silence check. Short enough to feel immediate, long enough not to spin.
POLL_INTERVAL = 0.1
# After /stop_now a source that has delivered nothing for this long is taken
# as silent at once (instead of waiting the whole --stop-deadline).
STOP_NOW_SILENCE = 1.0
# How long a start request waits for the run thread to open the file and the source.
START_TIMEOUT = 20.0
# How soon the main thread acts on SIGTERM/SIGINT.
SIGNAL_LATENCY = 0.1


# ---------------------------------------------------------------------------
# Errors and input validation (pure)
# ---------------------------------------------------------------------------
class State(str, enum.Enum):
    """What ``GET /status`` answers."""

    WAITING = "waiting"      # no start yet: parameters and a stop pulse may be set
    WRITING = "writing"      # started: messages of the range go into the file
    FINISHING = "finishing"  # the range is over (or stop/kill/signal): closing the file
    FINISHED = "finished"    # file closed; the process exits after the grace period
    ERROR = "error"          # the writer failed; the file is closed as far as possible


class RequestError(Exception):
    """A REST request that cannot be carried out; ``http_status`` says why in HTTP terms."""

    http_status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RequestError):
    """The request itself is wrong (400): bad pulse id, broken body, path outside the root, ..."""

    http_status = 400


class OutsideRoot(BadRequest):
    """The output file would resolve outside ``--output-root`` (400; at launch: exit code 2)."""


class WrongState(RequestError):
    """The request is fine but not now (409): start while writing, stop before start, ..."""

    http_status = 409


_DIGITS = re.compile(r"[0-9]+")


def parse_pulse_id(text: str | int, what: str = "pulse_id") -> int:
    """A pulse id from a URL segment: a non-negative int64 written in decimal digits."""
    if isinstance(text, bool):
        raise BadRequest(f"{what} must be an integer, not {text!r}")
    if isinstance(text, int):
        value = text
    else:
        if not _DIGITS.fullmatch(text):
            if re.fullmatch(r"\s*-\s*[0-9]+\s*", text):
                raise BadRequest(f"{what} must not be negative: {text!r}")
            raise BadRequest(f"{what} must be a non-negative integer, not {text!r}")
        value = int(text)
    if value < 0:
        raise BadRequest(f"{what} must not be negative: {value}")
    if value > MAX_PULSE_ID:
        raise BadRequest(f"{what} {value} does not fit in int64")
    return value


def resolve_output_file(path: object, output_root: str | None, base_dir: str | None = None) -> str:
    """The absolute path to write ``path`` to, or :class:`BadRequest`.

    With ``output_root`` the real path (every symlink resolved, ``..``
    applied) must lie strictly inside the root's real path, so neither
    ``../x.h5`` nor a symlink pointing out of the root can escape it. A
    relative path is taken relative to ``base_dir`` (default: the root when
    there is one, else the current directory). ``/dev/null`` is always
    allowed: it writes nothing. An existing file is refused: the writer never
    overwrites an earlier acquisition.
    """
    if not isinstance(path, str) or not path.strip():
        raise BadRequest(f"output_file must be a non-empty string, not {path!r}")
    if "\x00" in path:
        raise BadRequest("output_file must not contain NUL characters")
    if path == DEV_NULL:
        return path
    if base_dir is None:
        base_dir = output_root if output_root is not None else os.getcwd()
    candidate = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if output_root is None:
        resolved = os.path.abspath(candidate)
    else:
        root = os.path.realpath(output_root)
        resolved = os.path.realpath(candidate)
        if resolved == root or os.path.commonpath([root, resolved]) != root:
            raise OutsideRoot(f"output_file {path!r} resolves to {resolved}, outside the output root {root}")
    if os.path.isdir(resolved):
        raise BadRequest(f"output_file {path!r} is a directory")
    if os.path.lexists(resolved):
        raise BadRequest(f"output_file {resolved} already exists; the writer does not overwrite files")
    return resolved


def _check_parameters(body: object) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"parameters must be a JSON object, not {type(body).__name__}")
    missing = [name for name in REQUIRED_PARAMETERS if body.get(name) in (None, "")]
    if missing:
        raise BadRequest(f"missing parameters: {', '.join(missing)} (required: {', '.join(REQUIRED_PARAMETERS)})")
    for name in REQUIRED_PARAMETERS:
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise BadRequest(f"parameter {name} must be a string or a number, not {json.dumps(value)}")
    return dict(body)


# ---------------------------------------------------------------------------
# Commands from the control to the run loop
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    """Begin an acquisition: open ``output_file`` and ask the source from the start on."""

    output_file: str
    start_pulse_id: int | None
    start_time: float | None
    stop_pulse_id: int | None
    stop_time: float | None
    parameters: dict


@dataclass(frozen=True)
class SetStop:
    """The stop changed while writing. ``now``: /stop_now, a silent source ends the run at once."""

    stop_pulse_id: int | None
    stop_time: float | None
    now: bool = False


@dataclass(frozen=True)
class Close:
    """Close the file now; pulses of the range not yet written are recorded as missing for ``reason``."""

    reason: str


# ---------------------------------------------------------------------------
# The state machine (pure)
# ---------------------------------------------------------------------------
class WriterControl:
    """Which request is legal when, and what it means for the run loop.

    Pure: ``now`` is passed in, paths are checked by the injected
    ``check_output`` (default: accepted as given). Not thread-safe on its
    own; :class:`Writer` holds a lock around every call.
    """

    def __init__(self, output_file: str, check_output: Callable[[str, bool], str] | None = None) -> None:
        self.default_output_file = output_file  # OUTPUT_FILE of the command line
        self.output_file = output_file  # of the current (or last) start
        # check_output(path, requested) -> the path to write; requested: given over REST.
        self._check_output = check_output or (lambda path, requested: path)
        self.state = State.WAITING
        self.parameters: dict = {}
        self.start_pulse_id: int | None = None
        self.start_time: float | None = None
        self.stop_pulse_id: int | None = None
        self.stop_time: float | None = None
        self.end_reason: str | None = None
        self.error: str | None = None

    # -- what the DAQ asks ---------------------------------------------------
    def set_parameters(self, body: object) -> dict:
        self._require_waiting("parameters can only be set before the start")
        self.parameters = _check_parameters(body)
        return self.parameters

    def start_at_pulse(self, pulse_id: int, output_file: str | None = None) -> Start:
        self._require_waiting("cannot start")
        if self.stop_pulse_id is not None and pulse_id > self.stop_pulse_id:
            raise BadRequest(f"start_pulse_id {pulse_id} is after the stop_pulse_id {self.stop_pulse_id}")
        return self._start(output_file, start_pulse_id=pulse_id)

    def start_now(self, now: float, output_file: str | None = None) -> Start:
        self._require_waiting("cannot start")
        return self._start(output_file, start_time=now)

    def stop_at_pulse(self, pulse_id: int) -> SetStop | None:
        """Set (or move) the inclusive last pulse id; before the start too. None: nothing to tell the run loop."""
        if self.state not in (State.WAITING, State.WRITING):
            raise WrongState(f"cannot set stop_pulse_id: the writer is {self.state.value}")
        if self.start_pulse_id is not None and pulse_id < self.start_pulse_id:
            raise BadRequest(f"stop_pulse_id {pulse_id} is before the start_pulse_id {self.start_pulse_id}")
        self.stop_pulse_id = pulse_id
        if self.state is State.WAITING:
            return None
        return SetStop(self.stop_pulse_id, self.stop_time)

    def stop_now(self, now: float) -> SetStop:
        """Stop at the current time (and at the stop pulse, if one is set and comes first)."""
        if self.state is State.WAITING:
            raise WrongState("cannot stop_now: the writer has not started (GET /stop ends it without a file)")
        if self.state is not State.WRITING:
            raise WrongState(f"cannot stop_now: the writer is {self.state.value}")
        if self.stop_time is None or now < self.stop_time:
            self.stop_time = now
        return SetStop(self.stop_pulse_id, self.stop_time, now=True)

    def stop(self, reason: str = "stopped") -> Close | None:
        """End the acquisition now (``GET /stop``, ``/kill``, a signal). None: no run to close."""
        if self.state is State.WAITING:
            self.state = State.FINISHED
            self.end_reason = f"{reason} before start"
            return None
        if self.state is State.WRITING:
            self.state = State.FINISHING
            self.end_reason = reason
            return Close(reason)
        return None  # already finishing or finished: idempotent

    # -- what the run loop reports --------------------------------------------
    def start_failed(self, message: str) -> None:
        """Opening the file or the source failed: back to waiting, the DAQ may try again.

        If a stop arrived while opening, the writer is finished instead (no file).
        """
        self.error = message
        if self.state is State.FINISHING:
            self.state = State.FINISHED
            return
        self.state = State.WAITING
        self.start_pulse_id = self.start_time = None
        self.output_file = self.default_output_file

    def finishing(self, reason: str) -> None:
        if self.state is State.WRITING:
            self.state = State.FINISHING
            self.end_reason = reason

    def finished(self, error: str | None = None) -> None:
        self.state = State.ERROR if error else State.FINISHED
        if error:
            self.error = error

    # -- helpers ---------------------------------------------------------------
    def _require_waiting(self, what: str) -> None:
        if self.state is State.WAITING:
            return
        if self.state is State.WRITING:
            started = (f"start_pulse_id {self.start_pulse_id}" if self.start_pulse_id is not None
                       else f"start time {self.start_time}")
            raise WrongState(f"{what}: the writer is already writing (from {started})")
        raise WrongState(f"{what}: the writer is {self.state.value}")

    def _start(self, output_file: str | None, start_pulse_id: int | None = None,
               start_time: float | None = None) -> Start:
        if output_file is None:
            path = self._check_output(self.default_output_file, False)
        else:
            path = self._check_output(output_file, True)
        self.output_file = path
        self.start_pulse_id, self.start_time = start_pulse_id, start_time
        self.state = State.WRITING
        self.error = None
        return Start(path, start_pulse_id, start_time, self.stop_pulse_id, self.stop_time, dict(self.parameters))


# ---------------------------------------------------------------------------
# Pulse-range logic (pure)
# ---------------------------------------------------------------------------
class Verdict(enum.Enum):
    BEFORE = "before"    # before the start: not written
    OLD = "old"          # not after the last written pulse (duplicate, source reset): not written
    WRITE = "write"      # in the range: write it
    AFTER = "after"      # past the stop: the range is complete, not written


class PulseRange:
    """Decide, message by message, what belongs in the file; keep account of what is missing.

    Missing pulses come from three places and are each recorded once:
    gap notices of the buffer (:meth:`gap`), pulse-id jumps larger than the
    stream's usual step (:meth:`written`), and, at the end, the head and tail
    of the range that never arrived (:meth:`close`). The usual step is the
    smallest positive difference seen (a 10 Hz source at SwissFEL advances
    by 10), so a slow source is not reported as losing nine pulses in ten.
    """

    _STEP_LEARNING = 32  # messages during which an early jump can still be reinterpreted

    def __init__(self, start_pulse_id: int | None = None, start_time: float | None = None,
                 stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        self.start_pulse_id = start_pulse_id
        self.start_time = start_time
        self.stop_pulse_id = stop_pulse_id
        self.stop_time = stop_time
        self.first_pulse_id: int | None = None
        self.first_timestamp: float | None = None
        self.last_pulse_id: int | None = None
        self.last_timestamp: float | None = None
        self.step: int | None = None
        self.past_stop = False
        # The stop pulse (not a stop time) ended the range: only then is a tail up to it owed.
        self.ended_by_stop_pulse = False
        self.missing: list[MissingRange] = []
        self._covered: list[tuple[int, int]] = []
        self._previous: int | None = None  # last written pulse id in the current numbering
        self._early: list[tuple[int, int]] = []  # (previous, pulse_id) while the step is being learned
        # Pulse id and timestamp of every row written, to cut the file if the stop comes late (16 B/row).
        self._written_ids = array("q")
        self._written_times = array("d")

    @property
    def has_stop(self) -> bool:
        return self.stop_pulse_id is not None or self.stop_time is not None

    @property
    def complete(self) -> bool:
        """The stop is reached: the stop pulse written, or a message past the stop seen."""
        if self.past_stop:
            return True
        return (self.stop_pulse_id is not None and self.last_pulse_id is not None
                and self.last_pulse_id >= self.stop_pulse_id)

    @property
    def missing_count(self) -> int:
        return sum(item.count for item in self.missing)

    def set_stop(self, stop_pulse_id: int | None, stop_time: float | None) -> int | None:
        """Move the stop. If rows past the new stop were already written, forget them and
        return how many rows to keep (the file must be cut there); else None.

        A stop that arrives after its pulse was written is normal for a past
        range: the replay drains the backlog faster than a script sends
        ``start_pulse_id`` and then ``stop_pulse_id``.
        """
        self.stop_pulse_id, self.stop_time = stop_pulse_id, stop_time
        keep = len(self._written_ids)
        if stop_pulse_id is not None and self._written_ids and self._written_ids[-1] > stop_pulse_id:
            keep = min(keep, bisect.bisect_right(self._written_ids, stop_pulse_id))
            self.ended_by_stop_pulse = True
        if stop_time is not None and self._written_times and self._written_times[-1] > stop_time:
            keep = min(keep, bisect.bisect_right(self._written_times, stop_time))
        if keep == len(self._written_ids):
            return None
        self.past_stop = True
        del self._written_ids[keep:], self._written_times[keep:]
        if keep:
            self.last_pulse_id, self.last_timestamp = self._written_ids[-1], self._written_times[-1]
        else:
            self.first_pulse_id = self.first_timestamp = self.last_pulse_id = self.last_timestamp = None
        self._previous = self.last_pulse_id
        # Missing pulses noted beyond the new stop are not part of the range any more.
        limit = stop_pulse_id if stop_pulse_id is not None else self.last_pulse_id
        if limit is None:
            self.missing, self._covered = [], []
        else:
            self.missing = [item if item.last_pulse_id <= limit else
                            MissingRange(item.first_pulse_id, limit,
                                         min(item.count, self._estimate(item.first_pulse_id, limit)), item.reason)
                            for item in self.missing if item.first_pulse_id <= limit]
            self._covered = [(item.first_pulse_id, item.last_pulse_id) for item in self.missing]
        return keep

    @property
    def rows(self) -> int:
        """Rows written (and kept)."""
        return len(self._written_ids)

    def progress(self) -> float | None:
        """Fraction of the requested range written so far (by pulse id, else by time); None if unknown."""
        if self.complete:
            return 1.0
        if self.last_pulse_id is None:
            return 0.0 if self.has_stop else None
        if self.stop_pulse_id is not None:
            first = self.start_pulse_id if self.start_pulse_id is not None else self.first_pulse_id
            span = self.stop_pulse_id - first + 1
            return max(0.0, min(1.0, (self.last_pulse_id - first + 1) / span))
        if self.stop_time is not None and self.last_timestamp is not None:
            first_time = self.start_time if self.start_time is not None else self.first_timestamp
            span = self.stop_time - first_time
            if span <= 0:
                return 1.0
            return max(0.0, min(1.0, (self.last_timestamp - first_time) / span))
        return None

    def classify(self, pulse_id: int, timestamp: float) -> Verdict:
        if self.stop_pulse_id is not None and pulse_id > self.stop_pulse_id:
            self.past_stop = self.ended_by_stop_pulse = True
            return Verdict.AFTER
        if self.stop_time is not None and timestamp > self.stop_time:
            self.past_stop = True
            return Verdict.AFTER
        if ((self.start_pulse_id is not None and pulse_id < self.start_pulse_id)
                or (self.start_time is not None and timestamp < self.start_time)):
            return Verdict.BEFORE
        if self._previous is not None and pulse_id <= self._previous:
            return Verdict.OLD
        return Verdict.WRITE

    def written(self, pulse_id: int, timestamp: float) -> list[MissingRange]:
        """Account for one written message; returns the pulse-id jumps it reveals (already recorded)."""
        previous = self._previous
        self._previous = pulse_id
        self.last_pulse_id, self.last_timestamp = pulse_id, timestamp
        self._written_ids.append(pulse_id)
        self._written_times.append(timestamp)
        if self.first_pulse_id is None:
            self.first_pulse_id, self.first_timestamp = pulse_id, timestamp
        if previous is None:
            return []
        difference = pulse_id - previous
        found: list[MissingRange] = []
        if self.step is None or difference < self.step:
            old_step = self.step
            self.step = difference
            if old_step is not None:
                # The step was overestimated: earlier differences may be jumps after all.
                for early_previous, early_pulse_id in self._early:
                    if early_pulse_id - early_previous > self.step:
                        found += self._jump(early_previous, early_pulse_id)
        elif difference > self.step:
            found += self._jump(previous, pulse_id)
        if len(self._written_ids) <= self._STEP_LEARNING:
            self._early.append((previous, pulse_id))
        else:
            self._early.clear()
        return found

    def source_reset(self) -> None:
        """The buffer says the source restarted its pulse ids: accept the new numbering from here."""
        self._previous = None
        self._early.clear()

    def end_reached(self) -> None:
        """The buffer has passed the stop (its End notice): a tail not received is a pulse-id jump."""
        self.past_stop = True

    def gap(self, first_pulse_id: int, last_pulse_id: int, reason: str,
            count: int | None = None) -> list[MissingRange]:
        """A gap notice from the buffer, clipped to the range; returns what is newly recorded."""
        first, last = first_pulse_id, last_pulse_id
        if self.start_pulse_id is not None:
            first = max(first, self.start_pulse_id)
        if self.stop_pulse_id is not None:
            last = min(last, self.stop_pulse_id)
        if first > last:
            return []
        exact = count if (first, last) == (first_pulse_id, last_pulse_id) else None
        return self._record(first, last, reason, exact)

    def close(self, reason: str, head_reason: str = "not_received") -> list[MissingRange]:
        """At the end: the head and tail of the pulse range that never arrived.

        ``reason`` explains a tail cut off by the end of the run (source
        silent, stopped, ...); ``head_reason`` pulses before the first one
        received. A tail that a message past the stop skipped over is a
        pulse-id jump. Needs the start (or stop) as pulse ids: a range by
        time has no pulse ids to name. With a stop time as well, the tail up
        to the stop pulse is owed only if the stop pulse came first: pulses
        after the stop time (``stop_now``) were never part of the range.
        """
        found: list[MissingRange] = []
        step = self.step or 1
        tail_owed = self.stop_pulse_id is not None and (self.stop_time is None or self.ended_by_stop_pulse)
        if self.first_pulse_id is None:
            if self.start_pulse_id is not None and tail_owed:
                # Nothing of the range arrived at all.
                found += self._record(self.start_pulse_id, self.stop_pulse_id,
                                      head_reason if self.past_stop else reason)
            return found
        if self.start_pulse_id is not None and self.first_pulse_id - self.start_pulse_id >= step:
            found += self._record(self.start_pulse_id, self.first_pulse_id - 1, head_reason)
        if tail_owed and self.stop_pulse_id - self.last_pulse_id >= step:
            found += self._record(self.last_pulse_id + 1, self.stop_pulse_id,
                                  "pulse_id_jump" if self.past_stop else reason)
        return found

    # -- helpers ---------------------------------------------------------------
    def _jump(self, previous: int, pulse_id: int) -> list[MissingRange]:
        return self._record(previous + 1, pulse_id - 1, "pulse_id_jump")

    def _estimate(self, first: int, last: int) -> int:
        step = self.step or 1
        return max(1, (last - first + 1) // step) if step > 1 else last - first + 1

    def _record(self, first: int, last: int, reason: str, count: int | None = None) -> list[MissingRange]:
        pieces = self._uncovered(first, last)
        found = []
        for piece_first, piece_last in pieces:
            piece_count = count if (count is not None and len(pieces) == 1
                                    and (piece_first, piece_last) == (first, last)) else None
            if piece_count is None:
                piece_count = self._estimate(piece_first, piece_last)
            item = MissingRange(piece_first, piece_last, piece_count, reason)
            self._covered.append((piece_first, piece_last))
            self.missing.append(item)
            found.append(item)
        return found

    def _uncovered(self, first: int, last: int) -> list[tuple[int, int]]:
        pieces = [(first, last)]
        for covered_first, covered_last in self._covered:
            if covered_last < first or covered_first > last:
                continue
            next_pieces = []
            for piece_first, piece_last in pieces:
                if covered_last < piece_first or covered_first > piece_last:
                    next_pieces.append((piece_first, piece_last))
                    continue
                if piece_first < covered_first:
                    next_pieces.append((piece_first, covered_first - 1))
                if covered_last < piece_last:
                    next_pieces.append((covered_last + 1, piece_last))
            pieces = next_pieces
            if not pieces:
                break
        return pieces


# ---------------------------------------------------------------------------
# The I/O shell
# ---------------------------------------------------------------------------
@dataclass
class WriterSettings:
    """Everything the writer needs from its command line."""

    stream_address: str
    output_file: str
    output_root: str | None = None
    direct: bool = False
    direct_mode: str = "pull"
    stop_deadline: float = 10.0
    flush_interval: float = 1.0
    finished_grace: float = 2.0


class NullOutput:
    """``/dev/null`` as the output file: consume the range, count it, write nothing (as the original)."""

    def __init__(self) -> None:
        self.rows = 0
        self.bytes_written = 0
        self.absent_values = 0

    def append(self, message: Any) -> None:
        self.rows += 1
        for index in range(message.n_channels):
            size = len(message.value_part(index))
            self.bytes_written += size
            self.absent_values += size == 0

    def record_missing(self, first_pulse_id: int, last_pulse_id: int, reason: str, count: int | None = None) -> None:
        pass

    def set_attributes(self, attributes: dict) -> None:
        pass

    def maybe_flush(self) -> bool:
        return False

    def truncate(self, rows: int, missing: Any = None) -> int:
        """Only ``rows`` follows (nothing was written; the byte counts keep the removed rows)."""
        removed, self.rows = self.rows - rows, rows
        return removed

    def close(self, attributes: dict | None = None) -> None:
        pass


class DirectSource:
    """A plain bsread stream (PULL or SUB), live only: what the original writer read.

    Offers the part of the ReplayClient interface the run loop uses; every
    message is a ``replay.Data`` whose ``pulse_id`` is None (the run loop
    parses the frames anyway). There is no history: a start pulse in the past
    is recorded as missing ("not_received"), and the run loop applies the stop.
    """

    def __init__(self, address: str, mode: str = "pull") -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB if mode == "sub" else zmq.PULL)
        if mode == "sub":
            self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        self._address = address

    def start(self) -> "DirectSource":
        self._socket.connect(self._address)
        return self

    def receive(self, timeout: float) -> replay.Data | None:
        if not self._socket.poll(int(timeout * 1000)):
            return None
        return replay.Data(pulse_id=None, frames=self._socket.recv_multipart(copy=False))

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        pass

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()


@dataclass
class _Counters:
    """Written by the run thread only; /statistics reads them without a lock (plain ints)."""

    messages_received: int = 0
    messages_written: int = 0
    messages_before_start: int = 0
    messages_out_of_order: int = 0
    messages_rejected: int = 0
    rejected_reasons: dict = field(default_factory=dict)
    gap_notices: int = 0
    buffer_lost: int = 0
    rate: float = 0.0
    started_at: float | None = None


class Writer:
    """One acquisition: the control under a lock, a command queue, one run thread owning source and file.

    The REST layer calls the public methods from its request threads; they
    return plain data or raise :class:`RequestError`. ``done`` is set once
    the file is closed (or when the writer ends without ever starting).
    ``source_factory`` and ``output_factory`` (Start -> object) replace the
    ReplayClient/DirectSource and the H5File, for tests.
    """

    def __init__(self, settings: WriterSettings,
                 source_factory: Callable[[Start], Any] | None = None,
                 output_factory: Callable[[Start], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._source_factory = source_factory or self._default_source
        self._output_factory = output_factory or self._default_output
        self._lock = threading.Lock()
        self._control = WriterControl(settings.output_file, self._check_output)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._counters = _Counters()
        self._range: PulseRange | None = None
        self._output: Any = None
        self._unlocated_gaps: list[dict] = []
        self._thread: threading.Thread | None = None
        self.done = threading.Event()
        self.exit_at_once = threading.Event()  # /kill or a signal: no grace period

    # -- REST entry points -------------------------------------------------------
    @property
    def state(self) -> State:
        return self._control.state

    def status(self) -> str:
        return self._control.state.value

    @property
    def exit_code(self) -> int:
        return 1 if self._control.state is State.ERROR else 0

    def set_parameters(self, body: object) -> dict:
        with self._lock:
            parameters = self._control.set_parameters(body)
        logger.info("Parameters set: %s", parameters)
        return parameters

    def parameters(self) -> dict:
        with self._lock:
            return dict(self._control.parameters)

    def start_pulse_id(self, pulse_id: int, output_file: str | None = None) -> str:
        with self._lock:
            start = self._control.start_at_pulse(pulse_id, output_file)
        return self._launch(start)

    def start_now(self, output_file: str | None = None) -> str:
        with self._lock:
            start = self._control.start_now(self._clock(), output_file)
        return self._launch(start)

    def stop_pulse_id(self, pulse_id: int) -> str:
        with self._lock:
            command = self._control.stop_at_pulse(pulse_id)
            if command is not None:
                self._commands.put(command)
        logger.info("stop_pulse_id set to %d", pulse_id)
        return self.status()

    def stop_now(self) -> str:
        with self._lock:
            command = self._control.stop_now(self._clock())
            self._commands.put(command)
        logger.info("stop_now: stopping at time %.6f", command.stop_time)
        return self.status()

    def stop(self, reason: str = "stopped", wait: float | None = 60.0) -> str:
        """Close the file now and end the process; waits (up to ``wait`` s) until the file is closed."""
        with self._lock:
            command = self._control.stop(reason)
            if command is not None:
                self._commands.put(command)
            elif self._thread is None and self._control.state is State.FINISHED:
                self.done.set()  # stopped before any start: no file, nothing to close
        logger.info("Stop requested (%s)", reason)
        if wait is not None:
            self.done.wait(wait)
        return self.status()

    def kill(self, wait: float | None = 60.0) -> str:
        """As :meth:`stop`, then exit without the grace period."""
        self.exit_at_once.set()
        return self.stop("killed", wait)

    def statistics(self) -> dict:
        with self._lock:
            control, pulse_range, output = self._control, self._range, self._output
            counters = self._counters
            missing = list(pulse_range.missing) if pulse_range else []
            statistics: dict[str, Any] = {
                # The original writer's fields: the requested range and the last message written.
                "start_pulse_id": control.start_pulse_id,
                "stop_pulse_id": control.stop_pulse_id,
                "start_timestamp": control.start_time,
                "stop_timestamp": control.stop_time,
                "last_pulse_id": pulse_range.last_pulse_id if pulse_range else None,
                "last_timestamp": pulse_range.last_timestamp if pulse_range else None,
                # Added.
                "first_pulse_id": pulse_range.first_pulse_id if pulse_range else None,
                "first_timestamp": pulse_range.first_timestamp if pulse_range else None,
                "output_file": control.output_file,
                "messages_received": counters.messages_received,
                "messages_written": counters.messages_written,
                "bytes_written": output.bytes_written if output is not None else 0,
                # Rows on disk: what a kill -9 would leave in the file now.
                "rows_flushed": getattr(output, "rows_flushed", 0) if output is not None else 0,
                "rate": round(counters.rate, 3),
                "messages_before_start": counters.messages_before_start,
                "messages_out_of_order": counters.messages_out_of_order,
                "messages_rejected": counters.messages_rejected,
                "rejected_reasons": dict(counters.rejected_reasons),
                "gap_notices": counters.gap_notices,
                "buffer_lost": counters.buffer_lost,
                "missing_pulses": sum(item.count for item in missing),
                "missing_by_reason": _by_reason(missing),
                "missing_ranges": len(missing),
                "missing": [_missing_dict(item) for item in missing[:MAX_MISSING_SHOWN]],
                "unlocated_gaps": list(self._unlocated_gaps),
                "absent_values": output.absent_values if output is not None else 0,
                "pulse_id_step": pulse_range.step if pulse_range else None,
                "progress": (pulse_range.progress() if pulse_range
                             else 0.0 if control.state is State.WAITING else None),
                "end_reason": control.end_reason,
                "error": control.error,
            }
        return statistics

    # -- start -------------------------------------------------------------------
    def _check_output(self, path: str, requested: bool) -> str:
        # OUTPUT_FILE of the command line is relative to the working directory; a
        # relative path given over REST is relative to --output-root when there is one.
        base = self.settings.output_root if requested and self.settings.output_root else os.getcwd()
        return resolve_output_file(path, self.settings.output_root, base)

    def _launch(self, start: Start) -> str:
        """Start the run thread and wait until it has opened the file and the source (or failed to)."""
        logger.info("Starting: output %s, start_pulse_id %s, start_time %s, stop_pulse_id %s, stop_time %s",
                    start.output_file, start.start_pulse_id, start.start_time, start.stop_pulse_id, start.stop_time)
        opened = threading.Event()
        outcome: dict[str, str] = {}
        with self._lock:
            self._thread = threading.Thread(target=self._run, args=(start, opened, outcome), name="writer-run",
                                            daemon=True)
            self._thread.start()
        if not opened.wait(START_TIMEOUT):
            logger.warning("The file and the source are still opening after %.0f s", START_TIMEOUT)
        elif "error" in outcome:
            raise BadRequest(outcome["error"])
        return self.status()

    # -- the run thread: the only owner of the source and the file ---------------
    def _run(self, start: Start, opened: threading.Event, outcome: dict) -> None:
        pulse_range = PulseRange(start.start_pulse_id, start.start_time, start.stop_pulse_id, start.stop_time)
        source = output = None
        try:
            source = self._source_factory(start)
            output = self._output_factory(start)
            output.set_attributes(_requested_range(start.start_pulse_id, start.start_time,
                                                   start.stop_pulse_id, start.stop_time))
            source.start()
        except Exception as error:  # noqa: BLE001 (any failure to open is reported to the DAQ)
            logger.exception("Cannot start writing %s", start.output_file)
            outcome["error"] = f"cannot start writing {start.output_file}: {error}"
            _abandon(start, source, output)
            with self._lock:
                self._control.start_failed(outcome["error"])
                self._thread = None
                while not self._commands.empty():  # meant for the run that never was
                    self._commands.get_nowait()
                if self._control.state is State.FINISHED:
                    self.done.set()
            opened.set()
            return
        with self._lock:
            self._range, self._output = pulse_range, output
            self._counters.started_at = time.monotonic()
        opened.set()

        loop = _RunLoop(self, source, output, pulse_range)
        error_text: str | None = None
        try:
            end_reason = loop.run()
        except Exception as error:  # noqa: BLE001 (whatever failed, the file gets closed)
            logger.exception("The writer failed")
            error_text = f"{type(error).__name__}: {error}"
            end_reason = "writer_error"
            try:
                loop.finish(end_reason)
            except Exception:  # noqa: BLE001 (the file must still be closed)
                logger.exception("Recording the missing pulses failed")
        with self._lock:
            self._control.finishing(end_reason)
        attributes = _requested_range(start.start_pulse_id, start.start_time,
                                      pulse_range.stop_pulse_id, pulse_range.stop_time)
        attributes["end_reason"] = end_reason
        if self._unlocated_gaps:
            attributes["unlocated_gaps"] = list(self._unlocated_gaps)
        for closer, what in ((lambda: output.close(attributes), "the file"), (source.close, "the source")):
            try:
                closer()
            except Exception as error:  # noqa: BLE001
                logger.exception("Closing %s failed", what)
                error_text = error_text or f"closing {what} failed: {error}"
        with self._lock:
            self._control.finished(error_text)
            elapsed = time.monotonic() - self._counters.started_at
            if elapsed > 0:
                self._counters.rate = self._counters.messages_written / elapsed
        logger.info("Closed %s: %d messages, pulse_id %s..%s, %d pulses missing; end: %s%s",
                    start.output_file, self._counters.messages_written, pulse_range.first_pulse_id,
                    pulse_range.last_pulse_id, pulse_range.missing_count, end_reason,
                    f"; error: {error_text}" if error_text else "")
        self.done.set()

    # -- default factories -------------------------------------------------------
    def _default_source(self, start: Start) -> Any:
        if self.settings.direct:
            return DirectSource(self.settings.stream_address, self.settings.direct_mode)
        return replay.ReplayClient(self.settings.stream_address, start_pulse_id=start.start_pulse_id,
                                   start_time=start.start_time, stop_pulse_id=start.stop_pulse_id,
                                   stop_time=start.stop_time)

    def _default_output(self, start: Start) -> Any:
        if start.output_file == DEV_NULL:
            return NullOutput()
        directory = os.path.dirname(start.output_file)
        if directory:
            os.makedirs(directory, exist_ok=True)  # as the original: create the folder
        if os.path.lexists(start.output_file):  # appeared since the request was checked
            raise FileExistsError(f"{start.output_file} already exists; the writer does not overwrite files")
        general = {name: start.parameters[name] for name in REQUIRED_PARAMETERS if name in start.parameters}
        extra = {key: value for key, value in start.parameters.items() if key not in REQUIRED_PARAMETERS}
        return H5File(start.output_file, general, extra, flush_interval=self.settings.flush_interval)


MAX_MISSING_SHOWN = 100  # missing ranges listed in /statistics (all are in the file)


def _requested_range(start_pulse_id: int | None, start_time: float | None,
                     stop_pulse_id: int | None, stop_time: float | None) -> dict:
    """File attributes of the requested range (None: not requested, the attribute is left out)."""
    return {"requested_start_pulse_id": start_pulse_id, "requested_start_time": start_time,
            "requested_stop_pulse_id": stop_pulse_id, "requested_stop_time": stop_time}


def _missing_dict(item: MissingRange) -> dict:
    return {"first_pulse_id": item.first_pulse_id, "last_pulse_id": item.last_pulse_id,
            "count": item.count, "reason": item.reason}


def _by_reason(missing: Iterable[MissingRange]) -> dict[str, int]:
    result: dict[str, int] = {}
    for item in missing:
        result[item.reason] = result.get(item.reason, 0) + item.count
    return result


def _abandon(start: Start, source: Any, output: Any) -> None:
    """After a failed start: close what was opened and remove the empty file it created."""
    if output is not None:
        try:
            output.close({})
        except Exception:  # noqa: BLE001 (best effort; the start already failed)
            logger.exception("Closing the abandoned output failed")
        if start.output_file != DEV_NULL and os.path.exists(start.output_file):
            os.unlink(start.output_file)
    if source is not None:
        try:
            source.close()
        except Exception:  # noqa: BLE001
            logger.exception("Closing the abandoned source failed")


class _RunLoop:
    """The body of the run thread: receive, filter, write, until the range is over; returns why it ended."""

    def __init__(self, writer: Writer, source: Any, output: Any, pulse_range: PulseRange) -> None:
        self.writer = writer
        self.source = source
        self.output = output
        self.range = pulse_range
        self.parser = MessageParser()
        self.counters = writer._counters  # noqa: SLF001 (the run thread is their only writer)
        self.commands = writer._commands  # noqa: SLF001
        self.stop_deadline = writer.settings.stop_deadline
        self.stop_now = False
        self.buffer_lost = False  # since the last data
        now = time.monotonic()
        self.last_data_at = now
        self.stop_set_at = now
        self._rate_mark = (now, 0)

    def run(self) -> str:
        while True:
            if self.range.complete:
                return self.finish("stop_reached")
            event = self.source.receive(POLL_INTERVAL)
            # Commands after the receive, before the event: a stop posted while waiting
            # applies to the message that ended the wait.
            reason = self._apply_commands()
            if reason is not None:
                return self.finish(reason)
            now = time.monotonic()
            # append() flushes on its own; this covers a quiet source and events that write
            # no row (gaps, messages before the start or out of order), so no row waits in
            # memory longer than flush_interval (what kill -9 can cost).
            self.output.maybe_flush()
            if event is None:
                if self._silent(now):
                    return self.finish("buffer_lost" if self.buffer_lost else "source_silent")
            elif isinstance(event, replay.Data):
                self.last_data_at = now
                self.buffer_lost = False
                self._data(event.frames)
                self._update_rate(now)
            elif isinstance(event, replay.Gap):
                self._gap(event)
            elif isinstance(event, replay.End):
                logger.info("The buffer ended the replay: %s (last pulse_id %s)", event.reason, event.last_pulse_id)
                self.range.end_reached()
                return self.finish("stop_reached")
            elif isinstance(event, replay.BufferLost):
                # The client re-requests the rest of the range by itself; a buffer that stays
                # away is a silent source for the stop deadline.
                self.counters.buffer_lost += 1
                self.buffer_lost = True
            elif isinstance(event, replay.Error):
                raise RuntimeError(f"the buffer refused the replay request: {event.reason}: {event.detail}")
            else:
                logger.warning("Ignoring an unknown event from the source: %r", event)

    def finish(self, reason: str) -> str:
        """The range is over: record the head and tail that never arrived."""
        with self.writer._lock:  # noqa: SLF001
            self.writer._control.finishing(reason)  # noqa: SLF001
        for item in self.range.close(reason):
            self._record(item)
        return reason

    def _apply_commands(self) -> str | None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return None
            if isinstance(command, Close):
                return command.reason
            if isinstance(command, SetStop):
                keep = self.range.set_stop(command.stop_pulse_id, command.stop_time)
                if keep is not None:  # rows past the new stop were written already: remove them
                    removed = self.output.truncate(keep, self.range.missing)
                    logger.info("The stop came after its pulse was written: %d rows removed", removed)
                    self.counters.messages_written = keep
                self.source.set_stop(stop_pulse_id=command.stop_pulse_id, stop_time=command.stop_time)
                self.stop_set_at = time.monotonic()
                self.stop_now = self.stop_now or command.now

    def _silent(self, now: float) -> bool:
        """Nothing arrived for too long while a stop is set: stop waiting for it."""
        if not self.range.has_stop:
            return False
        limit = min(self.stop_deadline, STOP_NOW_SILENCE) if self.stop_now else self.stop_deadline
        return now - max(self.last_data_at, self.stop_set_at) > limit

    def _data(self, frames: Sequence[Any]) -> None:
        counters = self.counters
        counters.messages_received += 1
        try:
            message = self.parser.parse(frames)
        except IgnoredMessage:
            return
        except ProtocolError as error:
            counters.messages_rejected += 1
            key = error.reason.value
            counters.rejected_reasons[key] = counters.rejected_reasons.get(key, 0) + 1
            logger.warning("Rejected a message: %s", error)
            return
        verdict = self.range.classify(message.pulse_id, message.timestamp)
        if verdict is Verdict.WRITE:
            self.output.append(message)
            counters.messages_written += 1
            for item in self.range.written(message.pulse_id, message.timestamp):
                self._record(item)
        elif verdict is Verdict.BEFORE:
            counters.messages_before_start += 1
        elif verdict is Verdict.OLD:
            counters.messages_out_of_order += 1

    def _gap(self, gap: replay.Gap) -> None:
        self.counters.gap_notices += 1
        if gap.reason == replay.GapReason.SOURCE_RESET.value:
            self.range.source_reset()
        if gap.first_pulse_id is None or gap.last_pulse_id is None:
            # Pulse ids unknown (a range by time before the buffer's oldest, a source reset):
            # kept in the statistics and the file attributes, not in /missing.
            if gap.count != 0:
                logger.warning("Messages lost where pulse ids are unknown: %s", gap)
                with self.writer._lock:  # noqa: SLF001
                    self.writer._unlocated_gaps.append(  # noqa: SLF001
                        {"first_pulse_id": gap.first_pulse_id, "last_pulse_id": gap.last_pulse_id,
                         "count": gap.count, "reason": gap.reason})
            return
        for item in self.range.gap(gap.first_pulse_id, gap.last_pulse_id, gap.reason, gap.count):
            self._record(item)

    def _record(self, item: MissingRange) -> None:
        logger.warning("Pulses %d..%d missing (%d): %s", item.first_pulse_id, item.last_pulse_id, item.count,
                       item.reason)
        self.output.record_missing(item.first_pulse_id, item.last_pulse_id, item.reason, item.count)

    def _update_rate(self, now: float) -> None:
        mark_time, mark_count = self._rate_mark
        if now - mark_time >= 1.0:
            written = self.counters.messages_written
            self.counters.rate = (written - mark_count) / (now - mark_time)
            self._rate_mark = (now, written)


# ---------------------------------------------------------------------------
# Process: privileges, CLI, main
# ---------------------------------------------------------------------------
def drop_privileges(user_id: int) -> None:
    """Run as ``user_id`` and its primary group from now on (-1: keep the current user).

    Raises ``PermissionError`` with a message saying what to do when the
    process may not switch (only root may switch to another user).
    """
    if user_id == -1:
        logger.info("Not changing process uid and gid.")
        return
    if user_id < 0:
        raise ValueError(f"USER_ID must be -1 or a uid >= 0, not {user_id}")
    try:
        entry = pwd.getpwuid(user_id)
        group_id, name = entry.pw_gid, entry.pw_name
    except KeyError:
        group_id, name = user_id, None  # an uid without a passwd entry: its group as the original did
    if os.getuid() == user_id and os.geteuid() == user_id and os.getgid() == group_id:
        logger.info("Already running as uid %d gid %d.", user_id, group_id)
        return
    try:
        if os.geteuid() == 0:
            if name is not None:
                os.initgroups(name, group_id)
            else:
                os.setgroups([group_id])
        os.setgid(group_id)
        os.setuid(user_id)
    except PermissionError as error:
        raise PermissionError(
            f"cannot switch to uid {user_id} gid {group_id}: {error.strerror} (running as uid {os.getuid()}; "
            "only root may change user: start as root or pass -1)") from None
    logger.info("Running as uid %d gid %d.", user_id, group_id)


def _print_ready(payload: dict) -> None:
    sys.stdout.write("READY " + json.dumps(payload) + "\n")
    sys.stdout.flush()


def serve(writer: Writer, server: Any, in_flight: Callable[[], int] = lambda: 0) -> int:
    """Wait for the writer to finish, keep answering for the grace period, return the exit code.

    SIGTERM and SIGINT close the file (as ``/kill``). The handler only
    records the signal; this loop, in the main thread, acts on it within
    ``SIGNAL_LATENCY`` (taking locks inside a signal handler could deadlock).
    """
    pending: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        pending.append(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not writer.done.wait(SIGNAL_LATENCY):
            if pending:
                name = pending.pop()
                logger.info("%s received: closing the file", name)
                writer.exit_at_once.set()
                writer.stop(reason=f"signal_{name}", wait=None)
        grace_end = time.monotonic() + writer.settings.finished_grace
        while not pending and time.monotonic() < grace_end:
            if writer.exit_at_once.wait(min(SIGNAL_LATENCY, max(0.0, grace_end - time.monotonic()))):
                break
        # Let the answers of /stop and /kill (and of status polls) reach their clients.
        flush_end = time.monotonic() + 2.0
        while in_flight() > 0 and time.monotonic() < flush_end:
            time.sleep(0.01)
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = writer.exit_code
    logger.info("Writer exits with %d (%s)", code, writer.status())
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """CLI ``sf_bsread_writer STREAM_ADDRESS OUTPUT_FILE USER_ID REST_PORT [options]``."""
    from sf_bsread_writer.httpserver import HttpServer
    from sf_bsread_writer.rest import make_app

    args = config.parse_args("sf_bsread_writer", "bsread writer: one pulse range from a buffer into an HDF5 file",
                             config.WRITER_OPTIONS, config.WRITER_ENV_PREFIX, argv)
    config.configure_logging(args.log_level)
    settings = WriterSettings(
        stream_address=args.stream_address, output_file=args.output_file, output_root=args.output_root,
        direct=args.direct, direct_mode=args.direct_mode, stop_deadline=args.stop_deadline,
        flush_interval=args.flush_interval, finished_grace=args.finished_grace,
    )
    logger.info("Starting writer: stream %s, output file %s%s", settings.stream_address, settings.output_file,
                " (direct)" if settings.direct else "")
    writer = Writer(settings)
    app = make_app(writer)
    try:
        # Bind first (a privileged port needs the privileges), then drop them before touching any file.
        server = HttpServer(app, args.rest_host, args.rest_port)
    except OSError as error:
        logger.error("Cannot listen on %s:%s: %s", args.rest_host, args.rest_port, error)
        return 2
    try:
        drop_privileges(args.user_id)
        if settings.output_root is not None and not os.path.isdir(settings.output_root):
            raise ValueError(f"--output-root {settings.output_root} is not a directory")
        if args.output_file != DEV_NULL:
            try:
                resolve_output_file(args.output_file, settings.output_root, os.getcwd())
            except OutsideRoot as error:
                raise ValueError(error.message) from None
            except BadRequest as error:
                # E.g. it exists: a start may still name another file over REST, so warn only.
                logger.warning("OUTPUT_FILE: %s", error.message)
    except (PermissionError, ValueError) as error:
        logger.error("%s", error)
        server.stop()
        return 2
    server.start()
    _print_ready({"rest": server.url})
    return serve(writer, server, app.in_flight)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: rest.py imports
    # sf_bsread_writer.writer, and its exception classes must be the same ones.
    from sf_bsread_writer.writer import main as _main

    sys.exit(_main())
