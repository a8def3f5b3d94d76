"""Test utilities: free ports, polling with a deadline, subprocesses that are always cleaned up.

No test sleeps to synchronise: it polls a condition with ``wait_for`` (which
fails with a message when the deadline passes) or reads a readiness line
from a child's output with ``Child.wait_for_line``.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sf_bsread_writer.buffer.service import Buffer
from sf_bsread_writer.buffer.settings import BufferSettings
from sf_bsread_writer.client import WriterClient
from sf_bsread_writer.status import RingStatus
from sf_bsread_writer.tools.simulate import Simulator

ROOT = Path(__file__).resolve().parent.parent

# Loopback-only Channel Access: nothing may broadcast from tests.
EPICS_LOOPBACK_ENV = {
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (prefer binding port 0 where possible)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
             message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class FakeClock:
    """A clock the test moves: pass it where the product takes ``clock=`` (it is called for ``now``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedSource:
    """A writer's source that hands out its events (a callable event is called for it); once they are
    used up, every receive is a timeout that moves the fake clock on (and may run ``on_idle(source)``)."""

    def __init__(self, clock: FakeClock, events: Sequence[Any] = (), on_idle: Callable[[Any], None] | None = None
                 ) -> None:
        self.clock = clock
        self.events = list(events)
        self.on_idle = on_idle
        self.idle_polls = 0
        self.stops: list[tuple] = []

    def receive(self, timeout: float) -> Any:
        if self.events:
            event = self.events.pop(0)
            if callable(event):
                return event()
            return event
        self.idle_polls += 1
        self.clock.now += timeout
        if self.on_idle is not None:
            self.on_idle(self)
        return None

    def set_stop(self, stop_pulse_id: int | None = None, stop_time: float | None = None) -> None:
        self.stops.append((stop_pulse_id, stop_time))


def children_of(pid: int, marker: str = "") -> list[int]:
    """Pids of ``pid``'s child processes whose command line contains ``marker`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and marker in cmdline:
            found.append(int(entry.name))
    return found


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# How a Child dies with the thread that started it, as with the package's own children (process.start_child):
# a killed test run leaves no process behind (the CA repeater was one). Without preexec_fn, unsafe in a
# threaded parent (tests/test_supervision.py): a launcher arms PR_SET_PDEATHSIG for itself, ends as the signal
# would have ended it if that thread is gone already (it may end while the launcher starts), and execs the
# command, which keeps the setting (nats-server, softIoc: commands that cannot arm it themselves).
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: when the starting thread ends
except AttributeError:
    pass  # not Linux
if not os.path.exists(f"/proc/{sys.argv[1]}/task/{sys.argv[2]}"):
    os.kill(os.getpid(), signal.SIGTERM)
os.execvp(sys.argv[3], sys.argv[3:])
"""


class Child:
    """A subprocess whose combined output is read line by line in a thread.

    Use as a context manager (or call ``stop``): the process is terminated,
    then killed, whatever happens in the test. ``max_lines``: ``output()``
    keeps only the last lines read, and at most ``UNREAD_LINES`` wait
    unread (the oldest go first): for children that talk for hours (benchmarks).
    """

    UNREAD_LINES = 100_000  # with max_lines: far more than a waiter falls behind a child by

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, new_session: bool = False,
                 max_lines: int | None = None) -> None:
        full_env = dict(os.environ)
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env["PYTHONUNBUFFERED"] = "1"
        # A fatal signal prints every thread's stack (Python's faulthandler): what wait_or_explain shows of a hang.
        full_env.setdefault("PYTHONFAULTHANDLER", "1")
        if env:
            full_env.update(env)
        self.args = list(args)
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), str(threading.get_native_id()),
             *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, cwd=cwd, text=True, bufsize=1,
            # new_session: its own session and process group (as `setsid`), so that a test can signal the
            # whole group the way a terminal does (os.killpg(child.process.pid, SIGHUP)).
            start_new_session=new_session,
        )
        self.lines: list[str] = []
        self.max_lines = max_lines
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def python_module(cls, module: str, *args: str, **kwargs: Any) -> "Child":
        return cls([sys.executable, "-m", module, *args], **kwargs)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if self.max_lines is not None and self._queue.qsize() >= self.UNREAD_LINES:
                try:
                    self._queue.get_nowait()  # the oldest unread line goes
                except queue.Empty:
                    pass
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _keep(self, line: str) -> None:
        self.lines.append(line)
        if self.max_lines is not None and len(self.lines) > self.max_lines:
            del self.lines[:-self.max_lines]

    def wait_for_line(self, predicate: Callable[[str], bool] | str, timeout: float = 20.0) -> str:
        """Return the first new output line matching ``predicate`` (a substring or a function)."""
        match = (lambda line: predicate in line) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {predicate!r} within {timeout}s; output:\n"
                                     + "\n".join(self.lines[-50:]))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)  # keep the end marker for later callers
                raise AssertionError(f"process exited ({self.process.poll()}) before a line matching "
                                     f"{predicate!r}; output:\n" + "\n".join(self.lines[-50:]))
            self._keep(line)
            if match(line):
                return line

    def output(self) -> str:
        """Everything read so far (drains the queue without blocking)."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self._keep(line)
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        return self.process.wait(timeout=timeout)

    def wait_or_explain(self, timeout: float = 20.0) -> int:
        """The exit code; a child still running after ``timeout`` fails the test saying where each thread is.

        Then SIGABRT: Python's faulthandler (on in every Child) writes every thread's stack to stderr, which
        is in :meth:`output`, and the process ends. A hang seen once in CI then says why the next time.
        """
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.process.send_signal(signal.SIGABRT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        raise AssertionError(f"{' '.join(self.args)} did not end within {timeout} s; its threads then, and all "
                             f"it said:\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return self.process.returncode

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Generous: a 2-core machine shared with other test suites.
STREAM_DEADLINE = 60.0


class Stream:
    """A simulator and a buffer fed by it, both in threads of this process (``count`` 0: until closed).

    ``rate`` 0 sends as fast as the buffer takes the messages: ``count``
    messages are then in the buffer within a moment, a past range ready to
    be replayed. ``simulator_options`` go to ``Simulator`` (``n_channels``,
    ``image_shape`` ...); ``session_timeout``: how long the buffer keeps a silent writer's session.
    """

    def __init__(self, count: int = 0, rate: float = 100.0, first_pulse_id: int = 50_000_000,
                 profile: str = "mixed", compression: str = "bitshuffle_lz4", buffer_length: int = 20_000,
                 session_timeout: float = 10.0, **simulator_options: Any) -> None:
        self.simulator = Simulator(profile, rate=rate, start_pulse_id=first_pulse_id, compression=compression,
                                   **simulator_options)
        source = self.simulator.open()
        self.buffer = Buffer(BufferSettings(source, buffer_length=buffer_length, rest_port=None, output_mode="pub",
                                            session_timeout=session_timeout))
        self._threads = [threading.Thread(target=self.buffer.run, daemon=True),
                         threading.Thread(target=self.simulator.run, args=(count,), daemon=True)]
        for thread in self._threads:
            thread.start()
        assert self.buffer.started.wait(STREAM_DEADLINE)
        self.replay = self.buffer.replay_address
        self.output = self.buffer.output_address

    def ring(self) -> RingStatus:
        """The buffer's ``RingStatus`` now."""
        return self.buffer.statistics().ring

    def wait_for_pulse(self, pulse_id: int) -> None:
        wait_for(lambda: (self.ring().newest_pulse_id or 0) >= pulse_id, timeout=STREAM_DEADLINE,
                 message=f"pulse {pulse_id} in the buffer")

    def close(self) -> None:
        self.simulator.stop()
        self._threads[1].join(timeout=10)
        self.buffer.stop()
        self._threads[0].join(timeout=10)
        self.simulator.close(linger=0)


