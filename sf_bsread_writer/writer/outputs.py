"""What the writer writes into: a path it is allowed to use, an HDF5 file, or /dev/null.

The I/O side of a start: :func:`resolve_output_file` checks a requested path
against ``--output-root`` (the REST layer turns its :class:`BadRequest` into
a 400), :func:`open_output` creates the :class:`~sf_bsread_writer.h5.file.H5File`
(or a :class:`NullOutput` for ``/dev/null``), and :func:`abandon_output`
removes what a failed start left behind.

The check at the request and the creation at the start are two moments,
and a folder can be swapped for a symlink in between. So :func:`open_output`
checks again where it creates: it walks from the root to the file's folder
one directory descriptor at a time (creating what is missing inside the
descriptor it holds, never through a path), checks the real path of each
descriptor against the root, and creates the file exclusively inside the
last one (h5/placement.py). Whatever is swapped after a descriptor was
checked no longer matters: the descriptor is the folder.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

from sf_bsread_writer.h5.file import H5File
from sf_bsread_writer.h5.placement import FileSlot
from sf_bsread_writer.writer.acquisition import (
    REQUIRED_PARAMETERS,
    BadRequest,
    OutsideRoot,
    StartRun,
)

__all__ = ["DEV_NULL", "resolve_output_file", "NullOutput", "open_output", "abandon_output", "summary_path",
           "write_summary"]

logger = logging.getLogger(__name__)

DEV_NULL = "/dev/null"


def resolve_output_file(path: object, output_root: str | None, base_dir: str | None = None) -> str:
    """The absolute path to write ``path`` to, or :class:`BadRequest`.

    With ``output_root`` the real path (every symlink resolved, ``..``
    applied) must lie strictly inside the root's real path, so neither
    ``../x.h5`` nor a symlink pointing out of the root can escape it. A
    relative path is taken relative to ``base_dir`` (default: the root when
    there is one, else the current directory). ``/dev/null`` is always
    allowed: it writes nothing. An existing file is refused: the writer never
    overwrites an earlier acquisition.
    """
    if not isinstance(path, str) or not path.strip():
        raise BadRequest(f"output_file must be a non-empty string, not {path!r}")
    if "\x00" in path:
        raise BadRequest("output_file must not contain NUL characters")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRequest(f"output_file is not valid UTF-8 text ({error.reason} at character {error.start}: "
                         "a lone surrogate?)") from None
    if path == DEV_NULL:
        return path
    if base_dir is None:
        base_dir = output_root if output_root is not None else os.getcwd()
    candidate = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if output_root is None:
        resolved = os.path.abspath(candidate)
    else:
        root = os.path.realpath(output_root)
        try:
            resolved = os.path.realpath(candidate)
        except OSError as error:  # a symlink on the way changed while it was followed
            raise BadRequest(f"output_file {path!r} cannot be resolved now ({error.strerror}): "
                             "a folder on its path is changing; try again") from None
        if resolved == root or os.path.commonpath([root, resolved]) != root:
            raise OutsideRoot(f"output_file {path!r} resolves to {resolved}, outside the output root {root}")
    if os.path.isdir(resolved):
        raise BadRequest(f"output_file {path!r} is a directory")
    if os.path.lexists(resolved):
        raise BadRequest(f"output_file {resolved} already exists; the writer does not overwrite files")
    ancestor = os.path.dirname(resolved)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise BadRequest(f"output_file {path!r}: {ancestor} is a file, not a folder")
    return resolved


class NullOutput:
    """``/dev/null`` as the output file: consume the range, count it, write nothing (as the original)."""

    def __init__(self) -> None:
        self.rows = 0
        self.bytes_written = 0
        self.absent_values = 0

    def append(self, message: Any, time: float | None = None) -> None:
        self.rows += 1
        for index in range(message.n_channels):
            self.bytes_written += len(message.value_part(index))
            self.absent_values += not message.is_present(index)  # empty, or its channel refused by the parser

    def missing_from(self, records: Any) -> None:
        """Nothing to write them into: the statistics read them from the range."""

    def set_attributes(self, attributes: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def settle_channels(self) -> None:
        pass

    def maybe_flush(self) -> bool:
        return False

    def truncate(self, rows: int) -> int:
        """Only ``rows`` follows (nothing was written; the byte counts keep the removed rows)."""
        removed, self.rows = self.rows - rows, rows
        return removed

    def close(self, attributes: dict | None = None) -> None:
        pass


def open_output(start: StartRun, flush_interval: float, output_root: str | None = None,
                decompress_images: bool = False) -> H5File | NullOutput:
    """The output of a run: the HDF5 file (its folders created, as the original did), or NullOutput.

    OutsideRoot if the folder is not inside ``output_root`` *now* (see the
    module docstring); FileExistsError if the file appeared since the check.
    """
    if start.output_file == DEV_NULL:
        return NullOutput()
    directory_fd = _open_output_directory(os.path.dirname(start.output_file), output_root)
    try:
        general = {name: start.parameters[name] for name in REQUIRED_PARAMETERS if name in start.parameters}
        extra = {key: value for key, value in start.parameters.items() if key not in REQUIRED_PARAMETERS}
        return H5File(start.output_file, general, extra, flush_interval=flush_interval, directory_fd=directory_fd,
                      decompress_images=decompress_images)
    finally:
        os.close(directory_fd)


def _open_output_directory(directory: str, output_root: str | None) -> int:
    """A descriptor of the file's folder, created if missing; inside ``output_root`` when there is one."""
    if output_root is None:
        os.makedirs(directory, exist_ok=True)
        return FileSlot.open_directory(directory)
    root = os.path.realpath(output_root)
    relative = os.path.relpath(directory, root)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise OutsideRoot(f"{directory} is outside the output root {root}")
    fd = FileSlot.open_directory(root)
    try:
        for name in [] if relative == os.curdir else relative.split(os.sep):
            try:
                os.mkdir(name, dir_fd=fd)  # inside the folder this descriptor holds, whatever its path is now
            except FileExistsError:
                pass
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
            real = FileSlot.real_directory(fd)
            if real != root and os.path.commonpath([root, real]) != root:
                raise OutsideRoot(f"output_file {directory}: {name} now leads to {real}, outside the output "
                                  f"root {root}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def abandon_output(start: StartRun, output: Any) -> None:
    """After a failed start: close what was opened and remove the file it created (through its folder's descriptor)."""
    abandon = getattr(output, "abandon", None)
    if abandon is None:
        return
    try:
        abandon()
    except Exception:  # noqa: BLE001 (best effort; the start already failed)
        logger.exception("Removing the abandoned output failed")


def summary_path(output_file: str) -> str:
    """Where the JSON summary of a run goes: beside the file, ``<output_file>.summary.json``."""
    return output_file + ".summary.json"


def write_summary(output_file: str, summary: Mapping[str, Any], output_root: str | None = None) -> str:
    """Write the run's summary beside its file, whole or not at all, inside the root whatever changed meanwhile.

    Created exclusively, without following a symlink, under a random name
    in the folder's descriptor (walked from the root as for the file), then
    renamed over ``<output_file>.summary.json`` in the same folder.
    """
    path = summary_path(output_file)
    directory_fd = _open_output_directory(os.path.dirname(path), output_root)
    try:
        temporary = f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=directory_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(summary, file, indent=2)
                file.write("\n")
            os.replace(temporary, os.path.basename(path), src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
        except BaseException:
            os.unlink(temporary, dir_fd=directory_fd)
            raise
    finally:
        os.close(directory_fd)
    return path
