"""CLI ``sf_bsread_buffer STREAM [options]``: the buffer service until SIGTERM."""
from __future__ import annotations

import logging
import signal
from collections.abc import Sequence

import zmq

from sf_bsread_writer import config, process
from sf_bsread_writer.buffer.service import Buffer

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit code: 0 after a clean stop, 1 if the service failed, 2 for bad options."""
    args = config.parse_args(
        "sf_bsread_buffer",
        "Buffer one bsread stream in a ring; serve it live, replayed to writers and over HTTP.",
        config.BUFFER_OPTIONS, config.BUFFER_ENV_PREFIX, argv,
    )
    process.configure_logging(args.log_level)
    try:
        buffer = Buffer.from_args(args, print_ready=True, register=True)
    except ValueError as error:
        logger.error("%s", error)
        return 2

    process.stop_on_signals(lambda name: buffer.stop())
    signal.signal(signal.SIGHUP, lambda signum, frame: buffer.request_reload())  # never the default: it would end us
    try:
        buffer.run()
    except (zmq.ZMQError, OSError) as error:  # e.g. a port in use
        logger.error("buffer failed: %s", error)
        return 1
    except Exception:  # a bug: say where, exit non-zero so that systemd restarts us
        logger.exception("buffer failed")
        return 1
    return 0


