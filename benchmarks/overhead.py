"""Overhead of GradClipTrainer against the stock Trainer(max_grad_norm=1.0): step time and peak memory.

The same tiny-Llama Trainer run (fixed steps, fixed data, fixed seed) is repeated for every
configuration, interleaved (stock, A, B, ..., stock, A, B, ... with the order rotated each repeat) in
one process so that machine drift hits all configurations alike. A callback times every optimizer step
with ``time.perf_counter`` from ``on_step_begin`` to ``on_step_end`` (forward, backward, clipping,
optimizer step); the first ``--warmup`` steps of each run are dropped. Per repeat, the median step time
of a configuration is divided by the median of the stock run of the same repeat; the reported ratio is
the median over repeats. A second timing, ``cycle`` (``on_step_end`` to the next ``on_step_end``),
also contains logging steps and data loading.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during ``train()``. On CPU, torch's allocations are
invisible to ``tracemalloc`` (it only sees Python's allocator) and ``ru_maxrss`` never goes down within
a process, so each configuration is run once more in a fresh subprocess (``--memory``), which reports
its ``ru_maxrss`` after building the model and at the end of training.

    python benchmarks/overhead.py --steps 60 --repeats 5 --out benchmarks/results/overhead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _common import median  # noqa: E402

import torch  # noqa: E402

# name -> GradClipTrainingArguments options (None: the stock Trainer with max_grad_norm=1.0)
CONFIGS: dict[str, dict[str, Any] | None] = {
    "stock": None,
    "norm": dict(clip_strategy="norm", clip_threshold=1.0),
    "value": dict(clip_strategy="value", clip_threshold=0.01),
    "agc": dict(clip_strategy="agc", clip_threshold=0.05),
    "zscore": dict(clip_strategy="zscore", clip_threshold=1.0),
    "quantile": dict(clip_strategy="quantile"),
    "zscore+spike_tighten": dict(clip_strategy="zscore", clip_threshold=1.0, clip_spike_detection="loss"),
    "recommended": "recommended",  # ClipConfig.recommended(): norm + loss-spike skip
    "recommended+gate": "recommended+gate",  # the same, each micro-batch judged before its backward
    "zscore+spike_rollback": dict(clip_strategy="zscore", clip_threshold=1.0, clip_spike_detection="loss",
                                  clip_spike_action="rollback"),
}
TARGETS = {"norm": 1.02, "zscore+spike_tighten": 1.05, "recommended": 1.05}
LOG_TARGET = 1.05  # per-layer logging, at logging steps (log-cycle ratio)


def layer_log_fields() -> list[str]:
    from gradclip_hf.integrations.transformers import GradClipTrainingArguments

    return [f.name for f in fields(GradClipTrainingArguments) if f.name.startswith("clip_log")]


def layer_log_configs() -> dict[str, dict[str, Any]]:
    """Per-layer logging on and off, if the arguments have the ``clip_log_*`` options."""
    names = set(layer_log_fields())
    out: dict[str, dict[str, Any]] = {}
    if "clip_log_layers_top_k" in names:
        out["norm, layer log off (top_k=0)"] = dict(clip_strategy="norm", clip_threshold=1.0, clip_log_layers_top_k=0)
        if "clip_log_layer_patterns" in names:
            out["norm, layer log all layers"] = dict(clip_strategy="norm", clip_threshold=1.0,
                                                     clip_log_layer_patterns=[".*"])
    return out


def clip_options(config: Any) -> dict[str, Any]:
    if config in ("recommended", "recommended+gate"):
        from gradclip_hf import ClipConfig
        from gradclip_hf.integrations.transformers.arguments import argument_name

        gate = {"spike_gate": "micro_batch"} if config.endswith("+gate") else {}
        return {argument_name(k): v for k, v in ClipConfig.recommended(**gate).to_dict().items()}
    return dict(config)


def build_dataset(block: int, text_bytes: int = 400_000):
    from gradclip_hf.standins import ByteLMDataset, stdlib_text

    return ByteLMDataset(stdlib_text(text_bytes), block_size=block)


def model_kwargs(opts) -> dict[str, Any]:
    return dict(hidden_size=opts.hidden, layers=opts.layers, heads=4, max_position_embeddings=max(256, opts.block))


def make_trainer(name: str, config: Any, opts, dataset, output_dir: str):
    from transformers import Trainer

    from gradclip_hf.standins import tiny_llama
    from gradclip_hf.integrations.transformers import GradClipTrainer, GradClipTrainingArguments

    common = dict(max_steps=opts.steps, per_device_train_batch_size=opts.batch, logging_steps=opts.logging_steps,
                  learning_rate=1e-3, use_cpu=opts.device == "cpu", gradient_accumulation_steps=opts.accumulation)
    model = tiny_llama(0, **model_kwargs(opts))
    if config is None:
        args = _common.trainer_args(output_dir, max_grad_norm=1.0, **common)
        return Trainer(model=model, args=args, train_dataset=dataset)
    args = _common.trainer_args(output_dir, cls=GradClipTrainingArguments, **common, **clip_options(config))
    return GradClipTrainer(model=model, args=args, train_dataset=dataset)


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step, self.cycle, self.log_cycle = [], [], []
            self._begin = self._last_end = self._last_step = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step.append(now - self._begin)
            if self._last_end is not None:  # this cycle ran the log of the previous step, if it was a log step
                logged = self._last_step % args.logging_steps == 0
                (self.log_cycle if logged else self.cycle).append(now - self._last_end)
            self._last_end, self._last_step = now, state.global_step

    return StepTimer()


def run_once(name: str, config: Any, opts, dataset, tmp: str) -> dict[str, Any]:
    trainer = make_trainer(name, config, opts, dataset, os.path.join(tmp, name))
    timer = step_timer()
    trainer.add_callback(timer)
    cuda = opts.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    trainer.train()
    skip = max(opts.warmup - 1, 0)
    out = {"step": timer.step[opts.warmup:], "cycle": timer.cycle[skip:], "log_cycle": timer.log_cycle[1:]}
    if cuda:
        out["peak_mem"] = torch.cuda.max_memory_allocated() - base
    del trainer
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(name: str, opts) -> dict[str, Any]:
    """In a fresh process: the peak resident set during ``train()`` (sampled every 1 ms from
    /proc/self/statm) minus the resident set just before it, and ``ru_maxrss``."""
    import resource
    import threading

    dataset = build_dataset(opts.block, opts.text_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(name, CONFIGS[name], opts, dataset, os.path.join(tmp, name))
        before = _rss_bytes()
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        trainer.train()
        done.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
    return {"rss_before_mib": before / 2**20, "rss_peak_mib": peak[0] / 2**20,
            "rss_delta_mib": (peak[0] - before) / 2**20,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cpu_memory(names: list[str], opts, argv: list[str]) -> dict[str, dict[str, Any]]:
    results = {}
    # glibc: hand blocks >= 64 KiB back to the OS when freed, so the resident set follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    steps = str(min(opts.steps, opts.memory_steps))
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_memory_child", name, "--steps", steps]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory child {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("MEMORY "):])
    return results


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="first steps of each run not timed")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds over all configurations")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--configs", default=",".join(k for k in CONFIGS if k != "stock"),
                   help="comma-separated subset of: " + ", ".join(k for k in CONFIGS if k != "stock"))
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="samples per micro-batch")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps (micro-batches per step)")
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: peak RSS per configuration in fresh subprocesses")
    p.add_argument("--text_bytes", type=int, default=400_000, help="standard-library text to train on")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--layer_logging", action=argparse.BooleanOptionalAction, default=True,
                   help="add per-layer logging on/off configurations when clip_log_* options exist")
    p.add_argument("--warm_runs", action=argparse.BooleanOptionalAction, default=True,
                   help="one short untimed run of every configuration first")
    p.add_argument("--memory_steps", type=int, default=12, help="steps of each memory subprocess")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "overhead"),
                   help="output prefix: writes PREFIX.json and PREFIX.md")
    p.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_configs(opts) -> dict[str, Any]:
    configs = {"stock": None}
    for name in opts.configs.split(","):
        name = name.strip()
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {list(CONFIGS)}")
        configs[name] = CONFIGS[name]
    if opts.layer_logging:
        configs.update({name: CONFIGS[name] for name in layer_log_configs()})
    return configs


def time_runs(configs: dict[str, Any], opts, dataset) -> tuple[dict[str, list[dict[str, Any]]], list[float]]:
    """Every configuration once per repeat, interleaved (order rotated each repeat)."""
    names = list(configs)
    times: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    loads = [_common.load_now()]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names if opts.warm_runs else []:  # one untimed run each: imports, allocator and kernels warm
            run_once(name, configs[name], argparse.Namespace(**{**vars(opts), "steps": min(opts.steps, 3),
                                                                 "warmup": 0}), dataset, tmp)
        for r in range(opts.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(run_once(name, configs[name], opts, dataset, tmp))
            loads.append(_common.load_now())
    return times, loads


def ratios(times: dict[str, list[dict[str, Any]]], name: str, key: str, repeats: int) -> list[float]:
    return [median(times[name][r][key]) / median(times["stock"][r][key]) for r in range(repeats)]


def summarise(times: dict[str, list[dict[str, Any]]], opts, argv) -> dict[str, dict[str, Any]]:
    rows = {}
    for name in times:
        step = ratios(times, name, "step", opts.repeats)
        rows[name] = {"step_ms": 1e3 * median([t for rep in times[name] for t in rep["step"]]),
                      "step_ratio": median(step), "step_ratio_min": min(step), "step_ratio_max": max(step),
                      "step_ratios": step, "cycle_ratio": median(ratios(times, name, "cycle", opts.repeats)),
                      "log_cycle_ratio": median(ratios(times, name, "log_cycle", opts.repeats))}
        if opts.device == "cuda":
            rows[name]["peak_mem_mib"] = max(rep["peak_mem"] for rep in times[name]) / 2**20
    if opts.device == "cuda":
        for name in rows:
            rows[name]["mem_ratio"] = rows[name]["peak_mem_mib"] / rows["stock"]["peak_mem_mib"]
    elif opts.memory:
        mem = cpu_memory(list(rows), opts, argv)
        for name in rows:
            rows[name].update(mem[name])
            rows[name]["mem_ratio"] = mem[name]["rss_peak_mib"] / mem["stock"]["rss_peak_mib"]
            rows[name]["mem_delta_ratio"] = mem[name]["rss_delta_mib"] / max(mem["stock"]["rss_delta_mib"], 1e-9)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    _common.quiet_transformers()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.layer_logging:
        CONFIGS.update(layer_log_configs())
    if opts._memory_child:
        print("MEMORY " + json.dumps(memory_child(opts._memory_child, opts)), flush=True)
        return {}
    t0 = time.perf_counter()
    times, loads = time_runs(select_configs(opts), opts, build_dataset(opts.block, opts.text_bytes))
    result = {"command": "python benchmarks/overhead.py " + " ".join(argv), "options": vars(opts),
              "machine": _common.machine_info(), "load_during": loads, "elapsed_s": time.perf_counter() - t0,
              "clip_log_fields": layer_log_fields(), "targets": TARGETS, "results": summarise(times, opts, argv)}
    _common.write_json(opts.out + ".json", result)
    _common.write_text(opts.out + ".md", markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    o, m = result["options"], result["machine"]
    lines = [f"# Overhead: GradClipTrainer vs Trainer(max_grad_norm=1.0)", "",
             f"`{result['command']}`", "",
             f"{m['cpu']}, nproc {m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads), "
             f"transformers {m.get('transformers')}, device {o['device']}; load average during the run "
             f"{min(result['load_during'])}-{max(result['load_during'])}; {result['elapsed_s']:.0f} s.", "",
             f"tiny Llama hidden {o['hidden']}, {o['layers']} layers, block {o['block']}, batch {o['batch']} x "
             f"{o.get('accumulation', 1)} micro-batches per step; "
             f"{o['steps']} steps per run ({o['warmup']} untimed), {o['repeats']} interleaved repeats; "
             f"logging every {o['logging_steps']} steps.", "",
             "Step: on_step_begin to on_step_end (forward, backward, clipping, optimizer). Cycle: on_step_end to the next "
             "on_step_end, without (cycle) and with (log cycle) a logging step in it. Ratios: per-repeat medians over "
             "the stock run of the same repeat, median over repeats. Memory: a fresh process per configuration, peak "
             "resident set during train() (sampled every 1 ms) and its increase over the resident set before train().", "",
             "| config | step ms | step ratio (median, min-max over repeats) | cycle ratio | log-cycle ratio | "
             "peak mem ratio | train mem delta (MiB) | delta ratio | target |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["results"].items():
        target = result["targets"].get(name)
        verdict = "" if target is None else f"step <= {target}: {'met' if r['step_ratio'] <= target else 'NOT met'}"
        if "layer log" in name and "off" not in name or name == "norm" and result["clip_log_fields"]:
            ok = r["log_cycle_ratio"] <= LOG_TARGET
            verdict += f"{'; ' if verdict else ''}log cycle <= {LOG_TARGET}: {'met' if ok else 'NOT met'}"
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['step_ratio']:.3f} ({r['step_ratio_min']:.3f}-"
                     f"{r['step_ratio_max']:.3f}) | {r['cycle_ratio']:.3f} | {r['log_cycle_ratio']:.3f} | "
                     f"{r.get('mem_ratio', float('nan')):.3f} | "
                     f"{r.get('rss_delta_mib', r.get('peak_mem_mib', float('nan'))):.1f} | "
                     f"{r.get('mem_delta_ratio', r.get('mem_ratio', float('nan'))):.2f} | {verdict} |")
    if not result["clip_log_fields"]:
        lines += ["", "Per-layer logging: GradClipTrainingArguments has no `clip_log_*` options in this tree; "
                      "not measured."]
    else:
        lines += ["", f"Per-layer logging options found: {', '.join(result['clip_log_fields'])}; `norm` runs with "
                      f"their defaults."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
