"""Shared fixtures. Utilities live in tests/helpers.py."""
import os

# bitshuffle links OpenMP: keep it to one thread in the test process too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
