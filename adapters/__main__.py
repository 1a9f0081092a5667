"""``python -m adapters``: the ``qadapters`` command line."""

import sys

from adapters.cli import main

sys.exit(main())
