"""A small caproto IOC for the bridge tests: ``python tests/ca_ioc.py PREFIX [RATE]``.

PVs (each updated at RATE Hz from one counter ``n``, stamped with the time of the update):
``PREFIX:DOUBLE`` = n / 4, ``PREFIX:LONG`` = n, ``PREFIX:STRING`` = "s<n>",
``PREFIX:WAVE`` = [n, n+1, ..., n+7], ``PREFIX:PULSE`` = 1_000_000 + n (a pulse-id PV),
``PREFIX:STATIC`` = 42.5 (never updated); all of them records with fields (``.DESC``: ``PREFIX:DOUBLE``'s is
"n / 4"), except ``PREFIX:PLAIN`` = 7.0 (never updated, no fields). Prints ``IOC READY`` once serving.
Run it with the loopback EPICS environment of the test.
"""
from __future__ import annotations

import sys
import time

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty, run


class BridgeTestIOC(PVGroup):
    # Records with their fields, as on any IOC: the bridge reads each PV's .DESC at every connection (a PV
    # without one costs its metadata thread a CA timeout, and a bridge stopped meanwhile waits for it).
    DOUBLE = pvproperty(value=0.0, name="DOUBLE", record="ai", doc="n / 4")
    LONG = pvproperty(value=0, name="LONG", record="longin")
    STRING = pvproperty(value="s0", name="STRING", dtype=ChannelType.STRING, record="stringin")
    WAVE = pvproperty(value=[0.0] * 8, name="WAVE", record="waveform")
    PULSE = pvproperty(value=1_000_000.0, name="PULSE", record="ai")
    STATIC = pvproperty(value=42.5, name="STATIC", record="ai")
    # A bare PV without record fields (no .DESC), as some CA servers have: its metadata read times out.
    PLAIN = pvproperty(value=7.0, name="PLAIN")

    def __init__(self, *args, rate: float = 20.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rate = rate

    @DOUBLE.startup
    async def DOUBLE(self, instance, async_lib):
        print("IOC READY", flush=True)
        n = 0
        while True:
            n += 1
            stamp = time.time()
            await self.DOUBLE.write(n / 4, timestamp=stamp)
            await self.LONG.write(n, timestamp=stamp)
            await self.STRING.write(f"s{n}", timestamp=stamp)
            await self.WAVE.write([float(n + i) for i in range(8)], timestamp=stamp)
            await self.PULSE.write(1_000_000.0 + n, timestamp=stamp)
            await async_lib.library.sleep(1.0 / self.rate)


if __name__ == "__main__":
    prefix = sys.argv[1]
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    ioc = BridgeTestIOC(prefix=prefix + ":", rate=rate)
    run(ioc.pvdb, interfaces=["127.0.0.1"])
