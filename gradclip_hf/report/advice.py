"""Threshold advice: plain rules over a report's numbers (:func:`gradclip_hf.report.summary.summarize`).

Gradient clipping is meant to guard against *outliers*: an ordinary step should pass unchanged. The rules
compare the threshold with the norms of the steps after the first 10 % (the "start" phase, whose larger
norms after initialisation would skew them; the whole run when fewer than 5 norms remain). ``rate`` is the
clip rate there (logged, or estimated from ``grad_norm > threshold``). Steps whose update was skipped or
whose norm was NaN/Inf are left out of the rate and the percentiles (:mod:`.flagged`): a skipped spike is
not a clipped step, and counting it made a run whose threshold never touched an applied update look as if
clipping "suits" it. Exactly one *threshold rule* fires,
the first that matches:

``too_few_norms``         fewer than 5 finite norms logged: no advice.
``no_clipping``           the run did not clip (``max_grad_norm=0``, strategy ``none``): a threshold near
                          p99 would clip about 1 step in 100, the outliers.
``not_a_norm_threshold``  strategy ``value``/``agc`` (known from the pack's saved config): the threshold
                          bounds elements or per-unit ratios, not the global norm; no comparison made.
``below_usual_norm``      rate >= 50 %: for a constant threshold that means threshold <= median norm, so the
                          typical update is scaled down by threshold/median and clipping acts as a lower
                          learning rate; suggest p90 (clip the largest tenth), or an adaptive strategy.
``clips_often``           20 % <= rate < 50 %: the threshold sits inside the bulk of the norms (below p80),
                          trimming ordinary steps; suggest p90 if that is not intended.
``never_acted``           rate = 0: clipping was a no-op; suggest p99 if the operator wants it to catch
                          outliers (the smallest change that makes it act, on about 1 % of steps).
``suits``                 0 < rate < 20 %: clipping acts on the upper tail only; keep the threshold.

The suggestion is the smallest change that brings the clip rate into the outlier range from where it is:
p90 from above (still clipping one step in ten, closest to what the run was tuned with), p99 from below
(one in a hundred). It is read off this run's norms, which a different threshold would change: a start.

*Notes* may add to it (each independent): ``start_clipping`` (clipping concentrated in the start phase),
``threshold_varied`` (a schedule, adaptive strategy or spike controller moved it), ``unclipped_outliers``
(norm outliers that stayed below the threshold), ``loss_spikes_no_detector`` (loss outliers in a run
without a spike detector: clipping never sees the loss), ``nonfinite`` (NaN/Inf norms).
"""

from __future__ import annotations

from typing import Callable, Optional

from .summary import MIN_NORMS

__all__ = ["advise", "THRESHOLD_RULES", "NOTE_RULES", "OFTEN", "MOST"]

MOST = 0.5    # clip rate at/above which the threshold is below the median norm
OFTEN = 0.2   # clip rate at/above which ordinary steps are clipped
ADAPTIVE = ("zscore", "quantile")


def g(x: Optional[float]) -> str:
    """A number for a sentence: 3 significant digits."""
    return "?" if x is None else f"{x:.3g}"


def pct(rate: float) -> str:
    return f"{100 * rate:.0f} %" if rate == 0 or rate >= 0.01 else f"{100 * rate:.2f} %"


def _suggest(x: Optional[float]) -> Optional[float]:
    return None if x is None else float(f"{x:.2g}")


