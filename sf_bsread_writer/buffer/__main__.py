"""``python -m sf_bsread_writer.buffer``: the same as the ``sf_bsread_buffer`` command."""
import sys

from sf_bsread_writer.buffer.cli import main

sys.exit(main())
