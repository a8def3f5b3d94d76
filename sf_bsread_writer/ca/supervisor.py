"""The gateway command's process: runs the IOC as a child, and replaces it when the IOC asks.

It owns no EPICS state and imports nothing heavy, so that the first IOC is
started at once (start-up is the IOC's imports and ``iocInit``; docs/gateway.md).

**The restart protocol, explicitly.** The IOC child (``ca/ioc.py``) runs
with its stdin and stdout as pipes. The supervisor hands it its start state
with one line on stdin, ``go {json}`` (the records earlier IOCs served, by
channel name, and the channels that need long strings); the child prints
``READY {json}`` once serving (forwarded: the gateway's READY line) and,
before it exits with ``RESTART_EXIT_CODE`` to be replaced, ``NEXT {json}``:
the state for its successor, which the supervisor keeps. Other output of
the child is forwarded. A warm standby child, its slow imports done, waits
for its ``go``: a replacement costs ``iocInit``, not a Python start. The
standby is started once the serving IOC has printed READY, never beside it:
its imports would take half the CPU the first IOC needs before it answers
(docs/gateway.md, "Start-up and memory").
"""
from __future__ import annotations

import ctypes
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sf_bsread_writer import process

__all__ = ["RESTART_EXIT_CODE", "supervise", "check_access_security_file", "AccessSecurityError"]

logger = logging.getLogger(__name__)

#: Exit code of an IOC process that must be replaced (after its ``NEXT`` line): the supervisor starts the next
#: (an internal code of the table in process.ExitCode: the supervisor never exits with it).
RESTART_EXIT_CODE = process.ExitCode.IOC_RESTART


class _IocChild:
    """One IOC process: its stdin takes ``go {state}``, its stdout lines are read by a thread."""

    def __init__(self, argv: Sequence[str], on_line: Callable[["_IocChild", str], None]) -> None:
        self.process = process.start_child([sys.executable, "-m", "sf_bsread_writer.ca.gateway", *argv,
                                            "--ioc-child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.next_state: dict[str, Any] | None = None
        self.serving = threading.Event()  # its READY line was read: it answers CA clients
        self._reader = threading.Thread(target=self._read, args=(on_line,), daemon=True,
                                        name=f"ioc-{self.process.pid}-stdout")
        self._reader.start()

    def _read(self, on_line: Callable[["_IocChild", str], None]) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            on_line(self, raw.decode("utf-8", errors="replace").rstrip("\n"))

    def go(self, state: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(b"go " + json.dumps(dict(state)).encode() + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):  # it died while waiting: its exit code tells
            pass

    def wait_output(self, timeout: float = 5.0) -> None:
        """After the process ended: until its last line was read (the NEXT line comes just before the exit)."""
        self._reader.join(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def supervise(argv: Sequence[str]) -> int:
    """Run the IOC as a child (``--ioc-child``) and start the next one whenever it asks to be replaced.

    The next IOC is started in advance and waits, its imports done (loading
    EPICS takes seconds on a busy machine), until it is told to go: a
    replacement costs the new IOC's ``iocInit``, not a Python start. It is
    started once the serving IOC has said READY, not beside it: until then
    the two would share the CPU the serving IOC needs to answer its first
    client (on a loaded machine most of its start-up). A replacement asked
    before any standby exists starts one and waits for it. Each child dies
    with this process, and is started from this thread (``process.start_child``:
    the thread that starts a child is its "parent"). SIGTERM only sets an event
    (``process.stop_on_signals``: from its thread).
    """
    stopping = threading.Event()
    restore = process.stop_on_signals(lambda name: stopping.set())
    state: dict[str, Any] = {}
    output_lock = threading.Lock()

    def on_line(child: _IocChild, line: str) -> None:
        if line.startswith("NEXT "):
            try:
                child.next_state = json.loads(line[5:])
            except ValueError:
                logger.warning("IOC %d: unreadable NEXT line ignored", child.process.pid)
            return
        with output_lock:  # READY and whatever else the IOC prints: the gateway's own output
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):  # nobody reads our stdout any more: the child's lines still are
                pass
        if line.startswith(process.READY_PREFIX):
            child.serving.set()

    restarts = 0
    current = standby = None
    try:
        current = _IocChild(argv, on_line)
        current.go(state)
        while True:
            if standby is None and current.serving.is_set() and not stopping.is_set():
                standby = _IocChild(argv, on_line)  # the serving IOC answers: its successor may load now
            if standby is None:  # woken by READY at once, else every half second for the checks below
                current.serving.wait(0.5)
                code = current.process.poll()
            else:
                try:
                    code = current.process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    code = None
            if code is None:
                if stopping.is_set():
                    current.stop()
                    return process.ExitCode.OK
                continue
            current.wait_output()
            if stopping.is_set():  # ours to end: whatever ended the IOC meanwhile (a signal to the whole group)
                return process.ExitCode.OK if code in (0, RESTART_EXIT_CODE) or code < 0 else code
            if code < 0:  # the IOC was killed by a signal: a fault (sys.exit would make 256 - N of it)
                return process.ExitCode.FAILED
            if code != RESTART_EXIT_CODE:
                return code
            restarts += 1
            state = dict(current.next_state or state)
            state["restarts"] = restarts
            logger.info("gateway IOC replaced to serve what its records cannot hold (replacement %d)", restarts)
            current, standby = standby or _IocChild(argv, on_line), None
            current.go(state)
    finally:
        for child in (current, standby):
            if child is not None:
                child.stop()
        restore()


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
