"""`python -m planner.cli ...` is `planner ...`."""

import sys

from planner.cli import main

sys.exit(main())
