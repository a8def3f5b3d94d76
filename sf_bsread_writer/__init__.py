"""sf_bsread_writer: buffer, writer, Channel Access gateway and web service for bsread streams.

The bitshuffle wheel links OpenMP; with the default thread count on a small
machine its (de)compression runs 10-30x slower (see docs/dependencies.md).
OpenMP reads OMP_NUM_THREADS when the library loads, so it is set here, before
any submodule can import bitshuffle. An explicit setting by the user wins.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

__version__ = "2.0.0"


def write_range(buffer, start_pulse_id, stop_pulse_id, path, parameters=None, **options):
    """One acquisition in one call: ``write_range("BSBUFFER", 1000, 1999, "run.h5") -> Outcome``.

    ``buffer``: a buffer's name on this host (``sf_bsread_ctl ls``) or its HTTP URL. See
    :func:`sf_bsread_writer.tools.ctl.write_range` (imported on first use: the package import stays light).
    """
    from sf_bsread_writer.tools.ctl import write_range as write

    return write(buffer, start_pulse_id, stop_pulse_id, path, parameters, **options)
