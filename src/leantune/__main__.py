"""``python -m leantune`` (also what ``torchrun -m leantune`` runs)."""

import sys

from leantune.cli import main

sys.exit(main())
