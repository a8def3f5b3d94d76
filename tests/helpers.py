"""Test utilities: free ports, polling with a deadline, subprocesses that are always cleaned up.

No test sleeps to synchronise: it polls a condition with ``wait_for`` (which
fails with a message when the deadline passes) or reads a readiness line
from a child's output with ``Child.wait_for_line``.
"""
from __future__ import annotations

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

from sf_bsread_writer.process import die_with_parent

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


class Child:
    """A subprocess whose combined output is read line by line in a thread.

    Use as a context manager (or call ``stop``): the process is terminated,
    then killed, whatever happens in the test.
    """

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        full_env = dict(os.environ)
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.args = list(args)
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, cwd=cwd, text=True, bufsize=1,
            preexec_fn=die_with_parent,  # a killed test run leaves no process behind (the CA repeater was one)
        )
        self.lines: list[str] = []
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def python_module(cls, module: str, *args: str, **kwargs: Any) -> "Child":
        return cls([sys.executable, "-m", module, *args], **kwargs)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

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
            self.lines.append(line)
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
            self.lines.append(line)
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        return self.process.wait(timeout=timeout)

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
