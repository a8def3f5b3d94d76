#!/usr/bin/env python
"""The writer draining a backlog from the buffer into HDF5, against bare loops; and its RSS over a long run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_writer.py --profiles camera,scalars --repeat 3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_writer.py --profiles "" --soak-minutes 10

Throughput (per profile): a fast raw sender (a ZMTP PUSH peer on a plain TCP
socket, frames pre-built with ``protocol.build_message``, one ``sendmsg`` per
message) fills a real buffer process (``python -m sf_bsread_writer.buffer``,
ring sized to hold everything) with N messages and stops; once the buffer's
/statistics shows all N held, every variant drains the same held range
[first, first + N - 1] through the buffer's replay endpoint, repeat after
repeat, interleaved (so machine noise hits them alike):

  writer        the real writer CLI (``python -m sf_bsread_writer.writer REPLAY out.h5 -1 0``),
                REST POST /parameters, PUT /start_pulse_id, PUT /stop_pulse_id; timed from the
                start request to /status == finished (file closed); its /statistics rate is shown too
  writer-tuned  (--tuned-variant) the same with glibc malloc set as process.tune_allocator() sets it
                (GLIBC_TUNABLES), from before exec; the writer calls it itself since issue 14 (and its
                ReplayClient since issue 24), so this now differs only in when the setting takes effect
  writer-python (--python-variant) the writer with SF_BSREAD_NO_EXTENSION=1 (the pure pyzmq fallback)
  writer-baseline  (--baseline-tree DIR) the writer CLI of another checkout (e.g. a git worktree of
                an older commit), for before/after in one run; the buffer is this checkout's
  bare          fed directly by a PUSH socket with the same frames (a feeder child fetched them
                from the buffer once, untimed, and sends them when the bare child connects: the
                replay path's cost is the writer's alone): camera: ``recv_multipart`` +
                ``dataset.id.write_direct_chunk`` per image into an h5py dataset with the
                bitshuffle filter (preallocated, one chunk per image), file created and closed in
                the timed window; scalars: the compiled whole-message receive (partsio), no
                parsing, no writing. Until issue 24 the bare loop read through a ReplayClient too
                and started its timer before importing h5py: 0.95-1.18x then, 0.53x measured so.
  replay-receive   (--receive-variants) a ReplayClient draining the buffer, receive only (the client
                sets its process's allocator: ``keep_receive_memory``, issue 24)
  replay-receive-untuned  (--receive-variants, camera) the same with keep_receive_memory=False: the
                client before issue 24's fix, for before/after in one run
  direct-receive   (--receive-variants, camera) ``recv_multipart`` from the feeder, receive only
                (glibc's allocator at its defaults, as a plain pyzmq loop has it: the baseline)
  direct-receive-tuned  (--receive-variants, camera) the same after ``process.tune_allocator()``: what
                the replay path costs apart from memory (not the baseline)
  original      scalars only: ReplayClient + MessageParser + the original writer's element-by-element
                pattern (per message and channel: resize data/pulse_id/is_data_present by one row and
                write one element each); on --original-messages messages (it is slow), rate measured
                on those, the time for N extrapolated and labelled so

The bare loops and the original run in a fresh child process each, as the
writer does. The first drain after a fill is 2-5x slower whatever runs it
(this VM backs guest memory lazily: ``touch_memory``); the order of the
variants alternates per repeat (--bare-first: the bare loop opens), and
--touch-gb makes that first drain meet memory touched before. --warmup
drains (default 0, the bare variant, not counted) are the old remedy. Profiles: ``camera`` one 1024x1280 uint16 image in
bitshuffle_lz4 (a smooth spot on a pedestal + Gaussian noise, so it
compresses like a real camera, ~2x), sent by the raw sender; ``camera-psi`` the same shape from
psi-bsread's own ``Sender`` (bsread.sender.Sender, PUSH, data_compression bitshuffle_lz4, which
compresses each image as it sends it) with Poisson noise (lambda 50: 1.04 MB compressed, block size
8192 bytes, so direct-chunk compatible), the images a DAQ team tried; ``scalars`` 500 float64
channels (1002 parts).

Every variant reports its process's user and system CPU seconds and minor page faults at the end
(the writer's from /proc/PID/stat once it finished, a bare child's from getrusage): whole
processes, start-up included, as a DAQ system pays them; per image in the report.

Soak (--soak-minutes M): ``sf_bsread_writer.tools.simulate --profile demo --rate 100`` -> buffer ->
writer (start_now, stop pulse 10^9 pulses ahead) for M minutes; the writer's
VmRSS (/proc/PID/status) is sampled every --soak-interval seconds and printed
with the slope after the first minute; then PUT /stop_now and the file is
checked with h5py.

Everything binds 127.0.0.1 with port 0 (actual ports from READY lines),
every child is terminated in ``finally`` (killed if it does not exit), all
files live in a temporary directory removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402  (sets OMP_NUM_THREADS before bitshuffle loads)

PY = sys.executable
FIRST = common.FIRST_PULSE_ID
CAMERA_SPEC = {"name": "CAM:FPICTURE", "type": "uint16", "shape": [1280, 1024], "compression": "bitshuffle_lz4"}
PARAMETERS = {"general/created": "2026-11-21T00:00:00", "general/user": "bench", "general/process": "bench_writer",
              "general/instrument": "loopback"}


# ---------------------------------------------------------------- messages

def camera_image(seed: int) -> "Any":
    """1024x1280 uint16: a smooth Gaussian spot on a pedestal plus Gaussian noise (sigma 8 counts)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:1024, 0:1280]
    x0, y0 = 640 + 40 * np.sin(seed), 512 + 30 * np.cos(seed)
    spot = 2500.0 * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * 180.0 ** 2))
    gradient = 100.0 + 0.05 * x + 0.03 * y
    image = gradient + spot + rng.normal(0.0, 8.0, size=(1024, 1280))
    return np.clip(image, 0, 4095).astype("<u2")


