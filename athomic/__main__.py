"""``python -m athomic``: the ``athomic`` command."""

import sys

from athomic._cli import main

sys.exit(main())
