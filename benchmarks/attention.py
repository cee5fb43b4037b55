"""qkv against torch's attention, in one process: `python benchmarks/attention.py [--quick]`.

The suite itself lives in `qkv.bench` (also run by `qkv bench`); this script is its
entry point for people browsing benchmarks/.
"""

import sys

from qkv.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
