"""``python -m distill``: the ``distill`` command (distill.cli)."""
import sys

from distill.cli import main

sys.exit(main())
