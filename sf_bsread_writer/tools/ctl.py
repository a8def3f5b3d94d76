"""``sf_bsread_ctl``: the buffers and writers of this host, from the command line (docs/operations.md).

::

    sf_bsread_ctl ls                                  # every buffer and writer of this host
    sf_bsread_ctl status  BUFFER                      # BUFFER: a name from ls, http://host:8890 or the web URL
    sf_bsread_ctl channels BUFFER
    sf_bsread_ctl peek BUFFER CHANNEL                 # the newest value of one channel
    sf_bsread_ctl watch BUFFER                        # a live table (Ctrl-C ends it)
    sf_bsread_ctl write BUFFER START STOP FILE        # one acquisition; or --since 10s / --last 500
    sf_bsread_ctl plugin-path                         # the HDF5_PLUGIN_PATH for HDF5 tools (bitshuffle)
    sf_bsread_ctl h5dump [H5DUMP OPTIONS] FILE        # h5dump with it set
    sf_bsread_ctl repair FILE...                      # files whose writer and guardian were both killed

``write`` is :func:`write_range` (also ``sf_bsread_writer.write_range``): a
writer process, driven over its REST API like the DAQ system does, with a
progress bar; the exit code is the writer's (0 complete, 3 partial, 1 failed),
2 when the writer refuses the command (a file that exists). Its last line says
why the run ended as it did and what it left on disk (:func:`describe_run`,
from the run's summary); the writer's warning about the range is printed when
it starts. Tables are whole lines when stdout is not a terminal.
A one-shot acquisition must survive its terminal: when the terminal hangs
up (SIGHUP) or its output is gone (EPIPE, EIO), ``write`` stops printing and
drives its writer to the end of the range. Ctrl-C (SIGINT) or SIGTERM stop
the writer cleanly (the file closed, the rest of the range recorded as
missing), print what is on disk in one line and exit 128 + the signal.
Exit codes: ``process.ExitCode`` (docs/operations.md, "Exit codes").
"""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import requests

from sf_bsread_writer import process, registry
from sf_bsread_writer.bsread.message import MessageParser
from sf_bsread_writer.client import WriterClient, WriterError
from sf_bsread_writer.process import ExitCode
from sf_bsread_writer.replay.client import ReplayClient, ReplayHandshakeError
from sf_bsread_writer.replay.messages import Data, End, Gap, Refused
from sf_bsread_writer.status import BufferStatus
from sf_bsread_writer.writer.acquisition import Outcome
from sf_bsread_writer.writer.statistics import WriterStatistics

__all__ = ["main", "write_range", "BufferRef", "resolve_buffer", "CtlError", "StoppedBeforeStart", "describe_run"]

logger = logging.getLogger(__name__)

HTTP_TIMEOUT = 3.0


class CtlError(RuntimeError):
    """Something the operator must fix (an unknown buffer, a refused command): one line, ``exit_code``.

    2 (``ExitCode.CONFIGURATION``) unless said otherwise: a bad command, which
    trying again unchanged cannot fix; 1 (``ExitCode.FAILED``) for a failure
    that may pass (a writer that ended before it could be driven, a buffer
    with no room for another writer).
    """

    def __init__(self, message: str, exit_code: int = ExitCode.CONFIGURATION) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# The URLs a BUFFER argument may be, named in every answer to a URL that is none of them.
EXPECTED_URLS = ("give the buffer's HTTP URL (its --rest-port, e.g. http://host:8890), its web service's URL "
                 "(--web-port, e.g. http://host:8891, the page an operator opens) or its name from `sf_bsread_ctl ls`")


@dataclass(frozen=True)
class BufferRef:
    """A buffer to talk to: its name and addresses (from the registry or from its HTTP status).

    ``rest`` is where its status is read: the buffer's HTTP API (``GET
    /statistics``), or, with ``via_web``, its web service (``GET
    /api/v1/status``, whose ``buffer`` is the same record), so that the URL an
    operator sees in the browser works as well as the buffer's own.
    """

    name: str
    rest: str
    replay: str | None
    output: str | None
    web: str | None = None
    via_web: bool = False
    token: str | None = None  # the web service's access token (``?token=`` of the URL), if it asks for one

    def statistics(self) -> BufferStatus:
        try:
            return _read_status(self.rest, self.via_web, self.token)
        except CtlError as error:
            raise CtlError(f"buffer {self.name} does not answer at {self.rest}: {error}") from None


