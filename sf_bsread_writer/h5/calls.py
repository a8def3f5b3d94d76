"""The HDF5 calls made per channel, without h5py's per-call cost: a block write's ``H5Dset_extent`` and
``H5Dwrite``, and a channel group's copy from its template (``H5Ocopy``, the ``name`` attribute, four
``H5Dopen2``).

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

Channel groups (issue 24): a group copied from its template cost ~500 us,
of which HDF5 itself ~260 (``H5Ocopy`` ~75, four ``H5Dopen2`` ~40 each,
the ``name`` attribute ~15): the rest was h5py's objects (an h5py id object
costs ~25 us to make, an ``h5py.Dataset`` more). Through ctypes the group
is opened for its ``name`` and its datasets and closed again, and the
datasets are kept as bare ``hid_t`` integers: :data:`Dataset` is either kind, every
call here takes both, and :meth:`DatasetCalls.h5py_id` wraps a bare one
for h5py when something needs h5py's API (strings, direct chunks, an
error). A bare id is closed with the file: ``h5py.File.close`` closes
every object still open in it.
"""
from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
from h5py._objects import phil

__all__ = ["Dataset", "DatasetCalls", "CALLS", "AVAILABLE", "IMPLEMENTATION", "FALLBACK_REASON",
           "NO_EXTENSION_VARIABLE"]

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
        hid, text = ctypes.c_int64, ctypes.c_char_p
        for name, argtypes, restype in (
                ("H5Ocopy", [hid, text, hid, text, hid, hid], ctypes.c_int),
                ("H5Dopen2", [hid, text, hid], hid),
                ("H5Dclose", [hid], ctypes.c_int),
                ("H5Gopen2", [hid, text, hid], hid),
                ("H5Gclose", [hid], ctypes.c_int),
                ("H5Aopen", [hid, text, hid], hid),
                ("H5Awrite", [hid, hid, ctypes.c_void_p], ctypes.c_int),
                ("H5Aclose", [hid], ctypes.c_int),
                ("H5Lexists", [hid, text, hid], ctypes.c_int),
                ("H5Iinc_ref", [hid], ctypes.c_int)):
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, restype
    except (OSError, AttributeError) as error:
        return None, f"{candidates[0]}: {error}"
    return library, None


_LIBRARY, FALLBACK_REASON = _loaded_hdf5()
AVAILABLE: tuple[str, ...] = ("ctypes", "h5py") if _LIBRARY is not None else ("h5py",)
IMPLEMENTATION = AVAILABLE[0]
if FALLBACK_REASON:
    logger.debug("HDF5 block calls through h5py: %s", FALLBACK_REASON)


#: An open dataset: h5py's ``DatasetID``, or (opened through ctypes) the bare ``hid_t`` as an int.
Dataset = Any

# Property lists of H5Ocopy: the default object copy, and links named in ASCII or UTF-8 as h5py names them.
_OBJECT_COPY = h5py.h5p.create(h5py.h5p.OBJECT_COPY)
_LINK_CREATE_ASCII = h5py.h5p.create(h5py.h5p.LINK_CREATE)
_LINK_CREATE_UTF8 = h5py.h5p.create(h5py.h5p.LINK_CREATE)
_LINK_CREATE_UTF8.set_char_encoding(h5py.h5t.CSET_UTF8)
# A str attribute as h5py writes it: vlen UTF-8, from a char* in memory.
_TEXT_TYPE = h5py.h5t.py_create(h5py.string_dtype(), logical=True)


