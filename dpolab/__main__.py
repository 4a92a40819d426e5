"""`python -m dpolab ...` and `accelerate launch -m dpolab ...`: the same as the `dpolab` command."""

import sys

from .cli import entry

if __name__ == "__main__":
    sys.exit(entry())
