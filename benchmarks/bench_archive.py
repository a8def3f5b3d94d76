#!/usr/bin/env python
"""The archive (issue 23): does archiving keep up, what does it cost ingest, how fast does a range drain from it.

    .venv/bin/python benchmarks/bench_archive.py --seconds 60 --range 3000

Needs ``nats-server`` (Debian's package) and starts its own on a free
loopback port with a store in a temporary directory. Everything else runs as
in production: the buffer in this process (``Buffer.run`` in a thread, so
that the archiver can also run as a thread of the same process for the
comparison), the source and the writers as child processes.

1. **Keeps up** (``--seconds``, per stream): a 1 MiB camera stream and a
   2000-channel scalar stream at 100 Hz, with and without ``--archive``
   (the archiver a child process, as shipped): messages/s the buffer
   ingests and forwards, the archive's lag (max and last), pulses lost.
2. **Thread or process** (``--saturate`` seconds, per stream): the source as
   fast as it can; messages/s the buffer ingests without an archive, with
   the archiver as a child process, and with it as a thread in the buffer's
   process (its asyncio loop on a thread of its own). How the choice was made.
3. **Drain** (``--range`` pulses, per stream): the same range into a writer
   (a real ``sf_bsread_writer`` process writing HDF5) from the RAM ring and
   from the archive alone (``nats://``), in the same run.

Prints one JSON line per measurement and a summary; the machine's load is
printed with it (other processes share the cores: say so with the figures).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

STREAMS = {"camera": "camera1m", "scalars": "scalars2000"}
NATS_SERVER = "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else "nats-server"


class NatsServer:
    def __init__(self, store: Path) -> None:
        self.port = common.free_port()
        store.mkdir(parents=True, exist_ok=True)
        config = store / "nats.conf"
        config.write_text("max_payload: 8388608\n")
        self.process = subprocess.Popen([NATS_SERVER, "-c", str(config), "-js", "-a", "127.0.0.1", "-p",
                                         str(self.port), "-sd", str(store)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        for line in self.process.stdout:  # type: ignore[union-attr]
            if "Server is ready" in line:
                break
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()  # drain
        self.url = f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def wait(condition, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"no {what} within {timeout} s")


def sender(profile: str, rate: float) -> tuple[common.Child, str]:
    port = common.free_port()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import common; "
            f"common.run_raw_sender({profile!r}, {port}, {rate!r})")  # pre-encoded ZMTP: never the bottleneck
    return common.Child([sys.executable, "-c", code]), f"tcp://127.0.0.1:{port}"


class RunningBuffer:
    """A Buffer in a thread of this process; with ``archive``: the archiver as its child process."""

    def __init__(self, address: str, name: str, archive: str | None, length: int, **kwargs: Any) -> None:
        from sf_bsread_writer.buffer.service import Buffer

        self.buffer = Buffer(address, output_port=0, replay_port=0, rest_port=0, name=name, archive=archive,
                             buffer_length=length, buffer_bytes=8 * 1024**3, max_clock_skew=1e9, **kwargs)
        self.thread = threading.Thread(target=self.buffer.run, daemon=True)
        self.thread.start()
        assert self.buffer.started.wait(30)

    def stop(self) -> None:
        self.buffer.stop()
        self.thread.join(30)


def in_process_archiver(replay: str, url: str, name: str) -> tuple[Any, threading.Thread]:
    from sf_bsread_writer.archive.publisher import Archiver
    from sf_bsread_writer.archive.records import ArchiveTarget, StreamSettings

    target = ArchiveTarget.parse(url, name)
    archiver = Archiver(replay, target, StreamSettings(subjects=target.subjects))
    thread = threading.Thread(target=archiver.run, daemon=True)
    thread.start()
    return archiver, thread


def keeps_up(stream: str, nats: NatsServer, seconds: float, archive: bool) -> dict:
    """100 Hz for ``seconds``: ingest and forwarding rates; with the archive its lag and losses."""
    profile = STREAMS[stream]
    name = f"KEEP_{stream}_{int(time.time() * 1000) % 10**8}"
    source, address = sender(profile, 100.0)
    running = RunningBuffer(address, name, nats.url if archive else None, 1000)
    buffer = running.buffer
    try:
        if archive:
            wait(lambda: buffer.statistics().archive.state == "archiving", 30, "archiving")
        wait(lambda: buffer.statistics().received > 50, 30, "messages")
        first = buffer.statistics()
        started = time.monotonic()
        max_lag = 0.0
        while time.monotonic() - started < seconds:
            time.sleep(0.5)
            status = buffer.statistics()
            if archive and status.archive.lag_seconds is not None:
                max_lag = max(max_lag, status.archive.lag_seconds)
        last = buffer.statistics()
        elapsed = time.monotonic() - started
        result = {"stream": stream, "archive": archive, "seconds": round(elapsed, 1),
                  "received_per_second": round((last.received - first.received) / elapsed, 2),
                  "forwarded_per_second": round((last.forwarded - first.forwarded) / elapsed, 2),
                  "ring_evicted": last.ring.evicted}
        source.stop()
        if archive:
            newest = last.ring.newest_pulse_id
            final = wait(lambda: (s := buffer.statistics().archive).last_archived_pulse_id is not None
                         and s.last_archived_pulse_id >= newest and s, 60, "the archive to catch up")
            result.update(max_lag_seconds=round(max_lag, 3), lost=final.lost, oversize=final.oversize,
                          archived=final.archived, received=buffer.statistics().received)
        return result
    finally:
        source.stop()
        running.stop()


def saturated(stream: str, nats: NatsServer, seconds: float, variant: str) -> dict:
    """The source as fast as it goes: messages/s the buffer ingests with the archive as ``variant``."""
    profile = STREAMS[stream]
    name = f"SAT_{stream}_{variant}_{int(time.time() * 1000) % 10**8}"
    source, address = sender(profile, 0.0)
    running = RunningBuffer(address, name, nats.url if variant == "child" else None, 200)
    archiver = None
    try:
        if variant == "thread":
            archiver, _ = in_process_archiver(running.buffer.replay_address, nats.url, name)
        wait(lambda: running.buffer.statistics().received > 20, 30, "messages")
        first = running.buffer.statistics()
        started = time.monotonic()
        time.sleep(seconds)
        last = running.buffer.statistics()
        elapsed = time.monotonic() - started
        result = {"stream": stream, "variant": variant,
                  "received_per_second": round((last.received - first.received) / elapsed, 1)}
        if variant == "thread":
            result["archived"] = archiver.status.archived
            result["lost"] = archiver.status.lost
        elif variant == "child":
            result["archived"] = last.archive.archived
            result["lost"] = last.archive.lost
        return result
    finally:
        if archiver is not None:
            archiver.stop()
        source.stop()
        running.stop()


def drain(stream: str, nats: NatsServer, pulses: int, workdir: Path) -> list[dict]:
    """The same ``pulses`` into a writer from the ring and from the archive, in the same run."""
    profile = STREAMS[stream]
    name = f"DRAIN_{stream}_{int(time.time() * 1000) % 10**8}"
    source, address = sender(profile, 300.0)
    running = RunningBuffer(address, name, nats.url, pulses + 200)
    buffer = running.buffer
    results = []
    try:
        wait(lambda: buffer.statistics().archive.state == "archiving", 30, "archiving")
        wait(lambda: buffer.statistics().received >= pulses + 20, 600, f"{pulses} messages", 0.2)
        source.stop()
        status = buffer.statistics()
        first = status.ring.oldest_pulse_id + 5
        stop = first + pulses - 1
        wait(lambda: (buffer.statistics().archive.last_archived_pulse_id or 0) >= stop, 120, "the archive")
        assert buffer.statistics().archive.lost == 0
        for origin, address_ in (("ring", buffer.replay_address), ("archive", f"{nats.url}/{name}"),
                                 ("ring", buffer.replay_address), ("archive", f"{nats.url}/{name}")):
            output = workdir / f"{name}-{origin}-{len(results)}.h5"
            writer = common.Child([sys.executable, "-m", "sf_bsread_writer.writer", address_, str(output), "-1", "0",
                                   "--finished-grace", "0"], ready="READY")
            rest = json.loads(writer.ready_line.split(" ", 1)[1])["rest"]
            http("POST", rest + "/parameters", {"general/created": "now", "general/user": "bench",
                                                "general/process": "bench", "general/instrument": "bench"})
            http("PUT", rest + f"/stop_pulse_id/{stop}")
            started = time.monotonic()
            http("PUT", rest + f"/start_pulse_id/{first}")
            writer.process.wait(600)
            elapsed = time.monotonic() - started
            summary = json.loads(Path(str(output) + ".summary.json").read_text())
            results.append({"stream": stream, "origin": origin, "pulses": summary["messages_written"],
                            "outcome": summary["outcome"], "seconds": round(elapsed, 2),
                            "messages_per_second": round(summary["messages_written"] / elapsed, 1),
                            "MB_per_second": round(summary["bytes_written"] / elapsed / 1e6, 1)})
            output.unlink(missing_ok=True)
            print(json.dumps(results[-1]), flush=True)
    finally:
        source.stop()
        running.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=60.0, help="per keeps-up run")
    parser.add_argument("--saturate", type=float, default=10.0, help="per thread/process run")
    parser.add_argument("--range", type=int, default=3000, help="pulses per drain")
    parser.add_argument("--streams", default="camera,scalars")
    parser.add_argument("--parts", default="keeps_up,saturate,drain")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    print(f"# {common.machine_note()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_archive-") as workdir:
        nats = NatsServer(Path(workdir) / "nats")
        try:
            for stream in args.streams.split(","):
                if "keeps_up" in parts:
                    for archive in (False, True):
                        print(json.dumps(keeps_up(stream, nats, args.seconds, archive)), flush=True)
                if "saturate" in parts:
                    for variant in ("none", "child", "thread", "none"):
                        print(json.dumps(saturated(stream, nats, args.saturate, variant)), flush=True)
                if "drain" in parts:
                    drain(stream, nats, args.range, Path(workdir))
        finally:
            nats.stop()
    print(f"# {common.machine_note()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