def message_templates(profile: str, distinct: int = 4) -> list[list[bytes]]:
    """Pre-built messages of the profile (same data header, ``distinct`` different value sets)."""
    from sf_bsread_writer.bsread.build import build_message

    if profile == "camera":
        return [build_message(FIRST, [CAMERA_SPEC], [camera_image(seed)], timestamp=1_700_000_000.0)
                for seed in range(distinct)]
    if profile.startswith("scalars") and (profile[7:].isdigit() or profile == "scalars"):
        n = int(profile[7:] or 500)  # scalarsN: N float64 channels; scalars = 500
        channels = [{"name": f"SARFE10-PBPG050:SIGNAL-{i:03d}", "type": "float64"} for i in range(n)]
        return [build_message(FIRST, channels, [float(i) + seed * 0.25 for i in range(n)],
                              timestamp=1_700_000_000.0) for seed in range(distinct)]
    raise ValueError(f"unknown profile {profile!r}")


def poisson_image(seed: int, lam: float = 50.0) -> "Any":
    """1024x1280 uint16 Poisson noise (lambda 50): 1.04 MB in bitshuffle_lz4, as psi-bsread compresses it."""
    import numpy as np

    return np.random.default_rng(seed).poisson(lam, size=(1024, 1280)).astype("<u2")


def run_psi_sender(count: int) -> None:
    """Child: psi-bsread's Sender binds a PUSH socket and sends ``count`` Poisson images, then idles.

    The Sender compresses each image (bitshuffle_lz4, its own block size) as it
    sends it, as a camera server using bsread does; it blocks while the buffer
    is not connected or is slow (queue_size 10), so nothing is dropped.
    """
    from bsread.data.compression import BitshuffleLZ4
    from bsread.sender import PUSH, Sender

    images = [poisson_image(seed) for seed in range(4)]
    port = common.free_port()
    sender = Sender(port=port, address="tcp://127.0.0.1", mode=PUSH, queue_size=10, start_pulse_id=FIRST,
                    data_compression="bitshuffle_lz4")
    sender.add_channel(CAMERA_SPEC["name"], metadata={"type": "uint16", "shape": [1280, 1024]})
    sender.open()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    value_bytes = len(BitshuffleLZ4.pack_data(images[0], "uint16"))
    print("READY " + json.dumps({"port": port, "message_bytes": value_bytes + 600, "value_bytes": value_bytes}),
          flush=True)
    for n in range(count):
        sender.send(data={CAMERA_SPEC["name"]: images[n % len(images)]}, pulse_id=FIRST + n,
                    timestamp=time.time())
    print(f"SENT {count}", flush=True)
    while True:
        time.sleep(3600)


def run_sender(profile: str, count: int) -> None:
    """Child: serve one PULL peer with ``count`` messages as fast as possible, then idle until SIGTERM."""
    templates = message_templates(profile)
    headers = common.HeaderFactory(templates[0][0])
    tails = [b"".join(common.zmtp_frame(part, i < len(t) - 2) for i, part in enumerate(t[1:])) for t in templates]
    value_bytes = sum(len(t[2]) for t in templates) / len(templates)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY " + json.dumps({"port": server.getsockname()[1],
                                 "message_bytes": sum(map(len, templates[0])), "value_bytes": value_bytes}),
          flush=True)
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    common.zmtp_handshake(conn, b"PUSH")
    for n in range(count):
        conn.sendmsg([common.zmtp_frame(headers(FIRST + n, time.time()), True), tails[n % len(tails)]])
    print(f"SENT {count}", flush=True)
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------- bare loops (children)

