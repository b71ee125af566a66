"""Every ```python block of the README and of docs/*.md runs, in order, one namespace per file (so a later block
can use an earlier one's names), in a temporary working directory. Blocks are written as a user would run
them; where they use a model or data of the user's, the stand-ins come from ``gradclip_hf.standins``
in the block itself. A snippet that does not run fails here, not for a user."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # docs/recipes/ too
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_blocks_are_found():
    counts = {str(p.relative_to(ROOT)): len(python_blocks(p)) for p in FILES}
    assert counts["README.md"] >= 2, counts
    assert counts["docs/recipes/lora.md"] >= 3 and counts["docs/recipes/pretraining.md"] >= 2, counts
    assert sum(counts.values()) >= 10, counts


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in FILES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", [str(path)])
    import torch

    torch.manual_seed(0)
    script = types.ModuleType("__main__")  # as `python file.py` runs: classes defined here pickle by reference
    monkeypatch.setitem(sys.modules, "__main__", script)
    namespace = script.__dict__
    for line, code in python_blocks(path):
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except SystemExit as error:  # a block that ends a script successfully
            assert error.code in (0, None), f"{path.name}:{line} exited with {error.code}"
        except Exception as error:
            raise AssertionError(f"the python block at {path.name}:{line} fails: {error!r}") from error
    assert os.getcwd() == str(tmp_path)