def _read_status(base: str, via_web: bool, token: str | None = None) -> BufferStatus:
    """The buffer's status from its HTTP API or from its web service; CtlError says what answered instead."""
    path, key = ("/api/v1/status", "buffer") if via_web else ("/statistics", "statistics")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = requests.get(base + path, timeout=HTTP_TIMEOUT, headers=headers)
    except requests.RequestException as error:
        raise CtlError(f"nothing answers ({type(error).__name__})") from None
    if answer.status_code == 401:
        raise CtlError("the web service asks for a token: add ?token=TOKEN to its URL")
    document: Any = None
    try:
        document = answer.json()
        return BufferStatus.from_json(document[key])
    except (ValueError, KeyError, TypeError, AttributeError):
        status = document.get("status") if isinstance(document, dict) else None  # e.g. a 404's list of paths
        raise CtlError(f"GET {path} answered {answer.status_code} without a buffer's status"
                       + (f" ({str(status)[:120]})" if status else "")) from None


def _resolve_url(spec: str) -> BufferRef:
    """A buffer by URL: its HTTP API or its web service, given with or without a trailing path or ``?token=``."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(spec.strip())
    token = (parse_qs(parts.query).get("token") or [None])[0]
    origin = f"{parts.scheme}://{parts.netloc}"
    given = (origin + parts.path).rstrip("/")
    said = []
    for base in dict.fromkeys((given, origin)):  # the URL as given, then its host and port alone
        for via_web in (False, True):
            try:
                status = _read_status(base, via_web, token)
            except CtlError as error:
                said.append(f"{base}{'/api/v1/status' if via_web else '/statistics'}: {error}")
                continue
            endpoints = status.endpoints
            return BufferRef(status.name, base, endpoints.replay, endpoints.output, endpoints.web or
                             (base if via_web else None), via_web=via_web, token=token)
    raise CtlError(f"no buffer answers at {given} ({'; '.join(said[-2:])}): {EXPECTED_URLS}")


def resolve_buffer(spec: str) -> BufferRef:
    """``spec``: a buffer's name as ``ls`` shows it, its HTTP base URL (``http://host:8890``) or its web URL."""
    if spec.startswith(("http://", "https://")):
        return _resolve_url(spec)
    found = [entry for entry in registry.entries() if entry.kind == "buffer" and entry.name == spec]
    if not found:
        names = sorted({entry.name for entry in registry.entries() if entry.kind == "buffer"})
        raise CtlError(f"no buffer named {spec!r} on this host (running: {', '.join(names) or 'none'}; "
                       f"or give its HTTP URL, http://host:8890, or its web URL, http://host:8891)")
    endpoints = found[-1].endpoints
    if not endpoints.get("rest"):
        raise CtlError(f"buffer {spec!r} has no HTTP status (--rest-port)")
    return BufferRef(spec, endpoints["rest"], endpoints.get("replay"), endpoints.get("output"), endpoints.get("web"))


