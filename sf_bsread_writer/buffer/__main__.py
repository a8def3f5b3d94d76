"""``python -m sf_bsread_writer.buffer``: the same as the ``sf_bsread_buffer`` command (knobs first, then the service)."""
import sys

from sf_bsread_writer.commands import buffer

sys.exit(buffer())
