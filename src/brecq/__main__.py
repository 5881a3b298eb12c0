"""`python -m brecq ...` runs the command line (see `brecq.cli`)."""

import sys

from .cli import main

sys.exit(main())
