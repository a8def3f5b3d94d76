"""The two HDF5 calls of a block write, without h5py's per-call cost: ``H5Dset_extent`` and ``H5Dwrite``.

Why: a block write makes eight of these calls per channel (four datasets,
each grown and written), and through h5py's low-level API each costs about
15 us of binding (the object lock, argument conversion, the error
handler) on top of HDF5's own few microseconds: at 12 000 channels that
was most of the writer's time (docs/performance.md, issue 24: set_extent +
write 31.6 us per dataset through h5py, 12.1 us through ctypes). Here the
same two functions of the *same* HDF5 library h5py loaded are called
through ctypes with the dataset's, type's and dataspaces' ids that h5py
already holds: nothing else changes, the file is byte for byte the same
kind.

Optional, with the plain h5py calls behind the same API
(:class:`DatasetCalls`): ``ctypes`` where the library h5py loaded is found
in this process (``/proc/self/maps``) and reports h5py's HDF5 version,
``h5py`` otherwise or with ``SF_BSREAD_NO_EXTENSION=1`` (the variable that
also turns off the compiled transport). A call that fails through ctypes
is made again through h5py, so an error is raised exactly as h5py raises
it (a full disk stays an ``OSError`` with ENOSPC: ``h5.file.is_disk_full``).
Calls hold the GIL (``ctypes.PyDLL``) and h5py's own lock, as h5py's do:
HDF5 is never entered from two threads at once.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import h5py
import numpy as np
from h5py._objects import phil

__all__ = ["DatasetCalls", "CALLS", "AVAILABLE", "IMPLEMENTATION", "FALLBACK_REASON", "NO_EXTENSION_VARIABLE"]

logger = logging.getLogger(__name__)

NO_EXTENSION_VARIABLE = "SF_BSREAD_NO_EXTENSION"
_H5P_DEFAULT = 0


def _loaded_hdf5() -> tuple[Any, str | None]:
    """(the HDF5 library h5py uses, through ctypes) or (None, why not)."""
    if os.environ.get(NO_EXTENSION_VARIABLE, "") not in ("", "0"):
        return None, f"{NO_EXTENSION_VARIABLE}={os.environ[NO_EXTENSION_VARIABLE]}"
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    except OSError as error:
        return None, f"cannot list the loaded libraries: {error}"
    candidates = sorted(path for path in paths
                        if os.path.basename(path).startswith("libhdf5") and ".so" in os.path.basename(path)
                        and not os.path.basename(path).startswith("libhdf5_hl"))
    if len(candidates) != 1:
        return None, f"not exactly one HDF5 library loaded by h5py: {candidates}"
    try:
        library = ctypes.PyDLL(candidates[0])  # PyDLL: the GIL stays held, as in h5py's calls
        major, minor, release = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
        library.H5get_libversion(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(release))
        version = (major.value, minor.value, release.value)
        if version != tuple(h5py.version.hdf5_version_tuple[:3]):
            return None, f"{candidates[0]} is HDF5 {version}, h5py uses {h5py.version.hdf5_version}"
        library.H5Dset_extent.argtypes = [ctypes.c_int64, ctypes.c_void_p]
        library.H5Dset_extent.restype = ctypes.c_int
        library.H5Dwrite.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p]
        library.H5Dwrite.restype = ctypes.c_int
    except (OSError, AttributeError) as error:
        return None, f"{candidates[0]}: {error}"
    return library, None


_LIBRARY, FALLBACK_REASON = _loaded_hdf5()
AVAILABLE: tuple[str, ...] = ("ctypes", "h5py") if _LIBRARY is not None else ("h5py",)
IMPLEMENTATION = AVAILABLE[0]
if FALLBACK_REASON:
    logger.debug("HDF5 block calls through h5py: %s", FALLBACK_REASON)


class DatasetCalls:
    """``set_extent`` and ``write`` of a low-level h5py ``DatasetID``, through ctypes or h5py (module docstring)."""

    def __init__(self, implementation: str | None = None) -> None:
        implementation = implementation or IMPLEMENTATION
        if implementation not in AVAILABLE:
            raise ValueError(f"HDF5 calls through {implementation!r} are not available here: {FALLBACK_REASON}")
        self.implementation = implementation
        self._fast = implementation == "ctypes"
        self._memory_types: dict[str, Any] = {}  # dtype.str -> h5py TypeID, kept alive for its id
        self._dims: dict[tuple[int, ...], Any] = {}  # shape -> its hsize_t array (a block has a few shapes)

    def set_extent(self, dataset: h5py.h5d.DatasetID, shape: tuple[int, ...]) -> None:
        """Grow or shrink the dataset to ``shape`` (as ``DatasetID.set_extent``)."""
        if self._fast:
            dims = self._dims.get(shape)
            if dims is None:
                if len(self._dims) >= 256:
                    self._dims.clear()
                dims = self._dims[shape] = (ctypes.c_uint64 * len(shape))(*shape)
            with phil:
                if _LIBRARY.H5Dset_extent(dataset.id, dims) >= 0:
                    return
        dataset.set_extent(shape)  # the h5py path, or the same call again to raise h5py's error

    def write(self, dataset: h5py.h5d.DatasetID, memory_space: h5py.h5s.SpaceID, file_space: h5py.h5s.SpaceID,
              array: np.ndarray) -> None:
        """Write a C-contiguous ``array`` (as ``DatasetID.write(memory_space, file_space, array)``)."""
        if self._fast and array.flags.c_contiguous and array.nbytes:
            memory_type = self._memory_types.get(array.dtype.str)
            if memory_type is None:
                memory_type = self._memory_types[array.dtype.str] = h5py.h5t.py_create(array.dtype)
            # The address: through a ctypes view where the array is writable (3x cheaper than .ctypes)
            pointer = (ctypes.addressof(ctypes.c_char.from_buffer(array)) if array.flags.writeable
                       else array.ctypes.data)
            with phil:
                if _LIBRARY.H5Dwrite(dataset.id, memory_type.id, memory_space.id, file_space.id, _H5P_DEFAULT,
                                     pointer) >= 0:
                    return
        dataset.write(memory_space, file_space, array)


#: The calls the columns make.
CALLS = DatasetCalls()
