"""Where the writer may create its file: inside --output-root, exclusively, even while the tree changes under it."""
from __future__ import annotations

import json
import os
import threading

import h5py
import pytest

from sf_bsread_writer.h5.placement import OutputFileGone
from sf_bsread_writer.writer.acquisition import (
    REQUIRED_PARAMETERS,
    BadRequest,
    OutsideRoot,
    StartRun,
)
from sf_bsread_writer.writer.outputs import (
    open_output,
    resolve_output_file,
    write_summary,
)

PARAMETERS = dict.fromkeys(REQUIRED_PARAMETERS, "x")


def start(path: str) -> StartRun:
    return StartRun(path, 1, None, None, None, PARAMETERS)


def test_a_path_under_a_regular_file_says_so(tmp_path):
    (tmp_path / "blocked").write_text("a file where a folder is needed")
    for path in ("blocked/x.h5", "blocked/deeper/x.h5"):
        with pytest.raises(BadRequest, match=r"blocked is a file, not a folder"):
            resolve_output_file(path, str(tmp_path))


@pytest.mark.parametrize("path", ["S\ud800.h5", "x/\udcff.h5"])
def test_a_path_that_is_not_text_is_a_bad_request(tmp_path, path):
    with pytest.raises(BadRequest, match="not valid UTF-8"):
        resolve_output_file(path, str(tmp_path))


def test_open_output_creates_missing_folders_inside_the_root(tmp_path):
    path = resolve_output_file("a/b/c/x.h5", str(tmp_path))
    output = open_output(start(path), 1.0, str(tmp_path))
    output.close()
    with h5py.File(tmp_path / "a/b/c/x.h5", "r") as file:
        assert file.attrs["complete"] == 1


def test_open_output_never_replaces_a_file_that_appeared_since_the_check(tmp_path):
    path = resolve_output_file("late.h5", str(tmp_path))
    (tmp_path / "late.h5").write_bytes(b"an earlier acquisition")
    with pytest.raises(FileExistsError, match="does not overwrite"):
        open_output(start(path), 1.0, str(tmp_path))
    assert (tmp_path / "late.h5").read_bytes() == b"an earlier acquisition"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.h5"]  # no temporary file left


def test_open_output_refuses_a_folder_swapped_for_a_symlink_after_the_check(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "run").mkdir()
    path = resolve_output_file("run/x.h5", str(root))  # checked while run/ is a real folder
    (root / "run").rmdir()
    (root / "run").symlink_to(outside)  # ... and swapped before the open
    with pytest.raises(OutsideRoot, match="outside the output root"):
        open_output(start(path), 1.0, str(root))
    assert list(outside.iterdir()) == []


def test_no_file_escapes_the_root_while_a_folder_flips_to_a_symlink_and_back(tmp_path):
    """The race of the issue: 40 starts while another thread keeps swapping run/ for a symlink out of the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "run").mkdir()
    stop = threading.Event()
    flips = [0]

    def flip() -> None:
        real, link = root / "run.real", root / "run.link"
        link.symlink_to(outside)
        while not stop.is_set():
            try:
                os.rename(root / "run", real)
                os.rename(link, root / "run")  # now a symlink out of the root
                os.rename(root / "run", link)
                os.rename(real, root / "run")  # a folder again
                flips[0] += 1
            except OSError:  # a start created run/ while it was away: start the dance again
                for leftover in (root / "run", real):
                    if leftover.is_dir() and not leftover.is_symlink() and leftover != root / "run":
                        os.rename(leftover, root / f"run.{flips[0]}.aside")
                if not link.is_symlink() and not (root / "run").is_symlink():
                    link.symlink_to(outside)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    created, refused = 0, 0
    try:
        for index in range(40):
            try:
                path = resolve_output_file(f"run/x{index}.h5", str(root))
                output = open_output(start(path), 1.0, str(root))
            except (BadRequest, OSError):  # refused with a reason: the writer answers 400
                refused += 1
                continue
            created += 1
            try:
                output.close()
            except OutputFileGone:
                pass  # its folder was renamed away meanwhile: still inside the root, and said so
    finally:
        stop.set()
        flipper.join(timeout=10)
    assert flips[0] > 0 and created + refused == 40
    assert list(outside.iterdir()) == [], "a file was created outside the output root"
    # Every file created is somewhere inside the root (a start may have made its own run/ while the
    # real one was renamed away); none is hidden behind the symlink.
    inside = [name for folder, _, names in os.walk(root) for name in names if name.endswith(".h5")]
    assert len(inside) == created


def test_a_removed_output_folder_is_an_error_at_the_next_flush(tmp_path):
    path = resolve_output_file("run/x.h5", str(tmp_path))
    output = open_output(start(path), 1.0, str(tmp_path))
    try:
        output.flush()
        for child in (tmp_path / "run").iterdir():
            child.unlink()
        (tmp_path / "run").rmdir()
        with pytest.raises(OutputFileGone, match="removed while it was written"):
            output.flush()
    finally:
        with pytest.raises(OutputFileGone):
            output.close()


def test_the_summary_never_writes_through_a_symlink(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("not yours")
    (root / "x.h5.summary.json").symlink_to(outside / "precious")  # planted where the summary goes
    write_summary(str(root / "x.h5"), {"outcome": "complete"}, str(root))
    assert (outside / "precious").read_text() == "not yours"
    assert not (root / "x.h5.summary.json").is_symlink()
    assert json.loads((root / "x.h5.summary.json").read_text()) == {"outcome": "complete"}
    assert sorted(p.name for p in root.iterdir()) == ["x.h5.summary.json"]  # no temporary left


def test_dev_null_counts_a_refused_channel_as_absent():
    """/dev/null counts what a file would: a channel the parser refused is absent whatever its part holds."""
    from sf_bsread_writer.bsread.build import build_message
    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.writer.outputs import NullOutput

    frames = build_message(1, [{"name": "A", "type": "int32"}, {"name": "B", "type": "int32"}], [1, 2])
    frames[1] = json.dumps({"channels": [{"name": "A", "type": "int32"}, {"name": "B", "type": "cplx"}]}).encode()
    frames[0] = json.dumps({**json.loads(frames[0]), "hash": "refused"}).encode()
    output = NullOutput()
    output.append(MessageParser().parse(frames))
    assert (output.rows, output.absent_values) == (1, 1)
