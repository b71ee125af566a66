"""The README documents every option and every metric key (docs that cannot silently rot)."""

import dataclasses
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_options_page_is_generated_from_the_code():
    transformers = pytest.importorskip("transformers")
    from gradclip_hf.integrations.transformers import GradClipTrainingArguments
    from gradclip_hf.reference import options_markdown

    page = (ROOT / "docs" / "options.md").read_text()
    assert page == options_markdown(), "docs/options.md is stale: python -m gradclip_hf.reference > docs/options.md"
    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = [f.name for f in dataclasses.fields(GradClipTrainingArguments) if f.name not in base]
    assert ours and all(f"`--{name}`" in page for name in ours)


def test_every_metric_key_is_in_the_readme():
    pytest.importorskip("transformers")
    from gradclip_hf.integrations.transformers.metrics import METRIC_KEYS

    missing = [key for key in METRIC_KEYS if f"`{key}`" not in README]
    assert not missing, f"metric keys missing from the README: {missing}"


def test_the_two_commands_are_in_the_readme():
    assert re.search(r"^make demo\b", README, re.M) and re.search(r"^make test\b", README, re.M)


def test_the_front_page_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200, "the README is the front page: reference material goes to docs/"
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, broken
