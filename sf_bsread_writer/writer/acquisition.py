"""One acquisition's control: which request of the DAQ is legal when, and what it tells the run loop (pure).

:class:`WriterControl` is the state machine behind the writer's REST API:
what the DAQ asked for (parameters, start and stop by pulse id or by time)
and which request is legal in which state. Every REST call is one method
call that either returns a command for the run loop (:class:`StartRun`,
:class:`MoveStop`, :class:`EndRun`) or raises :class:`BadRequest` (400) /
:class:`WrongState` (409). :class:`SilenceWatch` is the run loop's one
clock-driven decision: when a quiet source ends the run. No threads,
sockets, files or clock here: ``now`` is an argument.

States::

    waiting --start--> writing --stop reached / silent source / stop, kill, signal--> finishing --> finished
       |   ^ ^                `-- an exception while writing ----------------------> finishing --> error
       |   | `-- the file or the source cannot be opened (400; the DAQ may try again)
       |   `---- persistent mode: the run ended by itself (not by /stop, /kill, a signal) <-- finishing
       `-- /stop, /kill, SIGTERM while waiting (before any start, or between persistent runs) -> finished

Persistent mode is the original's: a start that names its own
``output_file`` keeps the process for the next start once its run is over;
a start without one is the last. The process's exit code is then the worst
outcome of all its runs (:attr:`WriterControl.exit_outcome`).
"""
from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from sf_bsread_writer import jsontext

__all__ = [
    "State",
    "RunEnd",
    "signal_end_reason",
    "RequestError",
    "BadRequest",
    "WrongState",
    "Unavailable",
    "OutsideRoot",
    "REQUIRED_PARAMETERS",
    "MAX_PULSE_ID",
    "parse_pulse_id",
    "check_parameters",
    "StartRun",
    "MoveStop",
    "EndRun",
    "WriterControl",
    "SilenceWatch",
    "STOP_NOW_SILENCE",
    "Outcome",
    "judge_outcome",
]

REQUIRED_PARAMETERS = ("general/created", "general/user", "general/process", "general/instrument")
MAX_PULSE_ID = 2**63 - 1  # pulse ids are int64 on the wire and in the file
# After /stop_now a source that has delivered nothing for this long is taken
# as silent at once (instead of waiting the whole --stop-deadline).
STOP_NOW_SILENCE = 1.0


class RunEnd(str, enum.Enum):
    """Why a run ended: the file attribute and ``/statistics`` ``end_reason``, and the ``/missing`` reason
    of a tail the end cut off. Every end reason the writer gives is one of these or
    :func:`signal_end_reason` (docs/file-format.md and docs/writer.md list them; tests/test_docs_hold.py
    holds the lists against this enum). Emitters use ``.value``: the plain string goes into JSON and HDF5."""

    STOP_REACHED = "stop_reached"  # the stop pulse or time was reached (owes no tail)
    SOURCE_SILENT = "source_silent"  # nothing arrived for the stop deadline after a stop was set
    BUFFER_LOST = "buffer_lost"  # the buffer stopped answering (and a stop was set)
    STOPPED = "stopped"  # GET /stop
    KILLED = "killed"  # GET /kill
    DISK_FULL = "disk_full"  # the output's disk is full (docs/file-format.md, "A full disk")
    WRITER_ERROR = "writer_error"  # the writer failed while writing


def signal_end_reason(signal_name: str) -> str:
    """A run ended by a signal (``process.STOP_SIGNALS``): ``signal_SIGTERM``, ``signal_SIGINT``."""
    return f"signal_{signal_name}"


# ---------------------------------------------------------------------------
# Errors and input validation
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


class Unavailable(RequestError):
    """The request is fine but what it needs cannot be reached now (503): a buffer down, or full of writers."""

    http_status = 503


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


