"""``ConsoleTrim``: the per-layer keys stay out of the console's log lines (W&B, TensorBoard and
``trainer_state.json`` keep them). Placed right before the printer with the Trainer's public ``pop_callback`` /
``add_callback`` (:func:`~.compat.insert_callback`), from the run's first log, when no callback event is being
dispatched; removed at train end."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ...run.messages import is_layer_key
from .compat import insert_callback

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
        """Right before the console printer (``PrinterCallback``/``ProgressCallback``), once."""
        if not any(isinstance(cb, cls) for cb in trainer.callback_handler.callbacks):
            insert_callback(trainer, cls(), before=lambda cb: isinstance(cb, (PrinterCallback, ProgressCallback)))

    @classmethod
    def remove(cls, trainer: Any) -> None:
        while trainer.pop_callback(cls) is not None:
            pass
