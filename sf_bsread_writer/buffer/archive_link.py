"""``--archive``: the buffer's side of its archiver (a child process) and the archive's line in the snapshot.

The archiver (``archive.publisher``) is a client of the replay endpoint
like any writer, started and supervised as the CA gateway and the web
service are (``buffer.children``), so the NATS client never runs in the
buffer's process and the loop never waits on a broker. It reports its
status as JSON on a loopback PULL socket that this link owns; the loop
reads the newest report when it builds a snapshot (never blocking) and
adds the lag against its ring: how many ring messages, and how many
seconds of ring time, are newer than the last archived one.

The buffer imports nothing of ``archive`` (nor nats): the archiver is known
only by its command line.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import replace
from typing import Any

import zmq

from sf_bsread_writer.buffer.children import ChildSupervisor, reachable_locally
from sf_bsread_writer.ring import Ring
from sf_bsread_writer.status import ArchiveStatus

__all__ = ["ArchiveLink", "archiver_command"]

logger = logging.getLogger(__name__)

# Bytes of one status report from the archiver at most (a report is ~600 bytes): anything larger is dropped.
MAX_REPORT_BYTES = 64 * 1024


def archiver_command(replay: str, url: str, name: str, *, max_bytes: int, max_age: float, replicas: int,
                     status_address: str, log_level: str = "INFO", parent_pid: int | None = None) -> list[str]:
    """The command line that runs the archiver (``python -m sf_bsread_writer.archive.publisher ...``)."""
    command = [sys.executable, "-m", "sf_bsread_writer.archive.publisher", reachable_locally(replay), url,
               "--name", name, "--max-bytes", str(max_bytes), "--max-age", repr(float(max_age)),
               "--replicas", str(replicas), "--status-address", status_address, "--log-level", log_level]
    if parent_pid:
        command += ["--parent-pid", str(parent_pid)]
    return command


class ArchiveLink:
    """The archiver child and its status socket; owned by the buffer's loop thread (``status`` from there)."""

    def __init__(self, context: zmq.Context, url: str, name: str, max_bytes: int, max_age: float,
                 replicas: int) -> None:
        self.url = url
        self.name = name
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.replicas = replicas
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, 16)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_REPORT_BYTES)
        self.socket.bind("tcp://127.0.0.1:0")  # our own child reports here: loopback only
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.child: ChildSupervisor | None = None
        self._latest = ArchiveStatus(url=url, stream=f"sfbs_{name}", state="starting", replicas=replicas)
        self.bad_reports = 0

    def start(self, replay_address: str, log_level: str) -> ChildSupervisor:
        self.child = ChildSupervisor(archiver_command(
            replay_address, self.url, self.name, max_bytes=self.max_bytes, max_age=self.max_age,
            replicas=self.replicas, status_address=self.address, log_level=log_level,
            parent_pid=os.getpid())).start()
        return self.child

    def status(self, ring: Ring) -> ArchiveStatus:
        """The archiver's newest report, with the lag against ``ring`` (loop thread)."""
        while True:
            try:
                report = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                self._latest = ArchiveStatus.from_json(json.loads(report))
            except (ValueError, TypeError, KeyError) as error:
                self.bad_reports += 1
                logger.debug("archive: unreadable status report: %s", error)
        status = self._latest
        if self.child is not None and not self.child.running and status.state not in ("error",):
            status = replace(status, state="stopped")
        return replace(status, **lag(ring, status.last_archived_pulse_id, status.last_archived_time))


def lag(ring: Any, last_pulse_id: int | None, last_time: float | None) -> dict[str, Any]:
    """Ring messages newer than the last archived pulse, and the ring time between them (pure)."""
    if ring.oldest_pulse_id is None:
        return {"lag_messages": 0 if last_pulse_id is not None else None, "lag_seconds": None}
    if last_pulse_id is None:
        return {"lag_messages": ring.n_messages, "lag_seconds": None}
    messages = ring.next_seq - ring.seq_for_pulse_id(last_pulse_id + 1)
    newest = ring.newest_time
    seconds = max(0.0, newest - last_time) if messages and newest is not None and last_time is not None else 0.0
    return {"lag_messages": messages, "lag_seconds": seconds}
