"""``python -m distill.tune``: the sweep's command line (distill.tune.cli)."""
import sys

from distill.tune.cli import main

sys.exit(main())
