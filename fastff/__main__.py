"""``python -m fastff``: the same as the ``fastff`` command."""

import sys

from fastff.cli import main

sys.exit(main())