# --------------------------------------------------------------------------
# Reading the newest message
# --------------------------------------------------------------------------
def newest_message(buffer: BufferRef, timeout: float = 5.0) -> Any:
    """The newest message the buffer holds, replayed (never taken from a live output somebody consumes)."""
    status = buffer.statistics()
    newest = status.ring.newest_pulse_id
    if newest is None or buffer.replay is None:
        raise CtlError(f"buffer {buffer.name} holds no message yet")
    client = ReplayClient(buffer.replay, start_pulse_id=newest, stop_pulse_id=newest)
    try:
        client.start()
        client.handshake(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = client.receive(0.5)
            if isinstance(event, Data):
                return MessageParser().parse(event.frames)
            if isinstance(event, (End, Refused)):
                break
            if isinstance(event, Gap):
                raise CtlError(f"pulse {newest} was evicted meanwhile; try again")
    except ReplayHandshakeError as error:
        raise CtlError(str(error)) from None
    finally:
        client.close()
    raise CtlError(f"buffer {buffer.name} sent no message within {timeout:g} s")


# --------------------------------------------------------------------------
# write_range
# --------------------------------------------------------------------------
class StoppedBeforeStart(Exception):
    """``interrupted()`` named a signal before the range was asked for: the writer was ended, nothing written."""


@dataclass
class Progress:
    written: int
    expected: int | None
    last_pulse_id: int | None


def write_range(buffer: str | BufferRef, start_pulse_id: int, stop_pulse_id: int, path: str,
                parameters: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                on_progress: Callable[[Progress], None] | None = None,
                interrupted: Callable[[], str | None] | None = None,
                on_warning: Callable[[str], None] | None = None) -> Outcome:
    """Write pulses ``start_pulse_id..stop_pulse_id`` (both included) of ``buffer`` into ``path``.

    One writer process, driven over REST as the DAQ system drives it; returns its outcome
    (``complete``, ``partial``: some pulses are not in the file and it says why, ``failed``).
    ``parameters`` go to ``/parameters`` (defaults: now, this user, sf_bsread_ctl, the buffer's name).
    ``interrupted()``, asked while the writer runs, names a signal ("SIGINT") once the caller was
    told to stop: that signal is passed on to the writer, which closes the file at once (the rest of
    the range missing, ``signal_SIGINT``); the outcome is then what the closed file holds. Told so
    before the range was asked for, it ends the writer unasked (no file) and raises
    :class:`StoppedBeforeStart`.
    ``on_warning(text)`` hears what the writer warns about the range when it starts (pulses older
    than the buffer's oldest: they will be missing); without it, the warning is logged.
    A writer that refuses the range or the file (it exists, a path it may not write) raises
    :class:`CtlError` with its message (exit code 2); one that ends before it could be driven, too
    (exit code 1): no file was begun.
    """
    ref = buffer if isinstance(buffer, BufferRef) else resolve_buffer(buffer)
    if ref.replay is None:
        raise CtlError(f"buffer {ref.name} has no replay endpoint")
    if stop_pulse_id < start_pulse_id:
        raise CtlError(f"stop pulse id {stop_pulse_id} is before start {start_pulse_id}")
    step = ref.statistics().pulse_ids.usual_step or 1
    expected = (stop_pulse_id - start_pulse_id) // step + 1
    command = [sys.executable, "-m", "sf_bsread_writer.writer", ref.replay, path, "-1", "0",
               "--finished-grace", "0.2"]
    # Its log goes to a file, not a pipe nobody reads (a full pipe would block the writer); stdout is read to
    # the end by a thread (READY, then whatever else it prints).
    log = tempfile.TemporaryFile(mode="w+", prefix="sf_bsread_ctl-writer-")
    # Its own session (process.start_child): a hangup of our terminal, also while the writer still imports, does
    # not reach it, nor does a Ctrl-C (we forward SIGINT/SIGTERM below). It does not die with us either: a
    # started acquisition goes on to its end whatever happens to this process.
    writer = process.start_child(command, stdin=None, stdout=subprocess.PIPE, stderr=log, text=True,
                                 dies_with_parent=False)
    try:
        ready = _read_ready(writer, log)
        if interrupted is not None and interrupted():  # told to stop before anything was asked: ask nothing
            raise StoppedBeforeStart(interrupted() or "")
        client = WriterClient(ready["rest"], timeout=10)
        try:
            client.set_parameters({"general/created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "general/user": getpass.getuser(), "general/process": "sf_bsread_ctl",
                                   "general/instrument": ref.name, **dict(parameters or {})})
            client.start_pulse_id(start_pulse_id)
            client.stop_pulse_id(stop_pulse_id)
        except WriterError as error:
            # 4xx: the command is wrong (a file that exists, bad parameters); else the writer or the buffer failed.
            code = ExitCode.CONFIGURATION if 400 <= error.http_status < 500 else ExitCode.FAILED
            raise CtlError(f"the writer refused {path}: {error.status}", code) from None
        except requests.RequestException as error:
            raise CtlError(f"the writer ended before it could be driven ({type(error).__name__}): "
                           f"{_log_tail(log) or 'no log'}", ExitCode.FAILED) from None
        if client.warning:
            (on_warning or (lambda text: logger.warning("the writer warns: %s", text)))(client.warning)
        deadline = None if timeout is None else time.monotonic() + timeout
        forwarded = False
        while writer.poll() is None:
            stop_signal = interrupted() if interrupted is not None and not forwarded else None
            if stop_signal is not None:
                writer.send_signal(signal.Signals[stop_signal])
                forwarded = True
            if on_progress is not None:
                try:
                    statistics = WriterStatistics.from_json(client.statistics())
                    on_progress(Progress(statistics.messages_written, expected, statistics.last_pulse_id))
                except (requests.RequestException, WriterError):
                    pass  # finishing: the REST API goes away with the process
                except ValueError as error:  # a writer of another version: no progress, the run goes on
                    logger.debug("writer statistics not understood: %s", error)
            if deadline is not None and time.monotonic() > deadline:
                client.stop()
                deadline = None
            try:
                writer.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        code = writer.wait()
    except BaseException:
        if writer.poll() is None:
            writer.terminate()
            writer.wait(timeout=30)
        raise
    finally:
        log.close()
    by_code = {outcome.exit_code: outcome for outcome in Outcome}
    return by_code.get(code, Outcome.FAILED)


def _read_ready(writer: subprocess.Popen, log: Any, timeout: float = 30.0) -> dict[str, Any]:
    """The writer's READY payload; its stdout is drained to the end in a thread (never a full pipe)."""
    found: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def drain() -> None:
        assert writer.stdout is not None
        for line in writer.stdout:
            payload = process.parse_ready(line.strip())
            if payload is not None:
                found.put(payload)
        found.put(None)  # stdout closed: the writer ended

    threading.Thread(target=drain, name="writer-stdout", daemon=True).start()
    try:
        payload = found.get(timeout=timeout)
    except queue.Empty:  # still running, silent
        ended = None
    else:
        if payload is not None:
            return payload
        try:  # its stdout closed: the process ends (a moment after)
            ended = writer.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            ended = None
    # A writer that refused its command line (exit 2) is a bad command here too; one that hangs or fails is not.
    code = ExitCode.CONFIGURATION if ended == ExitCode.CONFIGURATION else ExitCode.FAILED
    what = f"the writer ended at its start (exit {ended})" if ended is not None else \
        f"the writer did not start within {timeout:g} s"
    raise CtlError(f"{what}: {_log_tail(log) or 'no READY line'}", code)


def _log_tail(log: Any, characters: int = 500) -> str:
    """The end of the writer's log (its own file): what it said before it ended."""
    log.flush()
    log.seek(0)
    return log.read().strip()[-characters:]


_SINCE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")


def parse_seconds(text: str) -> float:
    """``10s``, ``1.5m``, ``500ms``, ``2h``, ``30`` (seconds)."""
    match = _SINCE.match(text.strip())
    if not match:
        raise CtlError(f"--since {text!r}: give a duration like 10s, 1.5m, 500ms")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def range_of(status: BufferStatus, since: str | None, last: int | None) -> tuple[int, int]:
    """The pulse range of ``--since DURATION`` or ``--last N`` messages, ending at the newest pulse held."""
    ring, step = status.ring, status.pulse_ids.usual_step or 1
    if ring.newest_pulse_id is None:
        raise CtlError("the buffer holds no message yet")
    stop = ring.newest_pulse_id
    oldest = ring.oldest_pulse_id
    archive = status.archive
    if archive is not None and archive.first_pulse_id is not None and oldest is not None:
        oldest = min(oldest, archive.first_pulse_id)  # the writer reads what the ring lacks from the archive
    if last is not None:
        return max(oldest or stop, stop - (last - 1) * step), stop
    seconds = parse_seconds(since or "0")
    rate = status.rates.messages_per_second or 0.0
    if rate <= 0:
        raise CtlError("the buffer's message rate is not known (is the source sending?): use --last N")
    return max(oldest or stop, stop - int(round(seconds * rate)) * step + step), stop


# --------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------
def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """A rich table of plain text: names and paths come from files and buffers, never read as markup."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[Text("-" if value is None else str(value)) for value in row])
    return table


# A pipe or a log has no width: rich would cut every table to 80 columns (or $COLUMNS) and end cells in "…".
UNBOUNDED_WIDTH = 100_000


def _console() -> Any:
    """rich's console: the terminal's width on a terminal, whole lines anywhere else (a pipe, a file, a log)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=UNBOUNDED_WIDTH)


