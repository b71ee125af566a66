"""The Axolotl lane (``make test-axolotl``: its own virtualenv with axolotl 0.19.0). Every test here is marked
``axolotl`` and ``slow``; the test modules skip themselves where axolotl is not installed (the main ``.venv``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.axolotl)
            item.add_marker(pytest.mark.slow)
