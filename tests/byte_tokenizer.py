"""The byte-level tokenizer of ``gradclip_hf.standins`` saved for tests that need one on disk (the
Axolotl runs); ``byte_tokenizer`` itself lives in the package so the docs' examples can use it too."""

from __future__ import annotations

from pathlib import Path

from gradclip_hf.standins import byte_tokenizer

__all__ = ["byte_tokenizer", "save_tokenizer"]


def save_tokenizer(path: Path) -> None:
    byte_tokenizer().save_pretrained(str(path))