def _print(renderable: Any) -> None:
    _console().print(renderable)


def _status_rows(status: BufferStatus) -> list[tuple[str, Any]]:
    ring = status.ring
    return [("state", status.describe()), ("source", status.endpoints.stream),
            ("rate", f"{status.rates.messages_per_second:.1f} msg/s, {status.rates.bytes_per_second / 1e6:.2f} MB/s"),
            ("channels", status.channels), ("ring", f"{ring.messages} / {ring.max_messages} messages, "
                                                    f"{ring.bytes / 1e6:.1f} / {ring.max_bytes / 1e6:.0f} MB"),
            ("look-back", f"{ring.look_back_seconds:.1f} s, {ring.look_back_pulses} pulses"
             if ring.look_back_seconds is not None else None),
            ("pulse ids", f"{ring.oldest_pulse_id} .. {ring.newest_pulse_id}"),
            ("rejected", f"{status.rejected_total} {dict(status.rejected) or ''}"),
            ("source reconnects", status.source.reconnects),
            ("pulse-id jumps/resets", f"{status.pulse_ids.jumps} / {status.pulse_ids.resets}"),
            ("writers", status.replay.active_sessions), ("evicted", ring.evicted),
            *_archive_rows(status)]


def _archive_rows(status: BufferStatus) -> list[tuple[str, Any]]:
    """``--archive``: where, how far it is behind the ring, what it holds, what it lost (docs/archive.md)."""
    archive = status.archive
    if archive is None:
        return []
    lag = (f"{archive.lag_seconds:.1f} s, " if archive.lag_seconds is not None else "") + \
        f"{archive.lag_messages if archive.lag_messages is not None else '?'} messages"
    return [("archive", f"{archive.state} {archive.url}" + (f" ({archive.error})" if archive.error else "")),
            ("archive pulse ids", f"{archive.first_pulse_id} .. {archive.last_pulse_id}, "
                                  f"{archive.stored_messages} messages, {(archive.stored_bytes or 0) / 1e6:.1f} MB"),
            ("archive lag", lag),
            ("archive lost", f"{archive.lost} pulses (+{archive.unarchived_at_start} before it started), "
                             f"{archive.oversize} oversize, {archive.discarded} discarded by retention")]


