"""Trainer worker: real ``GradClipTrainer`` runs, launched by ``tests/distributed/test_trainer_distributed.py``.

``accelerate launch --multi_gpu --num_processes 2 ... _worker_trainer.py OUT_DIR MODE`` (or plain ``python`` for
the 1-process reference). MODE:

- ``spikes``: three 30-step runs of a tiny Llama on standard-library bytes (DDP, gloo), a rare-byte batch
  injected at ``SPIKE_STEP`` through :class:`SpikyByteStream` (an IterableDataset: accelerate dispatches
  it, rank 0 reads ``per_device * world`` items per step and sends each rank its slice, so the injected
  step carries rare bytes on EVERY rank): ``norm`` + loss spikes (tighten), ``norm`` + loss spikes (skip),
  ``zscore`` + loss spikes (tighten).
- ``equiv``: map-style :class:`ByteLMDataset`, ``train_sampling_strategy="sequential"``, norm clipping
  at a threshold that clips; run with 2 processes x ``EQUIV_BATCH`` and with 1 process x
  ``2 * EQUIV_BATCH``: the global batches are the same items.
- ``indices``: map-style dataset, sequential sampler, rare-byte blocks at the dataset indices of every sample of
  optimizer step ``SPIKE_STEP`` (both ranks): the spike record in rank 0's ``gradclip_spikes.jsonl`` must name
  them, per rank.
- ``gate``: the micro-batch gate (``spike_gate="micro_batch"``), gradient accumulation ``GATE_GA``, map-style
  dataset, sequential sampler, rare-byte blocks in ONE micro-batch of ONE rank (rank 0's micro-batch
  ``GATE_POSITION`` of optimizer step ``GATE_STEP``): only that rank drops it, every rank takes the same step
  (the gate's counts are all-reduced), the replicas stay identical.
- ``fsdp``: ``equiv`` under FSDP2 (``fsdp=True``, ``fsdp_config={"version": 2}``); records whether the
  Trainer really sharded (``is_fsdp_enabled``) and accelerate's distributed type.

Per step and rank a callback records the run's ``last_report`` (norm, threshold, coef, scale, spike
flag and factor, step loss), whether ``optimizer.step()`` changed the weights, and what the rank's
batch held. Results go to ``OUT_DIR/<mode>.rank<r>.json`` (``<mode>.single.json`` without a launcher).
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

torch.set_num_threads(1)

from transformers import TrainerCallback  # noqa: E402

from gradclip_hf.standins import ByteLMDataset, SpikyByteStream, stdlib_text, tiny_llama  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipTrainer, GradClipTrainingArguments  # noqa: E402

OUT, MODE = sys.argv[1], sys.argv[2]
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
DISTRIBUTED = "LOCAL_RANK" in os.environ
STEPS, SPIKE_STEP, SPIKE_WARMUP = 30, 22, 10
PER_DEVICE = 4          # spike runs
EQUIV_BATCH = 4         # equiv/fsdp: per device under 2 processes; 1 process uses 2 * EQUIV_BATCH
EQUIV_STEPS = 12
EQUIV_THRESHOLD = 0.5
GATE_GA, GATE_BATCH, GATE_STEPS, GATE_STEP, GATE_POSITION = 4, 2, 20, 16, 2


def _f(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _rare(ids: torch.Tensor) -> bool:
    return bool(((ids >= 128) & (ids < 256)).any())


class Recorder(TrainerCallback):
    """Runs after the bound GradClipCallback (which sits first): ``last_report`` is this step's."""

    def __init__(self):
        self.trainer = None
        self.rows: list[dict] = []
        self._before = None

    def _probe(self, model) -> torch.Tensor:
        for p in model.parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                return local.detach().clone()
        raise RuntimeError("no trainable parameter")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        report = self.trainer.clip_run.last_report
        row = {"step": state.global_step, "report_step": report.step}
        row.update({k: _f(v) for k, v in report.to_floats().items()})
        if report.spike is not None:
            s = report.spike
            row.update(spike=bool(s.spike), loss_spike=bool(s.loss_spike), norm_spike=bool(s.norm_spike),
                       factor=_f(s.factor), step_loss=_f(s.loss), loss_z=_f(s.loss_z))
        if report.gate is not None:
            g = report.gate
            row.update(rescale=_f(g.rescale), dropped=_f(g.dropped), micro_batches=_f(g.micro_batches),
                       kept=bool(g.kept), gate_loss=_f(g.loss), mask=_f(g.mask))
        row.update(self.trainer._batches.pop(state.global_step, {}))
        self._before = self._probe(model)
        self.rows.append(row)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.rows[-1]["updated"] = not torch.equal(self._before, self._probe(model))


