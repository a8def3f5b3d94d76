"""The writer service: one acquisition, driven over REST, written by one run thread.

:class:`Writer` is the I/O shell around the pure core of an acquisition
(``writer.acquisition.WriterControl``: which request is legal when;
``writer.pulse_range.PulseRange``: what belongs in the file). REST threads
call its public methods, which change the control under a lock and post
commands on a queue; **one run thread owns the source and the file**
(``writer.run_loop.RunLoop``; nobody else touches them) and reports back
through the same lock.

In ``finished`` and ``error`` the file is closed; the CLI (``writer.cli``)
answers ``/status`` for ``--finished-grace`` seconds, then exits with the
outcome's code. In persistent mode (a start that names its own
``output_file``, as in the original) a run that ends by itself brings the
writer back to ``waiting`` for the next start, and only ``/stop``,
``/kill`` or a signal end the process. Nothing here calls ``os._exit``.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sf_bsread_writer.archive.reach_back import ReachBackSource
from sf_bsread_writer.bsread.spec import DEFAULT_MAX_MESSAGE_BYTES
from sf_bsread_writer.bsread.timebase import MAX_CLOCK_SKEW
from sf_bsread_writer.replay.client import HANDSHAKE_SECONDS
from sf_bsread_writer.replay.messages import Accepted, make_label
from sf_bsread_writer.status import json_value
from sf_bsread_writer.transport import partsio
from sf_bsread_writer.version import __version__
from sf_bsread_writer.writer.acquisition import (
    BadRequest,
    EndRun,
    MoveStop,
    Outcome,
    RunEnd,
    StartRun,
    State,
    Unavailable,
    WriterControl,
    judge_outcome,
)
from sf_bsread_writer.writer.direct import DirectSource
from sf_bsread_writer.writer.outputs import (
    DEV_NULL,
    abandon_output,
    open_output,
    resolve_output_file,
    write_summary,
)
from sf_bsread_writer.writer.pulse_range import PulseRange
from sf_bsread_writer.writer.run_loop import DISK_FULL, RunCounters, RunLoop
from sf_bsread_writer.writer.statistics import WriterStatistics

__all__ = ["WriterSettings", "Writer", "Started", "START_TIMEOUT", "NO_PULSE_ID"]

logger = logging.getLogger(__name__)

# How long a start request waits for the run thread to open the file and the source.
START_TIMEOUT = 20.0
# /statistics' last_pulse_id before any message is written (the original's -1, which its clients compare with).
NO_PULSE_ID = -1


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
    finished_grace: float = 0.0  # as the CLI's default: gone once the file is closed (docs/writer.md, "The exit")
    handshake_timeout: float = HANDSHAKE_SECONDS  # how long a start waits for the buffer's acceptance
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_clock_skew: float = MAX_CLOCK_SKEW  # --direct: bsread.timebase (a buffer decides for its messages)
    decompress_images: bool = False  # bitshuffle images stored plain, for readers without the filter plugin


@dataclass(frozen=True)
class Started:
    """The answer to a start: the writer's state, and what the DAQ should know about the range (or None)."""

    status: str
    warning: str | None = None


def _start_warning(start: StartRun, accepted: Accepted | None) -> str | None:
    """What the buffer's acceptance says about the requested range: older than what it holds?"""
    if accepted is None or start.start_pulse_id is None or accepted.archive:
        return None  # with an archive, what the ring lacks is read from there (and gaps say what it lacks too)
    oldest = accepted.oldest_pulse_id
    if oldest is None:
        return ("the buffer holds no message yet: pulses before the first one it receives will be missing "
                "(not_received)")
    if start.start_pulse_id >= oldest:
        return None
    if start.stop_pulse_id is not None and start.stop_pulse_id < oldest:
        return (f"none of pulses {start.start_pulse_id}..{start.stop_pulse_id} is in the buffer any more (its "
                f"oldest is {oldest}): nothing will be written (outcome failed)")
    return (f"pulses {start.start_pulse_id}..{oldest - 1} are older than the buffer's oldest pulse {oldest} "
            "and will be missing (before_buffer)")