class DatasetCalls:
    """The per-channel HDF5 calls (module docstring), through ctypes or h5py: the same file either way."""

    def __init__(self, implementation: str | None = None) -> None:
        implementation = implementation or IMPLEMENTATION
        if implementation not in AVAILABLE:
            raise ValueError(f"HDF5 calls through {implementation!r} are not available here: {FALLBACK_REASON}")
        self.implementation = implementation
        self._fast = implementation == "ctypes"
        self._memory_types: dict[str, Any] = {}  # dtype.str -> h5py TypeID, kept alive for its id
        self._dims: dict[tuple[int, ...], Any] = {}  # shape -> its hsize_t array (a block has a few shapes)

    def set_extent(self, dataset: Dataset, shape: tuple[int, ...]) -> None:
        """Grow or shrink the dataset to ``shape`` (as ``DatasetID.set_extent``)."""
        if self._fast:
            dims = self._dims.get(shape)
            if dims is None:
                if len(self._dims) >= 256:
                    self._dims.clear()
                dims = self._dims[shape] = (ctypes.c_uint64 * len(shape))(*shape)
            with phil:
                if _LIBRARY.H5Dset_extent(dataset if type(dataset) is int else dataset.id, dims) >= 0:
                    return
        self.h5py_id(dataset).set_extent(shape)  # the h5py path, or the same call again to raise h5py's error

    def write(self, dataset: Dataset, memory_space: h5py.h5s.SpaceID, file_space: h5py.h5s.SpaceID,
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
                if _LIBRARY.H5Dwrite(dataset if type(dataset) is int else dataset.id, memory_type.id,
                                     memory_space.id, file_space.id, _H5P_DEFAULT, pointer) >= 0:
                    return
        self.h5py_id(dataset).write(memory_space, file_space, array)

    # -- channel groups (ColumnMaker) ----------------------------------------
    def copy_group(self, source: h5py.h5f.FileID, source_name: bytes, parent: h5py.h5g.GroupID,
                   name: bytes) -> None:
        """``H5Ocopy`` of ``source``'s group ``source_name`` to ``parent/name`` (a new link, named in UTF-8
        unless ASCII, as h5py names links); everything in it is copied, datasets and attributes."""
        link_create = _LINK_CREATE_ASCII if name.isascii() else _LINK_CREATE_UTF8
        if self._fast:
            with phil:
                if _LIBRARY.H5Ocopy(source.id, source_name, parent.id, name, _OBJECT_COPY.id,
                                    link_create.id) >= 0:
                    return
        h5py.h5o.copy(source, source_name, parent, name, _OBJECT_COPY, link_create)

    def open_copy(self, parent: h5py.h5g.GroupID, group_name: bytes, name_attribute: str,
                  datasets: Sequence[bytes]) -> list[Dataset]:
        """A group just copied: its vlen string attribute ``name`` set to ``name_attribute``, and its
        ``datasets`` opened (bare ids through ctypes: the module docstring). The group is closed again."""
        encoded = name_attribute.encode("utf-8")
        if self._fast and b"\0" not in encoded:
            opened = self._open_copy(parent.id, group_name, encoded, datasets)
            if opened is not None:
                return opened
        # h5py's way (or its error): the attribute through the open group (HDF5 cannot write an
        # attribute opened by path while its object is closed: "can't locate open attribute")
        group = h5py.h5g.open(parent, group_name)
        h5py.h5a.open(group, b"name").write(np.array(name_attribute, dtype=h5py.string_dtype()))
        return [h5py.h5d.open(group, name) for name in datasets]

    @staticmethod
    def _open_copy(parent: int, group_name: bytes, encoded: bytes, datasets: Sequence[bytes]) -> list[int] | None:
        """:meth:`open_copy` through ctypes; None (nothing left open) if a call failed."""
        pointer = ctypes.c_char_p(encoded)
        opened: list[int] = []
        with phil:
            group = _LIBRARY.H5Gopen2(parent, group_name, _H5P_DEFAULT)
            if group < 0:
                return None
            try:
                attribute = _LIBRARY.H5Aopen(group, b"name", _H5P_DEFAULT)
                if attribute < 0:
                    return None
                written = _LIBRARY.H5Awrite(attribute, _TEXT_TYPE.id, ctypes.byref(pointer))
                if _LIBRARY.H5Aclose(attribute) < 0 or written < 0:
                    return None
                for name in datasets:
                    dataset = _LIBRARY.H5Dopen2(group, name, _H5P_DEFAULT)
                    if dataset < 0:
                        for done in opened:
                            _LIBRARY.H5Dclose(done)
                        return None
                    opened.append(dataset)
                return opened
            finally:
                _LIBRARY.H5Gclose(group)

    def exists(self, parent: h5py.h5g.GroupID, name: bytes) -> bool:
        """Whether ``parent`` has a link ``name`` (one name, no path: as ``name in group`` for it)."""
        if self._fast:
            with phil:
                found = _LIBRARY.H5Lexists(parent.id, name, _H5P_DEFAULT)
            if found >= 0:
                return bool(found)
        return name in parent

    def h5py_id(self, dataset: Dataset) -> h5py.h5d.DatasetID:
        """h5py's ``DatasetID`` of ``dataset``; a bare id is wrapped with a reference of its own (the
        wrapper closes what it holds when it goes, the bare id stays open)."""
        if type(dataset) is not int:
            return dataset
        with phil:
            _LIBRARY.H5Iinc_ref(dataset)
        return h5py.h5d.DatasetID(dataset)


#: The calls the columns make.
CALLS = DatasetCalls()