def run_feeder(replay: str, first: int, last: int) -> None:
    """Child: fetch [first, last] from the buffer once (not timed), then PUSH exactly those frames to one peer.

    The bare loops read from this, not from the buffer: the baseline of a
    writer that drains the buffer is a loop fed directly by a socket with
    the same frames, so that the replay path's cost is measured on the
    writer's side only (issue 24: a bare loop behind a ReplayClient carried
    that cost too and made the writer look 2x better than it was). PUSH
    bound with no peer blocks, so nothing is queued before the bare loop
    connects (its timer runs from before its connect).
    """
    import zmq

    from sf_bsread_writer.replay.client import ReplayClient
    from sf_bsread_writer.replay.messages import Data, End
    from sf_bsread_writer.transport.partsio import send_parts

    messages = []
    with ReplayClient(replay, start_pulse_id=first, stop_pulse_id=last) as client:
        while True:
            event = client.receive(10.0)
            if isinstance(event, Data):
                messages.append(event.frames)
            elif isinstance(event, End) or event is None:
                break
    if len(messages) != last - first + 1:
        raise RuntimeError(f"the feeder got {len(messages)} of {last - first + 1} messages from the buffer")
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY " + json.dumps({"port": port, "messages": len(messages)}), flush=True)
    for frames in messages:
        send_parts(push, frames)
    print(f"SENT {len(messages)}", flush=True)
    while True:
        time.sleep(3600)


def _result(received: int, seconds: float, before: "resource.struct_rusage") -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"messages": received, "seconds": seconds, "user": usage.ru_utime,
                                  "sys": usage.ru_stime, "minflt": usage.ru_minflt,
                                  "drain_user": usage.ru_utime - before.ru_utime,
                                  "drain_sys": usage.ru_stime - before.ru_stime,
                                  "drain_minflt": usage.ru_minflt - before.ru_minflt}), flush=True)


def run_bare(kind: str, source: str, first: int, last: int, out: str) -> None:
    """Child: one bare loop (``kind``) over [first, last]; print RESULT {messages, seconds, CPU}.

    ``source``: the feeder's PUSH address for the direct kinds (``bare-camera``:
    ``recv_multipart`` + ``write_direct_chunk`` per image, the file created and
    closed inside the timed window as the writer's is; ``bare-scalars``: the
    compiled whole-message receive, no parsing, no writing;
    ``direct-receive``: ``recv_multipart`` only; ``direct-receive-tuned``: the
    same after ``process.tune_allocator()``), the buffer's replay address for
    ``replay-receive`` (a ReplayClient, receive only; ``-untuned``: with
    ``keep_receive_memory=False``) and ``original``.
    Every import comes before the timer starts.
    """
    import h5py
    import hdf5plugin
    import zmq

    from sf_bsread_writer.bsread.message import MessageParser
    from sf_bsread_writer.replay.client import ReplayClient
    from sf_bsread_writer.replay.messages import Data, End, Refused
    from sf_bsread_writer.transport.partsio import PartsReceiver

    count = last - first + 1
    received = 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if kind == "direct-receive-tuned":
        from sf_bsread_writer.process import tune_allocator

        tune_allocator()
    if kind in DIRECT_KINDS:
        context = zmq.Context()
        pull = context.socket(zmq.PULL)
        pull.connect(source)
        if kind == "bare-camera":
            with h5py.File(out, "w") as f:
                dataset = f.create_dataset("data", (count, 1024, 1280), chunks=(1, 1024, 1280), dtype="<u2",
                                           **hdf5plugin.Bitshuffle(cname="lz4"))
                write = dataset.id.write_direct_chunk
                for row in range(count):
                    frames = pull.recv_multipart(copy=False)
                    write((row, 0, 0), frames[2].buffer)
                    received += 1
        elif kind == "bare-scalars":
            receiver = PartsReceiver(implementation="compiled")
            for _ in range(count):
                receiver.receive(pull)
                received += 1
        else:
            for _ in range(count):
                pull.recv_multipart(copy=False)
                received += 1
        seconds = time.perf_counter() - start
        pull.close(linger=0)
        context.term()
        _result(received, seconds, before)
        return
    with ReplayClient(source, start_pulse_id=first, stop_pulse_id=last,
                      keep_receive_memory=kind != "replay-receive-untuned") as client:
        if kind in ("replay-receive", "replay-receive-untuned"):
            handle = None
        elif kind == "original":
            f = h5py.File(out, "w")
            original = common.OriginalPatternWriter(f)
            parser = MessageParser()
            handle = lambda frames: original.append(parser.parse(frames))  # noqa: E731
        else:
            raise ValueError(kind)
        while True:
            event = client.receive(5.0)
            if isinstance(event, Data):
                if handle is not None:
                    handle(event.frames)
                received += 1
            elif isinstance(event, End) or event is None:
                break
            elif isinstance(event, Refused):
                raise RuntimeError(event)
        if kind == "original":
            f.close()
    seconds = time.perf_counter() - start
    zmq.Context.instance().term()
    _result(received, seconds, before)


