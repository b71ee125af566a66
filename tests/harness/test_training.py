"""``train_one`` with real Trainer runs (tiny settings): deterministic, and the clean counterfactual is the
same run as the faulted one up to the first fault."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

from benchmarks.harness.sweep import RunStore, run_grid  # noqa: E402
from benchmarks.harness.tasks import Settings  # noqa: E402
from benchmarks.harness.training import train_one  # noqa: E402

TINY = Settings(steps=20, hidden=32, block=32, batch=4, train_bytes=20_000, eval_bytes=4_000, eval_blocks=8,
                base_steps=6, warmup=2)


def test_same_seed_same_numbers_and_the_clean_run_matches_up_to_the_fault():
    a = train_one("stock", "garbage_batches", 0, True, TINY)
    b = train_one("stock", "garbage_batches", 0, True, TINY)
    clean = train_one("stock", "garbage_batches", 0, False, TINY)
    assert a["eval_loss"] == b["eval_loss"] and a["series"] == b["series"]  # to the last digit
    first = a["fault_steps"][0]
    assert a["fault_steps"] == [8, 11, 13, 16] and clean["fault_steps"] == []
    assert a["series"]["loss"][:first] == clean["series"]["loss"][:first]
    assert a["series"]["loss"][first] > clean["series"]["loss"][first] + 0.5  # the garbage batch's own loss
    assert a["eval_loss"] != clean["eval_loss"]
    other_seed = train_one("stock", "garbage_batches", 1, False, TINY)
    assert other_seed["series"]["loss"][0] != clean["series"]["loss"][0]


def test_lr_fault_changes_nothing_before_its_steps():
    faulted = train_one("stock", "lr_mistake", 0, True, TINY)
    clean = train_one("stock", "lr_mistake", 0, False, TINY)
    first = faulted["fault_steps"][0]
    assert faulted["series"]["loss"][:first + 1] == clean["series"]["loss"][:first + 1]  # the loss before the update
    assert faulted["series"]["loss"][first + 1] != clean["series"]["loss"][first + 1]


def test_nonfinite_fault_kills_the_stock_run_not_the_guarded_ones():
    stock = train_one("stock", "nonfinite", 0, True, TINY)
    assert math.isnan(stock["eval_loss"])
    for name in ("olmo", "recommended"):
        run = train_one(name, "nonfinite", 0, True, TINY)
        assert math.isfinite(run["eval_loss"]), name
        assert set(run["fault_steps"]) <= set(run["skipped_steps"]), (name, run["skipped_steps"])


def test_grid_shares_clean_runs_between_faults_of_a_task(tmp_path):
    store = RunStore(tmp_path / "runs.jsonl")
    records = run_grid(["stock"], ["garbage_batches", "corrupt_shard", "lr_mistake"], [0], TINY, store,
                       log=lambda line: None)
    assert len(store.runs) == 4  # one clean run, three faulted
    assert records[0]["clean"] is records[1]["clean"] is records[2]["clean"]
    assert len(RunStore(tmp_path / "runs.jsonl").runs) == 4  # written to disk


def test_the_simulated_deepspeed_path_skips_loss_spikes_as_the_pack_does():
    """``engine:`` (benchmarks/harness/engine_sim.py) skips a loss spike under ``spike_action="skip"`` before the
    "engine" steps, as the pack now makes DeepSpeed do: the same steps as the local path's, the same end."""
    spec = ("strategy=norm,threshold=1.0,spike_detection=loss,spike_action=skip,spike_factor=1.0,"
            "spike_warmup_steps=5,spike_ratio=1.1")
    engine = train_one(f"engine:{spec}", "garbage_batches", 0, True, TINY)
    local = train_one(f"pack:{spec}", "garbage_batches", 0, True, TINY)
    assert engine["skipped_steps"] == local["skipped_steps"] == engine["spike_steps"]
    assert engine["skipped_steps"] and set(engine["skipped_steps"]) <= set(engine["fault_steps"])
    assert engine["eval_loss"] == pytest.approx(local["eval_loss"], rel=1e-4)
