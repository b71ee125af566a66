"""FSDP2 worker: ``torchrun --nproc_per_node 2 _worker_fsdp.py OUT_DIR``.

Each rank shards small models with ``fully_shard`` over a 2-rank CPU mesh (gloo), so gradients are
``DTensor`` shards (``Shard(0)``, uneven where a dimension does not divide by 2). Per step it
gathers the full gradients (``full_tensor()``) before clipping, clips them in a single-process
reference (plain tensors, own strategy instance), clips the shards with ``GradClipper``, and writes
both reports, the gradient differences after clipping and the strategies' state to
``OUT_DIR/<case>.rank<r>.json``. If ``fully_shard`` is unavailable the FSDP cases are skipped
(``{"fsdp": false}``) and only the ``distribute_tensor`` case runs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from _worker_common import CollectiveCounter, dump, floats, init

from gradclip_hf.core import (AGC, GradClipper, NormClip, QuantileClip, SpikeController, ValueClip,
                              ZScoreClip)

rank = init()
world = dist.get_world_size()

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: E402

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch without FSDP2
    fully_shard = None

mesh = init_device_mesh("cpu", (world,))


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))  # (3, 16): uneven shards


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def shard(model: nn.Module) -> nn.Module:
    blocks = model.model.layers if hasattr(model, "model") else [m for m in model if isinstance(m, nn.Linear)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def loss_of(model: nn.Module, step: int, spike: float = 1.0) -> torch.Tensor:
    """Different data per rank; ``spike`` scales rank 1's inputs (a gradient spike from one rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    if isinstance(model, nn.Sequential):
        x = torch.randn(4, 8, generator=g) * (spike if rank == 1 else 1.0)
        return model(x).pow(2).mean()
    ids = torch.randint(0, 97, (2, 12), generator=g)
    return model(input_ids=ids, labels=ids).loss


def reference(model: nn.Module) -> list[nn.Parameter]:
    """Plain (unsharded) copies of the parameters with the full gradients: the single-process view."""
    out = []
    for p in model.parameters():
        q = nn.Parameter(full(p.detach()).clone())
        q.grad = full(p.grad).clone()
        out.append(q)
    return out


def max_diff(model: nn.Module, ref: list[nn.Parameter]) -> float:
    return max((full(p.grad) - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref))


def per_tensor_rel(report, expect: torch.Tensor) -> float:
    """Largest relative difference of the report's per-tensor norms from the full gradients' ``expect``."""
    return ((report.per_tensor_norms - expect).abs() / expect.clamp(min=1e-12)).max().item()


results = {"fsdp": fully_shard is not None, "world": world, "torch": torch.__version__}

