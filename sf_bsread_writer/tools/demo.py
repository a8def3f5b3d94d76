"""`make demo`: the main job end to end on built-in defaults.

A simulated source (bsread's own Sender: a camera image, scalars and
strings, compressed and not) feeds a buffer. Once the buffer holds a few
seconds of data, a writer is launched and told over REST to write a pulse
range that *began before the writer existed* (the point of the buffer). The
writer finishes and exits by itself; the file is then summarised the way
``h5ls -r`` would show it, with the pulse range and what is missing.

Every process binds 127.0.0.1 on a free port (port 0) and is stopped at the
end, whatever happens.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

from sf_bsread_writer import process
from sf_bsread_writer.status import BufferStatus

__all__ = ["main", "summarize_file"]

logger = logging.getLogger(__name__)

OUTPUT_DIR = Path("demo-output")
RANGE_LENGTH = 200  # pulses (2 s at 100 Hz)


class _Process:
    """A child process whose output is echoed with a tag and searched for its READY line."""

    def __init__(self, tag: str, args: list[str]) -> None:
        self.tag = tag
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.popen = process.start_child(  # dies with the demo, however it ends (its `finally` stops it first)
            [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.ready: dict | None = None
        self._ready_event = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            ready = process.parse_ready(line)
            if ready is not None and self.ready is None:
                self.ready = ready
                self._ready_event.set()
            print(f"  [{self.tag}] {line}", flush=True)
        self._ready_event.set()

    def wait_ready(self, timeout: float = 30.0) -> dict:
        if not self._ready_event.wait(timeout) or self.ready is None:
            raise RuntimeError(f"{self.tag} did not become ready (exit code {self.popen.poll()})")
        return self.ready

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _poll(what: str, condition: Callable[[], object], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def summarize_file(path: str | os.PathLike) -> str:
    """Describe an output file like ``h5ls -r`` does, plus pulse range and missing pulses."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading)

    lines: list[str] = []
    with h5py.File(path, "r") as file:
        def visit(name: str, node: object) -> None:
            if isinstance(node, h5py.Dataset):
                shape = ", ".join(str(n) for n in node.shape) or "scalar"
                filters = " bitshuffle" if "32008" in node._filters else ""  # noqa: SLF001
                lines.append(f"/{name:<60} Dataset {{{shape}}} {node.dtype}{filters}")
            else:
                lines.append(f"/{name:<60} Group")
        file.visititems(visit)
        lines.append("")
        for key in sorted(file.attrs):
            value = file.attrs[key]
            if isinstance(value, bytes):
                value = value.decode()
            lines.append(f"attribute {key} = {value}")
        channels = list(file.get("data", {}))
        if channels:
            first = file["data"][channels[0]]
            pulse_ids = first["pulse_id"][()]
            present = first["is_data_present"][()].astype(bool)
            if present.any():
                lines.append(f"\n{len(channels)} channels, {len(pulse_ids)} rows, pulse_id "
                             f"{pulse_ids[present].min()} .. {pulse_ids[present].max()}")
    return "\n".join(lines)


def _buffer_statistics(rest_url: str) -> BufferStatus:
    return BufferStatus.from_json(requests.get(f"{rest_url}/statistics", timeout=5).json()["statistics"])


def run(output_dir: Path = OUTPUT_DIR) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    output_file = (output_dir / "demo.h5").resolve()
    if output_file.exists():
        output_file.unlink()
    processes: list[_Process] = []
    try:
        print("1. simulator: camera image (bitshuffle_lz4), scalars and strings at 100 Hz", flush=True)
        simulator = _Process("simulate", ["sf_bsread_writer.tools.simulate", "--profile", "demo", "--port", "0",
                                          "--rate", "100"])
        processes.append(simulator)
        source = simulator.wait_ready()["address"]

        print(f"2. buffer ingesting {source}", flush=True)
        buffer = _Process("buffer", ["sf_bsread_writer.buffer", source, "-o", "0", "--replay-port", "0",
                                     "--rest-port", "0", "-b", "2000"])
        processes.append(buffer)
        endpoints = buffer.wait_ready()
        rest = endpoints["rest"]

        # Let the buffer accumulate: the range to write lies entirely in the past.
        stats = _poll("300 messages in the buffer",
                      lambda: (s := _buffer_statistics(rest)).ring.messages >= 300 and s, 60)
        start_pulse_id = stats.ring.oldest_pulse_id + 50
        stop_pulse_id = start_pulse_id + RANGE_LENGTH - 1
        print(f"3. buffer holds pulses {stats.ring.oldest_pulse_id}..{stats.ring.newest_pulse_id};"
              f" writing {start_pulse_id}..{stop_pulse_id}, a range that is already past", flush=True)

        writer = _Process("writer", ["sf_bsread_writer.writer", endpoints["replay"], str(output_file), "-1", "0",
                                     "--finished-grace", "0.5"])
        processes.append(writer)
        api = writer.wait_ready()["rest"]
        parameters = {"general/created": time.strftime("%Y-%m-%dT%H:%M:%S"), "general/user": "demo",
                      "general/process": "sf_bsread_writer.tools.demo", "general/instrument": "simulation"}
        for method, path, body in (("POST", "/parameters", parameters),
                                   ("PUT", f"/start_pulse_id/{start_pulse_id}", None),
                                   ("PUT", f"/stop_pulse_id/{stop_pulse_id}", None)):
            answer = requests.request(method, api + path, json=body, timeout=5).json()
            print(f"   {method} {path} -> {answer}", flush=True)
            if answer.get("state") != "ok":
                raise RuntimeError(f"writer refused {method} {path}: {answer}")

        print("4. waiting for the writer to finish and exit by itself", flush=True)
        code = writer.popen.wait(timeout=120)
        if code != 0:
            raise RuntimeError(f"writer exited with {code}")
        print(f"\n5. {output_file}:\n", flush=True)
        print(summarize_file(output_file), flush=True)
        return output_file
    finally:
        for child in reversed(processes):
            child.stop()


def main(argv: list[str] | None = None) -> int:
    process.service_start()  # first: the process-wide knobs, before anything loads bitshuffle
    process.configure_logging("INFO")
    try:
        run()
    except (RuntimeError, requests.RequestException, subprocess.TimeoutExpired) as error:
        logger.error("demo failed: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
