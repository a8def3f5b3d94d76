"""The runtime registry read by ``sf_bsread_ctl ls``: garbage files, recycled pids, both directories.

Real files in real directories, real processes (this test's own pid, pid 1) and the real
``sf_bsread_ctl`` as a subprocess; nothing mocked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sf_bsread_writer import registry

CTL = [sys.executable, "-m", "sf_bsread_writer.tools.ctl"]


def _entry(name: str, pid: int, **extra) -> str:
    return json.dumps({"kind": "buffer", "name": name, "pid": pid, "started": 1.0,
                       "endpoints": {"rest": "http://127.0.0.1:1"}, **extra})


def _plant_garbage(directory: Path) -> list[str]:
    """One file of every bad kind; returns their names."""
    bad: dict[str, str | bytes] = {
        "deep.json": "[" * 200_000 + "]" * 200_000,
        "deep-object.json": '{"a":' * 50_000 + "1" + "}" * 50_000,
        "infinity.json": _entry("INF", 1).replace('"pid": 1', '"pid": Infinity'),
        "nan.json": _entry("NAN", 1).replace('"pid": 1', '"pid": NaN'),
        "huge.json": _entry("HUGE", 2**70),
        "negative.json": _entry("NEG", -1),
        "zero.json": _entry("ZERO", 0),
        "float.json": _entry("FLOAT", 1).replace('"pid": 1', '"pid": 1.5'),
        "string-pid.json": _entry("STR", 1).replace('"pid": 1', '"pid": "1"'),
        "bool-pid.json": _entry("BOOL", 1).replace('"pid": 1', '"pid": true'),
        "name-list.json": _entry("X", os.getpid()).replace('"name": "X"', '"name": ["X"]'),
        "started-inf.json": _entry("SI", os.getpid()).replace('"started": 1.0', '"started": Infinity'),
        "endpoints-list.json": _entry("EL", os.getpid()).replace('{"rest": "http://127.0.0.1:1"}', "[1, 2]"),
        "endpoint-number.json": _entry("EN", os.getpid()).replace('"http://127.0.0.1:1"', "5"),
        "array.json": "[]",
        "string.json": '"buffer"',
        "binary.json": bytes(range(256)) * 4,
        "empty.json": "",
        "big.json": " " * (2 * 1024 * 1024) + _entry("BIG", os.getpid()),
    }
    for name, content in bad.items():
        path = directory / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (directory / "a-directory.json").mkdir()
    os.mkfifo(directory / "fifo.json")  # opening it for reading would block for ever
    (directory / "zero-link.json").symlink_to("/dev/zero")  # reading it would never end
    return [*bad, "a-directory.json", "fifo.json", "zero-link.json"]


def _good(directory: Path, name: str) -> Path:
    path = registry.register("buffer", name, {"rest": "http://127.0.0.1:1"}, directory=directory)
    assert path is not None
    return path


def test_garbage_files_are_skipped_and_named_and_the_good_entries_listed(tmp_path):
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o755)
    _good(directory, "GOOD")
    bad = _plant_garbage(directory)
    listing = registry.scan([directory])
    assert [entry.name for entry in listing.entries] == ["GOOD"]
    assert sorted(Path(skipped.path).name for skipped in listing.skipped) == sorted(bad)
    assert all(skipped.reason for skipped in listing.skipped)
    assert [entry.name for entry in registry.entries(directory)] == ["GOOD"]


def test_ls_lists_the_good_entries_and_mentions_the_bad_in_one_line(tmp_path):
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o755)
    _good(directory, "GOOD")
    _plant_garbage(directory)
    environment = {**os.environ, "SF_BSREAD_RUNTIME_DIR": str(directory), "COLUMNS": "200"}
    listed = subprocess.run([*CTL, "ls", "--json"], capture_output=True, text=True, timeout=60, env=environment)
    assert listed.returncode == 0, listed.stderr
    assert [entry["name"] for entry in json.loads(listed.stdout)] == ["GOOD"]
    assert "Traceback" not in listed.stderr
    skipped_lines = [line for line in listed.stderr.splitlines() if "skipped" in line]
    assert len(skipped_lines) == 1 and "deep.json" in skipped_lines[0] and "infinity.json" in skipped_lines[0]
    table = subprocess.run([*CTL, "ls"], capture_output=True, text=True, timeout=60, env=environment)
    assert table.returncode == 0 and "GOOD" in table.stdout and "Traceback" not in table.stderr, table.stderr


def test_a_recycled_pid_is_shown_gone_and_pid_0_or_negative_never_alive(tmp_path):
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o755)
    path = _good(directory, "MINE")
    mine = json.loads(path.read_text())
    assert mine["pid"] == os.getpid() and isinstance(mine["pid_start"], int)
    # This process and init are alive and unrelated to the entries below: a different start time.
    for pid in (os.getpid(), 1):
        (directory / f"buffer-RECYCLED{pid}-{pid}.json").write_text(
            _entry(f"RECYCLED{pid}", pid, pid_start=mine["pid_start"] + 12345))
    assert [entry.name for entry in registry.entries(directory)] == ["MINE"]
    assert {entry.name for entry in registry.entries(directory, include_stale=True)} == {
        "MINE", f"RECYCLED{os.getpid()}", "RECYCLED1"}
    for pid in (0, -1):
        entry = registry.Entry("buffer", "X", pid, 1.0)
        assert not entry.alive


def test_both_the_system_and_the_users_directory_are_read(tmp_path):
    system = tmp_path / "run" / "sf_bsread_writer"
    user = tmp_path / "user"
    system.mkdir(parents=True, mode=0o755)
    user.mkdir(mode=0o700)
    _good(system, "SYSTEMD-BUFFER")
    _good(user / "sf_bsread_writer", "MY-BUFFER")
    environ = {"XDG_RUNTIME_DIR": str(user)}
    directories = registry.runtime_directories(environ, system=system)
    assert directories == [system, user / "sf_bsread_writer"]
    listing = registry.scan(directories)
    assert {entry.name: Path(entry.path).parent for entry in listing.entries} == {
        "SYSTEMD-BUFFER": system, "MY-BUFFER": user / "sf_bsread_writer"}
    # An explicit directory is the only one; a missing system directory is not listed.
    assert registry.runtime_directories({**environ, "SF_BSREAD_RUNTIME_DIR": "/x"}, system=system) == [Path("/x")]
    assert registry.runtime_directories(environ, system=tmp_path / "absent") == [user / "sf_bsread_writer"]


@pytest.mark.parametrize("name", ["[red]", "[/]", "[link=x]a"])
def test_names_that_look_like_markup_are_shown_as_they_are(tmp_path, name):
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o755)
    _good(directory, name)
    environment = {**os.environ, "SF_BSREAD_RUNTIME_DIR": str(directory), "COLUMNS": "200"}
    table = subprocess.run([*CTL, "ls"], capture_output=True, text=True, timeout=60, env=environment)
    assert table.returncode == 0 and name in table.stdout, table.stderr
