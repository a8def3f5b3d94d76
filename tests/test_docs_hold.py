"""The documents hold against the code: every documented reason, option and exit code exists, and every one
the code has is documented (both ways).

What the code can emit comes from its own definitions: the reason enums (the buffer's ``REJECT_REASONS``, ``GapReason``,
``ErrorReason``, ``RunEnd``, ``MissingReason``), the signals a writer stops on (``process.STOP_SIGNALS``), the
options of ``config.py`` and ``Outcome.exit_code``. What the documents say comes from their tables, read as a
Markdown renderer reads them: a table ends at its first line that is not a row (a blank line splits it, and
the rows after it are no longer a table).
"""
from __future__ import annotations

import re

from sf_bsread_writer import config, process
from sf_bsread_writer.buffer.ingest import REJECT_REASONS
from sf_bsread_writer.replay.messages import ErrorReason, GapReason
from sf_bsread_writer.writer.acquisition import Outcome, RunEnd, signal_end_reason
from sf_bsread_writer.writer.pulse_range import MissingReason

from .helpers import ROOT

DOCS = ROOT / "docs"


def _text(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _table(document: str, header: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table whose header line starts with ``header``."""
    lines = _text(document).splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith(header)]
    assert len(starts) == 1, f"{document}: {len(starts)} tables start with {header!r}"
    rows = []
    for line in lines[starts[0] + 2:]:  # the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows


def _words(text: str) -> set[str]:
    """The `code` words of a piece of Markdown."""
    return set(re.findall(r"`([^`]+)`", text))


def _row(document: str, header: str, key: str) -> str:
    found = [cells for cells in _table(document, header) if key in _words(cells[0])]
    assert len(found) == 1, f"{document}: no single row {key!r} in the table {header!r}"
    return " | ".join(found[0][1:])


END_REASONS = {reason.value for reason in RunEnd} | {signal_end_reason(signal.name) for signal in process.STOP_SIGNALS}
# A tail cut off by the run's end carries its end reason; a run that reached its stop owes no tail.
MISSING_REASONS = ({reason.value for reason in GapReason} | {reason.value for reason in MissingReason}
                   | END_REASONS - {RunEnd.STOP_REACHED.value})


# --------------------------------------------------------------------------
# Reasons
# --------------------------------------------------------------------------
def test_the_end_reasons_of_the_file_attribute_are_the_writers():
    documented = _words(_row("file-format.md", "| attribute |", "end_reason").split("ended:", 1)[1])
    assert documented == END_REASONS


def test_the_missing_reasons_the_file_format_names_are_ones_the_writer_records():
    documented = _words(_row("file-format.md", "| field | type |", "reason"))
    assert documented <= MISSING_REASONS, f"never recorded: {sorted(documented - MISSING_REASONS)}"


def test_the_writers_missing_table_lists_every_reason_it_records():
    documented = set().union(*(_words(cells[0]) for cells in _table("writer.md", "| reason | meaning |")))
    assert documented == MISSING_REASONS, (f"documented, never recorded: {sorted(documented - MISSING_REASONS)}; "
                                           f"recorded, not documented: {sorted(MISSING_REASONS - documented)}")


def test_the_buffers_reject_reasons_are_its_enum():
    cell = _row("buffer.md", "| key | meaning |", "rejected")
    documented = _words(cell) - {"--buffer-bytes", "{reason: count}"}
    assert documented == set(REJECT_REASONS)


def test_the_replay_protocols_gap_and_error_reasons_are_its_enums():
    gaps = set().union(*(_words(cells[0]) for cells in _table("replay-protocol.md", "| reason | when | fields |")))
    assert gaps == {reason.value for reason in GapReason}
    text = _text("replay-protocol.md")
    errors = text.split("`reason` is one of", 1)[1].split("\n\n", 1)[0]
    documented = {word for word in _words(errors) if re.fullmatch(r"[a-z_]+", word)} - {"replay", "refused"}
    assert documented == {reason.value for reason in ErrorReason}


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------
def _documented_flags(document: str, header: str) -> set[str]:
    """The options a table's first column names (`--flag ARG` counts as --flag; a positional by its NAME)."""
    flags = set()
    for cells in _table(document, header):
        for word in _words(cells[0]):
            flags.add(word.split()[0])
    return flags


def _check_options(document: str, header: str, options: list[config.Option]) -> None:
    documented = _documented_flags(document, header)
    names = {option.dest.upper() if not option.flags else option.dest: option for option in options}
    known = {flag for option in options for flag in option.flags} | {name for name, option in names.items()
                                                                       if not option.flags}
    assert documented <= known, f"{document}: documented, not an option: {sorted(documented - known)}"
    undocumented = [option.flags[0] if option.flags else option.dest.upper() for option in options
                    if not (set(option.flags) | ({option.dest.upper()} if not option.flags else set())) & documented]
    assert not undocumented, f"{document}: options missing from the table: {undocumented}"


def test_the_buffers_option_table_is_its_options():
    _check_options("buffer.md", "| option | default | meaning |", config.BUFFER_OPTIONS)


def test_the_writers_option_table_is_its_options():
    _check_options("writer.md", "| argument | meaning |", config.WRITER_OPTIONS)


# --------------------------------------------------------------------------
# Exit codes
# --------------------------------------------------------------------------
def test_the_writers_outcomes_and_exit_codes_are_its_enum():
    documented = {}
    for cells in _table("writer.md", "| outcome | when | exit code |"):
        (word,) = _words(cells[0])
        documented[word] = int(cells[-1])
    assert documented == {outcome.value: outcome.exit_code for outcome in Outcome}
