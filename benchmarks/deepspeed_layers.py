"""What per-layer gradient norms cost under DeepSpeed ZeRO, at the steps that read them (logging and loss-spike steps).

The same ``GradClipTrainer`` run on a real ZeRO engine (CPU, ``DS_ACCELERATOR=cpu``) with per-layer norms off
(``clip_log_layers_top_k=0``) and on at EVERY step (``logging_steps=1``, top 8), interleaved (off, on, off, on,
... with the order rotated each repeat) in one process, per stage. A callback times every optimizer step
(``on_step_begin`` to ``on_step_end``: forward, backward, the engine's reduction and step, the pack); the first
``--warmup`` steps of each run are dropped. Per repeat, the median step time with the read is divided by the
median without; the reported ratio is the median over repeats: the cost of one logging step. The read itself
(each rank's sums of squares, one all-reduce) is also timed alone, inside the step.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 benchmarks/deepspeed_layers.py --out benchmarks/results/deepspeed_layers
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/deepspeed_layers.py --out benchmarks/results/deepspeed_layers_2ranks
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _common import median  # noqa: E402

import torch  # noqa: E402

CONFIGS = {"off": dict(clip_log_layers_top_k=0, clip_wandb_histogram_every=0), "on": dict(clip_log_layers_top_k=8)}


class StepTimer:
    def __init__(self) -> None:
        self.steps: list[float] = []
        self._t = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.steps.append(time.perf_counter() - timer._t)
        return Timer()


def timed_reads() -> tuple[list[float], Any]:
    """Time ``EngineStep._read_layers`` (the read alone): returns the list it fills and the undo (call it after)."""
    from gradclip_hf.integrations.deepspeed.engine import EngineStep

    reads: list[float] = []
    original = EngineStep._read_layers

    def read(self):
        start = time.perf_counter()
        values = original(self)
        float(values.sum())  # done (CPU: synchronous anyway)
        reads.append(time.perf_counter() - start)
        return values
    EngineStep._read_layers = read

    def undo() -> None:
        EngineStep._read_layers = original
    return reads, undo


def one_run(config: str, stage: int, a: argparse.Namespace, data: Any, timer: StepTimer) -> None:
    from gradclip_hf.integrations.transformers import GradClipTrainer, GradClipTrainingArguments
    from gradclip_hf.standins import tiny_llama

    ds = {"zero_optimization": {"stage": stage}, "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    with tempfile.TemporaryDirectory() as out:
        args = _common.trainer_args(out, GradClipTrainingArguments, max_steps=a.steps, per_device_train_batch_size=a.batch,
                                    logging_steps=1, use_cpu=False, deepspeed=ds, max_grad_norm=1.0, **CONFIGS[config])
        trainer = GradClipTrainer(model=tiny_llama(0, hidden_size=a.hidden, layers=a.layers), args=args,
                                  train_dataset=data, callbacks=[timer.callback()])
        trainer.train()


def one_stage(stage: int, a: argparse.Namespace, data: Any, reads: list[float]) -> dict:
    """Interleaved runs without and with the read, ``a.repeats`` times (the order rotated each repeat)."""
    ratios, step_ms, read_ms = [], {"off": [], "on": []}, []
    for repeat in range(a.repeats):
        order = list(CONFIGS)[repeat % 2:] + list(CONFIGS)[:repeat % 2]
        medians = {}
        for config in order:
            timer = StepTimer()
            before = len(reads)
            one_run(config, stage, a, data, timer)
            medians[config] = median(timer.steps[a.warmup:])
            step_ms[config].append(1000 * medians[config])
            read_ms += [1000 * r for r in reads[before + a.warmup:]]
        ratios.append(medians["on"] / medians["off"])
    return {"step_ms_off": median(step_ms["off"]), "step_ms_on": median(step_ms["on"]), "ratio": median(ratios),
            "ratios": ratios, "read_ms": median(read_ms), "read_share": median(read_ms) / median(step_ms["off"])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="2,3")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text_bytes", type=int, default=200_000)
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "deepspeed_layers"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    _common.quiet_transformers()
    from gradclip_hf.standins import ByteLMDataset, stdlib_text, tiny_llama

    data = ByteLMDataset(stdlib_text(a.text_bytes), block_size=a.block)
    params = sum(t.numel() for t in tiny_llama(0, hidden_size=a.hidden, layers=a.layers).parameters())
    reads, undo = timed_reads()
    try:
        results = {f"zero{stage}": one_stage(stage, a, data, reads) for stage in [int(s) for s in a.stages.split(",")]}
    finally:
        undo()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = {"script": "deepspeed_layers.py", "argv": argv if argv is not None else sys.argv[1:], "params": params,
           "ranks": world, "machine": _common.machine_info(), "load": _common.load_now(), "results": results}
    if int(os.environ.get("RANK", "0")) == 0:
        _common.write_json(a.out + ".json", out)
        lines = [f"# Per-layer norms under DeepSpeed: cost of a step that reads them ({params / 1e6:.2f} M params, "
                 f"{world} rank{'s' if world > 1 else ''}, CPU, 1 thread per rank, load {out['load']})", "",
                 "Whole-step ratios on this shared machine are noise; the read alone is the number to use.", "",
                 "| stage | step, no read (ms) | step with the read (ms) | ratio (median of repeats) | the read alone (ms) |"
                 " read / step |", "|---|---|---|---|---|---|"]
        for name, r in results.items():
            lines.append(f"| {name} | {r['step_ms_off']:.0f} | {r['step_ms_on']:.0f} | {r['ratio']:.3f} "
                         f"({', '.join(f'{x:.3f}' for x in r['ratios'])}) | {r['read_ms']:.1f} | "
                         f"{100 * r['read_share']:.1f} % |")
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
