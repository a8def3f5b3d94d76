"""The package builds as a wheel and imports from a fresh venv: with the compiled message I/O, and without a compiler.

A wheel is built from this checkout (``pip wheel --no-deps
--no-build-isolation``: setuptools from the test venv, nothing downloaded)
and installed without dependencies into a new, empty venv; the
dependencies come from the test venv's site-packages through PYTHONPATH
(which does not process the editable install's .pth, so the import can only
find the wheel's copy). Skipped where there is no C compiler for the first
test; the second needs none.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from .helpers import ROOT

PROBE = ("import sf_bsread_writer, sys; from sf_bsread_writer.transport import partsio; "
         "from sf_bsread_writer.bsread.codecs import BLOCK_WALK; "
         "print(sf_bsread_writer.__file__); print(partsio.IMPLEMENTATION); print(partsio.FALLBACK_REASON); "
         "print(BLOCK_WALK)")


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    source = tmp_path / "source"
    # A copy without build products, so the wheel is built here and now (not an in-place .so of the checkout).
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", ".hypothesis",
        "demo-output"))
    out = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(out.glob("sf_bsread_writer-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _import_from_fresh_venv(tmp_path: Path, wheel: Path) -> list[str]:
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Install = unpack the wheel into site-packages (what pip does for a pure-layout wheel, without pip in the venv).
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    deps = sysconfig.get_paths()["purelib"]  # the test venv's packages: numpy, pyzmq, h5py...
    env = {**os.environ, "PYTHONPATH": deps}
    env.pop("SF_BSREAD_NO_EXTENSION", None)
    result = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_a_wheel_with_the_extension_builds_and_imports_from_a_fresh_venv(tmp_path):
    if not (shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc")):
        pytest.skip("no C compiler here: the wheel would be the pure one (next test)")
    wheel = _build_wheel(tmp_path, dict(os.environ))
    with zipfile.ZipFile(wheel) as archive:
        assert any(name.startswith("sf_bsread_writer/transport/_partsio") and name.endswith(".so")
                   for name in archive.namelist()), archive.namelist()
    location, implementation, reason, block_walk = _import_from_fresh_venv(tmp_path, wheel)
    assert location.startswith(str(tmp_path / "venv")), location
    assert implementation == "compiled", reason
    assert block_walk == "compiled"
    assert any(name.startswith("sf_bsread_writer/web/static/vendor/dygraph") for name in archive_names(wheel))


def test_without_a_compiler_the_wheel_builds_and_uses_the_pure_path(tmp_path):
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    wheel = _build_wheel(tmp_path, env)
    with zipfile.ZipFile(wheel) as archive:
        assert not any(name.endswith(".so") for name in archive.namelist())
    location, implementation, reason, block_walk = _import_from_fresh_venv(tmp_path, wheel)
    assert location.startswith(str(tmp_path / "venv")), location
    assert implementation == "python" and "not built" in reason
    assert block_walk == "python"


def archive_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()
