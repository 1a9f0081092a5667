"""``python -m adapters``: the ``qadapters`` command line."""

import sys

from .cli import main

sys.exit(main())
