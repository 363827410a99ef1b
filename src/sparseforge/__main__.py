"""``python -m sparseforge`` runs the command line."""

import sys

from sparseforge.cli import main

sys.exit(main())
