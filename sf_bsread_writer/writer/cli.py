"""CLI ``sf_bsread_writer STREAM_ADDRESS OUTPUT_FILE USER_ID REST_PORT``: one acquisition, then exit.

:func:`main` binds the REST API, drops privileges, prints the READY line
and hands over to :func:`serve`, which waits for the writer to finish,
keeps answering ``/status`` for the grace period (``--finished-grace``, 0 by
default: the original's clients wait for the process to end) and returns the
exit code (``process.ExitCode``): the run's outcome (0 complete, 3 partial,
1 failed), or 2 when it could not launch (a bad option, a port in use, no such
output root). The command (``commands.writer``) then ends the process at
once (``process.exit_now``), not after the interpreter's teardown.

SIGTERM and SIGINT close the file now (the rest of the range is recorded
as missing); SIGHUP does not end the run: a writer started from a terminal
(by hand, or by ``sf_bsread_ctl write``) writes on to the end of its range
when the terminal is gone (``process.survive_hangup``).
"""
from __future__ import annotations

import importlib
import logging
import os
import pwd
import time
from collections.abc import Callable, Sequence
from typing import Any

from sf_bsread_writer import config, process, registry
from sf_bsread_writer.h5 import guardian
from sf_bsread_writer.httpserver import HttpServer
from sf_bsread_writer.process import ExitCode
from sf_bsread_writer.transport import partsio
from sf_bsread_writer.writer.acquisition import (
    BadRequest,
    OutsideRoot,
    signal_end_reason,
)
from sf_bsread_writer.writer.outputs import DEV_NULL, resolve_output_file
from sf_bsread_writer.writer.rest import make_app
from sf_bsread_writer.writer.service import Writer, WriterSettings

__all__ = ["main", "serve", "drop_privileges", "import_what_a_run_may_need"]

logger = logging.getLogger(__name__)

# How soon the main thread acts on SIGTERM/SIGINT.
SIGNAL_LATENCY = 0.1
# How long the answers of /stop and /kill (and of status polls) may take to reach their clients.
ANSWER_FLUSH_SECONDS = 2.0


#: What a run imports on first use, not at the writer's start: bitshuffle (a value it must decode), the archive
#: reader with nats-py (a ``nats://`` source, or a range that reaches back past the ring into the archive).
#: A writer that drops its privileges imports them before: as another user, the checkout (a 0700 clone, its venv
#: inside) or the interpreter's own library (a Python under a 0700 home) may no longer be readable.
IMPORTED_ON_FIRST_USE = ("bitshuffle", "sf_bsread_writer.archive.reader")


def import_what_a_run_may_need() -> None:
    """Import :data:`IMPORTED_ON_FIRST_USE` now (one that is not installed is left to fail where it is needed)."""
    for name in IMPORTED_ON_FIRST_USE:
        try:
            importlib.import_module(name)
        except ImportError as error:
            logger.info("%s not imported before dropping privileges: %s", name, error)


def _identity(user_id: int) -> tuple[int, str | None]:
    """``user_id``'s primary group and name (an uid without a passwd entry: its group as the original did)."""
    try:
        entry = pwd.getpwuid(user_id)
        return entry.pw_gid, entry.pw_name
    except KeyError:
        return user_id, None


def start_guardian_as(user_id: int) -> None:
    """Start the files' guardian (h5/guardian.py) now, to run as ``user_id``: before the drop, as root.

    After the drop the interpreter itself may be out of reach (a pyenv
    Python under a 0700 /root), so the guardian is started while the
    writer still may, and switches to the writer's user as its first act.
    Not root (the drop will fail and say why) or no switch: started on first use.
    """
    if user_id < 0 or os.geteuid() != 0 or user_id == os.getuid():
        return
    group_id, name = _identity(user_id)
    groups = os.getgrouplist(name, group_id) if name is not None else [group_id]
    try:
        guardian.start(run_as=(user_id, group_id, groups))
    except OSError as error:
        logger.error("cannot start the files' guardian: %s (a kill mid-flush would need `sf_bsread_ctl repair`)",
                     error)


def drop_privileges(user_id: int) -> None:
    """Run as ``user_id`` and its primary group from now on (-1: keep the current user).

    Raises ``PermissionError`` with a message saying what to do when the
    process may not switch (only root may switch to another user).
    """
    if user_id == -1:
        logger.info("Not changing process uid and gid.")
        return
    if user_id < 0:
        raise ValueError(f"USER_ID must be -1 or a uid >= 0, not {user_id}")
    group_id, name = _identity(user_id)
    if os.getuid() == user_id and os.geteuid() == user_id and os.getgid() == group_id:
        logger.info("Already running as uid %d gid %d.", user_id, group_id)
        return
    try:
        if os.geteuid() == 0:
            if name is not None:
                os.initgroups(name, group_id)
            else:
                os.setgroups([group_id])
        os.setgid(group_id)
        os.setuid(user_id)
    except PermissionError as error:
        raise PermissionError(
            f"cannot switch to uid {user_id} gid {group_id}: {error.strerror} (running as uid {os.getuid()}; "
            "only root may change user: start as root or pass -1)") from None
    logger.info("Running as uid %d gid %d.", user_id, group_id)