def cmd_ls(args: argparse.Namespace) -> int:
    """Every live entry of every registry directory; files that are not entries are named in one line."""
    listing = registry.scan()
    if listing.skipped:
        print(f"sf_bsread_ctl: skipped {len(listing.skipped)} file(s) that are not registry entries: "
              + "; ".join(f"{item.path} ({item.reason})" for item in listing.skipped), file=sys.stderr)
    entries = listing.entries
    if args.json:
        print(json.dumps([{**entry.to_json(), "path": entry.path} for entry in entries]))
        return 0
    several = len(listing.directories) > 1  # then say which directory each entry came from

    def where(entry: registry.Entry) -> tuple[Any, ...]:
        return (os.path.dirname(entry.path),) if several else ()

    rows = []
    writers = [entry for entry in entries if entry.kind == "writer"]
    for entry in entries:
        if entry.kind != "buffer":
            continue
        try:
            status = BufferRef(entry.name, entry.endpoints.get("rest") or "", None, None).statistics()
            ring = status.ring
            rows.append((entry.name, entry.pid, status.describe(), f"{status.rates.messages_per_second:.1f}",
                         f"{ring.look_back_seconds:.1f} s" if ring.look_back_seconds is not None else None,
                         status.channels, status.replay.active_sessions, entry.endpoints.get("rest"),
                         *where(entry)))
        except CtlError:
            rows.append((entry.name, entry.pid, "not answering", None, None, None, None, entry.endpoints.get("rest"),
                         *where(entry)))
    directory_column = ("registry",) if several else ()
    _print(_table(f"buffers on this host ({', '.join(str(path) for path in listing.directories)})",
                  ("name", "pid", "state", "msg/s", "look-back", "channels", "writers", "HTTP", *directory_column),
                  rows))
    _print(_table("writers", ("file", "pid", "buffer", "REST", *directory_column),
                  [(w.details.get("output_file"), w.pid, w.details.get("buffer"), w.endpoints.get("rest"), *where(w))
                   for w in writers]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    ref = resolve_buffer(args.buffer)
    status = ref.statistics()
    if args.json:
        print(json.dumps(status.to_json()))
    else:
        _print(_table(f"buffer {ref.name}", ("", ""), _status_rows(status)))
    return 0


def cmd_channels(args: argparse.Namespace) -> int:
    message = newest_message(resolve_buffer(args.buffer))
    specs = message.data_header.channels
    if args.json:
        print(json.dumps([spec.metadata() for spec in specs]))
        return 0
    _print(_table(f"{len(specs)} channels at pulse {message.pulse_id}", ("name", "type", "shape", "compression",
                                                                        "present"),
                  [(spec.name, spec.type, list(spec.shape), spec.compression, message.is_present(index))
                   for index, spec in enumerate(specs)]))
    return 0


def cmd_peek(args: argparse.Namespace) -> int:
    message = newest_message(resolve_buffer(args.buffer))
    header = message.data_header
    if args.channel not in header:
        raise CtlError(f"channel {args.channel!r} is not in the stream (sf_bsread_ctl channels {args.buffer})")
    index = header.index_of(args.channel)
    value = message.value(index) if message.is_present(index) else None
    if args.json:
        import numpy as np

        shown = value.tolist() if isinstance(value, np.ndarray) else value
        print(json.dumps({"channel": args.channel, "pulse_id": message.pulse_id, "value": shown}))
    else:
        print(f"{args.channel} @ pulse {message.pulse_id}: {value!r}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from rich.live import Live

    ref = resolve_buffer(args.buffer)
    shown = 0
    with Live(refresh_per_second=4, transient=False, console=_console()) as live:
        while args.count is None or shown < args.count:
            try:
                live.update(_table(f"buffer {ref.name} ({time.strftime('%H:%M:%S')})", ("", ""),
                                   _status_rows(ref.statistics())))
            except CtlError as error:
                live.update(f"[red]{error}[/red]")
            shown += 1
            if args.count is not None and shown >= args.count:
                break
            time.sleep(args.interval)  # the refresh interval of a display, not a synchronisation
    return 0


def read_summary(path: str) -> tuple[WriterStatistics | None, str | None]:
    """The run's ``<path>.summary.json`` (written once the file is closed), or None and why it cannot be read."""
    try:
        with open(f"{path}.summary.json", encoding="utf-8") as file:
            return WriterStatistics.from_json(json.load(file)), None
    except (OSError, ValueError, TypeError) as error:
        return None, str(error)


def describe_run(path: str, summary: WriterStatistics | None, summary_error: str | None, file_exists: bool) -> str:
    """Why a run ended as it did and what it left on disk, in one line (pure: the caller reads the files).

    ``120 rows, 50 pulses missing (before_buffer: 50); on disk: FILE (120 rows) and FILE.summary.json``.
    The reasons are the summary's (the same words as the file's ``/missing`` table and
    docs/writer.md); a file with no row is named as such, so that a failed run never looks like data.
    """
    if summary is None:
        left = f"{path} (the rows up to its last flush)" if file_exists else f"no file ({path} does not exist)"
        return f"no summary ({summary_error}); on disk: {left}"
    rows = summary.messages_written
    said = [f"{rows} row{'s' if rows != 1 else ''}"]
    if summary.missing_pulses:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(summary.missing_by_reason.items()))
        said.append(f"{summary.missing_pulses} pulses missing ({reasons})")
    lost = [gap.count for gap in summary.unlocated_gaps]
    if lost:
        said.append("messages lost whose pulse ids are unknown: "
                    + ("an unknown number" if None in lost else str(sum(count or 0 for count in lost))))
    if summary.messages_rejected:
        said.append(f"{summary.messages_rejected} messages rejected ({_counts(summary.rejected_reasons)})")
    if summary.refused_values:
        said.append(f"values refused in {len(summary.refused_values)} channel(s): "
                    + ", ".join(sorted(summary.refused_values)[:5]))
    if summary.end_reason not in (None, "stop_reached", *summary.missing_by_reason):  # said once is enough
        said.append(f"ended: {summary.end_reason}")
    if summary.error:
        said.append(f"error: {summary.error}")
    if not file_exists:
        left = f"no file ({path} does not exist)"
    elif rows == 0:
        left = f"{path} with no row (kept as the record of the attempt)"
    else:
        left = f"{path} ({rows} rows)"
    return f"{', '.join(said)}; on disk: {left} and {path}.summary.json"


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in sorted(counts.items()))


def _on_disk(path: str) -> str:
    """What the run in ``path`` left and why, from its summary (see :func:`describe_run`)."""
    summary, error = read_summary(path)
    return describe_run(path, summary, error, os.path.exists(path))


def cmd_write(args: argparse.Namespace) -> int:
    # Ctrl-C and SIGTERM: stop the writer cleanly (the loop in write_range passes the signal on); a hangup:
    # the terminal is gone, its output with it, and the acquisition goes on to the end of its range.
    stop_signals: list[str] = []
    restore = process.stop_on_signals(stop_signals.append)
    process.survive_hangup("the terminal is gone: the writer goes on to the end of the range "
                           "(its outcome: the file and its .summary.json)", silence=(1, 2))
    try:
        code = _write(args, lambda: stop_signals[0] if stop_signals else None)
    finally:
        restore()
    if stop_signals:
        path = args.range_and_file[-1]
        if code is None:
            _say(f"{path}: interrupted by {stop_signals[0]} before the writer started: nothing written")
        else:
            summary, _ = read_summary(path)
            outcome = summary.outcome if summary is not None else "unknown outcome"
            _say(f"{path}: interrupted by {stop_signals[0]}: {outcome}, {_on_disk(path)}")
        return process.interrupted_code(stop_signals[0])
    assert code is not None
    return code


def _say(text: str) -> None:
    """Print a line; an output nobody reads any more (a closed pipe, a hung-up terminal) costs nothing else."""
    try:
        print(text, flush=True)
    except OSError:
        process.silence_output((1,))


def _write(args: argparse.Namespace, interrupted: Callable[[], str | None]) -> int | None:
    """The writer's exit code; None when interrupted before its range was asked for (nothing written)."""
    from rich.console import Console
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    class TerminalMayGo(Console):
        def on_broken_pipe(self) -> None:  # rich's own raises SystemExit(1): the acquisition would end with it
            process.silence_output((1,))

    ref = resolve_buffer(args.buffer)
    by_duration = args.since is not None or args.last is not None
    if by_duration and len(args.range_and_file) == 1:
        start, stop = range_of(ref.statistics(), args.since, args.last)
        path = args.range_and_file[0]
    elif not by_duration and len(args.range_and_file) == 3:
        try:
            start, stop = int(args.range_and_file[0]), int(args.range_and_file[1])
        except ValueError:
            raise CtlError("START and STOP are pulse ids (integers)") from None
        path = args.range_and_file[2]
    else:
        raise CtlError("give BUFFER START STOP FILE, or BUFFER FILE with --since 10s or --last 500")
    if any("=" not in item for item in args.param or ()):
        raise CtlError("--param takes KEY=VALUE")
    parameters = dict(item.split("=", 1) for item in args.param or ())
    bar = Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
              TimeElapsedColumn(), transient=not sys.stdout.isatty(), console=TerminalMayGo())
    task = bar.add_task(f"pulses {start}..{stop} -> {path}", total=None)

    def on_progress(progress: Progress) -> None:
        try:
            bar.update(task, completed=progress.written, total=progress.expected)
        except OSError:  # the terminal is gone: the acquisition is not
            process.silence_output((1,))

    def on_warning(text: str) -> None:
        try:
            print(f"sf_bsread_ctl: the writer warns: {text}", file=sys.stderr, flush=True)
        except OSError:
            process.silence_output((2,))

    if interrupted():
        return None
    try:
        bar.start()
    except OSError:
        process.silence_output((1,))
    try:
        outcome = write_range(ref, start, stop, path, parameters, on_progress=on_progress, interrupted=interrupted,
                              on_warning=on_warning)
    except StoppedBeforeStart:
        return None
    finally:
        try:
            bar.stop()
        except OSError:
            process.silence_output((1,))
    if not interrupted():
        _say(f"{path}: {outcome.value} (pulses {start}..{stop}): {_on_disk(path)}")
    return outcome.exit_code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sf_bsread_ctl", description="The bsread buffers and writers of this host.")
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="every buffer and writer of this host")
    ls.add_argument("--json", action="store_true")
    for name, helptext in (("status", "a buffer's status"), ("channels", "the channels of its newest message")):
        command = commands.add_parser(name, help=helptext)
        command.add_argument("buffer", help="a name from ls, or the buffer's HTTP URL")
        command.add_argument("--json", action="store_true")
    peek = commands.add_parser("peek", help="the newest value of a channel")
    peek.add_argument("buffer")
    peek.add_argument("channel")
    peek.add_argument("--json", action="store_true")
    watch = commands.add_parser("watch", help="a live status table")
    watch.add_argument("buffer")
    watch.add_argument("--interval", type=float, default=1.0)
    watch.add_argument("--count", type=int, default=None, help="refreshes before it ends (default: until Ctrl-C)")
    write = commands.add_parser("write", help="write a pulse range into an HDF5 file (exit code: the writer's)")
    write.add_argument("buffer")
    write.add_argument("range_and_file", nargs="+", metavar="START STOP FILE",
                       help="first and last pulse id and the file; only FILE with --since or --last")
    write.add_argument("--since", help="the last DURATION of the buffer (10s, 1.5m)")
    write.add_argument("--last", type=int, help="the last N messages")
    write.add_argument("--param", action="append", metavar="KEY=VALUE", help="a writer parameter (repeatable)")
    commands.add_parser("plugin-path", help="print the HDF5_PLUGIN_PATH that finds the bitshuffle filter")
    # Every argument goes to h5dump as given ("+" as the prefix: h5dump's own -d/-H are not ours to parse).
    h5dump = commands.add_parser("h5dump", help="h5dump with the bitshuffle filter (h5dump's options and exit code)",
                                 prefix_chars="+", add_help=False)
    h5dump.add_argument("arguments", nargs=argparse.REMAINDER)
    repair = commands.add_parser("repair", help="put a file whose writer and guardian were both killed back to its "
                                                "last completed flush (its undo journal applied)")
    repair.add_argument("files", nargs="+", metavar="FILE")
    return parser


