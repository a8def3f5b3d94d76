"""sf_bsread_writer: buffer, writer and Channel Access gateway for bsread streams.

The bitshuffle wheel links OpenMP; with the default thread count on a small
machine its (de)compression runs 10-30x slower (see docs/dependencies.md).
OpenMP reads OMP_NUM_THREADS when the library loads, so it is set here, before
any submodule can import bitshuffle. An explicit setting by the user wins.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

__version__ = "2.0.0"
