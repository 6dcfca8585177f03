"""`python -m rollout.data inspect OVERRIDES...` (see rollout/data/cli.py)."""
import sys

from rollout.data.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
