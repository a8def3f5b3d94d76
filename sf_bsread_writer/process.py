"""What every command does the same way, once: log set-up, signals, the READY line, systemd, malloc.

Each service (buffer, writer, CA gateway, CA bridge, simulator) is a thin
CLI around its own loop; what they share about being a *process* lives here:

* :func:`service_start`: the process-wide knobs of a service, set first
  thing by every service's ``main()`` (and by the commands before they
  import their service: :mod:`sf_bsread_writer.commands`), never by an
  import; a child started by :func:`start_child` arms its death with its
  parent there;
* :func:`start_child`: the one way a command starts a child process (the
  buffer's gateway, web service and archiver, the gateway's IOCs, ``ctl``'s
  writer): its own session, no ``preexec_fn``;
* :func:`configure_logging`: one log format, on stderr (stdout carries only
  the READY line);
* :class:`ExitCode`: the one table of exit codes of every command
  (docs/operations.md, "Exit codes"); :func:`start_error_code` sorts a
  failure at start into permanent (2) and transient (1);
* :func:`stop_on_signals`: SIGTERM (systemd, kill) and SIGINT (Ctrl-C) ask
  the service to stop; the handler only wakes a thread, which asks, and the
  service's own loop acts;
* :func:`survive_hangup`: SIGHUP (the terminal is gone) does not end a
  service or an acquisition: it is logged, the terminal's output is dropped,
  the command goes on;
* :func:`print_ready`: the one machine-readable line on stdout, ``READY
  {json}``, that tests, the demo and scripts wait for;
* :func:`sd_notify` and :func:`watchdog_interval`: systemd's ``Type=notify``
  and its watchdog;
* :func:`tune_allocator`: glibc malloc settings for processes that move
  large frames; :func:`release_free_memory` for those that should give a
  large request's memory back.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

__all__ = [
    "service_start",
    "exit_now",
    "SERVICE_KNOBS",
    "ExitCode",
    "start_error_code",
    "interrupted_code",
    "configure_logging",
    "stop_on_signals",
    "survive_hangup",
    "silence_output",
    "ignore_hangup_until_handled",
    "start_child",
    "PARENT_ENV",
    "print_ready",
    "parse_ready",
    "sd_notify",
    "watchdog_interval",
    "tune_allocator",
    "die_with_parent",
    "die_with_expected_parent",
    "pid_alive",
    "release_free_memory",
]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
READY_PREFIX = "READY "


#: The environment a service process runs with unless its user set otherwise. OMP_NUM_THREADS: the bitshuffle wheel
#: links OpenMP (libgomp), and with its default thread count bitshuffle's (de)compression runs 10-30x slower on a
#: small machine, where a service's other threads want the cores (docs/dependencies.md); libgomp reads the variable
#: once, when it loads, so it must be set before anything imports bitshuffle (bsread/codecs.py and bsread/build.py
#: import it on first use). numpy's OpenBLAS reads it the same way, at numpy's import.
SERVICE_KNOBS: Mapping[str, str] = {"OMP_NUM_THREADS": "1"}


def exit_now(code: int) -> NoReturn:
    """End a command's process with ``code`` now, without the interpreter's teardown; for entry points only.

    The writer's command (``commands.writer``) calls it once ``main`` has returned: its file is closed,
    its summary written, its API and registry entry gone. A DAQ system written for the original waits
    for the process to end, and the original's own test wants it gone 0.5 s after the range's last
    message; Python's teardown of what the writer imported (numpy, h5py, zmq, bottle) alone takes
    0.1-0.35 s on a loaded machine, with nothing left to do. What this process buffers is flushed here
    (the log, stdout, stderr). Never called by library code: ``main`` returns its code to a caller.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed terminal or pipe: nothing left to tell it
            pass
    os._exit(code)


def service_start() -> None:
    """Set the services' process-wide knobs (:data:`SERVICE_KNOBS`); a value the user set wins.

    Called first thing by every service's ``main()`` and by :mod:`sf_bsread_writer.commands` before it imports
    a service, never at an import: a physicist's ``import sf_bsread_writer.remote`` must leave their process
    (their numpy and OpenMP threads) as it was. Idempotent. Children inherit the setting through the environment.
    A child of :func:`start_child` also arms its death with its parent here (:func:`die_with_expected_parent`).
    """
    for name, value in SERVICE_KNOBS.items():
        os.environ.setdefault(name, value)
    die_with_expected_parent()