# The writer's CLI with an audit hook that notes every module imported once the process no longer runs as root:
# after the privilege drop the checkout (a 0700 clone, its venv inside) and even the interpreter's own library
# (a pyenv Python under a 0700 /root) may no longer be readable, so such an import can fail in production.
# Said at the end: IMPORTED_AFTER_THE_DROP [...].
_WATCH_IMPORTS = """
import json, os, sys
after_the_drop = []
def note(event, args):
    if event == "import" and os.geteuid() != 0:
        after_the_drop.append(args[0])
sys.addaudithook(note)
from sf_bsread_writer.writer.cli import main
code = main(sys.argv[1:])
print("IMPORTED_AFTER_THE_DROP", json.dumps(after_the_drop), flush=True)
sys.exit(code)
"""


def writer_process(address: str, output_file: str | os.PathLike, *options: str, user_id: str = "-1",
                   watch_imports: bool = False, **kwargs: Any) -> tuple[Child, WriterClient]:
    """The writer's CLI as a child process (``--finished-grace 0.5``), and a ``WriterClient`` of its REST API.

    ``watch_imports``: the child says what it imported after dropping its privileges (``imported_after_the_drop``).
    """
    arguments = (address, str(output_file), user_id, "0", "--finished-grace", "0.5", *options)
    if watch_imports:
        child = Child([sys.executable, "-c", _WATCH_IMPORTS, *arguments], **kwargs)
    else:
        child = Child.python_module("sf_bsread_writer.writer", *arguments, **kwargs)
    line = child.wait_for_line("READY ", timeout=STREAM_DEADLINE)
    return child, WriterClient(json.loads(line.split("READY ", 1)[1])["rest"], timeout=STREAM_DEADLINE)


