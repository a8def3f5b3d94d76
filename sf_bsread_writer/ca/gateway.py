"""EPICS Channel Access gateway over a buffer: CLI ``sf_bsread_gateway`` and the buffer's ``--ca``.

Every channel of the buffer's live stream is served as the PV ``PREFIX +
channel`` and the buffer's status as ``NAME:PULSE_ID`` and friends (see
docs/gateway.md). The gateway always runs as its own process: the buffer's
ingest must never wait for a CA client. The buffer starts it with its
``--ca`` as a supervised child (``buffer.children``) fed by a rate-limited
loopback feed.

One server: EPICS records in a pythonSoftIOC process (``ca/ioc.py``), whose
decisions are all in ``ca/policy.py``, fed by ``ca/feed.py`` (the stream and
the buffer's status), run and replaced by ``ca/supervisor.py``. This module
is the command line; it imports only what the supervisor needs, so that the
first IOC starts at once.

Channel Access stays on this machine unless the EPICS environment says
otherwise: see ``ca.environment``.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from sf_bsread_writer import process
from sf_bsread_writer.ca.environment import prepare_server_environment
from sf_bsread_writer.config import GATEWAY_ENV_PREFIX, GATEWAY_OPTIONS, parse_args
from sf_bsread_writer.process import ExitCode

__all__ = ["main", "GatewaySettings"]

# The import path even when run as ``python -m`` (where __name__ is "__main__").
logger = logging.getLogger(__spec__.name if __spec__ is not None else __name__)

# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------
@dataclass
class GatewaySettings:
    buffer_output: str
    status_url: str | None = None
    source_mode: str = "sub"
    prefix: str = ""
    name: str = "BSBUFFER"
    max_rate: float = 10.0
    total_rate: float = 20000.0
    writable: bool = False
    allow_hosts: tuple[str, ...] = ()
    acf: str | None = None  # the site's EPICS access-security file
    parent_pid: int = 0
    # "batch": ai/longin records set in one C call per message (ca/_recordpost.c); "set": pythonSoftIOC's set each.
    record_updates: str = "batch"


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``sf_bsread_gateway BUFFER_OUTPUT [--status-url URL] ...``; returns the exit code."""
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    args = parse_args("sf_bsread_gateway", "Serve a bsread buffer's live stream and status as EPICS PVs.",
                      GATEWAY_OPTIONS, GATEWAY_ENV_PREFIX, argv)
    process.configure_logging(args.log_level)
    # The supervisor and its IOC process alike: a terminal's hangup reaches the whole process group.
    process.survive_hangup("the terminal is gone: the gateway goes on serving (SIGTERM stops it)")
    changes = prepare_server_environment(os.environ)
    if changes and not args.ioc_child:
        logger.info("EPICS environment completed: %s", ", ".join(changes))
    settings = GatewaySettings(
        buffer_output=args.buffer_output,
        status_url=args.status_url,
        source_mode=args.source_mode,
        prefix=args.ca_prefix,
        name=args.name,
        max_rate=args.max_rate,
        total_rate=args.total_rate,
        writable=args.writable,
        allow_hosts=tuple(args.allow_hosts or ()),
        acf=os.path.abspath(args.acf) if args.acf else None,
        parent_pid=getattr(args, "parent_pid", 0) or 0,
        # --record-batch (the opt-in before batches were the default) still parses and means batch.
        record_updates="batch" if getattr(args, "record_batch", False) else args.record_updates,
    )
    if settings.allow_hosts and not settings.writable:
        logger.warning("--allow-host has no effect without --writable")
    if settings.acf is not None:
        if settings.writable or settings.allow_hosts:
            logger.error("--acf replaces --writable/--allow-host: give the rules in the file")
            return ExitCode.CONFIGURATION
        if not os.access(settings.acf, os.R_OK):
            logger.error("--acf %s: not a readable file", settings.acf)
            return ExitCode.CONFIGURATION
    return _run_ioc(settings, args.ioc_child, sys.argv[1:] if argv is None else list(argv))


def _run_ioc(settings: GatewaySettings, child: bool, argv: list[str]) -> int:
    """This process supervises the IOC process, which serves (ca/ioc.py)."""
    if not child:
        from sf_bsread_writer.ca import supervisor

        if settings.acf is not None:
            try:
                supervisor.check_access_security_file(settings.acf)
            except supervisor.AccessSecurityError as error:
                logger.error("%s", error)
                return ExitCode.CONFIGURATION
        return supervisor.supervise(argv)
    # The feed first: its first message arrives while EPICS loads (start-up).
    from sf_bsread_writer.ca import feed

    ingest = feed.Ingest(settings.buffer_output, settings.source_mode, lambda: None)
    # The buffer's status: on the feed (a buffer's --ca feed carries it), or polled from --status-url for a
    # gateway started by hand on a plain live output.
    poller = feed.StatusPoller(settings.status_url) if settings.status_url else None
    ingest.start()
    if poller is not None:
        poller.start()
    try:
        from sf_bsread_writer.ca import ioc
        from sf_bsread_writer.ca.policy import STATUS_PVS

        state = ioc.wait_for_go()
        if state is None:
            return ExitCode.OK
        return ioc.serve(settings, STATUS_PVS, ingest, poller or ingest, state)
    finally:
        ingest.stop()
        if poller is not None:
            poller.stop()
        ingest.join(timeout=2)


if __name__ == "__main__":
    sys.exit(main())