class ExitCode(enum.IntEnum):
    """How every command of the package ends: one table (docs/operations.md, "Exit codes").

    The split that matters to whoever restarts a command (systemd, the
    buffer's child supervisor, a script) is *permanent* against *transient*:
    a bad option, a port taken at start or a path that is not there fail the
    same way on every retry, so they exit ``CONFIGURATION`` and the units list
    it in ``RestartPreventExitStatus=``; anything else that ends a service
    early is ``FAILED`` and worth a restart. The writer's outcomes keep their
    contract (DESIGN.md): complete 0, partial 3, failed 1
    (``writer.acquisition.Outcome.exit_code``, checked against this table by
    tests/test_signals_exit_codes.py). ``sf_bsread_ctl write`` stopped by a
    signal exits 128 + its number, as a shell reports it
    (:func:`interrupted_code`).
    """

    OK = 0  # a clean stop (SIGTERM, SIGINT, the end of the work); the writer: every requested pulse written
    FAILED = 1  # a transient or runtime failure (a bug, a lost endpoint); the writer: nothing usable written
    CONFIGURATION = 2  # a permanent error at start: bad option, value or path, a port in use; never restart
    PARTIAL = 3  # the writer: rows written, but some of the range is not in the file (it says why)
    IOC_RESTART = 75  # internal: the gateway's IOC process asks its supervisor for a fresh IOC (ca/ioc.py)


# Errors of binding a listening socket: the address is taken, not on this host, or needs privileges. They are
# a configuration (two services given one port, a wrong --bind) and fail the same way on every restart.
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def start_error_code(error: BaseException) -> ExitCode:
    """The exit code for ``error`` raised while a service starts: ``CONFIGURATION`` for a bind error, else ``FAILED``.

    ``zmq.ZMQError`` carries the same errno values as ``OSError`` on Linux.
    """
    return ExitCode.CONFIGURATION if getattr(error, "errno", None) in _BIND_ERRNOS else ExitCode.FAILED


def interrupted_code(signal_name: str) -> int:
    """128 + the signal's number: what a shell shows for a command that ended on that signal."""
    return 128 + int(signal.Signals[signal_name])


def configure_logging(level: str) -> None:
    """One log format for every command, on stderr: stdout carries only the READY line.

    mflow (under bsread) logs every bind at INFO through a handler of its
    own, which would print each line twice; it is kept to warnings.
    """
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mflow").setLevel(logging.WARNING)


def stop_on_signals(stop: Callable[[str], None]) -> Callable[[], None]:
    """SIGTERM and SIGINT call ``stop(signal_name)``; returns a function that restores the old handlers.

    ``stop`` must only *ask*: set an event, append to a list, or
    ``loop.call_soon_threadsafe`` for an asyncio loop. The service's loop
    then ends, closes its sockets and files, and the command returns 0: a
    clean stop, no traceback.

    ``stop`` runs on a thread of its own ("stop-signals"), never inside the
    handler: a handler runs in the main thread between two bytecodes, and
    even setting a ``threading.Event`` takes the event's lock, which the
    interrupted main thread may hold (inside that event's ``wait``, which a
    service's loop calls all the time): the handler then waits for itself
    for ever (CI: the CA bridge did not end within 60 s of SIGTERM). The
    handler only writes the signal's number to a pipe (:func:`_on_a_thread`,
    as :func:`survive_hangup`'s).
    """
    def pass_on(signums: bytes) -> None:
        for signum in signums:
            try:
                stop(signal.Signals(signum).name)
            except Exception:  # a bug in stop: said, and the next signal still passed on
                logger.exception("stopping on %s", signal.Signals(signum).name)

    return _on_a_thread(STOP_SIGNALS, pass_on, "stop-signals")


def survive_hangup(meaning: str, action: Callable[[], None] | None = None,
                   silence: Sequence[int] | None = None) -> Callable[[], None]:
    """SIGHUP no longer ends the process: it is logged (``SIGHUP: <meaning>``), and ``action()`` runs.

    A hangup means the terminal is gone: an ssh session dropped, a window
    closed. The kernel sends SIGHUP to the terminal's whole foreground
    process group, so a command started by hand (a writer, ``sf_bsread_ctl
    write`` and its writer, a buffer and its children) would otherwise die
    mid-work, a writer leaving its file unclosed. SIGTERM and SIGINT keep
    their meaning (:func:`stop_on_signals`).

    The output descriptors in ``silence`` (default: those of 1 and 2 that are
    terminals now) are pointed at /dev/null at the hangup: a hung-up terminal
    answers every write with EIO, and a closed pipe with EPIPE. The log line
    is written before, so it reaches a log file or the journal.

    The handler only writes a byte to a pipe (no lock: a second hangup may
    interrupt the first handler); a daemon thread logs and runs ``action``,
    so ``action`` may take locks. Returns a function that restores the old
    handler.
    """
    if silence is None:
        silence = tuple(fd for fd in (1, 2) if _is_terminal(fd))
    def watch(signums: bytes) -> None:  # hangups arrived together: one line, one action
        logger.warning("SIGHUP: %s", meaning)
        silence_output(silence)
        if action is not None:
            try:
                action()
            except Exception:
                logger.exception("after SIGHUP")

    return _on_a_thread((signal.SIGHUP,), watch, "hangup")


