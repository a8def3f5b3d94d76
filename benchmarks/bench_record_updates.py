#!/usr/bin/env python
"""What one record update costs the gateway's IOC: pythonSoftIOC's ``set`` against the C batch.

    .venv/bin/python benchmarks/bench_record_updates.py [--records 1000] [--rounds 50]

One IOC process (loopback EPICS environment, free ports, nothing broadcast),
``--records`` ``ai`` records with MDEL -1 and TSE -2 as the gateway makes them;
each round sets every record once (value, alarm, timestamp), like one applied
message of a 1000-channel stream. Reported: the wall time and the process CPU
per record update, including EPICS' own processing threads (the softioc path
processes the record in EPICS' callback thread, which calls back into
Python): ``set`` (pythonSoftIOC, one record at a time) and ``batch``
(``ca/_recordpost.c``, one call per round, posted by the Poster's own EPICS thread without the GIL).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r'''
import json, resource, sys, time
import numpy as np
from softioc import asyncio_dispatcher, builder, softioc
n, rounds = int(sys.argv[1]), int(sys.argv[2])
builder.SetSimpleRecordNames(prefix="", separator="")
records = [builder.aIn(f"BENCH:R{i:04d}", MDEL=-1, ADEL=-1, TSE=-2) for i in range(n)]
builder.LoadDatabase()
softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
from sf_bsread_writer.ca.ioc import _ScalarBatch

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def measure(update):
    update(0)  # warm up
    time.sleep(0.5)
    wall, used = time.perf_counter(), cpu()
    for k in range(1, rounds + 1):
        update(k)
    time.sleep(0.5)  # the callback threads finish what was queued; their CPU counts
    return (time.perf_counter() - wall - 0.5) / (rounds * n), (cpu() - used) / (rounds * n)

def by_set(k):
    stamp = time.time()
    for i, record in enumerate(records):
        record.set(k + i * 0.001, severity=0, alarm=0, timestamp=stamp)

batch = _ScalarBatch(records)
def by_batch(k):
    stamp = time.time()
    for i in range(n):
        batch.stage(i, k + i * 0.001, 0, 0, stamp)
    batch.flush()
    batch.wait_posted()  # the Poster's thread posts it: every round counted, none merged

result = {}
for name, update in (("set", by_set), ("batch", by_batch)):
    wall, used = measure(update)
    result[name] = {"wall_us": wall * 1e6, "cpu_us": used * 1e6}
print("RESULT " + json.dumps(result), flush=True)
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.ca_helpers import ca_env

    env = dict(os.environ) | ca_env()
    completed = subprocess.run([sys.executable, "-c", CHILD, str(args.records), str(args.rounds)], env=env,
                               capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    line = next((line for line in completed.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        print(completed.stdout, completed.stderr, file=sys.stderr)
        return 1
    result = json.loads(line[7:])
    print(f"{args.records} ai records x {args.rounds} rounds (load average {os.getloadavg()[0]:.1f})")
    for name, figures in result.items():
        print(f"  {name:6s} {figures['wall_us']:7.1f} us wall, {figures['cpu_us']:7.1f} us CPU per record update")
    return 0


if __name__ == "__main__":
    sys.exit(main())
