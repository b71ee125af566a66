"""``ConsoleTrim``: the per-layer keys stay out of the console's log lines (W&B, TensorBoard and
``trainer_state.json`` keep them)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ...run.messages import is_layer_key

__all__ = ["ConsoleTrim"]


class ConsoleTrim(TrainerCallback):
    """Drops the per-layer keys from the logs right before the console printer: W&B, TensorBoard and the
    other reporters (earlier in the callback list) and ``trainer_state.json`` keep them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            for key in [k for k in logs if is_layer_key(k)]:
                del logs[key]
        return control

    @classmethod
    def place(cls, trainer: Any) -> None:
        callbacks = trainer.callback_handler.callbacks
        if any(isinstance(cb, cls) for cb in callbacks):
            return
        printers = [i for i, cb in enumerate(callbacks) if isinstance(cb, (PrinterCallback, ProgressCallback))]
        callbacks.insert(printers[0] if printers else len(callbacks), cls())

    @classmethod
    def remove(cls, trainer: Any) -> None:
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, cls)]
