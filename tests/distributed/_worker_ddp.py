"""DDP worker: ``torchrun --nproc_per_node 2 _worker_ddp.py OUT_DIR``.

A small model wrapped in ``DistributedDataParallel`` (CPU, gloo) sees different data on each rank;
after backward the gradients are already averaged (replicated). ``GradClipper`` with ZScoreClip and
a SpikeController is fed each rank's OWN loss; rank 1 reports a 100x loss at LOSS_SPIKE_STEP and
rank 0 a NaN loss at NAN_STEP. Every step's report is gathered from both ranks (outside the
counted region) and the collectives issued inside ``clip_`` are counted. A second phase runs a
clipper without a SpikeController. Results go to ``OUT_DIR/ddp.rank<r>.json``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _worker_common import CollectiveCounter, dump, floats, init

from gradclip_hf.core import GradClipper, SpikeController, ZScoreClip

LOSS_SPIKE_STEP, NAN_STEP, STEPS = 15, 22, 30

rank = init()
torch.manual_seed(0)
model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)


def run(clipper: GradClipper, steps: int) -> list[dict]:
    trace = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)  # different data per rank
        x = torch.randn(8, 8, generator=g)
        y = x.sum(dim=1, keepdim=True) * (1.0 + rank)
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        local_loss = loss.detach().clone()
        if step == LOSS_SPIKE_STEP and rank == 1:
            local_loss = local_loss * 100.0
        if step == NAN_STEP and rank == 0:
            local_loss = torch.full_like(local_loss, math.nan)
        with CollectiveCounter() as counter:
            report = clipper.clip_(model.module, step, loss=local_loss if clipper.spikes is not None else None)
        row = floats(report)
        row.update(step=step, local_loss=float(local_loss) if math.isfinite(float(local_loss)) else None,
                   collectives=counter.counts)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, row)
        trace.append(gathered)
        if not bool(report.skip):
            optimizer.step()
    return trace


with_spikes = GradClipper(ZScoreClip(warmup_steps=5, max_grad_norm=None), spikes=SpikeController(warmup_steps=5))
without = GradClipper(ZScoreClip(warmup_steps=5, max_grad_norm=None))
results = {"loss_spike_step": LOSS_SPIKE_STEP, "nan_step": NAN_STEP,
           "with_spikes": run(with_spikes, STEPS), "without_spikes": run(without, 8),
           "state": with_spikes.state_dict()}
dump("ddp", results)
dist.barrier()
dist.destroy_process_group()
