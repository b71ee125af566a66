"""The research harness (``benchmarks/harness``) is imported as ``benchmarks.harness``: the repository root on
``sys.path`` (the package itself may be installed elsewhere)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
