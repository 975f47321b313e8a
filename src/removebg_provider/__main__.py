"""`python -m removebg_provider` runs the `removebg` command line."""

import sys

from removebg_provider.cli import main

sys.exit(main())
