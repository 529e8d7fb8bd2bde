"""``python -m kvha``: the same command line as the ``kvha`` script."""

from __future__ import annotations

import sys

from kvha.cli import main

if __name__ == "__main__":
    sys.exit(main())
