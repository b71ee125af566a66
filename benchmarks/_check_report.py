"""gpu_check's markdown: the header, one part per section (its checks, then its numbers)."""

from __future__ import annotations

from typing import Any

TITLES = {"syncs": "Host syncs per step through the Trainer (bf16, fused AdamW)",
          "fp16": "fp16 + GradScaler + skip through the Trainer (recommended())",
          "identity": "Drop-in identity: GradClipCallback() vs the stock Trainer",
          "cost": "Cost: clip + fused AdamW step, and the Trainer step",
          "scale": "Evidence at scale: corrupt shard and an accumulation fault"}


def _f(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else "-" if x is None else str(x)


def _millions(n: Any) -> str:
    return "?" if not n else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def header(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']} (no GPU)"
    lines = ["# GPU check", "", f"`{result['command']}`", "",
             f"Device **{where}** ({result['device']}{', quick sizes' if result['quick'] else ''}), torch {m['torch']}"
             f"{' (CUDA ' + str(m['cuda']) + ')' if m.get('cuda') else ''}, transformers {m.get('transformers')}, "
             f"accelerate {m.get('accelerate')}, Python {m['python']}; {result['elapsed_s']:.0f} s of a "
             f"{result['budget_s']:.0f} s budget{'' if result.get('finished') else ' (still running or stopped)'}.",
             "", "| section | status | wall s | checks |", "|---|---|---|---|"]
    for name, section in result["sections"].items():
        checks = section.get("checks", [])
        passed = sum(c["status"] == "pass" for c in checks)
        failed = sum(c["status"] == "FAIL" for c in checks)
        lines.append(f"| {name} | {section['status']} | {_f(section.get('wall_s'), 1)} | {passed} passed, {failed} "
                     f"failed, {len(checks) - passed - failed} skipped |")
    return lines


def checks_table(section: dict[str, Any]) -> list[str]:
    lines = []
    if section.get("error"):
        lines += ["", "```", section["error"], "```"]
    if section.get("checks"):
        lines += ["", "| check | status | seen |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in section["checks"]]
    return lines


def syncs(s: dict[str, Any]) -> list[str]:
    lines = ["", f"Counted with {s['counted_with']}; {s['steps_counted']} steps per run, none with a log but in the "
                 f"last row. The stock Trainer's own loss check (logging_nan_inf_filter) makes "
                 f"{s['trainer_loss_check_per_step']} per step.", "",
             "| run | reads per step (min-max) | caused by the pack (max) | where (per step) |", "|---|---|---|---|"]
    for name, r in s["rows"].items():
        sites = "; ".join(f"{v:g}x `{k}`" for k, v in sorted(r["sites_per_step"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {r['min']}-{r['max']} | {r['pack_max']} | {sites} |")
    return lines


def fp16(s: dict[str, Any]) -> list[str]:
    lines = ["", f"Garbage-batch spikes at steps {s['spikes']}; overflow forced at steps {s['forced_overflow']}.", "",
             "| optimizer | final scale | logged nonfinite steps | pack-skipped steps | LR scheduler stepped on "
             "overflow steps |", "|---|---|---|---|---|"]
    for optim, r in s["runs"].items():
        stepped = r["lr_scheduler_stepped_on_overflow"]
        lines.append(f"| {optim} | {r['final_scale']:g} | {r['nonfinite_steps']} | {r['skipped_steps']} | "
                     f"{sum(stepped)} of {len(stepped)} |")
    return lines


def identity(s: dict[str, Any]) -> list[str]:
    lines = ["", f"{s['steps']} steps, logging every step.", "",
             "| precision | max diff loss | grad_norm | weights | stock vs stock (loss, grad_norm, weights) | verdict |",
             "|---|---|---|---|---|---|"]
    for precision, r in s["rows"].items():
        a, c = r["GradClipCallback() vs stock"], r["stock vs stock"]
        lines.append(f"| {precision} | {a['loss']:.3g} | {a['grad_norm']:.3g} | {a['weights']:.3g} | {c['loss']:.3g}, "
                     f"{c['grad_norm']:.3g}, {c['weights']:.3g} | {r['cause']} |")
    return lines


def cost(s: dict[str, Any]) -> list[str]:
    lines = []
    k = s.get("kernel")
    if k:
        lines += ["", f"Clip + step: preset `{k['preset']}` ({_millions(k['parameters'])} parameters, {k['tensors']} "
                      f"tensors, fp32), {k['repeats']} interleaved rounds after {k['warmup']} warm-up calls.", "",
                  "| method | median ms | ratio to clip_grad_norm_ + step | ratio to the floor |", "|---|---|---|---|"]
        lines += [f"| {n} | {r['ms']:.3f} | {r['ratio']:.3f} | {r['vs_floor']:.3f} |" for n, r in k["rows"].items()]
    t = s.get("trainer")
    if t:
        ms = t["ms_per_step"]
        lines += ["", f"Trainer step: byte-level Llama, {_millions(t['parameters'])} parameters (hidden {t['hidden']}, "
                      f"{t['layers']} layers), bf16, fused AdamW, batch {t['batch']} x {t['block']}; {t['steps']} steps "
                      f"per run ({t['untimed']} untimed), {t['repeats']} interleaved repeats.", "",
                  f"stock {ms['stock']:.2f} ms per step, recommended() {ms['recommended']:.2f} ms: ratio "
                  f"**{t['ratio']:.3f}** (per repeat {', '.join(f'{x:.3f}' for x in t['ratios'])}; median cycle ratio "
                  f"{t['cycle_ratio']:.3f})."]
    return lines


def scale(s: dict[str, Any]) -> list[str]:
    st = s["settings"]
    lines = ["", f"Byte-level Llama, {_millions(s.get('parameters'))} parameters (hidden {st['hidden']}, "
                 f"{st['layers']} layers), {st['steps']} steps, batch {st['batch']} x {st['block']} bytes, lr {st['lr']} "
                 f"cosine, bf16, fused AdamW, seed 0. Accumulation fault: GA {s['faults'].get('corrupt_microbatch', {}).get('ga')}"
                 f" ({s.get('ga_choice', '')}).", "",
             "| fault | GA | stock damage | recommended damage | removed | false-positive cost | fault steps "
             "flagged | clean steps flagged |", "|---|---|---|---|---|---|---|---|"]
    for name, f in s["faults"].items():
        sm = f["summary"]
        rec = sm.get("recommended", {})
        lines.append(f"| {name} | {f['ga']} | {_f(sm.get('stock', {}).get('damage'))} | {_f(rec.get('damage'))} | "
                     f"{_f(sm.get('removed'), 2)} | {_f(sm.get('fp_cost'))} | {_f(rec.get('fault_steps_flagged'))} of "
                     f"{len(f['fault_steps'])} | {_f(rec.get('clean_steps_flagged'))} |")
    lines += ["", "| fault | run | eval loss | train s | steps | skipped |", "|---|---|---|---|---|---|"]
    for name, f in s["faults"].items():
        for key, r in f["runs"].items():
            if "skipped" in r and "eval_loss" not in r:
                lines.append(f"| {name} | {key} | {r['skipped']} | | | |")
            else:
                lines.append(f"| {name} | {key} | {r['eval_loss']:.4f} | {r['train_s']:.1f} | {r['steps_done']}"
                             f"{' (cut)' if r['cut_short'] else ''} | {_f(r['skipped_steps'])} |")
    return lines


RENDER = {"syncs": syncs, "fp16": fp16, "identity": identity, "cost": cost, "scale": scale}


def markdown(result: dict[str, Any]) -> str:
    lines = header(result)
    for name, section in result["sections"].items():
        lines += ["", f"## {TITLES.get(name, name)}", "", f"{section['status']}, {_f(section.get('wall_s'), 1)} s"
                  + (f": {section['reason']}" if section.get("reason") else "")]
        lines += checks_table(section)
        if section["status"] in ("ok", "failed"):
            try:
                lines += RENDER[name](section)
            except (KeyError, TypeError, ValueError) as error:  # a partial section still writes its checks
                lines += ["", f"(numbers not rendered: {type(error).__name__}: {error})"]
    return "\n".join(lines) + "\n"
