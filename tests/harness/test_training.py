"""``train_one`` with real Trainer runs (tiny settings): deterministic, and the clean counterfactual is the
same run as the faulted one up to the first fault."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

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


# ---------------------------------------------------------------------------------------------- accumulation
TINY8 = dataclasses.replace(TINY, batch=8)  # the gallery's 8 samples per step: GA 4 x 2, GA 8 x 1

class _MicroBatches:
    """Records the input ids of every training forward, by (optimizer step, micro-batch)."""

    def __init__(self):
        from transformers import TrainerCallback

        seen, state = {}, {"step": -1, "micro": 0}

        def hook(module, args, kwargs):
            if module.training:
                seen[(state["step"], state["micro"])] = kwargs["input_ids"].clone()
                state["micro"] += 1

        class Callback(TrainerCallback):
            def on_train_begin(self, args, st, control, model=None, **kw):
                model.register_forward_pre_hook(hook, with_kwargs=True)

            def on_step_begin(self, args, st, control, **kw):
                state.update(step=st.global_step, micro=0)

        self.seen, self.callback = seen, Callback()


def test_faults_reach_exactly_the_bad_micro_batches_through_the_trainer():
    from benchmarks.harness.scenarios import GALLERY

    sc = GALLERY["ga4_garbage_sample"]  # 1 garbage sample of 8: position 6, micro-batch 3 of 4 (2 samples each)
    runs = {}
    for faulted in (True, False):
        rec = _MicroBatches()
        train_one("stock", sc, 0, faulted, TINY8, callbacks=[rec.callback])
        runs[faulted] = rec.seen
    bad, clean = runs[True], runs[False]
    assert len(bad) == len(clean) == TINY8.steps * 4 and all(v.shape == (2, TINY8.block) for v in bad.values())
    fault = sc.bad_micro_batches(TINY8.steps, TINY8.batch)
    assert fault == {8: (3,), 11: (3,), 13: (3,), 16: (3,)}
    differ = {key for key in bad if not torch.equal(bad[key], clean[key])}
    assert differ == {(t, k) for t, ks in fault.items() for k in ks}
    for t in fault:  # position 6 is the first sample of micro-batch 3 (positions 6, 7): garbage; 7 is clean
        assert torch.equal(bad[(t, 3)][1], clean[(t, 3)][1])
        assert (bad[(t, 3)][0, 1:] >= 128).all() and (clean[(t, 3)][0, 1:] < 128).all()


def test_oracles_skip_exactly_the_fault_steps_and_drop_exactly_the_bad_micro_batches():
    step = train_one("oracle", "ga4_garbage_micro", 0, True, TINY8)
    assert step["skipped_steps"] == step["fault_steps"] == [8, 11, 13, 16]
    stock_clean = train_one("stock", "ga4_garbage_micro", 0, False, TINY8)
    oracle_clean = train_one("oracle", "ga4_garbage_micro", 0, False, TINY8)
    assert oracle_clean["skipped_steps"] == [] and oracle_clean["eval_loss"] == stock_clean["eval_loss"]
    assert step["series"]["loss"][:8] == stock_clean["series"]["loss"][:8]
    micro = train_one("oracle_micro", "ga4_garbage_micro", 0, True, TINY8)
    assert micro["spike_steps"] == [8, 11, 13, 16] and micro["skipped_steps"] == []  # 3 of 4 kept
    assert micro["series"]["loss"][:8] == stock_clean["series"]["loss"][:8]
    whole = train_one("oracle_micro", "ga4_shard_steps", 0, True, TINY8)
    assert whole["skipped_steps"] == whole["fault_steps"]  # every micro-batch of the step dropped: a skip
    on_ga1 = train_one("oracle_micro", "garbage_batches", 0, True, TINY8)
    assert on_ga1["skipped_steps"] == [8, 11, 13, 16]
    assert on_ga1["eval_loss"] == pytest.approx(train_one("oracle", "garbage_batches", 0, True, TINY8)["eval_loss"],
                                                abs=1e-5)


def test_micro_oracle_rescales_the_kept_gradient_to_their_mean(tmp_path):
    """One SGD step, no clipping, GA 2 x 2 samples with micro-batch 1 dropped = one step on micro-batch 0 alone."""
    from transformers import Trainer, TrainingArguments

    from benchmarks.harness.faults import StepStream
    from benchmarks.harness.oracle import MicroDropTrainer
    from gradclip_hf.standins import ByteLMDataset, stdlib_text, tiny_llama

    data = ByteLMDataset(stdlib_text(8_000), block_size=16)
    items = [data[i] for i in range(8)]
    common = dict(max_steps=1, learning_rate=0.5, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                  report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    dropped = tiny_llama(0, hidden_size=16, layers=1, heads=2)
    MicroDropTrainer(model=dropped, args=TrainingArguments(str(tmp_path / "a"), per_device_train_batch_size=2,
                                                           gradient_accumulation_steps=2, **common),
                     train_dataset=StepStream(items, 4), drop=[(0, 1)]).train()
    alone = tiny_llama(0, hidden_size=16, layers=1, heads=2)
    Trainer(model=alone, args=TrainingArguments(str(tmp_path / "b"), per_device_train_batch_size=2, **common),
            train_dataset=StepStream(items[:2], 2)).train()
    start = tiny_llama(0, hidden_size=16, layers=1, heads=2)
    for (name, a), b, c in zip(dropped.named_parameters(), alone.parameters(), start.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert any(not torch.equal(a, c) for a, c in zip(dropped.parameters(), start.parameters()))