def _requested_range(start_pulse_id: int | None, start_time: float | None,
                     stop_pulse_id: int | None, stop_time: float | None) -> dict:
    """File attributes of the requested range (None: not requested, the attribute is left out)."""
    return {"requested_start_pulse_id": start_pulse_id, "requested_start_time": start_time,
            "requested_stop_pulse_id": stop_pulse_id, "requested_stop_time": stop_time}


class Writer:
    """One acquisition: the control under a lock, a command queue, one run thread owning source and file.

    The REST layer calls the public methods from its request threads; they
    return plain data or raise ``RequestError``. ``done`` is set once the
    file is closed (or when the writer ends without ever starting).
    ``source_factory`` and ``output_factory`` (StartRun -> object) replace
    the ReplayClient/DirectSource and the H5File, for tests; ``clock`` is
    the wall clock that ``start_now``/``stop_now`` compare with the source's
    timestamps, ``monotonic`` the run loop's clock for its deadlines.
    """

    def __init__(self, settings: WriterSettings,
                 source_factory: Callable[[StartRun], Any] | None = None,
                 output_factory: Callable[[StartRun], Any] | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._source_factory = source_factory or self._default_source
        self._output_factory = output_factory or self._default_output
        self._lock = threading.Lock()
        self._control = WriterControl(settings.output_file, self._check_output)
        self._commands: queue.SimpleQueue[MoveStop | EndRun] = queue.SimpleQueue()
        self._counters = RunCounters()
        self._range: PulseRange | None = None
        self._output: Any = None
        self._thread: threading.Thread | None = None
        self._last_run: WriterStatistics | None = None  # persistent mode: shown while waiting for the next start
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
        """0 complete (or ended before any start), 3 partial, 1 failed: the worst run's (docs/writer.md, "Outcome")."""
        outcome = self._control.exit_outcome
        if outcome is not None:
            return outcome.exit_code
        return 1 if self._control.state is State.ERROR else 0

    def set_parameters(self, body: object) -> dict:
        with self._lock:
            parameters = self._control.set_parameters(body)
        logger.info("Parameters set: %s", parameters)
        return parameters

    def parameters(self) -> dict:
        with self._lock:
            return dict(self._control.parameters)

    def start_at_pulse(self, pulse_id: int, output_file: str | None = None) -> Started:
        """``PUT /start_pulse_id/<id>``."""
        with self._lock:
            start = self._control.start_at_pulse(pulse_id, output_file)
            self._new_run()
        return self._launch(start)

    def start_now(self, output_file: str | None = None) -> Started:
        """``PUT /start_now``."""
        with self._lock:
            start = self._control.start_now(self._clock(), output_file)
            self._new_run()
        return self._launch(start)

    def _new_run(self) -> None:
        """A run's own figures, from the moment it is started (under the lock, with the control's start)."""
        self._counters, self._range, self._output = RunCounters(), None, None

    def stop_at_pulse(self, pulse_id: int) -> str:
        """``PUT /stop_pulse_id/<id>``."""
        with self._lock:
            command = self._control.stop_at_pulse(pulse_id)
            if command is not None:
                self._commands.put(command)
        logger.info("stop_pulse_id set to %d", pulse_id)
        return self.status()

    def stop_now(self) -> str:
        """``PUT /stop_now``."""
        with self._lock:
            command = self._control.stop_now(self._clock())
            self._commands.put(command)
        logger.info("stop_now: stopping at time %.6f", command.stop_time)
        return self.status()

    def stop(self, reason: str = RunEnd.STOPPED.value, wait: float | None = 60.0) -> str:
        """Close the file now and end the process; waits (up to ``wait`` s) until the file is closed."""
        with self._lock:
            command = self._control.stop(reason)
            if command is not None:
                self._commands.put(command)
            elif self._thread is None and self._control.state is State.FINISHED:
                self.done.set()  # stopped while waiting (before any start, or between persistent runs)
        logger.info("Stop requested (%s)", reason)
        if wait is not None:
            self.done.wait(wait)
        return self.status()

    def kill(self, wait: float | None = 60.0) -> str:
        """As :meth:`stop`, then exit without the grace period."""
        self.exit_at_once.set()
        return self.stop(RunEnd.KILLED.value, wait)

    def statistics(self) -> WriterStatistics:
        """``GET /statistics``, typed (``.to_json()`` is the answer).

        Between persistent runs (and after /stop ends them): the last run's, until the next start.
        """
        with self._lock:
            control, pulse_range, output, counters = self._control, self._range, self._output, self._counters
            last = self._last_run
            if (last is not None and control.state in (State.WAITING, State.FINISHED)
                    and last.runs_finished == control.runs_finished):
                return replace(last, error=control.error)  # and a failed start's error since
            last_pulse_id = pulse_range.last_pulse_id if pulse_range else None
            return WriterStatistics(
                start_pulse_id=control.start_pulse_id,
                stop_pulse_id=control.stop_pulse_id,
                start_timestamp=control.start_time,
                stop_timestamp=control.stop_time,
                last_pulse_id=NO_PULSE_ID if last_pulse_id is None else last_pulse_id,
                last_timestamp=pulse_range.last_timestamp if pulse_range else None,
                first_pulse_id=pulse_range.first_pulse_id if pulse_range else None,
                first_timestamp=pulse_range.first_timestamp if pulse_range else None,
                output_file=control.output_file,
                messages_received=counters.messages_received,
                messages_written=counters.messages_written,
                bytes_written=output.bytes_written if output is not None else 0,
                rows_flushed=getattr(output, "rows_flushed", 0) if output is not None else 0,
                rate=round(counters.rate, 3),
                messages_before_start=counters.messages_before_start,
                messages_out_of_order=counters.messages_out_of_order,
                messages_rejected=counters.messages_rejected,
                rejected_reasons=dict(counters.rejected_reasons),
                gap_notices=counters.gap_notices,
                buffer_lost=counters.buffer_lost,
                source_reconnects=counters.source_reconnects,
                **WriterStatistics.missing_summary(pulse_range.missing if pulse_range else ()),
                unlocated_gaps=tuple(counters.unlocated_gaps),
                absent_values=output.absent_values if output is not None else 0,
                pulse_id_step=pulse_range.step if pulse_range else None,
                progress=(pulse_range.progress() if pulse_range
                          else 0.0 if control.state is State.WAITING else None),
                end_reason=control.end_reason,
                error=control.error,
                outcome=control.outcome.value if control.outcome is not None else None,
                runs_finished=control.runs_finished,
                time_base=counters.time_base,
                io_path=partsio.IMPLEMENTATION,
                refused_values=getattr(output, "refused_values", {}) if output is not None else {},
            )

    # -- start -------------------------------------------------------------------
    def _check_output(self, path: str, requested: bool) -> str:
        # OUTPUT_FILE of the command line is relative to the working directory; a
        # relative path given over REST is relative to --output-root when there is one.
        base = self.settings.output_root if requested and self.settings.output_root else os.getcwd()
        return resolve_output_file(path, self.settings.output_root, base)

    def _launch(self, start: StartRun) -> Started:
        """Start the run thread and wait until it has opened the source and the file (or failed to)."""
        logger.info("Starting: output %s, start_pulse_id %s, start_time %s, stop_pulse_id %s, stop_time %s",
                    start.output_file, start.start_pulse_id, start.start_time, start.stop_pulse_id, start.stop_time)
        opened = threading.Event()
        outcome: dict[str, str | None] = {}
        with self._lock:
            self._thread = threading.Thread(target=self._run, args=(start, opened, outcome), name="writer-run",
                                            daemon=True)
            self._thread.start()
        if not opened.wait(START_TIMEOUT):
            logger.warning("The file and the source are still opening after %.0f s", START_TIMEOUT)
        elif "error" in outcome:
            raise (Unavailable if outcome.get("unavailable") else BadRequest)(str(outcome["error"]))
        warning = outcome.get("warning")
        if warning:
            logger.warning("Start: %s", warning)
        return Started(self.status(), warning)

    # -- the run thread: the only owner of the source and the file ---------------
    def _run(self, start: StartRun, opened: threading.Event, outcome: dict) -> None:
        pulse_range = PulseRange(start.start_pulse_id, start.start_time, start.stop_pulse_id, start.stop_time)
        source = output = None
        try:
            # The source first: a wrong address is refused before any file is created.
            source = self._source_factory(start)
            source.start()
            handshake = getattr(source, "handshake", None)  # a buffer's replay endpoint answers; a live stream not
            accepted = handshake(self.settings.handshake_timeout) if handshake is not None else None
            outcome["warning"] = _start_warning(start, accepted)
            output = self._output_factory(start)
            output.set_attributes(_requested_range(start.start_pulse_id, start.start_time,
                                                   start.stop_pulse_id, start.stop_time))
            output.flush()  # the requested range is in the file from the start, also after a kill -9
        except Exception as error:  # noqa: BLE001 (any failure to open is reported to the DAQ)
            logger.exception("Cannot start writing %s", start.output_file)
            outcome["error"] = f"cannot start writing {start.output_file}: {error}"
            outcome["unavailable"] = "yes" if getattr(error, "unavailable", False) else None
            self._abandon(start, source, output)
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
        opened.set()

        loop = RunLoop(source, output, pulse_range, self._counters, self._commands, self.settings.stop_deadline,
                       self._finishing, self._monotonic, self.settings.max_message_bytes,
                       receive_clock=self._clock if self.settings.direct else None,
                       max_clock_skew=self.settings.max_clock_skew)
        error_text: str | None = None
        try:
            end_reason = loop.run()
        except Exception as error:  # noqa: BLE001 (whatever failed, the file gets closed)
            logger.exception("The writer failed")
            error_text = f"{type(error).__name__}: {error}"
            end_reason = RunEnd.WRITER_ERROR.value
            try:
                loop.finish(end_reason)
            except Exception:  # noqa: BLE001 (the file must still be closed)
                logger.exception("Recording the missing pulses failed")
        self._finishing(end_reason)
        try:
            output.settle_channels()  # every refusal known before the outcome is judged
        except Exception as error:  # noqa: BLE001 (the close below reports what is wrong with the file)
            logger.exception("Settling the channels failed")
            error_text = error_text or f"{type(error).__name__}: {error}"
        outcome = self._judge(pulse_range, output, error_text, end_reason)
        attributes = _requested_range(start.start_pulse_id, start.start_time,
                                      pulse_range.stop_pulse_id, pulse_range.stop_time)
        attributes["end_reason"] = end_reason
        attributes["outcome"] = outcome.value
        attributes["time_base"] = loop.time_base
        if self._counters.unlocated_gaps:
            attributes["unlocated_gaps"] = json_value(tuple(self._counters.unlocated_gaps))
        sources = getattr(source, "pulse_sources", None)  # which pulses came from the ring, which from an archive
        if sources:
            attributes["pulse_sources"] = json.dumps(sources)
        for closer, what in ((lambda: output.close(attributes), "the file"), (source.close, "the source")):
            try:
                closer()
            except Exception as error:  # noqa: BLE001
                logger.exception("Closing %s failed", what)
                error_text = error_text or f"closing {what} failed: {error}"
                outcome = Outcome.FAILED  # the file may say otherwise: the summary and the exit code do not
        average = loop.average_rate()
        if average is not None:
            self._counters.rate = average
        # The summary before /status says finished: a script that polls and then reads it finds it.
        final = replace(self.statistics(), outcome=outcome.value, error=error_text,
                        runs_finished=self._control.runs_finished + 1)
        self._write_summary(start, final)
        counters = self._counters
        with self._lock:
            self._control.finished(error_text, outcome)
            ended = self._control.state is not State.WAITING
            if not ended:  # persistent: ready for the next start
                self._last_run = final
                self._thread = None
                # A stop posted after the loop's last look belonged to this run, never to the next.
                while not self._commands.empty():
                    self._commands.get_nowait()
        logger.info("Closed %s: %s, %d messages, pulse_id %s..%s, %d pulses missing; end: %s%s",
                    start.output_file, outcome.value, counters.messages_written, pulse_range.first_pulse_id,
                    pulse_range.last_pulse_id, pulse_range.missing_count, end_reason,
                    f"; error: {error_text}" if error_text else "")
        if ended:
            self.done.set()
        else:
            logger.info("Persistent mode: waiting for the next start (GET /stop ends the writer)")

    def _judge(self, pulse_range: PulseRange, output: Any, error_text: str | None, end_reason: str) -> Outcome:
        unlocated = [gap.count for gap in self._counters.unlocated_gaps]
        # A run the disk ended never got what was asked, even an open range with nothing missing yet.
        ended_early = end_reason == DISK_FULL or (pulse_range.has_stop and not pulse_range.complete)
        return judge_outcome(
            rows=pulse_range.rows, missing_pulses=pulse_range.missing_count,
            lost_without_pulse_ids=None if None in unlocated else sum(unlocated),
            refused_channels=len(getattr(output, "refused_channels", {}) or {}),
            range_open=ended_early, error=error_text)

    def _write_summary(self, start: StartRun, statistics: WriterStatistics) -> None:
        """The outcome beside the file (``<output_file>.summary.json``), for scripts, after the process is gone."""
        if start.output_file == DEV_NULL:
            return
        try:
            write_summary(start.output_file, {"writer": __version__, **statistics.to_json()},
                          self.settings.output_root)
        except OSError as error:
            logger.error("Cannot write the summary beside %s: %s", start.output_file, error)

    def _finishing(self, reason: str) -> None:
        """The run loop says the run is ending (called from the run thread)."""
        with self._lock:
            self._control.finishing(reason)

    @staticmethod
    def _abandon(start: StartRun, source: Any, output: Any) -> None:
        """After a failed start: close what was opened and remove the empty file it created."""
        abandon_output(start, output)
        if source is not None:
            try:
                source.close()
            except Exception:  # noqa: BLE001 (best effort; the start already failed)
                logger.exception("Closing the abandoned source failed")

    # -- default factories -------------------------------------------------------
    def _default_source(self, start: StartRun) -> Any:
        """The buffer's replay endpoint (reaching into its archive), an archive alone (nats://), or --direct."""
        if self.settings.direct:
            return DirectSource(self.settings.stream_address, self.settings.direct_mode,
                                self.settings.max_message_bytes)
        if self.settings.stream_address.startswith("nats://"):
            from sf_bsread_writer.archive.reader import (
                ArchiveSource,  # nats-py loads only for an archive
            )
            return ArchiveSource(self.settings.stream_address, start_pulse_id=start.start_pulse_id,
                                 start_time=start.start_time, stop_pulse_id=start.stop_pulse_id,
                                 stop_time=start.stop_time)
        return ReachBackSource(self.settings.stream_address, start_pulse_id=start.start_pulse_id,
                               start_time=start.start_time, stop_pulse_id=start.stop_pulse_id,
                               stop_time=start.stop_time, label=make_label(start.output_file),
                               max_message_bytes=self.settings.max_message_bytes)

    def _default_output(self, start: StartRun) -> Any:
        return open_output(start, self.settings.flush_interval, self.settings.output_root,
                           self.settings.decompress_images)
