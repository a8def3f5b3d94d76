"""Seeded fault injection over the whole product: the class check behind "Nothing lost".

Each test is one acquisition (a writer process replaying a range from a
buffer process fed by a deterministic source) while one kind of fault hits:

- ``signal:<target>``: a signal, drawn by the seed from ``kill9``,
  ``sigterm``, ``sighup`` and ``sigstop`` (stopped, then continued), to one
  process of the product: the ``buffer``, the ``writer``, the ``web``
  service or the CA ``gateway`` (both children of the buffer, started with
  ``--web`` / ``--ca``). One drawn signal per target keeps the whole file
  within its time budget (~35 s; <= 90 s on a loaded 2-core host); every
  run draws anew, so CI covers every pair over time;
- ``full_disk``: the writer's file lives on a small tmpfs that fills;
- ``clock_jump``: the source's clock jumps back an hour, ahead a day or to
  2**62 seconds (timestamps of a valid form, implausible against the
  receive time);
- ``clock_invalid``: the source sends timestamps no clock can show (negative
  seconds, ns >= 1e9, NaN);
- ``undecodable_channel``: one channel of some pulses turns undecodable (a
  declared shape of 2**62 elements, or a compressed block claiming 2 GiB).

What the seed decides (per kind, so ``-k`` replays one kind alone): the
signal, the stream profile (camera, scalars, mixed), compression, the range, when the
fault hits, how long a stop lasts, which channel and pulses go bad and how.
The seed is random per run and printed in every failure; replay a failure
with ``SF_BSREAD_FAULT_SEED=<seed> pytest tests/test_fault_injection.py -k <kind>``.

After each acquisition, whatever the fault (``check_acquisition``):

- the file opens with plain h5py; every row holds exactly what the source
  sent for its pulse (values are a function of the pulse id:
  ``tools.simulate.expected_values``); a value may be absent only where
  the source sent none or sent it undecodable;
- a file the writer closed lists every requested pulse that is not in it
  in ``/missing`` with a reason, and nothing that is;
- the exit code, the file attribute ``outcome`` and ``<file>.summary.json``
  say the same word, agree with the rows and the missing pulses, and a file
  with anything lost never says ``complete``; a writer killed by a signal
  leaves ``complete = 0`` and no summary;
- a hangup or a stop ends no process (the buffer and the web service keep
  SIGHUP for re-reading tokens; the writer goes on to the end of its
  range); a fault in the web service or the gateway never touches the
  buffer or the acquisition (every requested pulse written);
- no process is left behind: every process the test started, and every
  process below them (sampled while the tree was whole), is gone after the
  test stopped what it started (by pid).

``KNOWN_FAILING`` lists the kinds that fail on today's code for reasons
already being fixed (issue 20); remove an entry once its fix is merged and
the test turns from xfail into a strict XPASS failure.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle filter for reading)
import numpy as np
import pytest
import requests
import zmq

from sf_bsread_writer.bsread.build import build_message
from sf_bsread_writer.client import WriterClient
from sf_bsread_writer.h5.file import RESERVED_BYTES as WRITER_RESERVE
from sf_bsread_writer.process import parse_ready
from sf_bsread_writer.tools.simulate import channel_metadata, expected_values

from .ca_helpers import ca_env, start_repeater
from .helpers import (
    Child,
    children_of,
    command_line,
    descendants_of,
    process_gone,
    wait_for,
)

SEED_VARIABLE = "SF_BSREAD_FAULT_SEED"
SEED = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32))

SIGNALS = {"kill9": signal.SIGKILL, "sigterm": signal.SIGTERM, "sighup": signal.SIGHUP, "sigstop": signal.SIGSTOP}
TARGETS = ("buffer", "writer", "web", "gateway")
DATA_FAULTS = ("clock_jump", "clock_invalid", "undecodable_channel")
FAULT_KINDS = [f"signal:{target}" for target in TARGETS] + ["full_disk", *DATA_FAULTS]

#: Faults that fail on today's code for a reason being fixed on another branch (issue 20 "Nothing lost, round 2"),
#: by kind or, for a signal, by ``<signal>:<target>`` (a scenario is marked when the seed draws that signal).
#: The one place to edit once a fix is merged: the fault then passes, and strict xfail turns that into a failure.
KNOWN_FAILING: dict[str, str] = {}  # fault kinds that fail for a known reason still being fixed: none now

# A scenario takes 2-8 s (a gateway's start most of it); a hung one fails here instead of eating the budget.
pytestmark = pytest.mark.timeout(60)

PROFILES = ("camera", "scalars", "mixed")
CAMERA_SHAPE = (128, 64)  # bsread order (width, height): small, so that a scenario stays at 100 Hz on a busy host
N_SCALARS = 20
RATE = 100.0
OUTCOME_EXIT_CODES = {"complete": 0, "partial": 3, "failed": 1}
STOP_DEADLINE = 3.0  # the writer's --stop-deadline: how long a silent source is waited for (a killed buffer)
DEADLINE = 30.0  # any one wait of a scenario; a scenario takes a few seconds when nothing hangs
PARAMETERS = {"general/created": "2026-01-01T00:00:00", "general/user": "faults", "general/process": "fault_injection",
              "general/instrument": "simulation"}


# --------------------------------------------------------------------------- the plan the seed draws


@dataclass
class Plan:
    """Everything a scenario decides at random, drawn from ``random.Random(f"{SEED}:{kind}")``."""

    kind: str
    signal: str | None  # kill9, sigterm, sighup, sigstop: what hits the target
    profile: str
    compression: str
    back: int           # the range starts this many pulses before the newest in the buffer (a past head)
    ahead: int          # ... and stops this many after it (a live tail)
    trigger: float      # a signal hits once this fraction of the range is written
    pause: float        # sigstop: seconds stopped before SIGCONT
    bad_channel: str | None = None
    bad_mode: str | None = None
    bad_count: int = 0  # consecutive pulses hit by a data fault
    disk_fraction: float = 0.0

    @property
    def fault(self) -> str:
        return self.signal or self.kind

    @property
    def target(self) -> str | None:
        return self.kind.split(":")[1] if ":" in self.kind else None

    @property
    def fault_name(self) -> str:
        """The key of ``KNOWN_FAILING``: ``<signal>:<target>`` for a signal, else the kind."""
        return f"{self.signal}:{self.target}" if self.signal else self.kind


def draw_plan(kind: str) -> Plan:
    rng = random.Random(f"{SEED}:{kind}")
    target = kind.split(":")[1] if ":" in kind else None
    signal_name = rng.choice(tuple(SIGNALS)) if target is not None else None
    profile = rng.choice(PROFILES)
    compression = "none" if kind == "full_disk" or profile == "scalars" else rng.choice(["none", "bitshuffle_lz4"])
    plan = Plan(kind, signal_name, profile, compression, back=rng.randrange(10, 60), ahead=rng.randrange(150, 250),
                trigger=rng.uniform(0.25, 0.7), pause=rng.uniform(0.3, 1.0))
    if kind == "undecodable_channel":
        metadata = channel_metadata(profile, compression, N_SCALARS, CAMERA_SHAPE)
        plan.bad_channel = rng.choice([entry["name"] for entry in metadata])
        plan.bad_mode = rng.choice(["huge_shape", "claims_2gib"])
        plan.bad_count = rng.randrange(1, 20)
        if {entry["name"]: entry.get("type") for entry in metadata}[plan.bad_channel] == "string":
            # A string's value is its bytes whatever shape the header claims (the writer stores it, rightly):
            # a claimed shape makes no string undecodable, a claimed compression does.
            plan.bad_mode = "claims_2gib"
    elif kind == "clock_invalid":
        plan.bad_mode = rng.choice(["negative_seconds", "ns_overflow", "nan"])
        plan.bad_count = rng.randrange(1, 20)
    elif kind == "clock_jump":
        plan.bad_mode = rng.choice(["back_one_hour", "ahead_one_day", "seconds_2_62"])
        plan.bad_count = rng.randrange(1, 50)
    elif kind == "full_disk":
        plan.disk_fraction = rng.uniform(0.3, 0.6)
    return plan


# --------------------------------------------------------------------------- the source


class FaultSource:
    """A bsread source in this process (PUSH, 100 Hz) whose values are ``expected_values(profile, pulse_id)``.

    Deterministic by pulse id, so the file can be checked row by row without
    recording what was sent. A pulse is never skipped: when the buffer does
    not take a message (stopped, gone), the same pulse is sent again until it
    goes or the source is closed. ``corrupt(first, last, ...)`` turns the
    pulses ``first..last`` bad (clock or one channel) when they are built.
    """

    def __init__(self, profile: str, compression: str, first_pulse_id: int) -> None:
        self.profile = profile
        self.channels = channel_metadata(profile, compression, N_SCALARS, CAMERA_SHAPE)
        self.names = [entry["name"] for entry in self.channels]
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, 100)
        self.address = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.next_pulse_id = first_pulse_id
        self._bad: tuple[int, int, str, str | None] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-source", daemon=True)
        self._thread.start()

    def expected(self, pulse_id: int) -> dict[str, Any]:
        return expected_values(self.profile, pulse_id, N_SCALARS, CAMERA_SHAPE)

    def corrupt(self, first: int, last: int, mode: str, channel: str | None = None) -> None:
        with self._lock:
            self._bad = (first, last, mode, channel)

    def frames(self, pulse_id: int, now_ns: int) -> list[bytes]:
        values = self.expected(pulse_id)
        stamp = (now_ns // 1_000_000_000, now_ns % 1_000_000_000)
        frames = build_message(pulse_id, self.channels, [values[name] for name in self.names], timestamp=stamp)
        with self._lock:
            bad = self._bad
        if bad is not None and bad[0] <= pulse_id <= bad[1]:
            frames = self._spoil(frames, *bad[2:], stamp)
        return frames

    def _spoil(self, frames: list[bytes], mode: str, channel: str | None, stamp: tuple[int, int]) -> list[bytes]:
        main = json.loads(frames[0])
        sec, ns = stamp
        clocks = {"negative_seconds": (-sec, ns), "ns_overflow": (sec, 1_500_000_000 + ns), "nan": (float("nan"), ns),
                  "seconds_2_62": (2**62, ns), "back_one_hour": (sec - 3600, ns), "ahead_one_day": (sec + 86400, ns)}
        if mode in clocks:
            main["global_timestamp"] = dict(zip(("sec", "ns"), clocks[mode]))
            return [json.dumps(main).encode(), *frames[1:]]
        header = json.loads(frames[1])
        index = self.names.index(channel)
        entry = header["channels"][index]
        if mode == "huge_shape":
            entry["shape"] = [2**31, 2**31]  # 2**62 elements, the value part unchanged
        elif entry.get("compression") == "bitshuffle_lz4":  # claims_2gib: a block header that asks for 2 GiB
            frames[2 + 2 * index] = struct.pack(">QI", 2**31, 8192) + bytes(range(64))
        else:
            entry["compression"] = "lz4"
            frames[2 + 2 * index] = struct.pack(">I", 2**31) + bytes(range(64))
        frames[1] = json.dumps(header).encode()
        main["hash"] = hashlib.md5(frames[1]).hexdigest()
        return [json.dumps(main).encode(), *frames[1:]]

    def _run(self) -> None:
        period = 1.0 / RATE
        next_time = time.monotonic()
        while not self._stop.is_set():
            frames = self.frames(self.next_pulse_id, time.time_ns())
            while not self._stop.is_set():
                try:
                    self.socket.send_multipart(frames)
                    break
                except zmq.Again:  # the buffer does not take it (stopped, gone): the same pulse again
                    continue
            else:
                return
            self.next_pulse_id += 1
            next_time = max(next_time + period, time.monotonic() - 1.0)  # catch up, but not in a burst
            self._stop.wait(max(0.0, next_time - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close(0)
        self.context.term()


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process a scenario starts, and every process below them: stopped and checked by pid.

    ``watch`` samples the tree below a pid while it is whole (before a fault,
    at the end), so that an orphan is still known after its parent died.
    """

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.pids: set[int] = set()

    def start(self, child: Child) -> Child:
        self.children.append(child)
        self.pids.add(child.process.pid)
        return child

    def watch(self, pid: int) -> None:
        self.pids.update(descendants_of(pid))

    def alive(self) -> list[int]:
        return sorted(pid for pid in self.pids if not process_gone(pid))

    def stop_all(self) -> None:
        """Continue what a fault stopped, then stop our children, newest first (the writer before the buffer)."""
        for pid in self.alive():
            self.watch(pid)  # the tree as it is now: children started since (a side child restarted) are ours too
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for child in reversed(self.children):
            child.stop(timeout=10)

    def kill_leftovers(self) -> list[str]:
        """SIGKILL whatever is still alive (by pid); their descriptions for the failure message."""
        left = [f"{pid} {command_line(pid)[:160]}" for pid in self.alive()]
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