def _on_a_thread(signums: Sequence[int], act: Callable[[bytes], None], name: str) -> Callable[[], None]:
    """Handle ``signums`` on a daemon thread ``name``: ``act(numbers)`` with the signals that arrived since its
    last call; returns a function that restores the old handlers.

    The handler itself only writes the signal's number to a pipe: no lock, no logging (a handler runs in
    the main thread between two bytecodes and may interrupt either, also a second handler), so ``act`` may
    take locks and log.
    """
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(wake_read, True)

    def handler(signum: int, frame: Any) -> None:
        try:
            os.write(wake_write, bytes((signum,)))
        except BlockingIOError:  # thousands of signals not yet handled: one more changes nothing
            pass

    def run() -> None:
        while signums_now := os.read(wake_read, 4096):
            act(signums_now)

    threading.Thread(target=run, name=name, daemon=True).start()
    previous = {signum: signal.signal(signum, handler) for signum in signums}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


def ignore_hangup_until_handled() -> None:
    """SIGHUP is ignored until a handler replaces it (a command that starts children it must not lose to a hangup).

    An ignored signal stays ignored across ``exec``. Children of :func:`start_child` need no such thing: they
    run in their own session, which a terminal's hangup does not reach.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


#: The environment variable through which :func:`start_child` tells a child its parent's pid, for
#: :func:`die_with_expected_parent` (read and removed by the child's :func:`service_start`).
PARENT_ENV = "SF_BSREAD_PARENT_PID"


def start_child(argv: Sequence[str], *, env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = (),
                stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None, text: bool = False,
                dies_with_parent: bool = True) -> subprocess.Popen:
    """Start a child process of a command: the one way every command of the package does it.

    * **No ``preexec_fn``.** Python documents it as unsafe in a threaded parent (a lock held by another
      thread at the fork stays held in the child), and the buffer and the gateway start children from
      threads. What used to run there is done otherwise:
    * **Its own session** (``start_new_session``: ``setsid``): a terminal's hangup or Ctrl-C reaches the
      command only, never its child directly, also not a child still importing (seconds on a busy machine)
      before it could install its own SIGHUP handler. The parent decides what its child hears: the buffer
      stops its children, forwards SIGHUP to the web service; ``ctl`` forwards SIGINT/SIGTERM to its writer.
    * **Death with the parent** (``dies_with_parent``): the parent's pid goes to the child in
      :data:`PARENT_ENV`; the child's :func:`service_start` sets ``PR_SET_PDEATHSIG`` itself and, should the
      parent have gone before that, ends at once (:func:`die_with_expected_parent`). So a ``kill -9`` of a
      buffer leaves no child serving stale data. ``dies_with_parent=False`` (``ctl``'s writer: a started
      acquisition goes on to its end whatever happens to ``ctl``) clears the variable instead.

    As with ``PR_SET_PDEATHSIG`` always, the "parent" is the thread that starts the child: start children from
    a thread that lives as long as they should (the caller's, or a supervisor's own thread).
    """
    child_env = dict(os.environ if env is None else env)
    if dies_with_parent:
        child_env[PARENT_ENV] = str(os.getpid())
    else:
        child_env.pop(PARENT_ENV, None)
    return subprocess.Popen(list(argv), env=child_env, pass_fds=tuple(pass_fds), stdin=stdin, stdout=stdout,
                            stderr=stderr, text=text, start_new_session=True)


def die_with_expected_parent() -> None:
    """In a child of :func:`start_child`: SIGTERM when its parent ends, set by the child itself (no ``preexec_fn``).

    Reads (and removes, so that the child's own children do not inherit it) :data:`PARENT_ENV`; sets
    ``PR_SET_PDEATHSIG`` to SIGTERM, then compares ``os.getppid()`` with the expected parent: a parent that
    died before the signal was armed (the child still starting) has left the child to another reaper, and the
    child sends itself the SIGTERM it would have had. A no-op without the variable; on a system without
    ``prctl``, the child's own ``--parent-pid`` poll (web service, gateway, archiver) remains.
    """
    expected = os.environ.pop(PARENT_ENV, "")
    if not expected.isdigit():
        return
    die_with_parent()
    if os.getppid() != int(expected):
        logger.warning("parent process %s is gone before this child started: it ends", expected)
        os.kill(os.getpid(), signal.SIGTERM)


def silence_output(descriptors: Sequence[int] = (1, 2)) -> None:
    """Point ``descriptors`` at /dev/null: what was written there has no reader any more (a gone terminal)."""
    if not descriptors:
        return
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for fd in descriptors:
            os.dup2(null, fd)
    finally:
        os.close(null)


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def print_ready(payload: Mapping[str, Any]) -> None:
    """Print ``READY {json}`` on stdout and flush: the command is serving, at these addresses.

    Part of every CLI's contract, whatever the log level: scripts, tests and
    the demo start a service with port 0 and read the ports actually bound
    from this line. Nobody left to read it (a hung-up terminal the service inherited from its parent, in its own
    session, hears no SIGHUP: :func:`start_child`) ends no service.
    """
    try:
        sys.stdout.write(READY_PREFIX + json.dumps(dict(payload)) + "\n")
        sys.stdout.flush()
    except OSError as error:  # a terminal gone (EIO) or a pipe closed: a child of start_child hears no hangup
        logger.warning("READY line not printed (%s): the service goes on", error)


def parse_ready(line: str) -> dict[str, Any] | None:
    """The payload of a READY line printed by :func:`print_ready`; None for any other line."""
    if not line.startswith(READY_PREFIX):
        return None
    payload = json.loads(line[len(READY_PREFIX):])
    return payload if isinstance(payload, dict) else None


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd's notify socket, if there is one.

    The whole sd_notify protocol: one datagram on the unix socket named by
    NOTIFY_SOCKET ("@" means the abstract namespace). Returns False when not
    run under systemd with Type=notify.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as error:
        logger.warning("sd_notify(%r) failed: %s", state, error)
        return False


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


def die_with_parent() -> None:
    """This process gets SIGTERM when the thread that started it ends: Linux ``prctl(PR_SET_PDEATHSIG)``.

    Called by a child for itself (:func:`die_with_expected_parent`); the package starts no child with it as a
    ``preexec_fn`` (:func:`start_child` says why). A no-op elsewhere than Linux.
    """
    if _prctl is not None:  # looked up before any fork: between fork and exec, call only
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


# ---------------------------------------------------------------------- allocator
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 32 * 1024 * 1024,
                   trim_threshold: int = 1024 * 1024 * 1024) -> bool:
    """Make glibc reuse freed large blocks warm instead of returning them to the kernel.

    Why: the ring keeps the large parts that libzmq allocated for each
    received message and frees them when they are evicted. With glibc's
    defaults a multi-megabyte block is served by a fresh ``mmap`` (or the
    heap top is trimmed after it is freed), so every message pays page
    faults and zeroing of fresh pages: measured here, forwarding 2.6 MB
    images through a ring without this ran well below a bare relay (numbers
    in docs/performance.md). Raising the mmap threshold (32 MiB is glibc's
    maximum on 64-bit) makes such blocks come from the heap, and a high trim
    threshold keeps freed heap memory mapped, so an evicted image's block is
    reused, already faulted in, by the next image. Setting either disables
    glibc's dynamic threshold adjustment. Memory stays bounded by the ring's
    ``max_bytes`` plus what is in flight; it is simply not handed back to
    the kernel while the process runs, which is what a permanently running
    buffer wants.

    The receiving side of the replay pays the same: libzmq's I/O thread
    allocates each received image in its own glibc arena, and with the
    defaults that arena is trimmed (``madvise(MADV_DONTNEED)``) whenever the
    queue of received images runs empty, so the next images fault their
    pages in again: 15-110 faults per 1 MB image in a receiving process,
    against 3-5 so tuned (docs/performance.md, "The replay's receive, page
    by page"). Hence every ``ReplayClient`` calls this when it starts, unless
    told not to.

    Call early in the process (before the sockets receive anything); calling
    it again is cheap and changes nothing. Returns False, changing nothing,
    where the C library is not glibc.
    """
    mallopt = _mallopt()
    if mallopt is None:
        logger.info("no glibc mallopt: allocator left at its defaults")
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    if ok:
        logger.debug("glibc malloc tuned: mmap_threshold=%d trim_threshold=%d",
                     mmap_threshold, trim_threshold)
    else:
        logger.warning("mallopt refused mmap_threshold=%d / trim_threshold=%d",
                       mmap_threshold, trim_threshold)
    return ok


def release_free_memory() -> bool:
    """Give memory that is free inside glibc's heaps back to the kernel (``malloc_trim(0)``: every arena).

    For a service whose requests are occasionally large (the web service's
    ranges: tens of MB of columns and encodings, built in worker threads whose
    arenas glibc otherwise keeps at their peak): call after such a request.
    Not for the buffer or the writer, which keep their memory on purpose
    (:func:`tune_allocator`). Returns False where the C library is not glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _mallopt() -> Any:
    """glibc's ``mallopt``, looked up once (the running process's symbols: no ldconfig), or None.

    Once: every ReplayClient's start calls :func:`tune_allocator`, and a writer or a range may start many.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (the symbols of the running process: no ldconfig), or None."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (the parent a child watches: our parent while it lives)."""
    if os.getppid() == pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
