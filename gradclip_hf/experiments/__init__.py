"""The evidence machinery shared by ``gradclip-hf demo`` and ``benchmarks/stability.py``.

==================  ==========================================================================
module              what it holds
==================  ==========================================================================
``bytelm``          standard-library text, byte-level LM blocks, tiny Llama models
``sft``             SFT-like examples of variable length, prompt and padding masked
``faults``          fault injection: bad batches, a learning-rate mistake, non-finite activations
``scenarios``       the gallery of fault scenarios
``tasks``           ``Settings``; data, models and learning rates of the pretrain/lora/sft tasks
``methods``         stock Trainer, zclip, the OLMo-core rule and pack configurations
``olmo``            the OLMo-core spike-skipping rule as an independent baseline
``training``        ``train_one``: one run, faulted or clean, its per-step series and eval loss
``metrics``         damage, worst excursion and steps to recover against the clean counterfactual
``stats``           means and paired differences with 95 % t-intervals (no scipy)
``summary``         per (scenario, method) statistics over seeds
``sweep``           a grid of runs with a cache on disk
``machine``         what the numbers were measured on
==================  ==========================================================================

Modules import transformers (and peft, zclip) only where they need them.
"""
