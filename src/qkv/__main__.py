"""`python -m qkv ...`: the same command line as the installed `qkv` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