class RecordingTrainer(GradClipTrainer):
    """Notes what each rank's batch held (rare bytes, an id checksum) per optimizer step."""

    def training_step(self, model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        seen = self._batches.setdefault(self.state.global_step, {"rare": False, "ids_sum": 0, "rows": [],
                                                                 "batch": 0, "rare_at": []})
        if _rare(ids):
            seen["rare_at"].append(seen["batch"] // int(ids.shape[0]))  # its position in the step
        seen.update(rare=seen["rare"] or _rare(ids), ids_sum=seen["ids_sum"] + int(ids.sum()),
                    rows=seen["rows"] + [int(r.sum()) for r in ids], batch=seen["batch"] + int(ids.shape[0]))
        return super().training_step(model, inputs, *args, **kwargs)


class GarbageAt(torch.utils.data.Dataset):
    def __init__(self, dataset, indices):
        self.dataset, self.bad = dataset, set(indices)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index not in self.bad:
            return self.dataset[index]
        ids = torch.randint(128, 256, (64,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def run(name: str, train_dataset, **overrides) -> dict:
    options = dict(output_dir=os.path.join(OUT, f"hf_{name}_{RANK}"), use_cpu=True, report_to="none",
                   max_steps=STEPS, per_device_train_batch_size=PER_DEVICE, learning_rate=4e-3,
                   lr_scheduler_type="constant", logging_steps=1, save_strategy="no", seed=0,
                   disable_tqdm=True, max_grad_norm=0.0, dataloader_num_workers=0, clip_threshold=1.0,
                   clip_log_layers_top_k=0, ddp_find_unused_parameters=False, ddp_backend="gloo" if DISTRIBUTED else None)
    options.update(overrides)
    args = GradClipTrainingArguments(**options)
    recorder = Recorder()
    trainer = RecordingTrainer(model=tiny_llama(seed=0), args=args, train_dataset=train_dataset,
                               callbacks=[recorder])
    trainer._batches = {}
    recorder.trainer = trainer
    trainer.train()
    logs = [{k: v for k, v in entry.items() if k in ("step", "loss", "grad_norm", "gradclip/threshold",
                                                      "gradclip/spikes", "gradclip/skipped_steps")}
            for entry in trainer.state.log_history if "loss" in entry]
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        weights[key] = value.detach().to(torch.float64).reshape(-1).tolist()
    return {"rows": recorder.rows, "logs": logs, "weights": weights if MODE != "spikes" else None,
            "dropped_logged": [entry.get("gradclip/dropped_micro_batches") for entry in trainer.state.log_history
                               if "loss" in entry],
            "fsdp": trainer.is_fsdp_enabled, "world": trainer.args.world_size,
            "skipped": trainer.clip_run.skipped_steps,
            "distributed_type": str(trainer.accelerator.state.distributed_type),
            "fsdp_plugin_given": trainer.args.fsdp_plugin_args is not None}


def main() -> None:
    text = stdlib_text(120_000)
    blocks = ByteLMDataset(text, block_size=64)
    results: dict = {"rank": RANK, "world": WORLD, "spike_step": SPIKE_STEP}
    if MODE == "spikes":
        stream = SpikyByteStream(blocks, spike_steps=(SPIKE_STEP,), samples_per_step=PER_DEVICE * WORLD)
        spike = dict(clip_spike_detection="loss", clip_spike_warmup_steps=SPIKE_WARMUP)
        results["norm_tighten"] = run("norm_tighten", stream, **spike)
        results["norm_skip"] = run("norm_skip", stream, clip_spike_action="skip", **spike)
        results["zscore"] = run("zscore", stream, clip_strategy="zscore", clip_zscore_warmup_steps=5, **spike)
    elif MODE == "indices":
        bad = list(range(SPIKE_STEP * PER_DEVICE * WORLD, (SPIKE_STEP + 1) * PER_DEVICE * WORLD))
        spike = dict(clip_spike_detection="loss", clip_spike_warmup_steps=SPIKE_WARMUP)
        results["indices"] = run("indices", GarbageAt(blocks, bad), train_sampling_strategy="sequential",
                                 clip_spike_action="skip", **spike)
        results["indices"]["bad"] = bad
        path = os.path.join(OUT, "hf_indices_0", "gradclip_spikes.jsonl")
        results["indices"]["records"] = ([json.loads(line) for line in open(path)] if RANK == 0 and
                                         os.path.exists(path) else None)
    elif MODE == "gate":
        first = 2 * (GATE_STEP * GATE_GA + GATE_POSITION) * GATE_BATCH  # rank 0's share of that micro-batch round
        bad = list(range(first, first + GATE_BATCH))
        gate = dict(clip_spike_detection="loss", clip_spike_warmup_steps=5, clip_spike_gate="micro_batch",
                    clip_spike_ratio=1.5,  # early training: the loss still falls fast, its spread is wide
                    clip_spike_action="skip", clip_spike_factor=1.0)
        results["gate"] = run("gate", GarbageAt(blocks, bad), train_sampling_strategy="sequential",
                              max_steps=GATE_STEPS, per_device_train_batch_size=GATE_BATCH,
                              gradient_accumulation_steps=GATE_GA, **gate)
        results["gate"]["bad"] = bad
        path = os.path.join(OUT, "hf_gate_0", "gradclip_spikes.jsonl")
        results["gate"]["records"] = ([json.loads(line) for line in open(path)] if RANK == 0 and
                                      os.path.exists(path) else None)
    elif MODE in ("equiv", "fsdp"):
        extra = {}
        if MODE == "fsdp":
            extra = dict(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True})
        batch = EQUIV_BATCH if WORLD > 1 else 2 * EQUIV_BATCH
        results[MODE] = run(MODE, blocks, max_steps=EQUIV_STEPS, per_device_train_batch_size=batch,
                            train_sampling_strategy="sequential", clip_threshold=EQUIV_THRESHOLD, **extra)
    else:
        raise SystemExit(f"unknown mode {MODE!r}")
    suffix = f"rank{RANK}" if DISTRIBUTED else "single"
    with open(os.path.join(OUT, f"{MODE}.{suffix}.json"), "w") as f:
        json.dump(results, f, allow_nan=False)
    if DISTRIBUTED and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
