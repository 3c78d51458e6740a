"""``python -m deployers.cli``: the ``modeld`` command."""

import sys

from deployers.cli.parser import main

sys.exit(main())
