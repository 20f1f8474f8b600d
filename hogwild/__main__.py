"""`python -m hogwild` runs the command line."""

import sys

from hogwild.cli import main

sys.exit(main())
