"""Distributed correctness through the Hugging Face Trainer: real ``GradClipTrainer`` runs of a tiny Llama,
2 processes started by ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU; see
``conftest.accelerate_launch`` for why not ``--cpu``), worker ``_worker_trainer.py``.

1. DDP + loss-spike controller (norm/tighten, norm/skip, zscore/tighten): every rank's clip report
   (norm, threshold, coef, scale, spike flag and factor, step loss) and logs are identical at every step;
   the injected rare-byte step (on both ranks: accelerate dispatches the IterableDataset) is flagged on
   all ranks, and nowhere else; ``skip`` leaves the weights untouched on all ranks at that step only.
2. 2 processes x batch b == 1 process x batch 2b (map-style dataset, sequential sampler, clipping norm):
   same global batches, losses, ``grad_norm``, thresholds and final weights to float tolerance.
3. FSDP2 through the Trainer: same numbers as DDP, or skipped with the reason when the Trainer cannot
   shard on CPU (accelerate only builds an FSDP state for accelerator devices).
4. The micro-batch gate under DDP with gradient accumulation: a bad micro-batch on one rank only is dropped
   there, every rank takes the same step decision (rescale, kept, step loss), the replicas stay identical.
"""

from __future__ import annotations

import pytest

from conftest import accelerate_launch, run_single

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = "_worker_trainer.py"
VARIANTS = ("norm_tighten", "norm_skip", "zscore")
BATCH_FIELDS = ("rare", "ids_sum", "rows", "batch", "mask", "rare_at")  # what the rank's own batch held: differs by design
STEPS, SPIKE_STEP, PER_DEVICE = 30, 22, 4             # as in _worker_trainer.py
REL = 1e-4


def close(a, b, rel=REL, abs_=1e-6) -> bool:
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), abs_)


def decisions(rows):
    return [{k: v for k, v in row.items() if k not in BATCH_FIELDS} for row in rows]


@pytest.fixture(scope="module")
def spikes(tmp_path_factory):
    return accelerate_launch(WORKER, tmp_path_factory.mktemp("trainer_spikes"), "spikes", "spikes")