if fully_shard is not None:
    # ---- 1a. NormClip vs torch.nn.utils.clip_grad_norm_ (FSDP twin) and vs the single-process reference
    for model_name, build in (("mlp", mlp), ("llama", llama)):
        base = build()
        model, twin = shard(copy.deepcopy(base)), shard(copy.deepcopy(base))
        clipper = GradClipper(NormClip(0.05))
        steps = []
        for step in range(3):
            for m in (model, twin):
                m.zero_grad()
                loss_of(m, step).backward()
            assert all(type(p.grad).__name__ == "DTensor" for p in model.parameters())
            ref = reference(model)
            expect = torch.stack([torch.linalg.vector_norm(q.grad) for q in ref])
            ref_report = GradClipper(NormClip(0.05)).clip_(ref, step)
            with CollectiveCounter() as counter:
                report = clipper.clip_(model, step)
            torch_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
            steps.append({"report": floats(report), "ref": floats(ref_report), "torch_norm": full(torch_norm).item(),
                          "diff_ref": max_diff(model, ref),
                          "diff_torch": max(max((full(p.grad) - full(q.grad)).abs().max().item()
                                                for p, q in zip(model.parameters(), twin.parameters())), 0.0),
                          "per_tensor_rel": per_tensor_rel(report, expect),
                          "local_norm": math.sqrt(sum(p.grad.to_local().float().pow(2).sum().item()
                                                      for p in model.parameters())),
                          "collectives": counter.counts})
        results[f"normclip_{model_name}"] = steps

    # ---- 1b. adaptive strategies over 30 steps with a spike from rank 1 at step SPIKE_STEP
    SPIKE_STEP = 20
    base = mlp()
    model = shard(copy.deepcopy(base))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    configs = {
        "zscore": lambda: (ZScoreClip(alpha=0.9, z_thresh=2.0, warmup_steps=5, max_grad_norm=None), None),
        "zscore_spikes": lambda: (ZScoreClip(alpha=0.9, z_thresh=2.0, warmup_steps=5, max_grad_norm=None),
                                  SpikeController(warmup_steps=5, z=4.0)),
        "quantile": lambda: (QuantileClip(quantile=0.5, history=8), None),
        "value": lambda: (ValueClip(0.01), None),
        "agc": lambda: (AGC(clipping=0.01, exclude=()), None),
    }
    clippers, refs = {}, {}
    for name, make in configs.items():
        strategy, spikes = make()
        clippers[name] = GradClipper(strategy, spikes=spikes)
        strategy, spikes = make()
        if spikes is not None:
            spikes.reduce = False  # the reference gets the global mean loss directly
        refs[name] = GradClipper(strategy, spikes=spikes)
    traces = {name: [] for name in configs}
    for step in range(30):
        optimizer.zero_grad()
        loss = loss_of(model, step, spike=30.0 if step == SPIKE_STEP else 1.0)
        loss.backward()
        local = [p.grad.to_local().clone() for p in model.parameters()]
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        for name in configs:
            for p, g in zip(model.parameters(), local):
                p.grad.to_local().copy_(g)
            ref = reference(model)
            expect = torch.stack([torch.linalg.vector_norm(q.grad) for q in ref])
            ref_report = refs[name].clip_(ref, step, loss=mean_loss)
            report = clippers[name].clip_(model, step, loss=loss.detach())
            traces[name].append({"report": floats(report), "ref": floats(ref_report), "diff_ref": max_diff(model, ref),
                                 "per_tensor_rel": per_tensor_rel(report, expect)})
        optimizer.step()
    for name in configs:
        results[name] = {"steps": traces[name], "state": clippers[name].state_dict(),
                         "ref_state": refs[name].state_dict(), "spike_step": SPIKE_STEP}

# ---- 3. hand-made DTensor gradients: Shard(0), Shard(1), Replicate, and a plain tensor mixed in
torch.manual_seed(0)
fulls = [torch.randn(7, 5), torch.randn(4, 9), torch.randn(6), torch.randn(3, 3)]
placements = [[Shard(0)], [Shard(1)], [Replicate()]]
cases = {}
for case, with_plain in (("dtensor", False), ("dtensor_mixed", True)):
    params = []
    for f, pl in zip(fulls, placements):
        p = nn.Parameter(distribute_tensor(torch.zeros_like(f), mesh, pl))
        p.grad = distribute_tensor(f.clone(), mesh, pl)
        params.append(p)
    if with_plain:
        p = nn.Parameter(torch.zeros_like(fulls[3]))
        p.grad = fulls[3].clone()
        params.append(p)
    grads = fulls[: len(params)]
    out = {}
    try:
        report = GradClipper(NormClip(1.0)).clip_(params, 0)
        expect = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        coef = min(1.0, 1.0 / (torch.linalg.vector_norm(expect).item() + 1e-6))
        out = {"report": floats(report), "per_tensor": report.per_tensor_norms.tolist(),
               "expect_per_tensor": expect.tolist(), "expect_norm": torch.linalg.vector_norm(expect).item(),
               "diff_clipped": max((full(p.grad) - g * coef).abs().max().item() for p, g in zip(params, grads))}
    except Exception as error:  # recorded so the test names the failure
        out = {"error": f"{type(error).__name__}: {error}"}
    cases[case] = out
results.update(cases)

dump("fsdp", results)
dist.barrier()
dist.destroy_process_group()
