"""What ``GET /statistics`` of a writer says about its acquisition: one typed record (docs/writer.md).

Pure. ``sf_bsread_ctl``, the demo and the web page read it with :meth:`WriterStatistics.from_json`,
never by string paths.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sf_bsread_writer.replay.messages import Gap, MissingRange
from sf_bsread_writer.status import Record

__all__ = ["WriterStatistics", "MAX_MISSING_SHOWN"]

MAX_MISSING_SHOWN = 100  # missing ranges listed in /statistics (all are in the file)


@dataclass(frozen=True)
class WriterStatistics(Record):
    """Everything ``GET /statistics`` says about an acquisition (field meanings: docs/writer.md).

    The first six fields are the original writer's (the requested range and
    the last message written); the rest were added.
    """

    start_pulse_id: int | None
    stop_pulse_id: int | None
    start_timestamp: float | None
    stop_timestamp: float | None
    last_pulse_id: int | None
    last_timestamp: float | None
    first_pulse_id: int | None
    first_timestamp: float | None
    output_file: str
    messages_received: int
    messages_written: int
    bytes_written: int
    rows_flushed: int  # rows on disk: what a kill -9 would leave in the file now
    rate: float
    messages_before_start: int
    messages_out_of_order: int
    messages_rejected: int
    rejected_reasons: Mapping[str, int]
    gap_notices: int
    buffer_lost: int
    missing_pulses: int
    missing_by_reason: Mapping[str, int]
    missing_ranges: int
    missing: tuple[MissingRange, ...]  # the first MAX_MISSING_SHOWN (all are in the file)
    unlocated_gaps: tuple[Gap, ...]  # losses whose pulse ids are unknown
    absent_values: int
    pulse_id_step: int | None
    progress: float | None
    end_reason: str | None
    error: str | None
    outcome: str | None  # complete | partial | failed, once the run has ended (docs/writer.md)
    runs_finished: int = 0  # runs whose file is closed (more than one only in persistent mode)
    time_base: str | None = None  # where the rows' times came from: source | receive | mixed (bsread.timebase)
    io_path: str | None = None  # how whole messages move: compiled | python (transport.partsio)
    # Values stored absent because they were refused (a wrong data-header entry, a value that does not
    # decode), by channel and reason; also in absent_values and the file attribute refused_channels.
    refused_values: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # Connections to the source that ZeroMQ gave up after refusing a part over twice --max-message-bytes,
    # made anew (--direct: the stream; else the buffer's replay endpoint, asked for the rest of the range).
    # What the source sent meanwhile is lost (a replay: one message, an unlocated oversize gap).
    source_reconnects: int = 0

    @staticmethod
    def missing_summary(missing: Iterable[MissingRange]) -> dict[str, Any]:
        """``missing_pulses``, ``missing_by_reason``, ``missing_ranges`` and ``missing`` of all records."""
        records = list(missing)
        by_reason: dict[str, int] = {}
        for item in records:
            by_reason[item.reason] = by_reason.get(item.reason, 0) + item.count
        return {"missing_pulses": sum(item.count for item in records), "missing_by_reason": by_reason,
                "missing_ranges": len(records), "missing": tuple(records[:MAX_MISSING_SHOWN])}
