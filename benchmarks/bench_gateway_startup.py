#!/usr/bin/env python
"""The gateway's start-up and resting memory: from ``sf_bsread_gateway``'s process start to the first
``caget`` of a stream PV, the CPU each of its processes used until then, and what they hold once serving.

    .venv/bin/python benchmarks/bench_gateway_startup.py [--runs 5] [--channels 100] [--load 4]
        [--baseline-tree /path/to/a/checkout/of/the/commit/before]

A bsread source in this process (tests.ca_helpers.Feeder, 10 Hz, ``--channels``
float64 channels) is sending before the gateway starts; every process on
127.0.0.1, free ports, nothing broadcast. A fresh ``caget`` (EPICS base)
starts every 0.1 s, several at once, until one prints the value of the first
channel (one at a time with ``-w 0.5``, as before 2026-12-08, hid up to half
a second); the READY line's time is noted too (the serving IOC's iocInit done). At that moment the CPU time
(user + system) of the supervisor, the serving IOC and the warm standby (if
it runs yet) is read from /proc. Memory, 5 s after that: private (RssAnon)
and proportional (Pss) memory of each. ``--load N`` runs N CPU-bound busy
loops (``python -c 'while 1: pass'``) beside it, stopped by pid at the end.
``--baseline-tree DIR`` alternates runs of that checkout's gateway with this
one's (its compiled extensions must be built in place), so that both see the
same machine. Each tree's package is compiled to bytecode first, as an
installed package is: where PYTHONDONTWRITEBYTECODE is set (this VM sets it)
every process would otherwise compile the package's modules from source
(~0.07 s of CPU each, which no installed gateway spends). The load average is
printed: on a shared machine the figures depend on it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import baseline_site  # noqa: E402
from tests.ca_helpers import VENV_BIN, Feeder, ca_env, start_repeater  # noqa: E402
from tests.helpers import Child, children_of  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")
_CAGET_EVERY = 0.1  # s between the starts of two cagets asking for the first answer


def _memory(pid: int) -> tuple[int, int]:
    """(RssAnon, Pss) in kB."""
    anon = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return anon, pss


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _processes(supervisor: int) -> dict[str, int]:
    """The supervisor, the serving IOC (its first child) and the warm standby (the next), by role."""
    found = {"supervisor": supervisor}
    for number, pid in enumerate(sorted(children_of(supervisor, "sf_bsread_writer.ca.gateway"))):
        found["ioc" if number == 0 else f"standby{number}"] = pid
    return found


@dataclass
class Run:
    first_answer: float  # process start -> the first caget that printed a value (s)
    ready: float  # process start -> the READY line (the serving IOC's iocInit done)
    cpu: dict[str, float]  # CPU seconds by process at the first answer
    memory: dict[str, tuple[int, int]]  # (RssAnon, Pss) kB by process, 5 s later


def _first_answer(env: dict[str, str], started: float, gateway: Child) -> float:
    """Seconds from ``started`` to the first ``caget`` that printed a value.

    A fresh caget every ``_CAGET_EVERY`` seconds, each waiting up to 1 s, several at once: one caget at a
    time (``-w 0.5``, as before 2026-12-08 02:30) saw a server only at its next start or search retry, and
    hid changes of up to half a second in that step."""
    running: list[subprocess.Popen] = []
    next_start = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now >= next_start:
                running.append(subprocess.Popen([str(VENV_BIN / "caget"), "-w", "1.0", "-t", "SU:CH0000"], env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                stdin=subprocess.DEVNULL, text=True))
                next_start = now + _CAGET_EVERY
            for caget in [caget for caget in running if caget.poll() is not None]:
                running.remove(caget)
                output = caget.stdout.read() if caget.stdout else ""
                if caget.returncode == 0 and output.strip() and "not found" not in output:
                    return time.monotonic() - started
            if now - started > 60:
                raise RuntimeError("no caget answer in 60 s:\n" + gateway.output()[-2000:])
            time.sleep(0.005)  # the polling period of the cagets' exits (a measurement, not a wait)
    finally:
        for caget in running:
            caget.kill()
            caget.wait()


def one_run(env: dict[str, str], source: Feeder, tree: Path) -> Run:
    """One gateway start, measured; it runs in ``tree`` (``python -m`` puts the working directory first on
    sys.path)."""
    command = [sys.executable, "-m", "sf_bsread_writer.ca.gateway", source.address, "--ca-prefix", "SU:",
               "--name", "SU", "--parent-pid", str(os.getpid())]
    started = time.monotonic()
    gateway = Child(command, env=env, cwd=tree)
    ready_after: list[float] = []  # when the READY line came: the serving IOC's iocInit is done

    def note_ready() -> None:
        try:
            gateway.wait_for_line("READY", timeout=60)
            ready_after.append(time.monotonic() - started)
        except AssertionError:
            pass

    threading.Thread(target=note_ready, daemon=True).start()
    try:
        elapsed = _first_answer(dict(os.environ) | env, started, gateway)
        cpu = {name: _cpu_seconds(pid) for name, pid in _processes(gateway.process.pid).items()}
        time.sleep(5)  # resting memory: what the processes hold once serving (a measurement, not a wait)
        memory = {name: _memory(pid) for name, pid in _processes(gateway.process.pid).items()}
        return Run(elapsed, ready_after[0] if ready_after else float("nan"), cpu, memory)
    finally:
        gateway.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--load", type=int, default=0, metavar="N", help="CPU-bound busy loops beside the gateway")
    parser.add_argument("--baseline-tree", metavar="DIR", default=None,
                        help="alternate runs with the gateway of this checkout (the commit before)")
    args = parser.parse_args()
    env = ca_env()
    variants = {"this": (env, ROOT)}
    if args.baseline_tree:
        tree = Path(args.baseline_tree).resolve()
        variants = {"baseline": (env | {"PYTHONPATH": str(baseline_site(tree))}, tree), "this": (env, ROOT)}
    for _, tree in variants.values():  # bytecode, as an installed package has it (see the docstring)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "sf_bsread_writer")], check=True)
    repeater = start_repeater(env)
    channels = [{"name": f"CH{i:04d}", "type": "float64"} for i in range(args.channels)]
    source = Feeder(channels, lambda pid: [np.float64(pid)] * args.channels, rate=10.0)
    busy = [Child([sys.executable, "-c", "while 1: pass"]) for _ in range(args.load)]
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    loads = []
    try:
        for run in range(args.runs):
            for name, (variant_env, tree) in variants.items():
                loads.append(os.getloadavg()[0])
                result = one_run(variant_env, source, tree)
                runs[name].append(result)
                print(f"  {name:8s} run {run + 1}: start -> READY {result.ready:5.2f} s, -> first caget "
                      f"{result.first_answer:5.2f} s; CPU until then: "
                      + ", ".join(f"{role} {seconds:.2f} s" for role, seconds in result.cpu.items())
                      + f" (load average {loads[-1]:.1f})", flush=True)
    finally:
        for loop in busy:
            loop.stop()
        source.close()
        repeater.stop()
    print(f"{args.load} busy loops, load average {min(loads):.1f}-{max(loads):.1f}")
    for name, results in runs.items():
        roles = sorted({role for result in results for role in result.cpu})
        cpu_text = ", ".join(f"{role} {statistics.median(r.cpu.get(role, 0.0) for r in results):.2f} s"
                             for role in roles)
        answers = [result.first_answer for result in results]
        print(f"{name}: start -> first caget over {args.runs} runs: median {statistics.median(answers):.2f} s, "
              f"max {max(answers):.2f} s (READY: median {statistics.median(r.ready for r in results):.2f} s); "
              f"median CPU until then: {cpu_text}")
        for role, (anon, pss) in results[-1].memory.items():
            print(f"  {role:10s} RssAnon {anon / 1024:6.1f} MB, Pss {pss / 1024:6.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
