"""``python -m nmopt``: the command line, as the ``nmopt`` script runs it."""

import sys

from nmopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
