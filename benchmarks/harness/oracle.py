"""The micro-batch oracle: a perfect detector that drops exactly the bad micro-batches of a step (the floor of any
micro-batch gate), on the stock Trainer.

:class:`MicroDropTrainer` is ``transformers.Trainer`` (``max_grad_norm`` clipping, as stock) that, for the
``(step, micro-batch)`` pairs in ``drop`` (0-based optimizer step, 0-based micro-batch within it):

* runs the forward and the backward of a dropped micro-batch on ``loss * 0`` (it adds no gradient; the data order
  and every other micro-batch stay as they are);
* after the step's last micro-batch, rescales the gradient to the mean over the kept micro-batches, by label tokens
  (``total / kept``: with the Trainer's ``num_items_in_batch`` the loss of each micro-batch is divided by the
  step's total tokens), before the Trainer clips it;
* when every micro-batch of a step is dropped, sets every gradient to ``None``: the optimizer leaves weights and
  state alone (the learning-rate schedule still advances, as with the pack's skip).

Host reads (the token counts) every micro-batch: fine for an oracle, which is no candidate for the step path.
The training loss the Trainer logs for a step with a dropped micro-batch counts the dropped one as 0 (the
gallery's excursion metric leaves the fault steps out).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from transformers import Trainer

__all__ = ["MicroDropTrainer", "label_tokens"]


def label_tokens(inputs: Any) -> int:
    """Label tokens of a causal-LM micro-batch (what the Trainer counts in ``num_items_in_batch``)."""
    labels = inputs["labels"]
    return int((labels[..., 1:] != -100).sum())


class MicroDropTrainer(Trainer):
    """``Trainer`` that drops the micro-batches ``drop`` (see the module). ``dropped``: the ``(step, micro)``
    pairs it dropped; ``skipped``: the steps with nothing kept."""

    def __init__(self, *args: Any, drop: Iterable[tuple[int, int]] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.drop = frozenset((int(t), int(k)) for t, k in drop)
        self.dropped: list[tuple[int, int]] = []
        self.skipped: list[int] = []
        self._step, self._micro, self._kept, self._total, self._dropping = -1, 0, 0, 0, False

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        step = int(self.state.global_step)
        if step != self._step:
            self._step, self._micro, self._kept, self._total = step, 0, 0, 0
        tokens = label_tokens(inputs)
        self._dropping = (step, self._micro) in self.drop
        if self._dropping:
            self.dropped.append((step, self._micro))
        self._total += tokens
        self._kept += 0 if self._dropping else tokens
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._dropping = False
        self._micro += 1
        if self._micro == self.args.gradient_accumulation_steps:
            self._finish_step(model)
        return loss

    def compute_loss(self, model, inputs, return_outputs: bool = False, **kwargs: Any):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not (self._dropping and model.training):
            return out
        if return_outputs:
            return out[0] * 0.0, out[1]
        return out * 0.0

    @torch.no_grad()
    def _finish_step(self, model) -> None:
        grads = [p for p in model.parameters() if p.grad is not None]
        if self._kept == 0:
            for p in grads:
                p.grad = None
            self.skipped.append(self._step)
        elif self._kept < self._total:
            torch._foreach_mul_([p.grad for p in grads], self._total / self._kept)