@contextlib.contextmanager
def small_disk(directory: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``directory`` (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("full_disk mounts a small tmpfs, which needs root (CI runs as root)")
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)


def newest_pulse_id(rest: str) -> int:
    return requests.get(f"{rest}/statistics", timeout=DEADLINE).json()["statistics"]["ring"]["newest_pulse_id"] or 0


def bytes_per_pulse(source: FaultSource) -> int:
    values = source.expected(0)
    return sum(len(value.encode()) if isinstance(value, str) else value.nbytes for value in values.values()
               if value is not None)


# --------------------------------------------------------------------------- one scenario


@dataclass
class Result:
    """What an acquisition left: the file, the writer's exit code, and what the file may lack on purpose."""

    plan: Plan
    path: Path
    start: int
    stop: int
    exit_code: int
    source: FaultSource
    spoiled: dict[int, set[str]] = field(default_factory=dict)  # pulse id -> channels sent undecodable
    target_alive: bool = True  # the process the signal hit still runs once the writer has exited
    buffer_alive: bool = True


def run_scenario(plan: Plan, tmp_path: Path, processes: Processes) -> Result:
    """Source -> buffer (+ web or gateway) -> writer, one fault; returns once the writer has exited."""
    first_pulse_id = random.Random(f"{SEED}:{plan.kind}:first").randrange(10**9, 2 * 10**9)
    source = FaultSource(plan.profile, plan.compression, first_pulse_id)
    try:
        return _run_scenario(plan, tmp_path, processes, source)
    finally:
        source.close()


def _run_scenario(plan: Plan, tmp_path: Path, processes: Processes, source: FaultSource) -> Result:
    env: dict[str, str] = {}
    extra: list[str] = []
    if plan.target == "gateway":
        env = ca_env()  # loopback only: nothing broadcasts; our own repeater so libca spawns none
        processes.start(start_repeater(env))
        extra = ["--ca"]
    elif plan.target == "web":
        extra = ["--web", "--web-port", "0"]
    buffer = processes.start(Child.python_module(
        "sf_bsread_writer.buffer", source.address, "-o", "0", "--replay-port", "0", "--rest-port", "0",
        "-b", "5000", *extra, env=env))
    ready = parse_ready(buffer.wait_for_line("READY ", timeout=DEADLINE))
    assert ready is not None
    side_pid = None
    if plan.target in ("web", "gateway"):
        # The child's READY line comes on the buffer's output (it inherits it); then it serves.
        buffer.wait_for_line('READY {"url"' if plan.target == "web" else 'READY {"ca_port"', timeout=DEADLINE)
        marker = "sf_bsread_writer.web" if plan.target == "web" else "sf_bsread_writer.ca.gateway"
        side_pid = wait_for(lambda: children_of(buffer.process.pid, marker), timeout=DEADLINE,
                            message=f"the {plan.target} child")[0]
    processes.watch(buffer.process.pid)
    first = source.next_pulse_id
    wait_for(lambda: newest_pulse_id(ready["rest"]) >= first + plan.back, timeout=DEADLINE,
             message=f"{plan.back} pulses in the buffer")
    newest = newest_pulse_id(ready["rest"])
    start, stop = newest - plan.back, newest + plan.ahead
    spoiled: dict[int, set[str]] = {}
    if plan.fault in DATA_FAULTS:
        bad_first = newest + 30 + random.Random(f"{SEED}:{plan.kind}:at").randrange(plan.ahead - 60 - plan.bad_count)
        bad_last = bad_first + plan.bad_count - 1
        source.corrupt(bad_first, bad_last, plan.bad_mode, plan.bad_channel)
        if plan.bad_channel:
            spoiled = {pulse_id: {plan.bad_channel} for pulse_id in range(bad_first, bad_last + 1)}

    output = tmp_path / "run.h5"
    with contextlib.ExitStack() as stack:
        if plan.kind == "full_disk":
            # The writer keeps 1 MiB for its close and refuses to start without it (a clear 400): the disk
            # holds that reserve plus a fraction of the data, so that it fills mid-run.
            size = WRITER_RESERVE + max(64 * 1024, int(plan.disk_fraction * (stop - start + 1) * bytes_per_pulse(source)))
            output = stack.enter_context(small_disk(tmp_path / "small_disk", size)) / "run.h5"
        writer = processes.start(Child.python_module(
            "sf_bsread_writer.writer", ready["replay"], str(output), "-1", "0", "--finished-grace", "0",
            "--flush-interval", "0.2", "--stop-deadline", str(STOP_DEADLINE)))
        writer_ready = parse_ready(writer.wait_for_line("READY ", timeout=DEADLINE))
        assert writer_ready is not None
        client = WriterClient(writer_ready["rest"], timeout=DEADLINE)
        client.set_parameters(PARAMETERS)
        client.stop_pulse_id(stop)
        client.start_pulse_id(start)

        pid = None
        if plan.target is not None:
            trigger_rows = int(plan.trigger * (stop - start + 1))
            wait_for(lambda: writer.process.poll() is not None
                     or client.statistics()["messages_written"] >= trigger_rows,
                     timeout=DEADLINE, message=f"{trigger_rows} rows written before the fault")
            pid = {"buffer": buffer.process.pid, "writer": writer.process.pid}.get(plan.target, side_pid)
            assert pid is not None
            processes.watch(pid)
            inject(pid, plan)
        exit_code = writer.wait(timeout=DEADLINE + stop - start)
        processes.watch(buffer.process.pid)  # a side child restarted after its fault is ours too
        result = Result(plan, output, start, stop, exit_code, source, spoiled,
                        target_alive=plan.target is None or not process_gone(pid),
                        buffer_alive=buffer.process.poll() is None)
        if plan.kind == "full_disk":  # check while the tmpfs is mounted
            check_acquisition(result)
    return result


def inject(pid: int, plan: Plan) -> None:
    """Send the plan's signal; a stop lasts ``plan.pause`` seconds (the fault's length, not a synchronisation)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, SIGNALS[plan.fault])
        if plan.fault == "sigstop":
            threading.Event().wait(plan.pause)
            os.kill(pid, signal.SIGCONT)


# --------------------------------------------------------------------------- the checks


def row_pulse_ids(file: h5py.File, names: list[str], rows: int) -> list[int]:
    """Each row's pulse id: any channel present in the row names it; a row with every value absent lies
    between two rows that name theirs (one pulse step apart per row), or it is a failure."""
    named = np.zeros(rows, dtype=np.int64)
    for name in names:
        named = np.maximum(named, file["data"][name]["pulse_id"][:rows])
    pulse_ids = named.tolist()
    for row, pulse_id in enumerate(pulse_ids):
        if pulse_id == 0:
            before = next((pulse_ids[r] + row - r for r in range(row - 1, -1, -1) if pulse_ids[r]), None)
            after = next((pulse_ids[r] - (r - row) for r in range(row + 1, rows) if named[r]), None)
            assert before is not None and before == after, f"row {row}: no channel says which pulse it is"
            pulse_ids[row] = before
    return pulse_ids


def stored_values(group: h5py.Group, rows: int) -> list[Any]:
    """The group's value of each row, from ``data`` or, for a channel that changed type, ``data(n)``."""
    datasets = {0: group["data"][:rows]}
    if "data_variant" not in group:
        return list(datasets[0])
    variants = group["data_variant"][:rows]
    for variant in set(variants.tolist()) - {0}:
        datasets[variant] = group[f"data({variant})"][:rows]
    return [datasets[variant][row] for row, variant in enumerate(variants.tolist())]


def check_rows(result: Result, file: h5py.File, rows: int) -> tuple[list[int], list[tuple[int, str]]]:
    """Every row holds what the source sent for its pulse; returns the rows' pulse ids and the values lost."""
    names = result.source.names
    if rows == 0:
        return [], []  # e.g. killed before its first flush
    pulse_ids = row_pulse_ids(file, names, rows)
    assert pulse_ids == sorted(set(pulse_ids)), "rows are not in strictly increasing pulse order"
    assert all(result.start <= pulse_id <= result.stop for pulse_id in pulse_ids), \
        f"rows outside the range {result.start}..{result.stop}: {pulse_ids[:3]}..{pulse_ids[-3:]}"
    expected_rows = [result.source.expected(pulse_id) for pulse_id in pulse_ids]
    lost: list[tuple[int, str]] = []
    for name in names:
        group = file["data"][name]
        present = group["is_data_present"][:rows]
        stored_pulse_ids = group["pulse_id"][:rows]
        values = stored_values(group, rows)
        for row, pulse_id in enumerate(pulse_ids):
            expected = expected_rows[row][name]
            if not present[row]:
                assert expected is None or name in result.spoiled.get(pulse_id, ()), \
                    f"{name} at pulse {pulse_id} (row {row}) is absent, the source sent it"
                if expected is not None:
                    lost.append((pulse_id, name))
                continue
            assert expected is not None, f"{name} at pulse {pulse_id} (row {row}) is present, the source sent none"
            assert stored_pulse_ids[row] == pulse_id, (name, row, pulse_id)
            value = values[row]
            if isinstance(expected, str):
                assert (value.decode() if isinstance(value, bytes) else value) == expected, (name, pulse_id)
            else:
                assert np.array_equal(np.asarray(value).reshape(expected.shape), expected), (name, pulse_id)
    return pulse_ids, lost


def check_acquisition(result: Result) -> None:
    """The invariants every acquisition keeps, whatever hit it (module docstring); then the kind's own."""
    plan = result.plan
    summary_path = Path(f"{result.path}.summary.json")
    assert result.path.exists(), f"no file at {result.path} (writer exit code {result.exit_code})"
    try:
        with h5py.File(result.path, "r") as file:  # opens with plain h5py, whatever happened
            closed = int(file.attrs.get("complete", 0)) == 1
            rows = int(file.attrs.get("number_of_messages", 0))
            outcome = file.attrs.get("outcome")
            outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
            pulse_ids, lost = check_rows(result, file, rows)
            missing_table = file["missing"][()] if "missing" in file else []
            missing_attribute = int(file.attrs.get("missing_pulses", 0))
    except (OSError, KeyError, ValueError) as error:  # h5py's ways of saying the file is damaged
        raise AssertionError(f"the file does not read: {type(error).__name__}: {error}") from error
    requested = set(range(result.start, result.stop + 1))
    written = set(pulse_ids)

    # Every end but kill -9 closes the file: the other signals, a hangup, a full disk.
    if (plan.signal, plan.target) != ("kill9", "writer"):
        assert closed, f"the writer ended ({result.exit_code}) without closing its file (complete = 0)"
    if not closed:  # killed: the rows up to the last flush are valid, and nothing says it went well
        assert result.exit_code < 0, f"the writer exited {result.exit_code} but left its file open (complete = 0)"
        assert outcome != "complete", "a file left open says outcome complete"
        assert not summary_path.exists(), "a writer that did not close its file wrote a summary"
        return

    missing: set[int] = set()
    for first_pulse_id, last_pulse_id, count, reason in missing_table:
        assert (reason.decode() if isinstance(reason, bytes) else reason), "a /missing row without a reason"
        listed = set(range(int(first_pulse_id), int(last_pulse_id) + 1))
        assert count == len(listed), f"/missing {first_pulse_id}..{last_pulse_id} counts {count}"
        assert not listed & missing, f"/missing lists pulses {first_pulse_id}..{last_pulse_id} twice"
        missing |= listed
    assert not missing & written, f"pulses both in the file and in /missing: {sorted(missing & written)[:5]}"
    assert requested - written <= missing, \
        f"requested pulses neither in the file nor in /missing: {sorted(requested - written - missing)[:10]}"
    assert missing <= requested, f"/missing lists pulses outside the range: {sorted(missing - requested)[:5]}"
    assert missing_attribute == len(missing), (missing_attribute, len(missing))

    assert outcome in OUTCOME_EXIT_CODES, f"a closed file without an outcome ({outcome!r})"
    assert result.exit_code == OUTCOME_EXIT_CODES[outcome], f"exit code {result.exit_code}, file says {outcome}"
    assert summary_path.exists(), "the writer closed its file but wrote no summary beside it"
    summary = json.loads(summary_path.read_text())
    assert summary["outcome"] == outcome, f"summary says {summary['outcome']}, file says {outcome}"
    assert (summary["messages_written"], summary["missing_pulses"]) == (rows, len(missing)), \
        f"summary: {summary['messages_written']} rows, {summary['missing_pulses']} missing; " \
        f"file: {rows} rows, {len(missing)} missing"
    if outcome == "complete":
        assert written == requested and not lost, \
            f"outcome complete with {len(requested - written)} pulses and {len(lost)} values not in the file"
    if rows == 0:
        assert outcome == "failed", f"no row written, outcome {outcome}"

    # The kind's own promise.
    if plan.fault in DATA_FAULTS or plan.fault == "sigstop" or plan.target in ("web", "gateway") \
            or (plan.signal == "sighup" and plan.target in ("buffer", "writer")):
        assert written == requested, \
            f"{plan.kind} cost rows: {len(requested - written)} pulses not written, " \
            f"e.g. {sorted(requested - written)[:5]}"
    if plan.signal in ("sighup", "sigstop") and plan.target != "writer":  # the writer: its exit code above
        assert result.target_alive, f"{plan.signal} ended the {plan.target}"
    if plan.target in ("web", "gateway"):
        assert result.buffer_alive, f"{plan.signal} to the {plan.target} ended the buffer"
    if plan.kind == "undecodable_channel":
        assert outcome == "partial", f"values sent undecodable ({len(lost)} of them absent) but outcome {outcome}"


@pytest.fixture
def processes() -> Iterator[Processes]:
    """The scenario's processes; on the way out every one is stopped, and none may be left (by pid)."""
    tracked = Processes()
    try:
        yield tracked
    finally:
        tracked.stop_all()
        try:
            wait_for(lambda: not tracked.alive(), timeout=15, message="every process of the scenario to end")
            left: list[str] = []
        except AssertionError:
            left = tracked.kill_leftovers()
        assert not left, "processes left behind (killed now):\n" + "\n".join(left)


def kind_parameter(kind: str) -> Any:
    """One test per kind; marked xfail when what the seed draws for it is a known failure."""
    fault_name = draw_plan(kind).fault_name
    marks = [pytest.mark.xfail(strict=True, reason=f"{fault_name}: {KNOWN_FAILING[fault_name]}")] \
        if fault_name in KNOWN_FAILING else []
    return pytest.param(kind, marks=marks, id=kind)


@pytest.mark.parametrize("kind", [kind_parameter(kind) for kind in FAULT_KINDS])
def test_fault(kind: str, processes: Processes, tmp_path: Path) -> None:
    plan = draw_plan(kind)
    replay = f"replay: {SEED_VARIABLE}={SEED} pytest tests/test_fault_injection.py -k '{kind}'"
    print(f"{replay}\nplan: {plan}")  # shown by pytest with a failure
    try:
        result = run_scenario(plan, tmp_path, processes)
        if kind != "full_disk":
            check_acquisition(result)
    except AssertionError as error:
        raise AssertionError(f"{error}\n[{replay}; plan {plan}]") from error
