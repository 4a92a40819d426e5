"""`python -m dpolab ...` and `accelerate launch -m dpolab ...`: the same as the `dpolab` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
