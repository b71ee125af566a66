"""gradclip-hf: configurable, scheduled, logged gradient clipping for the Hugging Face Trainer.

The core (``gradclip_hf.core``) imports torch only. The Trainer integration is imported on first use
of its names, so ``import gradclip_hf`` does not import transformers or wandb.
"""

from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = list(_core_all)

from .config import ClipConfig  # noqa: E402  (torch only)

# Trainer integration: imported on first attribute access (module __getattr__, PEP 562).
_LAZY = {
    "GradClipTrainingArguments": "gradclip_hf.integrations.transformers",
    "GradClipTrainer": "gradclip_hf.integrations.transformers",
    "GradClipMixin": "gradclip_hf.integrations.transformers",
    "GradClipCallback": "gradclip_hf.integrations.transformers",
    "with_clip_options": "gradclip_hf.integrations.transformers",
    "GradClipArgumentParser": "gradclip_hf.integrations.transformers",
}
__all__ += ["ClipConfig", *_LAZY]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradclip_hf' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
