"""``python -m molora``: the ``molora`` command line."""

import sys

from .cli import main

sys.exit(main())
