"""HDF5 tools outside Python on the writer's files: the filter plugins that ``hdf5plugin`` ships.

Bitshuffle images are stored as the compressed chunks the source sent
(filter 32008). HDF5 programs (h5dump, h5ls, MATLAB, C readers) find that
filter only through ``HDF5_PLUGIN_PATH``; without it Debian's h5dump prints
an empty ``DATA {}`` (and only a short line on stderr). The one-liner
``$(python -c 'import hdf5plugin; ...')`` run by a python without
hdf5plugin sets the variable empty and goes on, so the commands here fail
loudly instead, with nothing on stdout (``sf_bsread_ctl plugin-path`` and
``sf_bsread_ctl h5dump``, docs/file-format.md).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

__all__ = ["PluginPathError", "plugin_path", "h5dump_environment", "run_h5dump", "BITSHUFFLE_PLUGIN"]

#: The library that holds the bitshuffle filter (id 32008) in hdf5plugin's plugin directory.
BITSHUFFLE_PLUGIN = "libh5bshuf.so"


class PluginPathError(RuntimeError):
    """The filter plugins cannot be found or run: the message says what to install."""


def plugin_path() -> str:
    """The directory to put into ``HDF5_PLUGIN_PATH``: hdf5plugin's, checked to hold the bitshuffle filter."""
    try:
        import hdf5plugin
    except ImportError as error:
        raise PluginPathError(f"hdf5plugin cannot be imported ({error}): run this command from the "
                              "environment sf_bsread_writer is installed in, or pip install hdf5plugin") from None
    directory = getattr(hdf5plugin, "PLUGIN_PATH", None) or getattr(hdf5plugin, "PLUGINS_PATH", None)
    if not directory or not os.path.isfile(os.path.join(directory, BITSHUFFLE_PLUGIN)):
        raise PluginPathError(f"hdf5plugin ({getattr(hdf5plugin, '__file__', '?')}) has no {BITSHUFFLE_PLUGIN} "
                              f"in {directory!r}: reinstall it (pip install --force-reinstall hdf5plugin)")
    return str(directory)


def h5dump_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with hdf5plugin's directory first in ``HDF5_PLUGIN_PATH`` (directories already there stay)."""
    directory = plugin_path()
    present = environ.get("HDF5_PLUGIN_PATH", "")
    return {**environ, "HDF5_PLUGIN_PATH": directory + (os.pathsep + present if present else "")}


def run_h5dump(arguments: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """h5dump with the plugins; returns h5dump's exit code (its output goes where ours goes)."""
    environment = h5dump_environment(os.environ if environ is None else environ)
    program = shutil.which("h5dump", path=environment.get("PATH"))
    if program is None:
        raise PluginPathError("h5dump is not installed (Debian: apt-get install hdf5-tools)")
    return subprocess.run([program, *arguments], env=environment).returncode
