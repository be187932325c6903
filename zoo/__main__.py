"""``python -m zoo``: the same as the ``zoo`` command."""

import sys

from zoo.cli import main

if __name__ == "__main__":  # not when a fork-server child imports the parent's main module
    sys.exit(main())
