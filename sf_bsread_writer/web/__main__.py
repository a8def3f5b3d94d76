import sys

from sf_bsread_writer.web.service import main

sys.exit(main())
