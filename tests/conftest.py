"""Shared fixtures. Utilities live in tests/helpers.py."""
import os
import tempfile

# bitshuffle links OpenMP: keep it to one thread in the test process too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Buffers and writers started by the tests list themselves here (sf_bsread_writer.registry), not in the
# user's runtime directory; children inherit it.
os.environ.setdefault("SF_BSREAD_RUNTIME_DIR", tempfile.mkdtemp(prefix="sf_bsread_test_runtime-"))