@pytest.fixture(scope="module")
def equiv(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_equiv")
    ddp = accelerate_launch(WORKER, out, "equiv", "equiv")
    single = run_single(WORKER, out, "equiv", "equiv")
    return [r["equiv"] for r in ddp], single["equiv"]


@pytest.fixture(scope="module")
def indices(tmp_path_factory):
    return [r["indices"] for r in accelerate_launch(WORKER, tmp_path_factory.mktemp("trainer_indices"), "indices",
                                                    "indices")]


def test_spike_record_names_the_dataset_indices_of_every_rank(indices):
    main = indices[0]
    spikes = [r for r in main["records"] if r["event"] == "spike"]
    assert [r["step"] for r in spikes] == [SPIKE_STEP + 1] and spikes[0]["skipped"] is True
    per_rank = spikes[0]["batch"]["indices"]
    assert len(per_rank) == 2 and sorted(per_rank[0] + per_rank[1]) == main["bad"]
    assert per_rank[0] != per_rank[1]  # each rank's own samples
    assert indices[1]["records"] is None  # only the main process writes the file


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return [r["fsdp"] for r in accelerate_launch(WORKER, tmp_path_factory.mktemp("trainer_fsdp"), "fsdp", "fsdp")]


# ----------------------------------------------------------------- 1. DDP + spike controller
@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_ranks_take_identical_decisions_every_step(spikes, variant):
    runs = [r[variant] for r in spikes]
    assert all(run["world"] == 2 and not run["fsdp"] for run in runs)
    assert [len(run["rows"]) for run in runs] == [STEPS, STEPS]
    assert [row["step"] for row in runs[0]["rows"]] == list(range(STEPS))
    assert decisions(runs[0]["rows"]) == decisions(runs[1]["rows"])  # exact: floats and flags
    assert runs[0]["logs"] == runs[1]["logs"]
    # and the ranks really trained on different data (the identity is the all-reduce's, not the input's)
    assert any(a["rows"] != b["rows"] for a, b in zip(runs[0]["rows"], runs[1]["rows"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_injected_spike_flagged_on_all_ranks(spikes, variant):
    for rank, result in enumerate(spikes):
        rows = result[variant]["rows"]
        # the dispatched IterableDataset puts the rare-byte items of step SPIKE_STEP on EVERY rank
        assert [row["step"] for row in rows if row["rare"]] == [SPIKE_STEP], f"rank {rank}"
        assert [row["step"] for row in rows if row["spike"]] == [SPIKE_STEP], f"rank {rank}"
        hit = rows[SPIKE_STEP]
        assert hit["loss_spike"] and hit["factor"] == pytest.approx(0.5), f"rank {rank}"
        assert rows[SPIKE_STEP - 1]["factor"] == 1.0
        assert hit["threshold"] == pytest.approx(0.5 * rows[SPIKE_STEP - 1]["threshold"], rel=1e-6)
        assert hit["coef"] < 1.0 and hit["norm"] > 2 * rows[SPIKE_STEP - 1]["norm"]
        # the factor relaxes back afterwards, the same on both ranks (checked above)
        assert 0.5 < rows[SPIKE_STEP + 1]["factor"] < rows[SPIKE_STEP + 2]["factor"] < 1.0


def test_skip_action_skips_the_update_on_all_ranks(spikes):
    for rank, result in enumerate(spikes):
        skip = result["norm_skip"]
        assert [row["step"] for row in skip["rows"] if not row["updated"]] == [SPIKE_STEP], f"rank {rank}"
        assert skip["skipped"] == 1
        assert sum(entry.get("gradclip/skipped_steps", 0) for entry in skip["logs"]) == 1
        for variant in ("norm_tighten", "zscore"):
            assert all(row["updated"] for row in result[variant]["rows"]), f"rank {rank} {variant}"
            assert result[variant]["skipped"] == 0


def test_iterable_dataset_is_dispatched_in_rank_order(spikes):
    """Rank r at step s holds items ``s*2b + r*b ... + b`` of the stream: rank 0 reads 2b items per step."""
    from gradclip_hf.standins import ByteLMDataset, SpikyByteStream, stdlib_text

    stream = SpikyByteStream(ByteLMDataset(stdlib_text(120_000), block_size=64), spike_steps=(SPIKE_STEP,),
                             samples_per_step=PER_DEVICE * 2)
    items = iter(stream)
    expected = [[int(next(items)["input_ids"].sum()) for _ in range(2 * PER_DEVICE)] for _ in range(STEPS)]
    for rank, result in enumerate(spikes):
        got = [row["rows"] for row in result["norm_tighten"]["rows"]]
        assert got == [step[rank * PER_DEVICE:(rank + 1) * PER_DEVICE] for step in expected], f"rank {rank}"


# ----------------------------------------------------------------- 2. 2 x b == 1 x 2b
def test_two_processes_match_one_process_with_double_batch(equiv):
    ddp, single = equiv
    steps = len(single["rows"])
    assert single["world"] == 1 and all(r["world"] == 2 for r in ddp) and steps == 12
    assert decisions(ddp[0]["rows"]) == decisions(ddp[1]["rows"]) and ddp[0]["logs"] == ddp[1]["logs"]
    for step in range(steps):
        # the same global batch: rank 0's half then rank 1's half is the 1-process batch
        assert ddp[0]["rows"][step]["rows"] + ddp[1]["rows"][step]["rows"] == single["rows"][step]["rows"]
        a, b = ddp[0]["logs"][step], single["logs"][step]
        assert close(a["loss"], b["loss"]), (step, a, b)
        assert close(a["grad_norm"], b["grad_norm"]), (step, a, b)
        ra, rb = ddp[0]["rows"][step], single["rows"][step]
        assert ra["threshold"] == rb["threshold"] == 0.5
        assert close(ra["norm"], rb["norm"]) and close(ra["coef"], rb["coef"])
    assert sum(row["clipped"] for row in single["rows"]) >= steps // 2  # the threshold really clips
    for name, values in single["weights"].items():
        assert ddp[0]["weights"][name] == ddp[1]["weights"][name], name  # replicas stay identical
        diff = max(abs(x - y) for x, y in zip(ddp[0]["weights"][name], values))
        assert diff < 1e-4, (name, diff)


# ----------------------------------------------------------------- 3. FSDP2 through the Trainer
def test_fsdp2_trainer_matches_ddp(fsdp, equiv):
    if not fsdp[0]["fsdp"]:
        pytest.skip(
            f"the Trainer did not shard on CPU (distributed type {fsdp[0]['distributed_type']}, FSDP plugin "
            f"given: {fsdp[0]['fsdp_plugin_given']}): accelerate's AcceleratorState turns an fsdp_plugin into "
            "DistributedType.FSDP only for MULTI_GPU/NPU/XPU/... and drops it silently under MULTI_CPU (gloo), so "
            "the run was plain DDP. The core's FSDP2/DTensor norms are covered by test_distributed.py.")
    ddp, _ = equiv
    assert decisions(fsdp[0]["rows"]) == decisions(fsdp[1]["rows"]) and fsdp[0]["logs"] == fsdp[1]["logs"]
    for a, b in zip(fsdp[0]["logs"], ddp[0]["logs"]):
        assert close(a["grad_norm"], b["grad_norm"], rel=1e-5) and close(a["loss"], b["loss"], rel=1e-5)
    for a, b in zip(fsdp[0]["rows"], ddp[0]["rows"]):
        assert a["threshold"] == b["threshold"] and close(a["coef"], b["coef"], rel=1e-5)


# ----------------------------------------------------------------- 4. the micro-batch gate under DDP
GATE_STEP, GATE_POSITION, GATE_GA = 16, 2, 4  # as in _worker_trainer.py


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return [r["gate"] for r in accelerate_launch(WORKER, tmp_path_factory.mktemp("trainer_gate"), "gate", "gate")]


def test_a_micro_batch_dropped_on_one_rank_gives_every_rank_the_same_step(gate):
    rank0, rank1 = (run["rows"] for run in gate)
    # rescale, kept, the kept loss, norm, threshold: identical; the loss an event shows is the rank's own worst
    # dropped micro-batch (rank 1 dropped none)
    shown = ("step_loss", "loss_z")
    assert [{k: v for k, v in row.items() if k not in shown} for row in decisions(rank0)] == \
        [{k: v for k, v in row.items() if k not in shown} for row in decisions(rank1)]
    assert rank0[GATE_STEP]["step_loss"] > 2 * rank0[GATE_STEP]["gate_loss"] and rank1[GATE_STEP]["step_loss"] is None
    assert [(row["step"], row["rare_at"]) for row in rank0 if row["rare"]] == [(GATE_STEP, [GATE_POSITION])]
    assert not any(row["rare"] for row in rank1)
    dropped = [row["step"] for row in rank0 if row["dropped"]]
    assert dropped == [GATE_STEP]
    hit = rank0[GATE_STEP]
    assert hit["dropped"] == 1 and hit["micro_batches"] == 2 * GATE_GA and hit["kept"] and hit["updated"]
    assert hit["rescale"] == pytest.approx(8 / 7, rel=1e-6)  # every micro-batch has as many tokens: 7 of 8 kept
    assert rank0[GATE_STEP]["mask"] == 2 ** GATE_POSITION and rank1[GATE_STEP]["mask"] == 0  # only rank 0 dropped
    assert all(row["rescale"] == 1.0 and row["kept"] for row in rank0 if row["step"] != GATE_STEP)
    assert all(run["skipped"] == 0 for run in gate)
    for name, values in gate[0]["weights"].items():
        assert gate[1]["weights"][name] == values, name  # the replicas stay identical
    assert sum(v or 0 for v in gate[0]["dropped_logged"]) == 1 == sum(v or 0 for v in gate[1]["dropped_logged"])
    records = gate[0]["records"]
    assert [(r["step"], r["action"], r["skipped"]) for r in records] == [(GATE_STEP + 1, "drop", False)]
    assert records[0]["dropped"] == {"count": 1, "micro_batches": 2 * GATE_GA, "positions": [GATE_POSITION]}
    assert records[0]["batch"]["indices"] == [gate[0]["bad"], None]  # rank 0's dropped samples; rank 1 dropped none
