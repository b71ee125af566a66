"""``benchmarks/gpu_check.py --device cpu --quick``: the GPU proof's every section, tiny, on the CPU, so the
script keeps working between GPU loans (``make test`` runs it; ``make gpu-check`` is the real thing)."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SECTIONS = ["syncs", "fp16", "identity", "cost", "scale"]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, BENCH)
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(BENCH)


@pytest.fixture(scope="module")
def quick(gpu_check, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check"
    result = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(out)])
    with open(f"{out}.json") as f:
        saved = json.load(f)
    with open(f"{out}.md") as f:
        return result, saved, f.read()


def checks(saved, section):
    return {c["name"]: c for c in saved["sections"][section]["checks"]}


def test_every_section_runs_and_passes_on_cpu(gpu_check, quick):
    result, saved, md = quick
    assert list(saved["sections"]) == SECTIONS and saved["finished"] and saved["quick"]
    for name, section in saved["sections"].items():
        assert section["status"] == "ok", (name, section.get("error"), [c for c in section["checks"]
                                                                       if c["status"] == "FAIL"])
        assert section["wall_s"] > 0
    assert gpu_check.passed(result)
    assert all(f"| {name} | ok |" in md for name in SECTIONS)


def test_syncs_counts_the_trainers_reads_and_none_of_the_packs(quick):
    _, saved, _ = quick
    s = saved["sections"]["syncs"]
    assert all(c["status"] == "pass" for c in s["checks"]) and len(s["checks"]) == 5
    stock, pack = s["rows"]["stock, logging_nan_inf_filter=True"], s["rows"]["recommended, logging_nan_inf_filter=True"]
    assert stock["max"] >= 2 and pack["pack_max"] == 0  # the counter sees reads: the Trainer's own loss check
    assert s["trainer_loss_check_per_step"] == 2  # torch.isnan(loss) or torch.isinf(loss): two reads
    assert "skipped on cpu" in s["counted_with"]


def test_fp16_section_records_each_invariant(quick):
    _, saved, _ = quick
    c = checks(saved, "fp16")
    for optim in ("adamw_torch_fused", "adamw_torch"):
        names = [n for n in c if n.startswith(optim + ":")]
        assert len(names) == 8 and all(c[n]["status"] == "pass" for n in names), names
    skipped = [x for x in c.values() if x["status"] == "skipped"]
    assert len(skipped) == 1 and "skipped on cpu" in skipped[0]["detail"]
    runs = saved["sections"]["fp16"]["runs"]
    assert runs["adamw_torch_fused"]["skipped_steps"] == 2 and runs["adamw_torch_fused"]["nonfinite_steps"] == 12


def test_identity_cost_and_scale_numbers(quick):
    _, saved, _ = quick
    ident = saved["sections"]["identity"]["rows"]
    assert ident["fp32"]["cause"] == ident["bf16"]["cause"] == "bit-identical"
    cost = saved["sections"]["cost"]
    assert cost["kernel"]["rows"]["torch clip_grad_norm_ + AdamW(fused)"]["ratio"] == pytest.approx(1.0)
    assert cost["trainer"]["ratio"] > 0 and len(cost["trainer"]["ratios"]) == 2
    scale = saved["sections"]["scale"]
    for fault in ("corrupt_shard", "corrupt_microbatch"):
        summary = scale["faults"][fault]["summary"]
        assert set(summary["stock"]) >= {"damage", "clean_eval"} and "removed" in summary and "fp_cost" in summary
    assert scale["faults"]["corrupt_microbatch"]["ga"] == 2


def test_a_failing_section_is_recorded_and_the_rest_still_run(gpu_check, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    sections = gpu_check.sections()
    monkeypatch.setattr(gpu_check, "sections", lambda: {"syncs": broken, "identity": sections["identity"]})
    out = tmp_path / "partial"
    result = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--only", "syncs,identity",
                             "--out", str(out)])
    saved = json.loads((tmp_path / "partial.json").read_text())
    assert saved["sections"]["syncs"]["status"] == "error" and "boom" in saved["sections"]["syncs"]["error"]
    assert saved["sections"]["identity"]["status"] == "ok" and not gpu_check.passed(result)


def test_the_budget_skips_what_does_not_fit(gpu_check, tmp_path):
    out = tmp_path / "late"
    result = gpu_check.main(["--device", "cpu", "--quick", "--budget", "0", "--only", "identity", "--out", str(out)])
    section = result["sections"]["identity"]
    assert section["status"] == "skipped" and "not started" in section["reason"]
    assert "| identity | skipped |" in (tmp_path / "late.md").read_text()


def test_cuda_without_a_gpu_says_so(gpu_check, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="--device cpu --quick"):
        gpu_check.main(["--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()


def test_plan_set_changes_one_size_and_refuses_unknown_names(gpu_check):
    plan = gpu_check.make_plan(gpu_check.parse(["--quick", "--set", "scale_steps=12", "--set", "fp16_spikes=(1, 2)",
                                                "--set", "kernel_preset=small"]))
    assert plan.scale_steps == 12 and plan.fp16_spikes == (1, 2) and plan.kernel_preset == "small"
    assert plan.small_hidden == 32  # the rest stays quick
    with pytest.raises(SystemExit, match="scale_steps"):
        gpu_check.make_plan(gpu_check.parse(["--set", "nope=1"]))
