"""``python -m sf_bsread_writer.writer``: the same as the ``sf_bsread_writer`` command."""
import sys

from sf_bsread_writer.writer.cli import main

sys.exit(main())