def check_parameters(body: object) -> dict:
    """The body of ``POST /parameters``: a JSON object with the four required fields (strings or numbers)."""
    if not isinstance(body, dict):
        raise BadRequest(f"parameters must be a JSON object, not {type(body).__name__}")
    missing = [name for name in REQUIRED_PARAMETERS if body.get(name) in (None, "")]
    if missing:
        # "Missing mandatory parameters" is the original's wording, which its clients look for.
        raise BadRequest(f"Missing mandatory parameters: {', '.join(missing)} "
                         f"(required: {', '.join(REQUIRED_PARAMETERS)})")
    for name in REQUIRED_PARAMETERS:
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise BadRequest(f"parameter {name} must be a string or a number, not {json.dumps(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"parameter {name} must be a finite number, not {value}")
    if jsontext.depth(body) > jsontext.MAX_DEPTH:
        raise BadRequest(f"parameters are nested more than {jsontext.MAX_DEPTH} levels")
    return dict(body)


# ---------------------------------------------------------------------------
# Commands from the control to the run loop
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StartRun:
    """Begin an acquisition: open ``output_file`` and ask the source from the start on."""

    output_file: str
    start_pulse_id: int | None
    start_time: float | None
    stop_pulse_id: int | None
    stop_time: float | None
    parameters: dict
    persistent: bool = False  # the start named its output_file: the process waits for the next start after it


@dataclass(frozen=True)
class MoveStop:
    """The stop changed while writing. ``now``: /stop_now, a silent source ends the run at once."""

    stop_pulse_id: int | None
    stop_time: float | None
    now: bool = False


@dataclass(frozen=True)
class EndRun:
    """Close the file now; pulses of the range not yet written are recorded as missing for ``reason``."""

    reason: str


# ---------------------------------------------------------------------------
# The state machine
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
        self.outcome: Outcome | None = None  # of the last run, once it has ended
        self.persistent = False  # the current (or last) run keeps the process for the next start
        self.ending = False  # /stop, /kill or a signal: the process ends after the current run
        self.runs_finished = 0
        self.exit_outcome: Outcome | None = None  # the worst outcome of every run so far

    # -- what the DAQ asks ---------------------------------------------------
    def set_parameters(self, body: object) -> dict:
        self._require_waiting("parameters can only be set before the start")
        self.parameters = check_parameters(body)
        return self.parameters

    def start_at_pulse(self, pulse_id: int, output_file: str | None = None) -> StartRun:
        self._require_waiting("cannot start")
        if self.stop_pulse_id is not None and pulse_id > self.stop_pulse_id:
            raise BadRequest(f"start_pulse_id {pulse_id} is after the stop_pulse_id {self.stop_pulse_id}")
        return self._start(output_file, start_pulse_id=pulse_id)

    def start_now(self, now: float, output_file: str | None = None) -> StartRun:
        self._require_waiting("cannot start")
        return self._start(output_file, start_time=now)

    def stop_at_pulse(self, pulse_id: int) -> MoveStop | None:
        """Set (or move) the inclusive last pulse id; before the start too. None: nothing to tell the run loop."""
        if self.state not in (State.WAITING, State.WRITING):
            raise WrongState(f"cannot set stop_pulse_id: the writer is {self.state.value}")
        if self.start_pulse_id is not None and pulse_id < self.start_pulse_id:
            raise BadRequest(f"stop_pulse_id {pulse_id} is before the start_pulse_id {self.start_pulse_id}")
        self.stop_pulse_id = pulse_id
        if self.state is State.WAITING:
            return None
        return MoveStop(self.stop_pulse_id, self.stop_time)

    def stop_now(self, now: float) -> MoveStop:
        """Stop at the current time (and at the stop pulse, if one is set and comes first)."""
        if self.state is State.WAITING:
            raise WrongState("cannot stop_now: the writer has not started (GET /stop ends it without a file)")
        if self.state is not State.WRITING:
            raise WrongState(f"cannot stop_now: the writer is {self.state.value}")
        if self.stop_time is None or now < self.stop_time:
            self.stop_time = now
        return MoveStop(self.stop_pulse_id, self.stop_time, now=True)

    def stop(self, reason: str = RunEnd.STOPPED.value) -> EndRun | None:
        """End the acquisition and the process (``GET /stop``, ``/kill``, a signal). None: no run to close."""
        self.ending = True
        if self.state is State.WAITING:
            self.state = State.FINISHED
            if not self.runs_finished:
                self.end_reason = f"{reason} before start"
            return None
        if self.state is State.WRITING:
            self.state = State.FINISHING
            self.end_reason = reason
            return EndRun(reason)
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

    def finished(self, error: str | None = None, outcome: "Outcome | None" = None) -> None:
        """The run's file is closed. A persistent run that ended by itself goes back to waiting."""
        self.runs_finished += 1
        self.outcome = outcome
        if outcome is not None and (self.exit_outcome is None or outcome.exit_severity > self.exit_outcome.exit_severity):
            self.exit_outcome = outcome
        if error:
            self.error = error
        if self.persistent and not self.ending:
            self.state = State.WAITING
            # The next run asks for its own range: nothing of this one carries over but the parameters.
            self.start_pulse_id = self.start_time = self.stop_pulse_id = self.stop_time = None
            self.output_file = self.default_output_file
            return
        self.state = State.ERROR if error else State.FINISHED

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
               start_time: float | None = None) -> StartRun:
        if output_file is None:
            path = self._check_output(self.default_output_file, False)
        else:
            path = self._check_output(output_file, True)
        self.output_file = path
        self.start_pulse_id, self.start_time = start_pulse_id, start_time
        self.state = State.WRITING
        self.error = self.end_reason = self.outcome = None
        self.persistent = output_file is not None
        return StartRun(path, start_pulse_id, start_time, self.stop_pulse_id, self.stop_time, dict(self.parameters),
                        self.persistent)


