"""Stand-ins for your model, data and tokenizer: what the docs, the notebooks, the demo and the tests train on.
Nothing is downloaded; transformers (and tokenizers) are imported inside the functions that need them.

======================================  ==================================================================
name                                    what it is
======================================  ==================================================================
:func:`stdlib_text`                     real Python source from the standard library (sorted, deterministic)
:class:`ByteLMDataset`                  byte-level causal-LM blocks of a text (``input_ids``, ``labels``,
                                        ``attention_mask``)
:class:`SpikyByteStream`                those blocks in a fixed order, with never-seen bytes at given steps
:func:`tiny_llama`                      a freshly initialised tiny ``LlamaForCausalLM`` (from a config)
:func:`pretrained_tiny_llama`           a tiny Llama pretrained here on the standard library (a LoRA base)
:func:`byte_tokenizer`                  a ``PreTrainedTokenizerFast`` whose token ids are the bytes
:func:`stdlib_blocks`, :func:`shuffled`  the split and the seeded order of the pretraining data
:func:`stand_in_arguments`              the quiet, deterministic CPU ``TrainingArguments`` of these runs
======================================  ==================================================================
"""

from __future__ import annotations

import functools
import os
import sysconfig
import tempfile
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset

__all__ = ["stdlib_text", "ByteLMDataset", "SpikyByteStream", "rare_byte_block", "tiny_llama_config", "tiny_llama",
           "pretrained_tiny_llama", "byte_tokenizer", "stdlib_blocks", "shuffled", "stand_in_arguments",
           "VOCAB_SIZE", "PAD_ID", "BOS_ID", "EOS_ID"]

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259  # 256 bytes + pad, bos, eos


def _py_files(root: str, recursive: bool) -> list[str]:
    if not recursive:
        return [os.path.join(root, n) for n in sorted(os.listdir(root))
                if n.endswith(".py") and os.path.isfile(os.path.join(root, n))]
    paths = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        paths += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return paths


def stdlib_text(max_bytes: int = 200_000, package: str | None = None) -> str:
    """Up to ``max_bytes`` of real Python source from the standard library, in sorted file order: its
    top-level modules, or (``package="email"``) every module of that package."""
    root = sysconfig.get_paths()["stdlib"]
    folder = root if package is None else os.path.join(root, package)
    chunks: list[str] = []
    size = 0
    for path in _py_files(folder, recursive=package is not None) if os.path.isdir(folder) else []:
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", errors="replace")
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    text = "".join(chunks)
    if not text:
        raise RuntimeError(f"No .py files found in the standard library directory {folder!r}.")
    return text[:max_bytes]


class ByteLMDataset(Dataset):
    """Byte-level causal-LM blocks: ``{"input_ids", "labels", "attention_mask"}`` of ``block_size`` each."""

    def __init__(self, text: str, block_size: int = 64, num_blocks: int | None = None):
        data = list(text.encode("utf-8"))
        n = (len(data) - 1) // (block_size - 1)
        if num_blocks is not None:
            n = min(n, num_blocks)
        if n < 1:
            raise ValueError(f"text of {len(data)} bytes is too short for block_size={block_size}.")
        self.block_size = block_size
        step = block_size - 1
        self.blocks = [torch.tensor([BOS_ID] + data[i * step:(i + 1) * step], dtype=torch.long) for i in range(n)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def rare_byte_block(block_size: int, generator: torch.Generator) -> torch.Tensor:
    """A block of byte values 128-255, which never occur in the (ASCII) standard library source: the
    model has never seen them, so the loss and the gradient of such a batch are a spike."""
    ids = torch.randint(128, 256, (block_size,), generator=generator, dtype=torch.long)
    ids[0] = BOS_ID
    return ids


class SpikyByteStream(IterableDataset):
    """Byte-level blocks in a fixed order, with "rare token" batches injected at known optimizer steps.

    Item ``i`` belongs to optimizer step ``i // samples_per_step``; the items of the steps in
    ``spike_steps`` are rare-byte blocks (:func:`rare_byte_block`), all others cycle through
    ``dataset`` in order. An ``IterableDataset`` is never shuffled by the Trainer, so the spikes land at
    exactly those steps (``max_steps`` must be set).

    Args:
        dataset: a :class:`ByteLMDataset` (a list of its items where no step is spiky).
        spike_steps: 0-based optimizer steps (the Trainer's ``state.global_step`` before the update).
        samples_per_step: per-device batch size x gradient accumulation steps x number of processes.
        seed: seed of the rare bytes.
    """

    def __init__(self, dataset: ByteLMDataset, spike_steps: tuple[int, ...] = (), samples_per_step: int = 8,
                 seed: int = 0):
        super().__init__()
        if samples_per_step < 1:
            raise ValueError(f"`samples_per_step` must be >= 1, got {samples_per_step!r}.")
        self.dataset, self.spike_steps = dataset, frozenset(spike_steps)
        self.samples_per_step, self.seed = samples_per_step, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        clean = 0
        item = 0
        while True:
            if item // self.samples_per_step in self.spike_steps:
                ids = rare_byte_block(self.dataset.block_size, generator)
                yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
            else:
                yield self.dataset[clean % len(self.dataset)]
                clean += 1
            item += 1


def tiny_llama_config(vocab_size: int = VOCAB_SIZE, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                      intermediate_size: int | None = None, max_position_embeddings: int = 256, **kwargs: Any):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       intermediate_size=intermediate_size or 2 * hidden_size,
                       max_position_embeddings=max_position_embeddings, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                       eos_token_id=EOS_ID, tie_word_embeddings=False, **kwargs)


