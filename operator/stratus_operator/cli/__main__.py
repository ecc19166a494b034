"""`python -m stratus_operator.cli` is the `stratus` command."""

import sys

from stratus_operator.cli import main

sys.exit(main())
