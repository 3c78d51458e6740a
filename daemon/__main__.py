"""``python -m daemon``: run the modeld daemon in the foreground (what auto-start spawns)."""

import sys

from .server import main

sys.exit(main())
