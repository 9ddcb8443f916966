"""Puts the repository root on ``sys.path`` so ``python jobs/X.py`` works from any folder (also under
``ray job submit --working-dir .``, whose entry point is run as a script)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
