"""CLI ``sf_bsread_buffer STREAM [options]``: the buffer service until SIGTERM.

Exit codes (``process.ExitCode``): 0 after SIGTERM/SIGINT, 2 for a
configuration that cannot work (a bad option, an endpoint that cannot be
bound: a port in use, an address not on this host), 1 when the running
service failed (systemd restarts it; the unit never restarts a 2). SIGHUP
re-reads the web service's tokens and never ends the buffer.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import zmq

from sf_bsread_writer import config, process
from sf_bsread_writer.buffer.service import Buffer
from sf_bsread_writer.buffer.settings import BufferSettings
from sf_bsread_writer.process import ExitCode

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit code: 0 after a clean stop, 1 if the service failed, 2 for a configuration error."""
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    args = config.parse_args(
        "sf_bsread_buffer",
        "Buffer one bsread stream in a ring; serve it live, replayed to writers and over HTTP.",
        config.BUFFER_OPTIONS, config.BUFFER_ENV_PREFIX, argv,
    )
    process.configure_logging(args.log_level)
    try:
        buffer = Buffer(BufferSettings.from_args(args, print_ready=True, register=True))
    except ValueError as error:
        logger.error("%s", error)
        return ExitCode.CONFIGURATION

    process.stop_on_signals(lambda name: buffer.stop())
    # Never the default, which would end us: `systemctl reload`, or the terminal of a buffer started by hand gone.
    process.survive_hangup("re-reading the web service's tokens (the buffer goes on)", buffer.request_reload)
    try:
        buffer.run()
    except (zmq.ZMQError, OSError) as error:  # a port in use (2: restarting cannot help), or a fault (1)
        code = process.start_error_code(error)
        logger.error("buffer failed: %s%s", error, " (a configuration error: not worth a restart)"
                     if code is ExitCode.CONFIGURATION else "")
        return code
    except Exception:  # a bug: say where, exit non-zero so that systemd restarts us
        logger.exception("buffer failed")
        return ExitCode.FAILED
    return ExitCode.OK


