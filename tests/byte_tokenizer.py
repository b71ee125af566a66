"""A byte-level tokenizer built locally with ``tokenizers`` (nothing downloaded), for tests that need one:
the Axolotl runs and TRL's ``SFTTrainer``. Token ids are the byte values, as in ``gradclip_hf.experiments.bytelm``."""

from __future__ import annotations

from pathlib import Path

from gradclip_hf.experiments.bytelm import BOS_ID, EOS_ID, PAD_ID


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-unicode table: ByteLevel pre-tokenization maps byte b to this symbol."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = dict(zip(printable, map(chr, printable))), 0
    for b in range(256):
        if b not in symbols:
            symbols[b], extra = chr(256 + extra), extra + 1
    return symbols


def byte_tokenizer():
    """BPE without merges over the 256 byte symbols (token id == byte value) plus <pad>/<s>/</s> with the ids
    of ``gradclip_hf.experiments.bytelm``: a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: b for b, symbol in _byte_symbols().items()}
    vocab.update({"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert fast("def f(x)")["input_ids"] == [BOS_ID, *b"def f(x)"]
    return fast


def save_tokenizer(path: Path) -> None:
    byte_tokenizer().save_pretrained(str(path))
