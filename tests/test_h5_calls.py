"""h5.calls: the block write's HDF5 calls through ctypes and through h5py give the same file and the same errors."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from sf_bsread_writer.h5 import calls
from sf_bsread_writer.h5.calls import DatasetCalls


@pytest.fixture(params=calls.AVAILABLE)
def implementation(request):
    return request.param


def test_ctypes_is_available_unless_turned_off():
    # The wheels this project is built on bundle libhdf5: the fast path must not silently fall back.
    if os.environ.get(calls.NO_EXTENSION_VARIABLE, "") not in ("", "0"):
        assert calls.AVAILABLE == ("h5py",) and calls.NO_EXTENSION_VARIABLE in calls.FALLBACK_REASON
    else:
        assert "ctypes" in calls.AVAILABLE, calls.FALLBACK_REASON


def _spaces(extent: int, start: int, shape: tuple[int, ...]):
    file_space = h5py.h5s.create_simple((extent, *shape[1:]), (h5py.h5s.UNLIMITED, *shape[1:]))
    file_space.select_hyperslab((start,) + (0,) * (len(shape) - 1), shape)
    return h5py.h5s.create_simple(shape), file_space


@pytest.mark.parametrize("dtype, row_shape", [("<f8", ()), (">i4", ()), ("u1", ()), ("bool", ()), ("<u2", (3, 4))])
def test_set_extent_and_write_rows_of_every_kind(tmp_path, implementation, dtype, row_shape):
    made = DatasetCalls(implementation)
    assert made.implementation == implementation
    rows = np.arange(10 * int(np.prod(row_shape)), dtype="i8").reshape((10, *row_shape)).astype(dtype)
    with h5py.File(tmp_path / "f.h5", "w") as file:
        dataset = file.create_dataset("d", shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                                      chunks=(4, *row_shape))
        for start in (0, 5):
            made.set_extent(dataset.id, (start + 5, *row_shape))
            made.write(dataset.id, *_spaces(start + 5, start, (5, *row_shape)), np.ascontiguousarray(rows[start:start + 5]))
        made.set_extent(dataset.id, (12, *row_shape))  # grown past the rows written: fill value
    with h5py.File(tmp_path / "f.h5", "r") as file:
        stored = file["d"][()]
    assert stored.dtype == np.dtype(dtype) and stored.shape == (12, *row_shape)
    assert np.array_equal(stored[:10], rows) and not stored[10:].any()


def _errors(path, made: DatasetCalls) -> list[tuple[type, str]]:
    """What each of two bad calls raises: past maxshape, 5 values into a selection of 4."""
    errors = []
    with h5py.File(path, "w") as file:
        dataset = file.create_dataset("d", shape=(4,), maxshape=(8,), dtype="<f8", chunks=(4,))
        for call in (lambda: made.set_extent(dataset.id, (9,)),
                     lambda: made.write(dataset.id, h5py.h5s.create_simple((5,)), _spaces(4, 0, (4,))[1],
                                        np.zeros(5))):
            with pytest.raises(Exception) as raised:
                call()
            errors.append((type(raised.value), str(raised.value)))
        assert dataset.shape == (4,)
    return errors


def test_a_failing_call_raises_as_h5py_does(tmp_path, implementation, capfd):
    errors = _errors(tmp_path / "a.h5", DatasetCalls(implementation))
    assert errors == _errors(tmp_path / "b.h5", DatasetCalls("h5py"))
    assert "HDF5-DIAG" not in capfd.readouterr().err  # no error stack printed on the way


def test_a_read_only_array_is_written_too(tmp_path, implementation):
    rows = np.arange(4.0)
    rows.flags.writeable = False
    made = DatasetCalls(implementation)
    with h5py.File(tmp_path / "f.h5", "w") as file:
        dataset = file.create_dataset("d", shape=(4,), maxshape=(None,), dtype="<f8", chunks=(4,))
        made.write(dataset.id, *_spaces(4, 0, (4,)), rows)
        assert file["d"][()].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="not available"):
        DatasetCalls("cffi")


def _template(file: h5py.File) -> None:
    group = file.create_group("t")
    group.attrs["name"] = "template"
    group.attrs["modulo"] = np.int64(1)
    for name, dtype in (("data", "<f8"), ("pulse_id", "<i8"), ("is_data_present", "u1"), ("timestamp", "<i8")):
        group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(16,),
                             fillvalue=np.zeros((), dtype))


@pytest.mark.parametrize("name", ["CH:A-1", "ÄRR µJ"])
def test_a_group_copied_and_opened_is_the_template_with_its_name(tmp_path, implementation, name):
    made = DatasetCalls(implementation)
    link = name.encode("utf-8")
    with h5py.File(tmp_path / "f.h5", "w") as file:
        _template(file)
        data = file.create_group("data")
        assert not made.exists(data.id, link)
        made.copy_group(file.id, b"t", data.id, link)
        assert made.exists(data.id, link)
        datasets = made.open_copy(data.id, link, name, (b"data", b"pulse_id", b"is_data_present", b"timestamp"))
        assert all((type(d) is int) == (implementation == "ctypes") for d in datasets)
        for dataset in datasets:
            made.set_extent(dataset, (3,))
        made.write(datasets[0], *_spaces(3, 0, (3,)), np.array([1.5, 2.5, 3.5]))
        wrapped = made.h5py_id(datasets[0])
        assert wrapped.shape == (3,)
        del wrapped  # the wrapper's reference goes, the column's stays open
        made.set_extent(datasets[0], (4,))
    with h5py.File(tmp_path / "f.h5", "r") as file:
        group = file["data"][name]
        assert group.attrs["name"] == name and group.attrs["modulo"] == 1
        assert file["t"].attrs["name"] == "template"
        assert group["data"][()].tolist() == [1.5, 2.5, 3.5, 0.0]
        assert [group[n].shape for n in ("pulse_id", "is_data_present", "timestamp")] == [(3,)] * 3
        expected_cset = h5py.h5t.CSET_ASCII if name.isascii() else h5py.h5t.CSET_UTF8
        assert file["data"].id.links.get_info(name.encode("utf-8")).cset == expected_cset


def _group_errors(path, made: DatasetCalls) -> list[tuple[type, str]]:
    """What each of two bad group calls raises: a copy onto a taken name, opening a dataset that is not there."""
    errors = []
    with h5py.File(path, "w") as file:
        _template(file)
        data = file.create_group("data")
        made.copy_group(file.id, b"t", data.id, b"A")
        for call in (lambda: made.copy_group(file.id, b"t", data.id, b"A"),
                     lambda: made.open_copy(data.id, b"A", "A", (b"data", b"nothing"))):
            with pytest.raises(Exception) as raised:
                call()
            errors.append((type(raised.value), str(raised.value)))
    return errors


def test_a_failing_group_call_raises_as_h5py_does(tmp_path, implementation, capfd):
    errors = _group_errors(tmp_path / "a.h5", DatasetCalls(implementation))
    assert errors == _group_errors(tmp_path / "b.h5", DatasetCalls("h5py"))
    assert "HDF5-DIAG" not in capfd.readouterr().err
