"""``python -m fastclip``: the ``fastclip`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not when imported (pytest's --doctest-modules imports it)
    sys.exit(main())
