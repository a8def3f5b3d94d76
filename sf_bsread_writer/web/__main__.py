"""``python -m sf_bsread_writer.web``: the same as the ``sf_bsread_web`` command (knobs first, then the service)."""
import sys

from sf_bsread_writer.commands import web

sys.exit(web())
