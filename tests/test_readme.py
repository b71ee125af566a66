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
    from gradclip_hf.run.metrics import METRIC_KEYS

    missing = [key for key in METRIC_KEYS if f"`{key}`" not in README]
    assert not missing, f"metric keys missing from the README: {missing}"


def test_the_two_commands_are_in_the_readme():
    assert re.search(r"^make demo\b", README, re.M) and re.search(r"^make test\b", README, re.M)


def test_the_front_page_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200, "the README is the front page: reference material goes to docs/"
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, broken


def test_each_feature_names_the_extra_that_brings_what_it_needs():
    """setup.cfg has an extra per optional feature, with what it imports; the page of the feature names it."""
    import configparser

    cfg = configparser.RawConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = {name: value.split() for name, value in cfg.items("options.extras_require")}
    features = {  # extra: (a package it brings, the page that documents the feature)
        "wandb": ("wandb", "docs/wandb.md"), "tensorboard": ("tensorboard", "docs/metrics.md"),
        "report": ("matplotlib", "docs/report.md"), "qlora": ("bitsandbytes", "docs/recipes/lora.md"),
        "trl": ("trl", "docs/trl.md")}
    for extra, (package, page) in features.items():
        assert any(r.startswith(package) for r in extras[extra]), (extra, extras[extra])
        assert re.search(rf"\[(?:\w+,)*{extra}(?:,\w+)*\]", (ROOT / page).read_text()), (extra, page)  # [a,report]
        assert f"[{extra}]" in README, extra


@pytest.mark.slow
def test_the_command_line_example_prints_the_threshold_and_a_metric_line(tmp_path):
    """The README's `python train.py ...` with the train.py of docs/trainer.md: the threshold line (INFO, shown
    by --log_level info), a metric line every logging_steps, and a run `gradclip-hf report` can read."""
    import shlex
    import subprocess
    import sys

    pytest.importorskip("transformers")
    trainer_md = (ROOT / "docs" / "trainer.md").read_text()
    script = next(b for b in re.findall(r"^```python\n(.*?)^```", trainer_md, re.M | re.S) if b.startswith("# train.py"))
    (tmp_path / "train.py").write_text(script)
    command = re.search(r"^(python train\.py .*?)\n(?!    )", README, re.M | re.S).group(1).replace("\\\n", " ")
    assert command in trainer_md.replace("\\\n", " ")  # the same command on both pages
    argv = shlex.split(command)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    run = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert "gradclip: GradClipTrainer: strategy zscore, threshold 1 (from max_grad_norm=1)" in output
    metric_lines = [line for line in output.splitlines() if "'gradclip/norm_post'" in line]
    assert len(metric_lines) == 30  # --max_steps 300 --logging_steps 10
    report = subprocess.run([sys.executable, "-m", "gradclip_hf", "report", "out", "--no-png"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "advice:" in report.stdout, report.stderr[-2000:]
