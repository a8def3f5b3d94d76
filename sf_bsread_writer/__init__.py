"""sf_bsread_writer: buffer, writer, Channel Access gateway and web service for bsread streams.

Importing the package (or its clients, ``sf_bsread_writer.client`` and
``sf_bsread_writer.remote``) changes nothing in the importing process: no
environment variable, no thread setting. The services' process-wide knobs
(``OMP_NUM_THREADS=1`` for bitshuffle's OpenMP) are set by the service
commands themselves, first thing (:func:`sf_bsread_writer.process.service_start`).
"""
from sf_bsread_writer.version import __version__

__all__ = ["__version__", "write_range"]


def write_range(buffer, start_pulse_id, stop_pulse_id, path, parameters=None, **options):
    """One acquisition in one call: ``write_range("BSBUFFER", 1000, 1999, "run.h5") -> Outcome``.

    ``buffer``: a buffer's name on this host (``sf_bsread_ctl ls``) or its HTTP URL. See
    :func:`sf_bsread_writer.tools.ctl.write_range` (imported on first use: the package import stays light).
    It runs a writer on this host, so it needs the services' dependencies
    (``pip install 'sf_bsread_writer[services]'``); without them it raises ImportError saying so.
    """
    try:
        from sf_bsread_writer.tools.ctl import write_range as write
    except ModuleNotFoundError as error:
        if (error.name or "").startswith("sf_bsread_writer"):
            raise  # a module of the package itself: a broken install, not a missing extra
        raise ImportError(f"write_range runs a writer on this host and needs the services' dependencies "
                          f"({error}): pip install 'sf_bsread_writer[services]'") from error

    return write(buffer, start_pulse_id, stop_pulse_id, path, parameters, **options)
