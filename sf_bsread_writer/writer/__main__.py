"""``python -m sf_bsread_writer.writer``: the same as the ``sf_bsread_writer`` command (knobs first, then the service)."""
import sys

from sf_bsread_writer.commands import writer

sys.exit(writer())