def tiny_llama(seed: int = 0, **config_kwargs: Any):
    """A freshly initialised tiny ``LlamaForCausalLM`` (deterministic for a given ``seed``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config_kwargs))


@functools.lru_cache(maxsize=8)
def stdlib_blocks(train_bytes: int, eval_bytes: int, block_size: int, eval_blocks: int | None = None,
                  package: str | None = None) -> tuple[ByteLMDataset, ByteLMDataset]:
    """Train and held-out blocks of ``train_bytes + eval_bytes`` of the standard library's text (the held-out
    part follows the train part; at most ``eval_blocks`` of it), cached."""
    text = stdlib_text(train_bytes + eval_bytes, package=package)
    cut = len(text) * train_bytes // (train_bytes + eval_bytes)
    return (ByteLMDataset(text[:cut], block_size=block_size),
            ByteLMDataset(text[cut:], block_size=block_size, num_blocks=eval_blocks))


def shuffled(items: Sequence, seed: int) -> list:
    """``items`` in the order of ``seed`` (a fixed permutation per seed)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
    return [items[i] for i in order]


def stand_in_arguments(output_dir: str, *, steps: int, batch: int, lr: float, seed: int, schedule: str = "cosine",
                       warmup: int = 10, optim: str = "adamw_torch", **overrides: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords of a stand-in run: quiet (one log per step, no progress bar, no reporter, no
    checkpoint), deterministic (``seed`` for the weights and the data) and on the CPU."""
    kwargs = dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch,
                  per_device_eval_batch_size=32, learning_rate=lr, lr_scheduler_type=schedule, warmup_steps=warmup,
                  weight_decay=0.0, logging_steps=1, logging_nan_inf_filter=False, seed=seed, data_seed=seed,
                  report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                  optim=optim)
    kwargs.update(overrides)
    return kwargs


def pretrained_tiny_llama(seed: int = 0, *, steps: int = 300, hidden: int = 64, layers: int = 2, block: int = 64,
                          batch: int = 8, lr: float = 4e-3, warmup: int = 10, schedule: str = "cosine",
                          train_bytes: int = 300_000, eval_bytes: int = 40_000, optim: str = "adamw_torch"):
    """A tiny Llama pretrained here: :func:`tiny_llama` of ``seed``, trained ``steps`` steps on ``block``-byte
    blocks of the standard library's top-level modules (in ``seed``'s order) with the stock ``Trainer``
    (``max_grad_norm=1.0``). Deterministic (1 torch thread on CPU); a few seconds with the defaults."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    model = tiny_llama(seed, hidden_size=hidden, layers=layers, heads=4, max_position_embeddings=max(256, 2 * block + 32))
    train, _ = stdlib_blocks(train_bytes, eval_bytes, block)
    items = shuffled([train[i] for i in range(len(train))], seed)
    with tempfile.TemporaryDirectory(prefix="gradclip-base-") as tmp:
        args = TrainingArguments(**stand_in_arguments(tmp, steps=steps, batch=batch, lr=lr, seed=seed,
                                                      schedule=schedule, warmup=warmup, optim=optim),
                                 max_grad_norm=1.0)
        trainer = Trainer(model=model, args=args, train_dataset=SpikyByteStream(items, samples_per_step=batch))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return model


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-unicode table: ByteLevel pre-tokenization maps byte b to this symbol."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = dict(zip(printable, map(chr, printable))), 0
    for b in range(256):
        if b not in symbols:
            symbols[b], extra = chr(256 + extra), extra + 1
    return symbols


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` built locally (nothing downloaded) for the byte-level models here: BPE
    without merges over the 256 byte symbols (token id == byte value) plus <pad>/<s>/</s> with the ids above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: b for b, symbol in _byte_symbols().items()}
    vocab.update({"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
