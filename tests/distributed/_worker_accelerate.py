"""A hand-written accelerate loop: ``accelerate launch --multi_gpu --num_processes 2 _worker_accelerate.py OUT OPTIM``.

Three runs of the same loop in one launch, each from the same initial model: ``stock`` calls
``accelerator.clip_grad_norm_`` as the ``*_no_trainer.py`` scripts do; ``pack`` uses ``AcceleratorClipper``
(norm strategy, threshold = max_grad_norm); ``spike`` uses the pack with the loss-spike controller and
``spike_action="skip"``, with the batches of optimizer step ``SPIKE`` on rank 1 ONLY replaced by rare bytes.
OPTIM: ``foreach`` or ``fused`` AdamW. A tiny Llama on real stdlib text, a prepared DataLoader (sharded by
accelerate), gradient accumulation 2. Writes ``OUT/<mode>_<OPTIM>.rank<r>.json`` and the final weights
``OUT/<mode>_<OPTIM>.rank<r>.pt``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from gradclip_hf.config import ClipConfig
from gradclip_hf.standins import ByteLMDataset, rare_byte_block, stdlib_text, tiny_llama
from gradclip_hf.integrations.accelerate import AcceleratorClipper

STEPS, ACCUM, BATCH, SPIKE, MAX_GRAD_NORM, LOG_EVERY = 24, 2, 2, 20, 2.0, 4

out, optim = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
accelerator = Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)  # gloo on CPU
rank, world = accelerator.process_index, accelerator.num_processes
data = ByteLMDataset(stdlib_text(60_000), block_size=64, num_blocks=STEPS * ACCUM * BATCH * world)


def clipper_for(mode, model, optimizer):
    if mode == "pack":
        return AcceleratorClipper(accelerator, ClipConfig(), model, optimizer, max_grad_norm=MAX_GRAD_NORM)
    if mode == "spike":
        config = ClipConfig(spike_detection="loss", spike_action="skip", spike_warmup_steps=5, spike_ratio=1.2)
        return AcceleratorClipper(accelerator, config, model, optimizer, max_grad_norm=MAX_GRAD_NORM)
    return None


def rare_batch(batch, generator):
    ids = torch.stack([rare_byte_block(64, generator) for _ in range(len(batch["input_ids"]))])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def run(mode):
    model = tiny_llama(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, **({"fused": True} if optim == "fused" else {}))
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=BATCH))
    clipper = clipper_for(mode, model, optimizer)
    rare = torch.Generator().manual_seed(1)
    rows, logged, local, step = [], [], [], 0
    for micro, batch in enumerate(loader):
        if mode == "spike" and rank == 1 and micro // ACCUM == SPIKE:  # this rank's data only
            batch = rare_batch(batch, rare)
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            local.append(loss.item())
            accelerator.backward(loss)
            report = norm = None
            if clipper is not None:
                report = clipper.clip_(loss)
            elif accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            synced = accelerator.sync_gradients
            before = [p.detach().clone() for p in model.parameters()] if synced else None
            optimizer.step()
            optimizer.zero_grad()
        if not synced:
            assert report is None, "the clipper acted on a micro-step without synced gradients"
            continue
        row = {"step": step, "local_step_loss": sum(local) / len(local),
               "changed": any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))}
        if report is not None:
            row.update(report.to_floats(), spike=bool(report.spike.spike) if report.spike is not None else False,
                       step_loss=report.spike.loss.item() if report.spike is not None else None)
        else:
            row["norm"] = norm.item()
        rows.append(row)
        local, step = [], step + 1
        if clipper is not None and step % LOG_EVERY == 0:
            logged.append({"step": step, **clipper.metrics()})
    if clipper is not None:
        clipper.close()
        rows.append({"hooks_left": len(getattr(optimizer, "optimizer", optimizer)._optimizer_step_pre_hooks)})
    name = f"{mode}_{optim}.rank{rank}"
    torch.save({k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()},
               os.path.join(out, f"{name}.pt"))
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"rows": rows, "logged": logged, "world": world, "type": str(accelerator.distributed_type),
                   "spike_step": SPIKE}, f)


for mode in ("stock", "pack", "spike"):
    run(mode)
    accelerator.free_memory()
accelerator.wait_for_everyone()
accelerator.end_training()
