"""The research harness of the benchmarks (not shipped in the wheel): the fault gallery, its sweeps and their
statistics. It builds on the demo's pieces in the package (``gradclip_hf.demo``: the pretraining task, the batch
faults, the learning-rate and non-finite faults, ``train_one``, the damage metrics) and adds:

==================  ==========================================================================
module              what it holds
==================  ==========================================================================
``tasks``           ``Settings`` of the gallery; the ``lora`` and ``sft`` tasks on a pretrained base
``sft``             SFT-like examples of variable length, prompt and padding masked
``faults``          the batch faults, with ``null`` (other clean items: the noise floor of the measure)
``scenarios``       the gallery: the demo's scenarios and the LoRA and SFT ones
``methods``         the peers (zclip, the OLMo-core rule), the simulated DeepSpeed path and the candidates
``olmo``            the OLMo-core spike-skipping rule as an independent baseline
``engine_sim``      the pack's DeepSpeed path simulated in-process (``engine:...`` methods)
``training``        ``train_one`` of the gallery (the demo's, with the gallery's tasks and methods)
``stats``           means and paired differences with 95 % t-intervals (no scipy)
``summary``         per (scenario, method) statistics over seeds
``sweep``           a grid of runs with a cache on disk
==================  ==========================================================================

Import it as ``benchmarks.harness`` with the repository root on ``sys.path`` (the scripts in ``benchmarks/``
put it there). Modules import transformers (and peft, zclip) only where they need them.
"""
