"""``AcceleratorClipper`` in a hand-written loop under ``accelerate launch --num_processes 2`` (gloo, CPU).

The same loop (tiny Llama, prepared DataLoader, gradient accumulation 2, AdamW) runs with
``accelerator.clip_grad_norm_`` and with the pack: bit-identical weights and norms with the norm strategy.
With the spike controller, a batch of rare bytes on rank 1 only is a spike of the process-averaged loss:
both ranks skip that update and stay identical.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import accelerate_launch

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    """One launch per optimizer; each runs the stock, pack and spike loops (see the worker)."""
    out = tmp_path_factory.mktemp("accelerate_loop")
    results = {}
    for optim in ("foreach", "fused"):
        accelerate_launch("_worker_accelerate.py", out, f"stock_{optim}", optim)
        for mode in ("stock", "pack", "spike"):
            name = f"{mode}_{optim}"
            ranks = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
            results[name] = (ranks, [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)])
    return results


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optim", ["foreach", "fused"])
def test_norm_strategy_is_bit_identical_to_accelerator_clip_grad_norm(loops, optim):
    (stock, stock_w), (pack, pack_w) = loops[f"stock_{optim}"], loops[f"pack_{optim}"]
    assert stock[0]["world"] == 2 and "MULTI_CPU" in stock[0]["type"]
    for rank in range(2):
        assert same(stock_w[rank], pack_w[rank]), f"rank {rank}"
        steps = [r for r in pack[rank]["rows"] if "step" in r]
        assert len(steps) == 24  # one clip per optimizer step, none on the accumulation micro-steps
        assert [r["norm"] for r in steps] == [r["norm"] for r in stock[rank]["rows"]]  # the same pre-clip norm
        assert any(r["clipped"] for r in steps) and any(not r["clipped"] for r in steps)
        assert pack[rank]["rows"][-1] == {"hooks_left": 0}  # close() removed the gate
    assert same(pack_w[0], pack_w[1])
    first = pack[0]["logged"][0]
    assert first["step"] == 4 and first["grad_norm"] == pack[0]["rows"][3]["norm"]
    assert first["gradclip/threshold"] == 2.0


@pytest.mark.parametrize("optim", ["foreach", "fused"])
def test_spike_on_one_rank_is_skipped_on_both(loops, optim):
    ranks, weights = loops[f"spike_{optim}"]
    spike = ranks[0]["spike_step"]
    rows = [[r for r in ranks[rank]["rows"] if "step" in r] for rank in range(2)]
    for rank in range(2):
        assert [r["step"] for r in rows[rank] if r["spike"]] == [spike], f"rank {rank}"
        assert [r["step"] for r in rows[rank] if not r["changed"]] == [spike], f"rank {rank}: update not skipped"
    # rank 1 alone saw the rare bytes; the controller decided on the mean loss over both processes
    assert rows[1][spike]["local_step_loss"] > 1.5 * rows[0][spike]["local_step_loss"]
    for step in range(len(rows[0])):
        mean = (rows[0][step]["local_step_loss"] + rows[1][step]["local_step_loss"]) / 2
        assert rows[0][step]["step_loss"] == rows[1][step]["step_loss"] == pytest.approx(mean, rel=1e-5)
    assert same(weights[0], weights[1])
    logged = ranks[0]["logged"]
    assert sum(m["gradclip/skipped_steps"] for m in logged) == 1
    assert sum(m.get("gradclip/spikes", 0) for m in logged) == 1

