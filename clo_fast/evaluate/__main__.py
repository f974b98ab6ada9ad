"""`python -m clo_fast.evaluate`: see cli.py."""

import sys

from clo_fast.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
