"""The installed service commands: the process-wide knobs first, then the service, or one line on what to install.

``pip install sf_bsread_writer`` brings only what the public clients need
(``sf_bsread_writer.client``, ``sf_bsread_writer.remote``: requests,
aiohttp, numpy); the service commands need the ``services`` extra (ZeroMQ,
HDF5, bitshuffle, EPICS, ...: docs/dependencies.md). A console script
imports its target module before it calls anything, and a service module
imports its libraries at its top, so without the extra the user would see a
traceback ending in ``No module named 'zmq'``. Each command here therefore

1. sets the services' process-wide knobs (:func:`process.service_start`:
   OMP_NUM_THREADS before any library that reads it is loaded),
2. imports its service by name, and if a library of the services' extra is
   missing, says in one line what to install and returns
   ``ExitCode.CONFIGURATION`` (2: a retry will not help),
3. runs the service's ``main()``.

The services are named by string, as console scripts name them: this module
imports none of them (tests/test_architecture.py sees no arrow from here).
``python -m sf_bsread_writer.buffer`` (``.writer``, ``.web``) goes through
the same functions.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable

from sf_bsread_writer import process
from sf_bsread_writer.process import ExitCode

__all__ = ["COMMANDS", "SERVICES_EXTRA", "SERVICE_LIBRARIES", "run", "missing_library",
           "buffer", "writer", "simulate", "gateway", "ca_bridge", "web", "ctl"]

#: Each service command and the module whose ``main()`` it runs.
COMMANDS: dict[str, str] = {
    "sf_bsread_buffer": "sf_bsread_writer.buffer.cli",
    "sf_bsread_writer": "sf_bsread_writer.writer.cli",
    "sf_bsread_simulate": "sf_bsread_writer.tools.simulate",
    "sf_bsread_gateway": "sf_bsread_writer.ca.gateway",
    "sf_bsread_ca_bridge": "sf_bsread_writer.ca.bridge",
    "sf_bsread_web": "sf_bsread_writer.web.service",
    # The operator's tool of a data-acquisition host: it reads the host's registry, peeks at streams (replay
    # protocol, bsread decoding) and starts writers, so it belongs with the services.
    "sf_bsread_ctl": "sf_bsread_writer.tools.ctl",
}

SERVICES_EXTRA = "pip install 'sf_bsread_writer[services]'"

#: The top-level modules the services' extra provides (setup.py ``SERVICES``; tests/test_packaging.py holds the
#: two together). Only their absence is reported as a missing extra: any other missing module is a bug, and its
#: traceback is the right report.
SERVICE_LIBRARIES = frozenset({
    "zmq", "bsread", "mflow", "h5py", "hdf5plugin", "bitshuffle", "lz4", "bottle", "caproto", "softioc",
    "epicscorelibs", "epicsdbbuilder", "setuptools_dso", "epics", "rich", "nats",
})


def missing_library(error: ImportError) -> str | None:
    """The services' library whose absence ``error`` reports, or None if it is about anything else."""
    name = getattr(error, "name", None) or ""
    top = name.partition(".")[0]
    return top if top in SERVICE_LIBRARIES else None


#: Libraries a command needs beyond what its module imports at its top (the gateway's command imports only the
#: light supervisor; its IOC process loads EPICS): looked up, not imported, before the command starts.
NEEDS: dict[str, tuple[str, ...]] = {command: ("zmq",) for command in COMMANDS}
NEEDS["sf_bsread_gateway"] = ("zmq", "softioc", "epicscorelibs")
NEEDS["sf_bsread_ca_bridge"] = ("zmq", "epics")  # pyepics, imported when the bridge connects


def run(command: str, argv: list[str] | None = None) -> int:
    """Start ``command`` (a key of :data:`COMMANDS`): knobs, import, ``main(argv)``; its exit code."""
    process.service_start()
    absent = [library for library in NEEDS[command] if importlib.util.find_spec(library) is None]
    if absent:
        print(f"{command}: the services' dependencies are not installed (no module {absent[0]!r}): "
              f"{SERVICES_EXTRA}", file=sys.stderr)
        return ExitCode.CONFIGURATION
    try:
        main: Callable[..., int] = importlib.import_module(COMMANDS[command]).main
    except ImportError as error:
        library = missing_library(error)
        if library is None:
            raise
        print(f"{command}: the services' dependencies are not installed (no module {library!r}): "
              f"{SERVICES_EXTRA}", file=sys.stderr)
        return ExitCode.CONFIGURATION
    return main(argv)


def buffer() -> int:
    """``sf_bsread_buffer``."""
    return run("sf_bsread_buffer")


def writer() -> int:
    """``sf_bsread_writer``: gone as soon as ``main`` returns (the file closed), as the original's clients expect."""
    process.exit_now(run("sf_bsread_writer"))


def simulate() -> int:
    """``sf_bsread_simulate``."""
    return run("sf_bsread_simulate")


def gateway() -> int:
    """``sf_bsread_gateway``."""
    return run("sf_bsread_gateway")


def ca_bridge() -> int:
    """``sf_bsread_ca_bridge``."""
    return run("sf_bsread_ca_bridge")


def web() -> int:
    """``sf_bsread_web``."""
    return run("sf_bsread_web")


def ctl() -> int:
    """``sf_bsread_ctl``."""
    return run("sf_bsread_ctl")
