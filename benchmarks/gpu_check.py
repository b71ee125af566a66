"""The GPU proof: one command that checks on CUDA what the CPU tests cannot, and a scale run of the evidence.

    make gpu-check                                          # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check   # tiny sizes, seconds

Sections, in this order, each timed, each written to ``--out``.json/.md as soon as it ends (a failing section
is recorded with its error and the next one runs; a section that does not fit the time left is skipped):

1. ``syncs``: host syncs per non-logging step through the Trainer, bf16, fused AdamW: ``recommended()`` against
   the stock Trainer, the Trainer's per-micro-step loss check (``logging_nan_inf_filter``) on and off; every
   sync attributed to the code that made it (0 may come from the pack).
2. ``fp16``: fp16 + the Trainer's GradScaler + ``recommended()``: unscaled once per step, spikes skipped by the
   pack, overflows skipped by the scaler, the step after each skip in the clean range, the non-finite watchdog
   under the scaler (fused and foreach AdamW).
3. ``identity``: ``GradClipCallback()`` against the stock Trainer, fp32 and bf16: losses and weights equal.
4. ``cost``: clip + fused AdamW step vs ``clip_grad_norm_`` + the step on 494 M parameters, and the floor;
   Trainer step time, ``recommended()`` vs stock, ~100 M parameters, bf16 (interleaved).
5. ``scale``: the corrupt shard and an accumulation fault on a 53 M-parameter model for 1,000 steps, stock vs
   ``recommended()``, with and without the fault: damage and removed share.

The sizes are :class:`_check_base.Plan` (``--quick``: tiny; ``--set name=value`` changes one). The whole run
stops starting work at ``--budget`` seconds after the process started (default 450: 7.5 minutes). Exit status:
0 when every check passed, 1 when a check failed or a section broke, 2 without CUDA (``--device cuda``).
Where a check needs CUDA (the sync debug mode, fp16 autocast and the Trainer's own GradScaler) the CPU run
says "skipped on cpu" and runs the same code with the CPU stand-in (Python-level host reads; a CPU GradScaler).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the identity section
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

from _check_base import QUICK, Context, Plan  # noqa: E402
from _check_report import markdown  # noqa: E402

# section -> seconds it needs at least to start (full sizes on a GPU, quick sizes)
NEEDS = {"syncs": (15, 2), "fp16": (20, 3), "identity": (20, 2), "cost": (45, 3), "scale": (40, 5)}


def sections() -> dict[str, Callable[[Context], dict[str, Any]]]:
    from _check_cost import cost
    from _check_fp16 import fp16
    from _check_scale import scale
    from _check_trainer import identity, syncs

    return {"syncs": syncs, "fp16": fp16, "identity": identity, "cost": cost, "scale": scale}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds on a CPU): the check of the check")
    p.add_argument("--budget", type=float, default=450.0, help="seconds after start when no more work is started")
    p.add_argument("--only", default="", help="comma-separated sections: " + ", ".join(NEEDS))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="change one size of the plan")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "gpu_check"),
                   help="output prefix: writes PREFIX.json and PREFIX.md after every section")
    return p.parse_args(argv)


def make_plan(opts: argparse.Namespace) -> Plan:
    plan = Plan(**(QUICK if opts.quick else {}))
    for assignment in opts.set:
        plan.set(assignment)
    return plan


def machine() -> dict[str, Any]:
    info = _common.machine_info(("transformers", "accelerate"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


def write(result: dict[str, Any], out: str, started: float) -> None:
    result["elapsed_s"] = time.perf_counter() - started
    _common.write_json(out + ".json", result)
    _common.write_text(out + ".md", markdown(result))


def run_section(name: str, fn: Callable[[Context], dict[str, Any]], ctx: Context, need: float) -> dict[str, Any]:
    if ctx.left() < need:
        return {"status": "skipped", "reason": f"not started: {ctx.left():.0f} s left of the budget, it needs at "
                                               f"least {need:.0f} s", "checks": []}
    print(f"gpu_check: {name} ({ctx.left():.0f} s left)", flush=True)
    start = time.perf_counter()
    try:
        section = fn(ctx)
        failed = any(c["status"] == "FAIL" for c in section.get("checks", []))
        section["status"] = "failed" if failed else "ok"
    except Exception as error:  # recorded; the next section still runs
        section = {"status": "error", "checks": [], "error": "".join(
            traceback.format_exception(type(error), error, error.__traceback__))[-4000:]}
    section["wall_s"] = time.perf_counter() - start
    ctx.release()
    return section


def main(argv: list[str] | None = None, started: float | None = None) -> dict[str, Any]:
    """Run the sections; ``started``: when the budget began (the process start for the script, else now)."""
    started = time.perf_counter() if started is None else started
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False (torch "
                         f"{torch.__version__}). On a machine without a GPU: --device cpu --quick.")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    _common.quiet_transformers()
    only = [s.strip() for s in opts.only.split(",") if s.strip()] or list(NEEDS)
    unknown = sorted(set(only) - set(NEEDS))
    if unknown:
        raise SystemExit(f"--only: unknown sections {unknown}; choose from {list(NEEDS)}")
    plan = make_plan(opts)
    result: dict[str, Any] = {"command": _common.command_line(), "device": opts.device, "quick": opts.quick,
                              "budget_s": opts.budget, "machine": machine(), "plan": plan.to_dict(),
                              "sections": {}, "finished": False}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(opts.device, plan, started + opts.budget, tmp)
        for name, fn in sections().items():
            if name in only:
                result["sections"][name] = run_section(name, fn, ctx, NEEDS[name][1 if opts.quick else 0])
                write(result, opts.out, started)
    result["finished"] = True
    write(result, opts.out, started)
    print(markdown(result), flush=True)
    return result


def passed(result: dict[str, Any]) -> bool:
    return all(s["status"] == "ok" for s in result["sections"].values())


if __name__ == "__main__":
    sys.exit(0 if passed(main(started=START)) else 1)