def serve(writer: Writer, server: Any, wait_until_idle: Callable[[float], bool] = lambda timeout: True) -> int:
    """Wait for the writer to finish, keep answering for the grace period, return the exit code.

    SIGTERM and SIGINT close the file (as ``/kill``); SIGHUP is only logged
    (the run goes on: :func:`main` installs that). The signal is only
    recorded (by process.stop_on_signals's thread); this loop, in the main
    thread, acts on it within ``SIGNAL_LATENCY``.
    ``wait_until_idle(timeout)`` waits for the HTTP answers still being sent.
    """
    pending: list[str] = []
    restore = process.stop_on_signals(pending.append)
    try:
        while not writer.done.wait(SIGNAL_LATENCY):
            if pending:
                name = pending.pop()
                logger.info("%s received: closing the file", name)
                writer.exit_at_once.set()
                writer.stop(reason=signal_end_reason(name), wait=None)
        grace_end = time.monotonic() + writer.settings.finished_grace
        while not pending and time.monotonic() < grace_end:
            if writer.exit_at_once.wait(min(SIGNAL_LATENCY, max(0.0, grace_end - time.monotonic()))):
                break
        wait_until_idle(ANSWER_FLUSH_SECONDS)
    finally:
        server.stop()
        restore()
    code = writer.exit_code
    logger.info("Writer exits with %d (%s)", code, writer.status())
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """CLI ``sf_bsread_writer STREAM_ADDRESS OUTPUT_FILE USER_ID REST_PORT [options]``."""
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    args = config.parse_args("sf_bsread_writer", "bsread writer: one pulse range from a buffer into an HDF5 file",
                             config.WRITER_OPTIONS, config.WRITER_ENV_PREFIX, argv)
    process.configure_logging(args.log_level)
    # Before any socket receives (as the buffer does): a camera frame (1-3 MB) would otherwise come from a
    # fresh mmap and go back to the kernel when freed, so every received image pays page faults and the
    # zeroing of fresh pages. Measured for a fresh writer draining 800 images, paired with and without
    # (docs/performance.md, "A fresh writer on camera streams"): minor faults 85-90 000 -> 42-50 000,
    # system time 1.16 -> 0.68 s and 748 -> 1378 img/s on the first drain.
    try:
        process.tune_allocator()
    except Exception as error:  # an optimisation, never a reason not to write
        logger.warning("allocator tuning failed: %s", error)
    settings = WriterSettings(
        stream_address=args.stream_address, output_file=args.output_file, output_root=args.output_root,
        direct=args.direct, direct_mode=args.direct_mode, stop_deadline=args.stop_deadline,
        flush_interval=args.flush_interval, finished_grace=args.finished_grace,
        max_message_bytes=args.max_message_bytes, max_clock_skew=args.max_clock_skew,
        decompress_images=args.decompress_images,
    )
    logger.info("Starting writer: stream %s, output file %s%s", settings.stream_address, settings.output_file,
                " (direct)" if settings.direct else "")
    writer = Writer(settings)
    app = make_app(writer)
    try:
        # Bind first (a privileged port needs the privileges), then drop them before touching any file.
        server = HttpServer(app, args.rest_host, args.rest_port)
    except OSError as error:
        logger.error("Cannot listen on %s:%s: %s", args.rest_host, args.rest_port, error)
        return ExitCode.CONFIGURATION
    try:
        if args.user_id != -1:
            import_what_a_run_may_need()
            start_guardian_as(args.user_id)  # a start may name a file over REST: also for /dev/null
        drop_privileges(args.user_id)
        if settings.output_root is not None and not os.path.isdir(settings.output_root):
            raise ValueError(f"--output-root {settings.output_root} is not a directory")
        if args.output_file != DEV_NULL:
            try:
                resolve_output_file(args.output_file, settings.output_root, os.getcwd())
            except OutsideRoot as error:
                raise ValueError(error.message) from None
            except BadRequest as error:
                # E.g. it exists: a start may still name another file over REST, so warn only.
                logger.warning("OUTPUT_FILE: %s", error.message)
    except (PermissionError, ValueError) as error:
        logger.error("%s", error)
        server.stop()
        return ExitCode.CONFIGURATION
    # Before READY: from then on a closed terminal (or `kill -HUP`) must not cost the file.
    process.survive_hangup("the terminal is gone: writing on to the end of the range "
                           "(SIGTERM or SIGINT close the file now)")
    server.start()
    process.print_ready({"rest": server.url, "io_path": partsio.IMPLEMENTATION})
    entry = registry.register("writer", os.path.basename(args.output_file) or "writer", {"rest": server.url},
                              {"output_file": os.path.abspath(args.output_file), "buffer": settings.stream_address})
    try:
        code = serve(writer, server, app.wait_until_idle)
    finally:
        registry.unregister(entry)
    return code
