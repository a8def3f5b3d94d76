"""Reading the writer's bitshuffle images without Python: Debian's h5dump (hdf5-tools) on a real file.

h5dump without the filter plugin prints an empty ``DATA {}``; the product ships
``sf_bsread_ctl plugin-path`` (prints the HDF5_PLUGIN_PATH that finds hdf5plugin's filters, or fails
saying why) and ``sf_bsread_ctl h5dump`` (h5dump with it set). docs/file-format.md quotes the error a
plain h5py gives: checked here against the h5py that runs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sf_bsread_writer.h5.file import H5File

from .helpers import ROOT
from .test_h5format import _image, channel, message

H5DUMP = shutil.which("h5dump")
needs_h5dump = pytest.mark.skipif(H5DUMP is None, reason="h5dump needs Debian's hdf5-tools (.ci/run installs it)")
CTL = [sys.executable, "-m", "sf_bsread_writer.tools.ctl"]
DATASET = "/data/CAM/data"


def _environment(**changes: str | None) -> dict[str, str]:
    """This process's environment without HDF5_PLUGIN_PATH (h5dump's own default directory has no bitshuffle)."""
    env = {key: value for key, value in os.environ.items() if key != "HDF5_PLUGIN_PATH"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A writer's file: three bitshuffle_lz4 uint16 images stored as the chunks received."""
    path = tmp_path_factory.mktemp("h5dump") / "images.h5"
    spec = channel("CAM", "uint16", (80, 96), "little", "bitshuffle_lz4")  # >= 4 KiB: kept compressed
    images = [_image(pulse_id) for pulse_id in range(3)]
    with H5File(path) as h5:
        for pulse_id, image in enumerate(images):
            h5.append(message(pulse_id, [spec], [image]))
    return path, images


def _dumped_values(text: str) -> list[int]:
    """The numbers of h5dump's DATA block (each line starts with an index ``(r,i,j):``)."""
    data = text.split("DATA {", 1)[1].split("}", 1)[0]
    return [int(number) for number in re.findall(r"-?\d+", re.sub(r"\([\d,]+\):", "", data))]


@needs_h5dump
def test_h5dump_without_the_plugin_path_prints_an_empty_data_block(image_file):
    """Why the wrapper exists: the trap an operator falls into (docs/file-format.md says what h5dump does)."""
    path, _ = image_file
    result = subprocess.run([H5DUMP, "-d", DATASET, str(path)], capture_output=True, text=True, timeout=60,
                            env=_environment())
    assert _dumped_values(result.stdout) == []
    # Debian's h5dump 1.10 says so on stderr and exits 1 (the issue saw 0: other versions, other tools).
    assert (result.returncode, result.stderr.strip()) == (1, "h5dump error: unable to print data")
    documented = (ROOT / "docs" / "file-format.md").read_text(encoding="utf-8")
    assert "`h5dump error: unable to print data`" in documented
    assert "USER_DEFINED_FILTER" in subprocess.run([H5DUMP, "-p", "-H", "-d", DATASET, str(path)],
                                                   capture_output=True, text=True, timeout=60).stdout


@needs_h5dump
def test_plugin_path_makes_h5dump_print_the_images(image_file):
    path, images = image_file
    result = subprocess.run([*CTL, "plugin-path"], capture_output=True, text=True, timeout=60, env=_environment())
    assert result.returncode == 0, result.stderr
    plugin_path = result.stdout.strip()
    assert os.path.isdir(plugin_path) and any("bshuf" in name for name in os.listdir(plugin_path))
    dumped = subprocess.run([H5DUMP, "-d", DATASET, str(path)], capture_output=True, text=True, timeout=60,
                            env=_environment(HDF5_PLUGIN_PATH=plugin_path))
    assert dumped.returncode == 0, dumped.stderr
    assert _dumped_values(dumped.stdout) == np.stack(images).reshape(-1).tolist()


@needs_h5dump
def test_ctl_h5dump_runs_h5dump_with_the_plugins(image_file):
    path, images = image_file
    result = subprocess.run([*CTL, "h5dump", "-d", DATASET, str(path)], capture_output=True, text=True,
                            timeout=60, env=_environment())
    assert result.returncode == 0, result.stderr
    assert _dumped_values(result.stdout) == np.stack(images).reshape(-1).tolist()
    # h5dump's own exit code comes through: a missing dataset is h5dump's error 1, not a silent 0.
    missing = subprocess.run([*CTL, "h5dump", "-d", "/data/NOPE/data", str(path)], capture_output=True,
                             text=True, timeout=60, env=_environment())
    assert missing.returncode == 1


def test_plugin_path_fails_loudly_where_hdf5plugin_is_missing(tmp_path):
    """The documented one-liner under a python without hdf5plugin gave an empty variable and no error."""
    shadow = tmp_path / "shadow" / "hdf5plugin"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named hdf5plugin (shadowed by the test)')\n")
    env = _environment(PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", str(ROOT))]))
    for command in (["plugin-path"], ["h5dump", "-H", "nothing.h5"]):
        result = subprocess.run([*CTL, *command], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 2, (command, result)
        assert result.stdout == ""  # `HDF5_PLUGIN_PATH=$(...) && export ...` stops here
        assert "hdf5plugin" in result.stderr and "pip install" in result.stderr


_PLAIN_H5PY_READER = textwrap.dedent("""
    import sys
    import h5py  # and not hdf5plugin
    with h5py.File(sys.argv[1], "r") as f:
        try:
            f["data/CAM/data"][0]
        except OSError as error:
            print(f"{type(error).__name__}: {error}")
""")


def test_the_documented_h5py_error_is_the_one_h5py_gives(image_file):
    path, _ = image_file
    result = subprocess.run([sys.executable, "-c", _PLAIN_H5PY_READER, str(path)], capture_output=True,
                            text=True, timeout=60, env=_environment())
    error = result.stdout.strip()
    assert error.startswith("OSError: "), result
    documented = (ROOT / "docs" / "file-format.md").read_text(encoding="utf-8")
    quoted = re.search(r"raises `(OSError: [^`]+)`", documented)
    assert quoted, "docs/file-format.md quotes the error as: raises `OSError: ...`"
    # The plugin directory in the message is the HDF5 build's default: the docs write it as <...>.
    pattern = re.escape(quoted.group(1)).replace(re.escape("<plugin directory>"), r"[^)]*")
    assert re.fullmatch(pattern, error), (quoted.group(1), error)
