"""Helpers shared by the Trainer tests (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import torch
import transformers
from transformers import TrainerCallback

BLOCK = 64


def make_args(tmp_path, cls=None, **overrides):
    """Quiet, deterministic CPU TrainingArguments (``cls``: a subclass such as GradClipTrainingArguments)."""
    cls = cls or transformers.TrainingArguments
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-3,
                   logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                   seed=0, data_seed=0, lr_scheduler_type="constant", dataloader_num_workers=0,
                   optim="adamw_torch")
    options.update(overrides)
    return cls(**options)


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class StepRecorder(TrainerCallback):
    """After each optimizer step (test only: host reads): the clip report's scalars, names, per-tensor norms
    and spike flag, keyed by the 0-based step; with ``keep_state`` also the weights and optimizer state.

    Args:
        source: the entry point whose run to read: a ``GradClipTrainer`` (``clip_run``) or a
            ``GradClipCallback`` (``run``); ``None`` records weights only.
    """

    def __init__(self, source=None, keep_state=False):
        self.source, self.keep_state = source, keep_state
        self.reports, self.weights, self.optim_state = {}, {}, {}

    @property
    def steps(self):
        return self.reports

    def _run(self):
        return getattr(self.source, "clip_run", None) or getattr(self.source, "run", None)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step - 1
        run = self._run()
        r = run.last_report if run is not None else None
        if r is not None and r.step == step:
            self.reports[step] = {**r.to_floats(), "names": list(r.names), "per_tensor": r.per_tensor_norms.tolist(),
                                  "spike": bool(r.spike.spike) if r.spike is not None else False}
        if self.keep_state:
            self.weights[step] = [p.detach().clone() for p in model.parameters()]
            inner = getattr(optimizer, "optimizer", optimizer)
            self.optim_state[step] = [{k: v.clone() for k, v in inner.state[p].items()} for p in model.parameters()
                                      if p in inner.state]
