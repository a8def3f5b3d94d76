"""The buffer's child processes: the CA gateway for ``--ca``, the web service for ``--web``.

Every service that serves clients beyond the writers runs in its own
process, so that no client can slow ingest or share its GIL: the buffer
starts it with its command line and a :class:`ChildSupervisor` restarts it
with backoff if it dies, and stops it when the buffer stops. The buffer
knows its children only by their command lines; it imports none of their
code (caproto, aiohttp stay out of the buffer process).

:class:`BufferChildren` is what the buffer's loop holds of them: the
supervisors, and the listening socket of the web port, which the buffer
opens itself and hands to every web service it starts (READY and the
status name the real port, also for ``--web-port 0``; nobody can take the
port while a service restarts; connections that come meanwhile wait in its
backlog).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from sf_bsread_writer import process
from sf_bsread_writer.buffer.restart import RestartPolicy
from sf_bsread_writer.buffer.settings import BufferSettings
from sf_bsread_writer.status import ChildStatus

__all__ = ["BufferChildren", "ChildSupervisor", "gateway_command", "start_gateway", "web_command", "start_web",
           "reachable_locally", "listen"]

logger = logging.getLogger(__name__)


def gateway_command(buffer_output: str, status_url: str | None = None, prefix: str = "",
                    name: str = "BSBUFFER", *, log_level: str = "INFO",
                    extra_args: Sequence[str] = (), parent_pid: int | None = None) -> list[str]:
    """The command line that runs the gateway (``python -m sf_bsread_writer.ca.gateway ...``)."""
    command = [sys.executable, "-m", "sf_bsread_writer.ca.gateway", buffer_output,
               "--ca-prefix", prefix, "--name", name, "--log-level", log_level]
    if status_url:
        command += ["--status-url", status_url]
    if parent_pid:
        command += ["--parent-pid", str(parent_pid)]
    return command + list(extra_args)


class ChildSupervisor:
    """Runs a child process (``process.start_child``) and restarts it whenever it exits unexpectedly.

    When, decides :class:`~sf_bsread_writer.buffer.restart.RestartPolicy` (backoff 1 s .. 30 s, reset by a
    child that ran a minute): never after exit code 2 (``process.ExitCode.CONFIGURATION``: a bad option, a
    port in use), which fails the same way on every start: it is logged and the child stays down
    (``child_up`` 0, the alert ``SfBsreadChildDown``), as systemd treats the buffer itself.

    The child inherits stdout/stderr (its logs go where the buffer's go) and
    the environment (EPICS_* settings). It dies with the buffer
    (``process.start_child``: the parent-death signal it arms itself, and its
    ``--parent-pid`` poll), so a ``kill -9`` of the buffer leaves no orphan
    serving stale data. Restarts come from this supervisor's own thread, which
    lives until :meth:`stop`: the "parent" of the parent-death signal.
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None,
                 max_backoff: float = 30.0, pass_fds: Sequence[int] = ()) -> None:
        self.command = command
        self.env = env
        self.pass_fds = tuple(pass_fds)  # descriptors every start inherits (the web service's listening socket)
        self.policy = RestartPolicy(max_backoff=max_backoff)
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="child-supervisor", daemon=True)

    def start(self) -> "ChildSupervisor":
        self.process = self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        logger.info("starting child process: %s", " ".join(self.command))
        child = process.start_child(self.command, env=self.env, pass_fds=self.pass_fds)
        self.policy.started(time.monotonic())
        return child

    def _supervise(self) -> None:
        """The supervisor's thread: wait for the child's end, ask :class:`RestartPolicy` when to start it again."""
        while not self._stop_event.is_set():
            child = self.process
            assert child is not None
            while child.poll() is None:
                if self._stop_event.wait(0.5):
                    return
            if self._stop_event.is_set():
                return
            now = time.monotonic()
            due = self.policy.next_start(now, child.returncode)
            if due is None:  # as systemd's RestartPreventExitStatus=2
                logger.error("child process %s exited with %d, a configuration error: not restarted (its log says "
                             "what to fix; then restart the buffer)", self.command[:3], child.returncode)
                return
            logger.error("child process %s exited with %s; restarting in %.0f s", self.command[:3],
                         child.returncode, due - now)
            if self._stop_event.wait(max(0.0, due - now)):
                return
            self.restarts += 1
            self.process = self._spawn()

    def send_signal(self, signum: int) -> bool:
        """Pass a signal on to the child (e.g. SIGHUP: re-read configuration); False if it is not running."""
        process = self.process
        if process is None or process.poll() is not None:
            return False
        process.send_signal(signum)
        return True

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop supervising and terminate the child (SIGTERM, then SIGKILL after ``timeout``)."""
        self._stop_event.set()
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        return process.returncode


def start_gateway(buffer_output: str, status_url: str | None = None, prefix: str = "",
                  name: str = "BSBUFFER", *, source_mode: str = "sub", log_level: str = "INFO",
                  extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> ChildSupervisor:
    """Start the gateway for a buffer's ``--ca`` and keep it running; call ``.stop()`` at shutdown.

    ``buffer_output`` is the bsread stream the gateway reads, as a client
    connects to it (``tcp://127.0.0.1:PORT``); the buffer passes its own
    rate-limited loopback feed, never its live output (a PUSH live output
    would share its messages between the legacy consumer and the gateway).
    ``status_url`` is the buffer's HTTP base URL (``http://127.0.0.1:REST_PORT``).
    """
    command = gateway_command(buffer_output, status_url, prefix, name, log_level=log_level,
                              extra_args=["--source-mode", source_mode, *extra_args], parent_pid=os.getpid())
    return ChildSupervisor(command, env=env).start()


def reachable_locally(address: str) -> str:
    """An address a child on this host connects to: a wildcard bind (0.0.0.0, ::, *) becomes loopback."""
    for wildcard in ("0.0.0.0", "[::]", "*"):
        address = address.replace(f"//{wildcard}:", "//127.0.0.1:")
    return address


def web_command(feed: str, status_url: str | None, replay: str, *, port: int, bind: str, tokens: str | None,
                max_rate: float, log_level: str = "INFO", parent_pid: int | None = None,
                listen_fd: int | None = None, allow_origins: Sequence[str] = ()) -> list[str]:
    """The command line that runs the web service (``python -m sf_bsread_writer.web ...``).

    ``status_url``: None for the buffer's own ``--web``, whose feed carries the status (``feed``).
    """
    command = [sys.executable, "-m", "sf_bsread_writer.web", feed]
    if status_url:
        command += ["--status-url", reachable_locally(status_url)]
    command += ["--replay", reachable_locally(replay), "--port", str(port), "--bind", bind,
                "--max-rate", repr(max_rate), "--log-level", log_level]
    if tokens:
        command += ["--tokens", os.path.abspath(tokens)]
    if parent_pid:
        command += ["--parent-pid", str(parent_pid)]
    for origin in allow_origins:
        command += ["--allow-origin", origin]
    if listen_fd is not None:
        command += ["--listen-fd", str(listen_fd)]
    return command


def start_web(feed: str, status_url: str | None, replay: str | None, *, port: int, bind: str,
              tokens: str | None, max_rate: float, log_level: str = "INFO",
              env: dict[str, str] | None = None, listen_fd: int | None = None,
              allow_origins: Sequence[str] = ()) -> ChildSupervisor:
    """Start the web service for a buffer's ``--web`` and keep it running; call ``.stop()`` at shutdown.

    ``listen_fd``: the buffer's listening socket on the web port, inherited by every start
    (``BufferChildren``): the service serves on it instead of binding the port itself. ``status_url``:
    None when ``feed`` carries the buffer's status (the buffer's own web feed always does).
    """
    if replay is None:
        raise ValueError("--web needs the buffer's replay endpoint")
    command = web_command(feed, status_url, replay, port=port, bind=bind, tokens=tokens, max_rate=max_rate,
                          log_level=log_level, parent_pid=os.getpid(), listen_fd=listen_fd,
                          allow_origins=allow_origins)
    return ChildSupervisor(command, env=env, pass_fds=() if listen_fd is None else (listen_fd,)).start()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port) for the web service to inherit (``pass_fds``).

    ``host`` may be a name: its first address decides the family (``localhost``
    -> 127.0.0.1 where both families resolve, as ``getaddrinfo`` orders them).
    OSError names host and port.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise OSError(f"cannot listen for --web on {host}:{port}: {error}") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart past TIME_WAIT, as aiohttp does
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise OSError(error.errno, f"cannot listen for --web on {host}:{port}: {error.strerror}") from None
    return listener


class BufferChildren:
    """The buffer's children (``ca_gateway`` for --ca, ``web`` for --web) and the web port's listening socket.

    Owned by the loop thread: :meth:`listen_for_web` before READY, :meth:`start` after it, :meth:`stop` at
    the end (children first, then the listener). ``web_port`` is the real port once listening.
    """

    def __init__(self, settings: BufferSettings) -> None:
        self.settings = settings
        self.web_port = settings.web_port
        self._listener: socket.socket | None = None
        self._children: dict[str, ChildSupervisor] = {}

    def listen_for_web(self) -> None:
        """--web: the listening socket on --web-bind/--web-port (OSError names them)."""
        self._listener = listen(self.settings.web_bind, self.settings.web_port)
        self.web_port = self._listener.getsockname()[1]

    def start(self, ca_feed: str | None, web_feed: str | None, replay_address: str | None) -> None:
        """Start a child for each feed given (its address): the gateway, the web service."""
        settings = self.settings
        if ca_feed is not None:
            self._children["ca_gateway"] = start_gateway(  # its feed carries the status: no HTTP poll
                ca_feed, None, settings.ca_prefix, settings.name, source_mode="sub",
                log_level=settings.log_level, extra_args=["--max-rate", repr(settings.ca_max_rate)])
        if web_feed is not None:
            listener = self._listener
            self._children["web"] = start_web(
                web_feed, None, replay_address, port=self.web_port, bind=settings.web_bind,
                tokens=settings.web_tokens, max_rate=settings.web_max_rate, log_level=settings.log_level,
                allow_origins=settings.web_allow_origins,
                listen_fd=listener.fileno() if listener is not None else None)

    def forward_reload(self) -> None:
        """SIGHUP: the web service re-reads its token file."""
        web = self._children.get("web")
        if web is not None and web.send_signal(signal.SIGHUP):
            logger.info("SIGHUP forwarded to the web service (its tokens are re-read)")
        else:
            logger.info("SIGHUP: nothing to reload (no --web)")

    def __getitem__(self, name: str) -> ChildSupervisor:
        """The running child ``name`` (``ca_gateway``, ``web``, ``archiver``); KeyError if there is none."""
        return self._children[name]

    def add(self, name: str, child: ChildSupervisor) -> None:
        """A child started elsewhere (the archiver: buffer/archive_link.py), supervised and stopped with the rest."""
        self._children[name] = child

    def status(self) -> tuple[ChildStatus, ...]:
        return tuple(ChildStatus(name, child.running, child.restarts) for name, child in self._children.items())

    def stop(self) -> None:
        for child in self._children.values():
            child.stop()
        self._children.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