def cmd_plugin_path(args: argparse.Namespace) -> int:
    from sf_bsread_writer.tools.h5plugins import PluginPathError, plugin_path

    try:
        print(plugin_path())
    except PluginPathError as error:  # nothing on stdout: `export HDF5_PLUGIN_PATH=$(...)` must not look fine
        raise CtlError(str(error)) from None
    return 0


def cmd_h5dump(args: argparse.Namespace) -> int:
    from sf_bsread_writer.tools.h5plugins import PluginPathError, run_h5dump

    try:
        return run_h5dump(args.arguments)
    except PluginPathError as error:
        raise CtlError(str(error)) from None


def cmd_repair(args: argparse.Namespace) -> int:
    """Apply the undo journal beside each FILE (h5/journal.py): the file opens again, with its last flush's rows.

    The writer's guardian does this by itself when a writer dies; only if
    both were killed is the journal left, and a new writer of that path
    refuses to start until this ran. One line per file; exit 0 (also for a
    file without a journal: nothing to do), 1 if a file could not be
    repaired (its journal still held by a running writer or guardian, an
    I/O error): the others are repaired all the same.
    """
    from sf_bsread_writer.h5.journaled import journal_path, repair

    failed = 0
    for path in args.files:
        try:
            plan = repair(path)
        except OSError as error:
            print(f"sf_bsread_ctl: cannot repair {path}: {error.strerror or error}", file=sys.stderr)
            failed += 1
            continue
        if plan is None:
            print(f"{path}: no journal ({journal_path(path)}): nothing to repair")
        elif not os.path.exists(path):
            print(f"{path}: no such file (its writer was killed before it was named); its journal is removed")
        else:
            print(f"{path}: back to its last completed flush: {plan.describe()}")
    return ExitCode.FAILED if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"ls": cmd_ls, "status": cmd_status, "channels": cmd_channels, "peek": cmd_peek,
                "watch": cmd_watch, "write": cmd_write, "plugin-path": cmd_plugin_path, "h5dump": cmd_h5dump,
                "repair": cmd_repair}
    try:
        return handlers[args.command](args)
    except CtlError as error:
        print(f"sf_bsread_ctl: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return process.interrupted_code("SIGINT")


if __name__ == "__main__":
    sys.exit(main())