def run_profiled_writer(argv: list[str], out: str) -> int:
    """Child: the writer CLI with cProfile around the run thread's loop (RunLoop.run); stats dumped to ``out``."""
    import cProfile

    from sf_bsread_writer.writer import cli, run_loop

    original = run_loop.RunLoop.run

    def profiled(self: Any) -> str:
        profile = cProfile.Profile()
        profile.enable()
        try:
            return original(self)
        finally:
            profile.disable()
            profile.dump_stats(out)

    run_loop.RunLoop.run = profiled
    return cli.main(argv)


# ---------------------------------------------------------------- parent helpers

def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{method} {url}: HTTP {error.code}: {error.read()[:300]!r}") from None


def ready_json(child: common.Child) -> dict:
    return json.loads(child.ready_line.split(" ", 1)[1])


def child_result(child: common.Child, timeout: float) -> dict:
    """Wait for the child's RESULT line (the child is killed on timeout by the caller's finally)."""
    try:
        line = child.wait_for_line(lambda line: line.startswith("RESULT "), timeout)
    except AssertionError as error:  # exited without one, or none within the timeout
        raise RuntimeError(f"no result from the child: {error}") from None
    return json.loads(line.split(" ", 1)[1])


def wait_held(rest: str, count: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = http("GET", rest + "/statistics")["statistics"]
        if stats["ring"]["messages"] >= count and stats["received"] >= count:
            return stats
        time.sleep(0.2)
    raise TimeoutError(f"the buffer did not hold {count} messages within {timeout} s: {stats['ring']}")


def proc_cpu(pid: int) -> dict:
    """user and system CPU seconds and minor page faults of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"user": int(fields[11]) / tick, "sys": int(fields[12]) / tick, "minflt": int(fields[7])}


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# glibc malloc settings equal to process.tune_allocator()'s, given to the writer through the environment
# (variant writer-tuned; from issue 14, when the writer did not call it yet: it does now).
TUNED_MALLOC_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"}


def writer_env(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, str] | None:
    """The environment that makes a writer variant (module docstring)."""
    if kind == "writer-tuned":
        return TUNED_MALLOC_ENV
    if kind == "writer-python":
        return {"SF_BSREAD_NO_EXTENSION": "1"}
    if kind == "writer-baseline":
        return {"PYTHONPATH": str(common.baseline_site(args.baseline_tree))}
    return None


def start_writer(replay: str, out: str, extra: list[str] | None = None, profile_out: str | None = None,
                 env: dict[str, str] | None = None) -> common.Child:
    argv = [replay, out, "-1", "0", "--log_level", "WARNING", "--finished-grace", "3"] + (extra or [])
    if profile_out:
        args = [PY, str(HERE / "bench_writer.py"), "--_profiled-writer", profile_out, "--"] + argv
    else:
        args = [PY, "-m", "sf_bsread_writer.writer"] + argv
    return common.Child(args, ready="READY", timeout=60, env=env)


def wait_state(rest: str, states: tuple[str, ...], timeout: float, interval: float = 0.02) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http("GET", rest + "/status")["status"]
        if status in states:
            return status
        time.sleep(interval)
    raise TimeoutError(f"writer not in {states} within {timeout} s (last: {status})")


def measure_writer(replay: str, first: int, last: int, out: str, timeout: float,
                   profile_out: str | None = None, env: dict[str, str] | None = None) -> dict:
    writer = start_writer(replay, out, profile_out=profile_out, env=env)
    try:
        rest = ready_json(writer)["rest"]
        http("POST", rest + "/parameters", PARAMETERS)
        before = proc_cpu(writer.process.pid)
        start = time.perf_counter()
        http("PUT", f"{rest}/start_pulse_id/{first}")
        http("PUT", f"{rest}/stop_pulse_id/{last}")
        state = wait_state(rest, ("finished", "error"), timeout)
        seconds = time.perf_counter() - start
        stats = http("GET", rest + "/statistics")["statistics"]
        cpu = proc_cpu(writer.process.pid)
        if state != "finished":
            raise RuntimeError(f"writer ended in {state}: {stats.get('error')}")
        writer.process.wait(30)
        return {"messages": stats["messages_written"], "seconds": seconds, "stat_rate": stats["rate"],
                "missing": stats["missing_pulses"], **cpu, **{f"drain_{k}": cpu[k] - before[k] for k in cpu}}
    finally:
        writer.stop()


DIRECT_KINDS = ("bare-camera", "bare-scalars", "direct-receive", "direct-receive-tuned")


def measure_child(kind: str, replay: str, first: int, last: int, out: str, timeout: float) -> dict:
    """A bare loop in a fresh child; the direct kinds read from a fresh feeder holding the same frames."""
    feeder = None
    try:
        source = replay
        if kind in DIRECT_KINDS:
            feeder = common.Child([PY, str(HERE / "bench_writer.py"), "--_feeder", replay, str(first), str(last)],
                                  timeout=max(120.0, timeout))
            source = f"tcp://127.0.0.1:{ready_json(feeder)['port']}"
        child = common.Child([PY, str(HERE / "bench_writer.py"), "--_bare", kind, source, str(first), str(last),
                              out], ready="", timeout=60)  # no READY: the first line of output is fine
        try:
            return child_result(child, timeout)
        finally:
            child.stop()
    finally:
        if feeder is not None:
            feeder.stop()


def touch_memory(gigabytes: float) -> None:
    """A child writes ``gigabytes`` of new memory and exits, twice; both times are printed.

    This machine is a VM whose host backs guest memory lazily: memory the guest
    touches for the first time costs the host's page fault on top of the
    guest's, seen as system time in whichever process touches it (the kernel
    zeroing an anonymous page, or copying a file write into a new page-cache
    page). The first drain after a buffer fill pays that; a machine with its
    memory backed does not. This makes the first measured drain meet memory
    the guest has touched before, and says how slow the first touch was.
    """
    code = f"import numpy, time; t = time.perf_counter(); a = numpy.ones({int(gigabytes * 2**30) // 8}); " \
           "print(f'{time.perf_counter() - t:.2f}')"
    seconds = [subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
               for _ in range(2)]
    print(f"# touched {gigabytes:g} GB of memory in a child, twice: {seconds[0]} s, then {seconds[1]} s", flush=True)


def check_rows(path: str, dataset: str) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f[dataset].shape[0])


# ---------------------------------------------------------------- throughput

def throughput(profile: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    camera = profile.startswith("camera")
    count = args.messages or (1000 if camera else 2000)
    first, last = FIRST, FIRST + count - 1
    source = ["--_psi-sender", str(count)] if profile == "camera-psi" else ["--_sender", profile, str(count)]
    sender = common.Child([PY, str(HERE / "bench_writer.py"), *source], timeout=120)
    buffer = None
    results: list[dict] = []
    try:
        info = ready_json(sender)
        ring_bytes = int(count * info["message_bytes"] * 1.2) + 64 * 2**20
        buffer = common.Child([PY, "-m", "sf_bsread_writer.buffer", f"tcp://127.0.0.1:{info['port']}", "-o", "0",
                               "--replay-port", "0", "--rest-port", "0", "-b", str(count + 16),
                               "--buffer-bytes", str(ring_bytes), "--log_level", "WARNING"], timeout=60)
        endpoints = ready_json(buffer)
        fill_start = time.perf_counter()
        held = wait_held(endpoints["rest"], count, timeout=max(120.0, count / 5))
        print(f"# {profile}: {count} messages of {info['message_bytes'] / 1e3:.0f} kB held "
              f"(value part {info['value_bytes'] / 1e6:.3f} MB) after {time.perf_counter() - fill_start:.1f} s; "
              f"ring {held['ring']['bytes'] / 1e6:.0f} MB; oldest {held['ring']['oldest_pulse_id']}", flush=True)
        bare = "bare-camera" if camera else "bare-scalars"
        kinds = ["writer", bare]
        if args.receive_variants:  # item 1 of issue 24: the replay path against a direct socket, receive only
            kinds += (["replay-receive", "replay-receive-untuned", "direct-receive", "direct-receive-tuned"] if camera
                      else ["replay-receive"])
        if args.tuned_variant:
            kinds.insert(1, "writer-tuned")
        if args.python_variant:
            kinds.insert(1, "writer-python")
        if args.baseline_tree:
            kinds.insert(1, "writer-baseline")
        if profile == "scalars" and args.original_messages:
            kinds.append("original")
        if args.touch_gb:
            touch_memory(args.touch_gb)
        for warmup in range(args.warmup):
            # Unmeasured: the first drain after the fill was often 2-5x slower (kernel time) whichever
            # variant ran it; without this the writer, first in repeat 1, always took that hit.
            out = str(workdir / f"{profile}-warmup-{warmup}.h5")
            result = measure_child(bare, endpoints["replay"], first, last, out, timeout=args.timeout)
            print(f"  {profile:8s} warm-up ({bare}), not counted: {result['messages'] / result['seconds']:.1f} msg/s",
                  flush=True)
            if os.path.exists(out):
                os.unlink(out)
        for repeat in range(args.repeat):
            # Alternate the order (writer first, then bare first, ...): a run right after another
            # one's large file was deleted, or while the page cache writes it back, is not penalised
            # always on the same side.
            for kind in (kinds if (repeat + args.bare_first) % 2 == 0 else kinds[::-1]):
                out = str(workdir / f"{profile}-{kind}-{repeat}.h5")
                load = os.getloadavg()[0]
                if kind.startswith("writer"):
                    result = measure_writer(endpoints["replay"], first, last, out, timeout=args.timeout,
                                            env=writer_env(kind, args, workdir))
                    rows = check_rows(out, f"data/{'CAM:FPICTURE' if camera else 'SARFE10-PBPG050:SIGNAL-000'}/pulse_id")
                    if rows != count:
                        raise RuntimeError(f"writer file has {rows} rows, expected {count}")
                elif kind == "original":
                    o_last = first + min(count, args.original_messages) - 1
                    result = measure_child(kind, endpoints["replay"], first, o_last, out, timeout=args.timeout)
                else:
                    result = measure_child(kind, endpoints["replay"], first, last, out, timeout=args.timeout)
                result.update(profile=profile, kind=kind, repeat=repeat, load=load,
                              rate=result["messages"] / result["seconds"],
                              bytes=info["message_bytes"], size=os.path.getsize(out) if os.path.exists(out) else 0)
                if os.path.exists(out):
                    os.unlink(out)
                results.append(result)
                extra = (f" (writer /statistics rate {result['stat_rate']:.1f})" if "stat_rate" in result else "")
                if "sys" in result:
                    extra += (f"; process user {result['user']:.2f} s, sys {result['sys']:.2f} s, "
                              f"{result['minflt']} minor faults")
                print(f"  {profile:8s} {kind:13s} run {repeat + 1}: {result['messages']} msg in "
                      f"{result['seconds']:.2f} s = {result['rate']:.1f} msg/s{extra}, load {load:.2f}", flush=True)
        if args.profile_writer:
            prof = str(Path(args.profile_writer) / f"writer-{profile}.prof")
            out = str(workdir / f"{profile}-profiled.h5")
            result = measure_writer(endpoints["replay"], first, last, out, timeout=args.timeout, profile_out=prof)
            print(f"  {profile:8s} writer under cProfile: {result['messages'] / result['seconds']:.1f} msg/s; "
                  f"stats in {prof}", flush=True)
            os.unlink(out)
    finally:
        if buffer is not None:
            buffer.stop()
        sender.stop()
    return results


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n# {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}; medians of {args.repeat} runs")
    writers = [w for w in ("writer", "writer-tuned", "writer-python", "writer-baseline")
               if any(r["kind"] == w for r in results)]
    print("| profile | message | variant | messages | msg/s (median) | runs (msg/s) | MB/s | "
          + " | ".join(f"{w} / this" for w in writers) + " | load (1 min) |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(writers) + "---|")
    for profile in dict.fromkeys(r["profile"] for r in results):
        rows = [r for r in results if r["profile"] == profile]
        medians = {}
        for kind in dict.fromkeys(r["kind"] for r in rows):
            medians[kind] = statistics.median(r["rate"] for r in rows if r["kind"] == kind)
        for kind, median in medians.items():
            runs = [r for r in rows if r["kind"] == kind]
            ratios = " | ".join(f"{medians[w] / median:.2f}x" for w in writers)
            label = kind
            count = runs[0]["messages"]
            if kind == "original":
                full = args.messages or 2000
                label = (f"original element-by-element (measured on {count} msg; for {full}: "
                         f"~{full / median:.0f} s extrapolated)")
            loads = "/".join(f"{r['load']:.1f}" for r in runs)
            print(f"| {profile} | {runs[0]['bytes'] / 1e3:.0f} kB | {label} | {count} | {median:.1f} | "
                  f"{' / '.join(format(r['rate'], '.1f') for r in runs)} | {median * runs[0]['bytes'] / 1e6:.0f} | "
                  f"{ratios} | {loads} |")
        print()
        for w in writers:
            by_repeat = {r["repeat"]: r["rate"] for r in rows if r["kind"] == w}
            for kind in medians:
                if kind.startswith("bare"):
                    paired = [by_repeat[r["repeat"]] / r["rate"] for r in rows if r["kind"] == kind]
                    print(f"{profile}: {w} / {kind} paired per repeat: {' / '.join(format(x, '.2f') for x in paired)}"
                          f" (median {statistics.median(paired):.2f}x)")
            stat_rates = [r["stat_rate"] for r in rows if r["kind"] == w]
            print(f"{profile}: {w} own /statistics rate: {' / '.join(format(x, '.1f') for x in stat_rates)}")
        # Issue 24, point 1: the replay's receive against a directly fed socket, paired per repeat.
        for numerator, denominator in (("replay-receive", "direct-receive"), ("replay-receive-untuned", "direct-receive"),
                                       ("replay-receive", "replay-receive-untuned"),
                                       ("replay-receive", "direct-receive-tuned")):
            by_repeat = {r["repeat"]: r["rate"] for r in rows if r["kind"] == denominator}
            paired = [r["rate"] / by_repeat[r["repeat"]] for r in rows
                      if r["kind"] == numerator and r["repeat"] in by_repeat]
            if paired:
                print(f"{profile}: {numerator} / {denominator} paired per repeat: "
                      f"{' / '.join(format(x, '.2f') for x in paired)} (median {statistics.median(paired):.2f}x)")
        print(f"\n{profile}: CPU and faults per message while draining (from the start request / the drain's "
              f"first receive to the end; medians, runs in order), and the whole process (start-up included)")
        print("| variant | user ms / msg | system ms / msg | minor faults / msg | system ms / msg (runs) | "
              "whole process: user s, sys s, minor faults (median) |")
        print("|---|---|---|---|---|---|")
        for kind in medians:
            runs = [r for r in rows if r["kind"] == kind and "drain_sys" in r]
            if not runs:
                continue
            per = {key: [(1e3 if key != "minflt" else 1.0) * r[f"drain_{key}"] / r["messages"] for r in runs]
                   for key in ("user", "sys", "minflt")}
            whole = ", ".join(format(statistics.median(r[key] for r in runs), fmt)
                              for key, fmt in (("user", ".2f"), ("sys", ".2f"), ("minflt", ".0f")))
            print(f"| {kind} | {statistics.median(per['user']):.2f} | {statistics.median(per['sys']):.2f} | "
                  f"{statistics.median(per['minflt']):.0f} | {' / '.join(format(x, '.2f') for x in per['sys'])} | "
                  f"{whole} |")


# ---------------------------------------------------------------- soak

def soak(args: argparse.Namespace, workdir: Path) -> None:
    import h5py
    import hdf5plugin  # noqa: F401  (registers the bitshuffle/lz4 filters for reading back)
    import numpy as np

    minutes = args.soak_minutes
    simulator = buffer = writer = None
    try:
        simulator = common.Child([PY, "-m", "sf_bsread_writer.tools.simulate", "--profile", "demo", "--port", "0",
                                  "--rate", "100", "--log_level", "WARNING"], timeout=60)
        address = ready_json(simulator)["address"]
        buffer = common.Child([PY, "-m", "sf_bsread_writer.buffer", address, "-o", "0", "--replay-port", "0",
                               "--rest-port", "0", "-b", "3000", "--buffer-bytes", str(1024**3),
                               "--log_level", "WARNING"], timeout=60)
        endpoints = ready_json(buffer)
        wait_held(endpoints["rest"], 100, timeout=60)
        newest = http("GET", endpoints["rest"] + "/statistics")["statistics"]["ring"]["newest_pulse_id"]
        out = str(workdir / "soak.h5")
        writer = start_writer(endpoints["replay"], out)
        rest = ready_json(writer)["rest"]
        http("POST", rest + "/parameters", PARAMETERS)
        http("PUT", rest + "/start_now")
        http("PUT", f"{rest}/stop_pulse_id/{newest + 10**9}")
        pid = writer.process.pid
        print(f"\n# soak {time.strftime('%Y-%m-%d %H:%M')}, {common.machine_note()}: simulate --profile demo "
              f"--rate 100 -> buffer -> writer (start_now, stop_pulse_id {newest + 10**9}) for {minutes} min; "
              f"writer pid {pid}", flush=True)
        print("| t (s) | written | rate (msg/s, writer /statistics) | file (MB) | writer VmRSS (MB) | buffer VmRSS (MB) | load |")
        print("|---|---|---|---|---|---|---|")
        start = time.monotonic()
        samples: list[tuple[float, int]] = []
        while True:
            now = time.monotonic() - start
            stats = http("GET", rest + "/statistics")["statistics"]
            if stats.get("error") or http("GET", rest + "/status")["status"] != "writing":
                raise RuntimeError(f"writer left 'writing': {stats}")
            rss = vm_rss(pid)
            samples.append((now, rss))
            size = os.path.getsize(out) / 1e6 if os.path.exists(out) else 0.0
            print(f"| {now:.0f} | {stats['messages_written']} | {stats['rate']:.1f} | {size:.0f} | {rss / 1e6:.1f} | "
                  f"{vm_rss(buffer.process.pid) / 1e6:.1f} | {os.getloadavg()[0]:.2f} |", flush=True)
            if now >= minutes * 60:
                break
            time.sleep(min(args.soak_interval, max(0.1, start + minutes * 60 - time.monotonic())))
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        http("PUT", rest + "/stop_now")
        wait_state(rest, ("finished", "error"), 60, interval=0.1)
        stats = http("GET", rest + "/statistics")["statistics"]
        writer.process.wait(30)
        settled = [(t, rss) for t, rss in samples if t >= 60]
        if len(settled) >= 3:
            t = np.array([s[0] for s in settled]) / 60.0
            r = np.array([s[1] for s in settled]) / 1e6
            slope = float(np.polyfit(t, r, 1)[0])
            print(f"\nwriter VmRSS after the first minute: {r[0]:.1f} -> {r[-1]:.1f} MB, min {r.min():.1f}, "
                  f"max {r.max():.1f}; least-squares slope {slope:+.3f} MB/min over {t[-1] - t[0]:.1f} min")
        print(f"writer CPU {cpu:.0f} s over {samples[-1][0]:.0f} s ({100 * cpu / samples[-1][0]:.0f} %); "
              f"end: {stats['end_reason']}, written {stats['messages_written']}, missing {stats['missing_pulses']} "
              f"{stats['missing_by_reason']}")
        with h5py.File(out, "r") as f:
            rows = int(f.attrs["number_of_messages"])
            pulse_ids = f["data/DEMO:CAMERA/pulse_id"][:, 0] if f["data/DEMO:CAMERA/pulse_id"].ndim == 2 \
                else f["data/DEMO:CAMERA/pulse_id"][:]
            steps = np.diff(pulse_ids)
            last_image = f["data/DEMO:CAMERA/data"][rows - 1]
            print(f"file: complete={int(f.attrs['complete'])}, number_of_messages={rows}, camera rows "
                  f"{f['data/DEMO:CAMERA/data'].shape}, pulse ids {pulse_ids[0]}..{pulse_ids[-1]} "
                  f"(steps: min {steps.min()}, max {steps.max()}), last image readable "
                  f"(mean {float(last_image.mean()):.1f}), {os.path.getsize(out) / 1e6:.0f} MB")
        os.unlink(out)
    finally:
        for child in (writer, buffer, simulator):
            if child is not None:
                child.stop()


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_sender":
        run_sender(argv[1], int(argv[2]))
        return 0
    if argv and argv[0] == "--_psi-sender":
        run_psi_sender(int(argv[1]))
        return 0
    if argv and argv[0] == "--_feeder":
        run_feeder(argv[1], int(argv[2]), int(argv[3]))
        return 0
    if argv and argv[0] == "--_bare":
        print("STARTED", flush=True)
        run_bare(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5])
        return 0
    if argv and argv[0] == "--_profiled-writer":
        return run_profiled_writer(argv[3:], argv[1])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="camera,scalars", help="comma-separated; '' for none")
    parser.add_argument("--messages", type=int, default=0, help="N per profile (default camera 1000, scalars 2000)")
    parser.add_argument("--original-messages", type=int, default=300,
                        help="messages for the original element-by-element pattern (0: skip)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0,
                        help="unmeasured drains (bare variant) before the repeats (default none: a DAQ system "
                             "has no warm-up drain either)")
    parser.add_argument("--bare-first", action="store_true",
                        help="repeat 1 runs the variants in reverse order (the bare loop first), so the first "
                             "drain after the fill is the bare loop's")
    parser.add_argument("--touch-gb", type=float, default=0.0,
                        help="before the measured drains, a child writes this many GB of new memory and exits "
                             "(touch_memory: the VM's first touch of guest memory, not the product)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement before giving up")
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--soak-interval", type=float, default=10.0)
    parser.add_argument("--profile-writer", metavar="DIR", default=None,
                        help="after the repeats, one more writer run under cProfile (its run loop); .prof in DIR")
    parser.add_argument("--tuned-variant", action="store_true",
                        help="also run the writer with glibc malloc tuned as ring.tune_allocator() does "
                             "(GLIBC_TUNABLES; variant writer-tuned)")
    parser.add_argument("--python-variant", action="store_true",
                        help="also run the writer on the pure pyzmq path (SF_BSREAD_NO_EXTENSION=1; writer-python)")
    parser.add_argument("--baseline-tree", metavar="DIR", default=None,
                        help="also run the writer of the checkout in DIR (writer-baseline), e.g. a git worktree of "
                             "the commit before a change")
    parser.add_argument("--receive-variants", action="store_true",
                        help="also the receive-only loops: replay-receive (a ReplayClient draining the buffer) and, "
                             "for cameras, replay-receive-untuned (keep_receive_memory=False), direct-receive "
                             "(recv_multipart from a PUSH feeder with the same frames) and direct-receive-tuned "
                             "(the same after process.tune_allocator())")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    profiles = [p for p in args.profiles.split(",") if p]
    workdir = Path(tempfile.mkdtemp(prefix="bench_writer-"))
    print(f"# {common.machine_note()}; temp dir {workdir}", flush=True)
    results: list[dict] = []
    try:
        for profile in profiles:
            results += throughput(profile, args, workdir)
        if results:
            report(results, args)
        if args.soak_minutes:
            soak(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
