"""``GradClipPlugin``: gradclip-hf as an Axolotl plugin (Axolotl 0.19).

In the Axolotl YAML::

    plugins:
      - gradclip_hf.integrations.axolotl.GradClipPlugin
    clip_strategy: zscore
    clip_spike_detection: loss
    clip_spike_action: skip

Every ``ClipConfig`` option is a top-level key ``clip_<name>`` (:mod:`.axolotl_args`), validated with the
rest of the config: a bad value stops ``axolotl train`` before the model loads, with the same message as
``GradClipTrainingArguments``. Axolotl drops unknown keys silently, so the plugin rejects unknown ``clip_*``
keys itself when it is registered.

The plugin keeps Axolotl's Trainer class (``AxolotlTrainer`` or whatever Axolotl picks): it attaches a
:class:`~gradclip_hf.integrations.transformers.GradClipCallback` to the Trainer it is handed
(``add_callbacks_post_trainer``). The callback wraps that instance's ``training_step`` (the step loss for the
spike controller), ``log`` (metrics into the logs before TensorBoard/W&B and ``trainer_state.json``) and
the Trainer's own clip and norm calls (no-ops while the pack runs), for the run only.

``max_grad_norm`` works as with the Trainer integration: ``clip_threshold`` defaults to Axolotl's
``max_grad_norm`` (unset in the YAML: the TrainingArguments default, 1.0), the Trainer's own clipping is off
while the pack clips, and the arguments are not changed. Axolotl has no ``gradient_clipping`` key (it is
dropped); the plugin warns when it sees one.

Note: Axolotl logs a plugin that fails to import and trains WITHOUT it. Check the ``gradclip:`` line at
train start (or the ``gradclip/*`` metrics) when you set the plugin up.
"""

from __future__ import annotations

import logging
from typing import Any

from axolotl.integrations.base import BasePlugin

from .axolotl_args import PREFIX, clip_config, unknown_keys, unknown_message

__all__ = ["GradClipPlugin"]

LOG = logging.getLogger("transformers.gradclip_hf")
ARGS = "gradclip_hf.integrations.axolotl_args.GradClipArgs"


class GradClipPlugin(BasePlugin):
    """Configurable, scheduled, logged and spike-adaptive gradient clipping for Axolotl (see the module
    docstring)."""

    def get_input_args(self) -> str:
        return ARGS

    def register(self, cfg: Any) -> None:
        """Called with the raw YAML before validation (unknown keys are still there)."""
        unknown = unknown_keys(cfg)
        if unknown:
            from ..config import ClipConfig

            allowed = ", ".join(PREFIX + name for name in ClipConfig.field_names())
            raise ValueError(f"gradclip: unknown option(s) {unknown_message(unknown)} in the Axolotl config (Axolotl "
                             f"would ignore them silently); the options of GradClipPlugin are: {allowed}.")
        if cfg.get("gradient_clipping") is not None:
            LOG.warning("gradclip: Axolotl has no `gradient_clipping` key (it is ignored): the clip threshold is "
                        "clip_threshold, or max_grad_norm when clip_threshold is unset.")

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        """The pack's callback, attached to Axolotl's own Trainer instance."""
        from .transformers import GradClipCallback

        config = clip_config(cfg)
        LOG.info("gradclip: GradClipPlugin attached to %s (%s).", type(trainer).__name__,
                 ", ".join(f"{PREFIX}{k}={v!r}" for k, v in config.non_default().items()) or "defaults")
        return [GradClipCallback(config=config).attach(trainer)]