# ---------------------------------------------------------------------------
# When a quiet source ends the run
# ---------------------------------------------------------------------------
class SilenceWatch:
    """Decides when a source that has gone quiet ends the run; fed the run loop's clock.

    Only a run with a stop (pulse or time) can end by silence: without one
    the writer waits for the DAQ. The clock starts at the last data message
    or the last stop change, whichever is later, so a stop set long after
    the source went quiet still waits the whole deadline. After
    ``/stop_now`` the source is given only ``stop_now_silence`` (at most the
    deadline): the DAQ said "now", and a live source that stays quiet for a
    second has nothing more for this run. While the buffer is lost (the
    replay client re-requests by itself), the end is ``buffer_lost``, not
    ``source_silent``.
    """

    def __init__(self, stop_deadline: float, now: float, stop_now_silence: float = STOP_NOW_SILENCE) -> None:
        self.stop_deadline = stop_deadline
        self.stop_now_silence = stop_now_silence
        self.last_data_at = now
        self.stop_moved_at = now
        self.stop_now = False
        self.buffer_is_lost = False  # since the last data

    def data(self, now: float) -> None:
        self.last_data_at = now
        self.buffer_is_lost = False

    def buffer_lost(self) -> None:
        self.buffer_is_lost = True

    def stop_moved(self, now: float, at_once: bool) -> None:
        self.stop_moved_at = now
        self.stop_now = self.stop_now or at_once

    def end_reason(self, now: float, has_stop: bool) -> str | None:
        """``source_silent`` / ``buffer_lost`` when nothing arrived for too long, else None."""
        if not has_stop:
            return None
        limit = min(self.stop_deadline, self.stop_now_silence) if self.stop_now else self.stop_deadline
        if now - max(self.last_data_at, self.stop_moved_at) <= limit:
            return None
        return RunEnd.BUFFER_LOST.value if self.buffer_is_lost else RunEnd.SOURCE_SILENT.value


# ---------------------------------------------------------------------------
# What a run achieved
# ---------------------------------------------------------------------------
class Outcome(str, enum.Enum):
    """What an acquisition achieved; the same word in the exit code, the file, /statistics and the summary.

    The process's exit code is :attr:`exit_code`: 0 complete, 3 partial,
    1 failed (2 is kept for a writer that could not even start).
    """

    COMPLETE = "complete"  # every requested pulse is in the file
    PARTIAL = "partial"  # rows were written, but some of the range is not in the file (counted by reason)
    FAILED = "failed"  # nothing was written, or the run ended in an error

    @property
    def exit_code(self) -> int:
        return {Outcome.COMPLETE: 0, Outcome.PARTIAL: 3, Outcome.FAILED: 1}[self]

    @property
    def exit_severity(self) -> int:
        """For the worst of several runs (persistent mode): failed > partial > complete."""
        return {Outcome.COMPLETE: 0, Outcome.PARTIAL: 1, Outcome.FAILED: 2}[self]


def judge_outcome(rows: int, missing_pulses: int, lost_without_pulse_ids: int | None, refused_channels: int,
                  range_open: bool, error: str | None) -> Outcome:
    """The outcome of a run from what the file holds and what is known to be missing.

    ``lost_without_pulse_ids``: messages the buffer reported lost where
    pulse ids are unknown (None: an unknown number, at least one).
    ``range_open``: the requested range had a stop (pulse or time) that
    the run did not reach (a source gone silent, a stop request): the rest
    of the range is missing even where no pulse id can name it.
    """
    if error is not None or rows == 0:
        return Outcome.FAILED
    if missing_pulses or lost_without_pulse_ids != 0 or refused_channels or range_open:
        return Outcome.PARTIAL
    return Outcome.COMPLETE
