"""`python -m clo_fast.data --config configs/<run>.yaml`: build (and tokenize) the dataset; see cli.py."""

import sys

from clo_fast.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