def imported_after_the_drop(child: Child) -> list[str]:
    """What a ``writer_process(..., watch_imports=True)`` that has ended imported after dropping its privileges."""
    line = child.wait_for_line("IMPORTED_AFTER_THE_DROP ", timeout=STREAM_DEADLINE)
    return json.loads(line.split("IMPORTED_AFTER_THE_DROP ", 1)[1])


def descendants_of(pid: int) -> list[int]:
    """Every process below ``pid``: its children, their children, ... (from /proc, via ``children_of``).

    A process whose parent died is adopted by init and drops out of this
    list: sample it while the tree is whole (e.g. before a fault) and check
    the pids later with ``process_gone``.
    """
    found: list[int] = []
    pending = [pid]
    while pending:
        children = children_of(pending.pop())
        found += children
        pending += children
    return found


def command_line(pid: int) -> str:
    """``pid``'s command line as one string ("" once it is gone): for messages that name a process."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


NATS_SERVER = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)


class NatsServer:
    """A real ``nats-server -js`` on a free loopback port with its own store, cleaned up by pid (``stop``, ``kill``).

    ``cluster``: (own cluster port, [route ports]) for a JetStream cluster
    member. ``max_payload``: the broker's message limit (its default is 1 MB,
    below one camera image with headers). Restartable on the same store and
    ports (``start`` again after ``kill``).
    """

    def __init__(self, store: Path, port: int | None = None, name: str = "n1", max_payload: int = 8 * 1024**2,
                 cluster: tuple[int, Sequence[int]] | None = None, max_store: int | None = None) -> None:
        if NATS_SERVER is None:
            raise RuntimeError("nats-server is not installed")
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.name = name
        self.cluster = cluster
        config = [f"max_payload: {max_payload}", f'server_name: "{name}"']
        if max_store is not None:
            config.append(f"jetstream {{ store_dir: \"{self.store}\", max_file_store: {max_store} }}")
        self.config = self.store / "nats.conf"
        self.config.write_text("\n".join(config) + "\n")
        self.child: Child | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "NatsServer":
        args = [NATS_SERVER, "-c", str(self.config), "-js", "-a", "127.0.0.1", "-p", str(self.port),
                "-sd", str(self.store)]
        if self.cluster is not None:
            own, routes = self.cluster
            args += ["--cluster_name", "sfbs", "--cluster", f"nats://127.0.0.1:{own}",
                     "--routes", ",".join(f"nats://127.0.0.1:{port}" for port in routes)]
        self.child = Child(args)
        self.child.wait_for_line("Server is ready", timeout)
        return self

    def kill(self) -> None:
        """kill -9, as a crash."""
        if self.child is not None and self.child.process.poll() is None:
            self.child.process.kill()
            self.child.process.wait(10)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def __enter__(self) -> "NatsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
