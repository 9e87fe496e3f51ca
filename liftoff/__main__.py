"""`python -m liftoff ARGS` runs the `liftoff` command."""

import sys

from liftoff.cli import main

sys.exit(main())
