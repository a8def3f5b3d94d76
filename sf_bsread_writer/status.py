"""The buffer's statistics snapshot -> HTTP answers (JSON) and Prometheus text.

Pure functions over a plain ``dict`` snapshot. The buffer's main loop builds
a fresh snapshot a few times a second and publishes it by swapping one
reference; the HTTP threads only read published snapshots, never the ring or
a socket. Layout of a snapshot (every key always present; pulse ids and
times may be None)::

    name, state ("running" | "stopping"), time, uptime_seconds,
    endpoints {stream, output, replay, rest},
    source {address, mode, idle_seconds, last_message_time, connected_once},
    received, received_bytes, forwarded, output_mode, output_drops,
    rejected {reason: count}, rejected_total, ignored, duplicates, header_changes,
    ring {messages, bytes, max_messages, max_bytes, oldest_pulse_id,
          newest_pulse_id, evicted, evicted_bytes},
    pulse_ids {last, usual_step, jumps, jumped_pulses, resets, reset_evicted, held_back, out_of_order},
    rates {messages_per_second, bytes_per_second, window_seconds},
    replay {active_sessions, started, ended, expired, refused, disconnected,
            send_failures, sent, gaps, lost,
            sessions [ {session, start_pulse_id, start_time, stop_pulse_id,
                        stop_time, cursor_seq, last_pulse_id, sent, in_flight,
                        window, gaps, lost, ended} ]}

Field meanings: docs/buffer.md ("GET /statistics").
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["describe", "status_answer", "statistics_answer", "prometheus_text", "SOURCE_IDLE_SECONDS"]

# No message for this long: the status says the source is idle.
SOURCE_IDLE_SECONDS = 5.0


def describe(snapshot: Mapping[str, Any]) -> str:
    """One word for humans and monitoring: what the buffer is doing."""
    if snapshot.get("state") == "stopping":
        return "stopping"
    source = snapshot["source"]
    if not source.get("connected_once"):
        return "waiting_for_source"
    idle = source.get("idle_seconds")
    if idle is not None and idle > SOURCE_IDLE_SECONDS:
        return "source_idle"
    return "receiving"


def status_answer(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """GET /status: a short answer for health checks."""
    ring = snapshot["ring"]
    return {
        "state": "ok",
        "status": describe(snapshot),
        "name": snapshot["name"],
        "uptime_seconds": snapshot["uptime_seconds"],
        "source_idle_seconds": snapshot["source"]["idle_seconds"],
        "newest_pulse_id": ring["newest_pulse_id"],
        "oldest_pulse_id": ring["oldest_pulse_id"],
        "replay_sessions": snapshot["replay"]["active_sessions"],
        "endpoints": dict(snapshot["endpoints"]),
    }


def statistics_answer(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """GET /statistics: everything the snapshot holds."""
    return {"state": "ok", "status": describe(snapshot), "statistics": dict(snapshot)}


# ---------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4
# ---------------------------------------------------------------------------
_PREFIX = "sf_bsread_buffer_"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items()) + "}"


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Metrics:
    def __init__(self, base_labels: Mapping[str, Any]) -> None:
        self.base = dict(base_labels)
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Mapping[str, Any], Any]]) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        full = _PREFIX + name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{_labels({**self.base, **labels})} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: Any) -> None:
        self.family(name, kind, help_text, [({}, value)])


def prometheus_text(snapshot: Mapping[str, Any]) -> str:
    """GET /metrics: the snapshot as Prometheus metrics (label ``buffer`` = the buffer's name)."""
    m = _Metrics({"buffer": snapshot["name"]})
    ring = snapshot["ring"]
    replay = snapshot["replay"]
    pulse_ids = snapshot["pulse_ids"]
    m.one("up", "gauge", "1 while the buffer runs.", 1)
    m.one("uptime_seconds", "gauge", "Seconds since the buffer started.", snapshot["uptime_seconds"])
    m.one("received_messages_total", "counter", "Valid messages received and stored.", snapshot["received"])
    m.one("received_bytes_total", "counter", "Bytes of valid messages received.", snapshot["received_bytes"])
    m.one("forwarded_messages_total", "counter", "Messages handed to the live output.", snapshot["forwarded"])
    m.one("output_drops_total", "counter",
          "Messages the live output could not take (PUSH at high-water mark; PUB drops are invisible).",
          snapshot["output_drops"])
    m.family("rejected_messages_total", "counter", "Malformed messages dropped, by reason.",
             [({"reason": reason}, count) for reason, count in sorted(snapshot["rejected"].items())])
    m.one("ignored_messages_total", "counter", "Control messages (htype not bsr_m-*) ignored.", snapshot["ignored"])
    m.one("duplicate_messages_total", "counter", "Messages dropped because their pulse id repeated the newest.",
          snapshot["duplicates"])
    m.one("header_changes_total", "counter", "Changes of the data header hash.", snapshot["header_changes"])
    m.one("ring_messages", "gauge", "Messages held in the ring.", ring["messages"])
    m.one("ring_bytes", "gauge", "Bytes of raw frames held in the ring.", ring["bytes"])
    m.one("ring_max_messages", "gauge", "Most messages the ring holds.", ring["max_messages"])
    m.one("ring_max_bytes", "gauge", "Most bytes the ring holds.", ring["max_bytes"])
    m.one("ring_evicted_messages_total", "counter", "Messages evicted from the ring.", ring["evicted"])
    m.one("ring_evicted_bytes_total", "counter", "Bytes evicted from the ring.", ring["evicted_bytes"])
    m.one("oldest_pulse_id", "gauge", "Oldest pulse id held.", ring["oldest_pulse_id"])
    m.one("newest_pulse_id", "gauge", "Newest pulse id held.", ring["newest_pulse_id"])
    m.one("pulse_id_jumps_total", "counter", "Pulse-id steps different from the usual step.", pulse_ids["jumps"])
    m.one("pulse_id_resets_total", "counter", "Pulse ids going backwards (source restarts).", pulse_ids["resets"])
    m.one("out_of_order_messages_total", "counter",
          "Backwards messages dropped because the stream went on above them.", pulse_ids["out_of_order"])
    m.one("message_rate", "gauge", "Messages per second (recent window).", snapshot["rates"]["messages_per_second"])
    m.one("byte_rate", "gauge", "Bytes per second (recent window).", snapshot["rates"]["bytes_per_second"])
    m.one("source_idle_seconds", "gauge", "Seconds since the last message from the source.",
          snapshot["source"]["idle_seconds"])
    m.one("replay_sessions", "gauge", "Active replay sessions.", replay["active_sessions"])
    m.one("replay_sessions_started_total", "counter", "Replay sessions accepted.", replay["started"])
    m.one("replay_sessions_expired_total", "counter", "Replay sessions expired (silent writer).", replay["expired"])
    m.one("replay_sent_messages_total", "counter", "Data messages sent to writers.", replay["sent"])
    m.one("replay_gaps_total", "counter", "Gap notices sent to writers.", replay["gaps"])
    m.one("replay_lost_messages_total", "counter", "Messages reported lost to writers (where known).", replay["lost"])
    sessions = replay["sessions"]
    m.family("replay_session_last_pulse_id", "gauge", "Last pulse id sent to a session.",
             [({"session": s["session"]}, s["last_pulse_id"]) for s in sessions])
    m.family("replay_session_sent_messages", "gauge", "Data messages sent to a session.",
             [({"session": s["session"]}, s["sent"]) for s in sessions])
    m.family("replay_session_in_flight", "gauge", "Data messages in flight to a session.",
             [({"session": s["session"]}, s["in_flight"]) for s in sessions])
    m.family("replay_session_lost_messages", "gauge", "Messages a session lost.",
             [({"session": s["session"]}, s["lost"]) for s in sessions])
    return "\n".join(m.lines) + "\n"