def _steps(steps: list, limit: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _spike_steps(spikes: dict) -> str:
    """Steps of the spike file's spikes ("61-80", runs of consecutive steps), else the logging windows that
    counted spikes ("21-30")."""
    steps = [_span(r["first"], r["last"]) for r in spikes.get("runs", [])]
    if not steps and not spikes["events"]:
        steps = [_span(w["first"], w["last"]) for w in spikes["windows"]]
    return _steps(steps)


def _advice(rule: str, message: str, suggested: Optional[float] = None) -> dict:
    return {"rule": rule, "message": message, "suggested_threshold": suggested}


def _left_out(s: dict) -> str:
    """``" (20 skipped or non-finite steps left out)"``: flagged steps are not in the rate (:mod:`.flagged`)."""
    n = s.get("flagged") or 0
    return f" ({n} skipped or non-finite step{'s' if n > 1 else ''} left out)" if n else ""


def _rate_text(s: dict) -> str:
    return ("estimated " if s["clip_rate_estimated"] else "") + f"clip rate {pct(s['clip_rate'])}" + _left_out(s)


def _comparable(r: dict) -> bool:
    """The run clipped with a norm threshold, and its clip rate is known from enough norms."""
    return (r["threshold"]["clipping"] and r["run"]["strategy"] not in ("value", "agc")
            and r["norms"]["all"]["n"] >= MIN_NORMS and r["steady"]["clip_rate"] is not None)


# ---------------------------------------------------------------------------------------------- threshold rules
def too_few_norms(r: dict) -> Optional[dict]:
    n, bad = r["norms"]["all"]["n"], r["norms"]["all"]["nonfinite"]
    if n >= MIN_NORMS:
        return None
    also = f" (and {bad} non-finite)" if bad else ""
    return _advice("too_few_norms", f"only {n} finite gradient norm(s) logged{also}: too few to advise on the "
                   "threshold; log more often (smaller logging_steps) or report on a longer run")


def no_clipping(r: dict) -> Optional[dict]:
    if r["threshold"]["clipping"] or r["norms"]["all"]["n"] < MIN_NORMS:
        return None
    s = r["steady"]
    p99 = _suggest(s["p99"])
    return _advice("no_clipping", f"the run did not clip (no threshold: {r['threshold']['source']}); its norms: median "
                   f"{g(s['p50'])}, p99 {g(s['p99'])}, max {g(s['max'])}; a threshold near p99 ({g(p99)}) "
                   "would clip about 1 step in 100, the outliers", p99)


def not_a_norm_threshold(r: dict) -> Optional[dict]:
    strategy = r["run"]["strategy"]
    if strategy not in ("value", "agc") or not r["threshold"]["clipping"] or r["norms"]["all"]["n"] < MIN_NORMS:
        return None
    what = "each gradient element" if strategy == "value" else "each unit's gradient-to-weight norm ratio"
    rate = r["steady"]["clip_rate"]
    return _advice("not_a_norm_threshold", f"strategy '{strategy}': the threshold ({g(r['threshold']['value'])}) "
                   f"bounds {what}, not the global norm, so it is not compared with these norms"
                   + (f"; clip rate {pct(rate)}" if rate is not None else ""))


def below_usual_norm(r: dict) -> Optional[dict]:
    s, t = r["steady"], r["threshold"]["value"]
    if not _comparable(r) or s["clip_rate"] < MOST:
        return None
    scale = f" (a typical one by {t / s['p50']:.2f})" if s["p50"] else ""
    other = "" if r["run"]["strategy"] in ADAPTIVE else " or strategy 'zscore' (adaptive)"
    return _advice("below_usual_norm", f"{_rate_text(s)}: the threshold ({g(t)}) is below the usual norm (median "
                   f"{g(s['p50'])}): most updates are scaled down{scale}, so clipping acts as a lower learning rate, "
                   f"not an outlier guard; consider threshold ~p90 = {g(_suggest(s['p90']))}{other}",
                   _suggest(s["p90"]))


def clips_often(r: dict) -> Optional[dict]:
    s, t = r["steady"], r["threshold"]["value"]
    if not _comparable(r) or not OFTEN <= s["clip_rate"] < MOST:
        return None
    return _advice("clips_often", f"{_rate_text(s)}: the threshold ({g(t)}) sits inside the usual range of norms "
                   f"(median {g(s['p50'])}, p90 {g(s['p90'])}): it trims ordinary steps, not only outliers; consider "
                   f"~p90 = {g(_suggest(s['p90']))} unless that is intended", _suggest(s["p90"]))


def never_acted(r: dict) -> Optional[dict]:
    s, t = r["steady"], r["threshold"]["value"]
    if not _comparable(r) or s["clip_rate"] != 0:
        return None
    when = " after the start" if s["name"] == "after start" and r["norms"]["all"]["clip_rate"] else ""
    sampled = " (of the logged steps)" if r["run"]["sampled"] and not s["max_exact"] else ""
    applied, apart = "", ""
    if s.get("flagged"):
        spiky = _spike_steps(r["spikes"])
        applied = " on an applied update"
        apart = (f"; the {s['flagged']} step(s) whose update was skipped or whose norm was not finite"
                 + (f" (spikes at steps {spiky})" if spiky else "") + " are left out: the optimizer got nothing "
                 "there, the spike action's doing, not clipping's")
    return _advice("never_acted", f"the threshold ({g(t)}) never acted{when}{applied}{sampled}; the largest norm "
                   f"was {g(s['max'])} ({s['max'] / t:.2g}x the threshold): clipping was a no-op for this run{apart}; "
                   f"a threshold near p99 ({g(_suggest(s['p99']))}) would catch outliers", _suggest(s["p99"]))


def suits(r: dict) -> Optional[dict]:
    s, t = r["steady"], r["threshold"]["value"]
    if not _comparable(r) or not 0 < s["clip_rate"] < OFTEN:
        return None
    spiky = _spike_steps(r["spikes"])
    spiky = f", spikes at steps {spiky}" if spiky else ""
    return _advice("suits", f"{_rate_text(s)}{spiky}: the threshold ({g(t)}) acts on the upper tail of the norms "
                   f"(median {g(s['p50'])}, p90 {g(s['p90'])}, max {g(s['max'])}): it suits the run")


THRESHOLD_RULES: tuple[Callable[[dict], Optional[dict]], ...] = (
    too_few_norms, no_clipping, not_a_norm_threshold, below_usual_norm, clips_often, never_acted, suits)


# ---------------------------------------------------------------------------------------------- notes
def start_clipping(r: dict) -> Optional[dict]:
    start, s = r["norms"]["phases"][0], r["steady"]
    if s["name"] != "after start" or start["clip_rate"] is None or s["clip_rate"] is None:
        return None
    if start["clip_rate"] < MOST or s["clip_rate"] >= MOST:
        return None
    return _advice("start_clipping", f"clipping acted on {pct(start['clip_rate'])} of steps {start['first']}-"
                   f"{start['last']} (the first 10 %) and {pct(s['clip_rate'])} after: large norms right after "
                   "initialisation are usual; the advice uses the steps after the start")


def threshold_varied(r: dict) -> Optional[dict]:
    t = r["threshold"]
    if t["min"] is None or t["max"] is None or t["max"] <= t["min"] * 1.01:
        return None
    return _advice("threshold_varied", f"the threshold varied between {g(t['min'])} and {g(t['max'])} (a schedule, an "
                   f"adaptive strategy or the spike controller); the advice compares with its median after the start, "
                   f"{g(t['value'])}")


def unclipped_outliers(r: dict) -> Optional[dict]:
    passed = [o for o in r["outliers"]["norm"] if not o["clipped"] and not o.get("skipped")]
    if not passed or not r["threshold"]["clipping"]:
        return None
    steps = _steps([f"{o['step']} ({g(o['value'])})" for o in passed])
    return _advice("unclipped_outliers", f"{len(passed)} norm outlier(s) stayed below the threshold and passed "
                   f"unclipped: steps {steps} (norm in brackets; more than 6 sigma above the norms before them)")


def loss_spikes_no_detector(r: dict) -> Optional[dict]:
    found = r["outliers"]["loss"]
    if not found or r["spikes"]["detector"]:
        return None
    steps = _steps([f"{o['step']} ({g(o['value'])})" for o in found])
    return _advice("loss_spikes_no_detector", f"loss outlier(s) at steps {steps} (loss in brackets), in a run without "
                   "a spike detector: clipping sees only the gradient norm; ClipConfig(spike_detection='loss') "
                   "flags such steps and can skip or tighten on them")


def nonfinite(r: dict) -> Optional[dict]:
    n = r["nonfinite"]
    if not n["count"]:
        return None
    where = f" (steps {_steps(n['steps'])})" if n["steps"] else ""
    if r["run"]["pack"]:
        tail = "the pack's nonfinite policy decided what happened to them (the default, 'skip', skips the update)"
    else:
        tail = ("the stock Trainer applies such a step (clip_grad_norm_ leaves NaN in the gradient) unless an fp16 "
                "GradScaler skipped it: check the weights; the pack's nonfinite='skip' never applies one")
    return _advice("nonfinite", f"{n['count']} step(s) with a non-finite gradient norm{where}: {tail}")


NOTE_RULES: tuple[Callable[[dict], Optional[dict]], ...] = (
    start_clipping, threshold_varied, unclipped_outliers, loss_spikes_no_detector, nonfinite)


def advise(report: dict) -> list[dict]:
    """The advice for a :func:`summarize` report: one threshold rule's advice, then any notes."""
    first = next((a for a in (rule(report) for rule in THRESHOLD_RULES) if a is not None), None)
    return ([first] if first else []) + [a for a in (rule(report) for rule in NOTE_RULES) if a is not None]
