"""Distributed correctness of the clipping core: 2 processes on CPU with the gloo backend.

FSDP2 (``torch.distributed.fsdp.fully_shard``) runs on CPU/gloo in the supported torch releases, so
the FSDP cases use real sharded models (an MLP with uneven shards and a tiny LlamaForCausalLM); the
DTensor case also builds gradients directly with ``distribute_tensor`` (``Shard(0)``, ``Shard(1)``,
``Replicate``, and a plain tensor mixed in). Each worker is launched once per module (see
``conftest.py``) and every test below checks one property of its per-rank results.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed

REL = 1e-5  # sharded vs unsharded norms differ only in summation order
ADAPTIVE = ("zscore", "zscore_spikes", "quantile", "value", "agc")
SCALARS = ("norm", "norm_post", "threshold", "coef", "clipped", "nonfinite", "skip", "scale")


def close(a, b, rel=REL, abs_=1e-7) -> bool:
    if a is None or b is None:
        return a is b
    if a == b:  # also two equal infinities (an uncapped ZScoreClip threshold)
        return True
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), abs_)


def require_fsdp(results):
    if not results[0]["fsdp"]:
        pytest.skip(f"torch {results[0]['torch']} has no torch.distributed.fsdp.fully_shard")


# ----------------------------------------------------------------- 1. FSDP2, NormClip
@pytest.mark.parametrize("model", ["mlp", "llama"])
def test_fsdp_normclip_global_norm_matches_torch_and_reference(fsdp_results, model):
    require_fsdp(fsdp_results)
    for rank, results in enumerate(fsdp_results):
        for step, row in enumerate(results[f"normclip_{model}"]):
            where = f"rank {rank} step {step}"
            report = row["report"]
            # (a) the global norm: torch's clip_grad_norm_ on an FSDP twin and the unsharded reference
            assert close(report["norm"], row["torch_norm"]), where
            assert close(report["norm"], row["ref"]["norm"]), where
            assert not close(report["norm"], row["local_norm"], rel=1e-3), f"{where}: the shard's own norm"
            for key in ("threshold", "coef", "norm_post", "clipped"):
                assert close(report[key], row["ref"][key]), f"{where}: {key}"
            assert report["clipped"] == 1.0, where
            # (b) the full clipped gradients equal torch's and the reference's
            assert row["diff_torch"] <= 1e-6, where
            assert row["diff_ref"] <= 1e-6, where
            # norm computation needs no torch.distributed call (DTensor's functional collective only)
            assert sum(row["collectives"].values()) == 0, where


@pytest.mark.parametrize("model", ["mlp", "llama"])
def test_fsdp_normclip_ranks_agree(fsdp_results, model):
    require_fsdp(fsdp_results)
    rank0, rank1 = (r[f"normclip_{model}"] for r in fsdp_results)
    assert [row["report"] for row in rank0] == [row["report"] for row in rank1]


# ----------------------------------------------------------------- 1. FSDP2, adaptive strategies
@pytest.mark.parametrize("name", ADAPTIVE)
def test_fsdp_adaptive_ranks_identical(fsdp_results, name):
    require_fsdp(fsdp_results)
    rank0, rank1 = (r[name] for r in fsdp_results)
    assert [row["report"] for row in rank0["steps"]] == [row["report"] for row in rank1["steps"]]
    assert rank0["state"] == rank1["state"]


@pytest.mark.parametrize("name", ADAPTIVE)
def test_fsdp_adaptive_matches_single_process_reference(fsdp_results, name):
    require_fsdp(fsdp_results)
    for rank, results in enumerate(fsdp_results):
        run = results[name]
        for step, row in enumerate(run["steps"]):
            for key in SCALARS + (("spike", "loss_spike", "norm_spike", "factor", "loss") if "spikes" in name else ()):
                assert close(row["report"][key], row["ref"][key]), f"{name} rank {rank} step {step}: {key}"
            assert row["diff_ref"] <= 1e-6, f"{name} rank {rank} step {step}"
        _assert_state_close(run["state"], run["ref_state"], name)


def _assert_state_close(state, ref, where):
    if isinstance(state, dict):
        assert set(state) == set(ref), where
        for key in state:
            _assert_state_close(state[key], ref[key], f"{where}.{key}")
    elif isinstance(state, list):
        assert len(state) == len(ref), where
        for i, (a, b) in enumerate(zip(state, ref)):
            _assert_state_close(a, b, f"{where}[{i}]")
    elif isinstance(state, float):
        assert close(state, ref), where
    else:
        assert state == ref, where


@pytest.mark.parametrize("name", ["zscore", "zscore_spikes", "quantile"])
def test_fsdp_spike_from_one_rank_is_clipped_everywhere(fsdp_results, name):
    require_fsdp(fsdp_results)
    for results in fsdp_results:
        run = results[name]
        spike = run["steps"][run["spike_step"]]["report"]
        calm = run["steps"][run["spike_step"] - 1]["report"]
        assert spike["norm"] > 50 * calm["norm"]
        assert spike["clipped"] == 1.0 and spike["coef"] < 0.01
        if name == "zscore_spikes":
            assert spike["spike"] == 1.0 and spike["factor"] < 1.0
            assert [row["report"]["spike"] for row in run["steps"]].count(1.0) == 1


# ----------------------------------------------------------------- 3. per-tensor norms of DTensor grads
def test_fsdp_per_tensor_norms_are_full_gradient_norms(fsdp_results):
    require_fsdp(fsdp_results)
    for results in fsdp_results:
        for name in ("normclip_mlp", "normclip_llama"):
            assert max(row["per_tensor_rel"] for row in results[name]) <= REL
        for name in ADAPTIVE:
            assert max(row["per_tensor_rel"] for row in results[name]["steps"]) <= REL


@pytest.mark.parametrize("case", ["dtensor", "dtensor_mixed"])
def test_distribute_tensor_grads(fsdp_results, case):
    """Hand-made DTensor gradients (Shard(0), Shard(1), Replicate; plus a plain tensor when mixed)."""
    for results in fsdp_results:
        out = results[case]
        assert "error" not in out, out.get("error")
        assert len(out["per_tensor"]) == len(out["expect_per_tensor"])
        assert all(close(a, b) for a, b in zip(out["per_tensor"], out["expect_per_tensor"]))
        assert close(out["report"]["norm"], out["expect_norm"])
        assert out["diff_clipped"] <= 1e-6
    assert fsdp_results[0][case]["report"] == fsdp_results[1][case]["report"]


# ----------------------------------------------------------------- 2. DDP (replicated gradients)
DECISION = ("norm", "norm_post", "threshold", "coef", "clipped", "skip", "scale", "spike", "loss_spike",
            "norm_spike", "factor", "loss")


def test_ddp_every_rank_decides_the_same(ddp_results):
    for rows in ddp_results[0]["with_spikes"]:
        rank0, rank1 = rows
        assert rank0["local_loss"] != rank1["local_loss"]  # each rank fed its own loss
        assert {k: rank0[k] for k in DECISION} == {k: rank1[k] for k in DECISION}, f"step {rank0['step']}"
    for rows in ddp_results[0]["without_spikes"]:
        assert {k: rows[0][k] for k in SCALARS} == {k: rows[1][k] for k in SCALARS}
    assert ddp_results[0]["state"] == ddp_results[1]["state"]


def test_ddp_loss_is_the_mean_over_ranks(ddp_results):
    for rank0, rank1 in ddp_results[0]["with_spikes"]:
        if rank0["local_loss"] is None or rank1["local_loss"] is None:
            assert rank0["loss"] is None and rank1["loss"] is None  # a NaN on any rank is NaN everywhere
        else:
            assert close(rank0["loss"], (rank0["local_loss"] + rank1["local_loss"]) / 2)


def test_ddp_one_rank_spike_flagged_on_both_and_one_rank_nan_agreed(ddp_results):
    results = ddp_results[0]
    steps = results["with_spikes"]
    flagged = {rank: [row[rank]["step"] for row in steps if row[rank]["spike"] == 1.0] for rank in (0, 1)}
    assert flagged[0] == flagged[1] == [results["loss_spike_step"]]
    step = results["loss_spike_step"]
    for row in steps[step]:
        assert row["loss_spike"] == 1.0 and row["factor"] < steps[step - 1][0]["factor"]
    # a NaN loss on rank 0 only: NaN on both after the reduction, so both ranks agree it is no spike (non-finite
    # values belong to the gradient guard) and both keep relaxing the same factor
    nan_rows = steps[results["nan_step"]]
    assert [row["spike"] for row in nan_rows] == [0.0, 0.0]
    assert nan_rows[0]["factor"] == nan_rows[1]["factor"] > steps[results["nan_step"] - 1][0]["factor"]
    assert steps[results["loss_spike_step"]][0]["local_loss"] < steps[results["loss_spike_step"]][1]["local_loss"]


def test_ddp_collectives_one_all_reduce_per_step_with_spikes_none_without(ddp_results):
    for rows in ddp_results[0]["with_spikes"]:
        for row in rows:
            assert row["collectives"]["all_reduce"] == 1, row["step"]
            assert sum(row["collectives"].values()) == 1, row["collectives"]
    for rows in ddp_results[0]["without_spikes"]:
        for row in rows:
            assert sum(row["collectives"].values()) == 0, row["collectives"]
