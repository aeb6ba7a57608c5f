"""``python -m minift``: the command line, as the ``minift`` script."""

import sys

from minift.tools.cli import main

sys.exit(main())
