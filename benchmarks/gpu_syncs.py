"""Host syncs per optimizer step on CUDA, per clipping configuration.

What it measures (needs a CUDA device; on a machine without one it says so and exits 0):

1. ``GradClipper.clip_`` alone, per strategy (norm, value, agc, zscore, quantile, none), with the spike
   controller, and with every ``nonfinite`` policy, run under ``torch.cuda.set_sync_debug_mode("error")``:
   the core must never sync (``nonfinite="raise"`` is the one documented exception). A configuration
   that raises is reported with the error.
2. The Trainer integration's per-step path (``ClipRun.clip_step`` then ``optimizer.step()`` of a real AdamW,
   fused and foreach: what ``GradClipTrainer``/``GradClipCallback`` run in ``on_pre_optimizer_step`` and the
   Trainer right after), under ``set_sync_debug_mode("warn")``, counting the sync warnings per step after two
   warm-up steps. Expected by design: 0 for ``tighten``/``skip`` and ``nonfinite="skip"`` on the fused
   AdamW (the decision travels to the optimizer as a device tensor); 1 (one stacked flag read) for
   ``rollback``/``stop``, and for skips on the foreach AdamW.
3. The reference: ``torch.nn.utils.clip_grad_norm_`` (0 syncs).

    python benchmarks/gpu_syncs.py --out benchmarks/results/gpu_syncs

``--dry_run_cpu`` runs the same loops on the CPU without the sync checks (to test the script itself).
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

CORE_CONFIGS: dict[str, dict[str, Any]] = {
    "norm": dict(strategy="norm", threshold=1.0),
    "value": dict(strategy="value", threshold=1e-3),
    "agc": dict(strategy="agc", threshold=0.05),
    "zscore": dict(strategy="zscore", threshold=1.0),
    "quantile": dict(strategy="quantile"),
    "none (measure only)": dict(strategy="none", threshold=None),
    "norm + cosine schedule": dict(strategy="norm", threshold=1.0, schedule="cosine", threshold_final=0.3,
                                   schedule_steps=100),
    "zscore + spike tighten": dict(strategy="zscore", threshold=1.0, spike_detection="loss"),
    "zscore + spike both/mad": dict(strategy="zscore", threshold=1.0, spike_detection="both", spike_method="mad"),
    "norm nonfinite=zero": dict(strategy="norm", threshold=1.0, nonfinite="zero"),
    "norm nonfinite=ignore": dict(strategy="norm", threshold=1.0, nonfinite="ignore"),
    "norm nonfinite=raise": dict(strategy="norm", threshold=1.0, nonfinite="raise"),
}
RUNNER_CONFIGS: dict[str, Any] = {
    "norm (nonfinite=skip, default)": dict(strategy="norm", threshold=1.0),
    "norm nonfinite=zero": dict(strategy="norm", threshold=1.0, nonfinite="zero"),
    "zscore + spike tighten": dict(strategy="zscore", threshold=1.0, spike_detection="loss"),
    "recommended (norm + loss-spike skip)": "recommended",
    "zscore + spike rollback": dict(strategy="zscore", threshold=1.0, spike_detection="loss",
                                    spike_action="rollback"),
    "zscore + spike stop": dict(strategy="zscore", threshold=1.0, spike_detection="loss", spike_action="stop"),
}


def config_of(spec):
    from gradclip_hf import ClipConfig

    return ClipConfig.recommended(threshold=1.0) if spec == "recommended" else ClipConfig(**spec)


def small_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(512, 128), torch.nn.Linear(128, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 512)).to(device)


def backward(model, device, step):
    x = torch.randint(0, 512, (8, 32), device=device)
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, 512), x.reshape(-1))
    loss.backward()
    return loss.detach()


class SyncCounter:
    """Counts the warnings of ``set_sync_debug_mode("warn")`` (one per synchronizing call)."""

    def __init__(self, enabled: bool):
        self.enabled, self.count, self.where = enabled, 0, []

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        if self.enabled:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        syncs = [r for r in self._records if "synchroniz" in str(r.message).lower()]
        self.count = len(syncs)
        self.where = sorted({f"{os.path.basename(r.filename)}:{r.lineno}" for r in syncs})


def check_core(device, steps, sync_checks) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec in CORE_CONFIGS.items():
        model = small_model(device)
        clipper = config_of(spec).build(total_steps=steps)
        row = {"raised": None}
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            loss = backward(model, device, step)
            if sync_checks and step >= 2:
                torch.cuda.set_sync_debug_mode("error")
            try:
                clipper.clip_(model, step=step, loss=loss)
            except RuntimeError as error:
                row["raised"] = f"step {step}: {str(error).splitlines()[0][:160]}"
                break
            finally:
                if sync_checks:
                    torch.cuda.set_sync_debug_mode("default")
        row["syncs"] = row["raised"] is not None
        out[name] = row
    return out


def check_runner(device, steps, sync_checks) -> dict[str, dict[str, Any]]:
    from gradclip_hf.run import ClipRun

    out = {}
    for name, spec in RUNNER_CONFIGS.items():
        for fused in (True, False):
            model = small_model(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
            state = types.SimpleNamespace(max_steps=steps, global_step=0, log_history=[])
            run = ClipRun(config_of(spec), None, args=types.SimpleNamespace(max_grad_norm=0.0), state=state,
                          optimizer=optimizer, owner="gpu_syncs")
            counts, where = [], set()
            for step in range(steps):
                state.global_step = step
                run.loss.add(backward(model, device, step))
                with SyncCounter(sync_checks and step >= 2) as counter:
                    run.clip_step(model, state)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if step >= 2:
                    counts.append(counter.count)
                    where.update(counter.where)
            run.close()
            out[f"{name}, {'fused' if fused else 'foreach'} AdamW"] = {
                "syncs_per_step": max(counts) if counts else 0, "min_per_step": min(counts) if counts else 0,
                "where": sorted(where)}
    # the reference
    model = small_model(device)
    counts = []
    for step in range(steps):
        backward(model, device, step)
        with SyncCounter(sync_checks and step >= 2) as counter:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        model.zero_grad(set_to_none=True)
        if step >= 2:
            counts.append(counter.count)
    out["torch clip_grad_norm_ (reference)"] = {"syncs_per_step": max(counts), "min_per_step": min(counts),
                                                "where": []}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Host syncs per step on CUDA", "", f"`{result['command']}`", "",
             f"device: {result['machine'].get('gpu', result['device'])}, torch {result['machine']['torch']}; "
             f"{result['steps']} steps per configuration, the first 2 not checked.", "",
             *([] if result["sync_checks"] else ["**Dry run on the CPU: no sync checks were made; the columns below "
                                                 "say nothing about syncs.**", ""]),
             "## GradClipper.clip_ under set_sync_debug_mode('error')", "", "| configuration | syncs | error |",
             "|---|---|---|"]
    for name, r in result["core"].items():
        lines.append(f"| {name} | {'yes' if r['syncs'] else 'no'} | {r['raised'] or ''} |")
    lines += ["", "## ClipRun.clip_step + AdamW.step under set_sync_debug_mode('warn')", "",
              "| configuration | syncs per step | where |", "|---|---|---|"]
    for name, r in result["runner"].items():
        lines.append(f"| {name} | {r['syncs_per_step']} | {', '.join(r['where'])} |")
    return "\n".join(lines) + "\n"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "gpu_syncs"),
                   help="output prefix: writes PREFIX.json and PREFIX.md")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dry_run_cpu", action="store_true", help="run the loops on the CPU without sync checks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse(argv)
    if not torch.cuda.is_available() and not opts.dry_run_cpu:
        print("gpu_syncs.py needs a CUDA device (torch.cuda.is_available() is False): nothing measured.")
        return None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device("cpu" if opts.dry_run_cpu else "cuda")
    sync_checks = device.type == "cuda"
    warnings.filterwarnings("ignore", message=".*max_grad_norm.*")
    result = {"command": "python benchmarks/gpu_syncs.py " + " ".join(argv), "machine": _common.machine_info(),
              "device": str(device), "steps": opts.steps, "sync_checks": sync_checks,
              "core": check_core(device, opts.steps, sync_checks), "runner": check_runner(device, opts.steps, sync_checks)}
    _common.write_json(opts.out + ".json", result)
    _common.write_text(opts.out + ".md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
