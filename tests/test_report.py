"""`gradclip-hf report`: numbers equal to numpy on the logged values, each advice rule on its own constructed
log, tolerant reading (corrupt state, malformed spike lines), the CLI, the chart; real Trainer runs (slow)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradclip_hf.cli import main
from gradclip_hf.report import advice as rules
from gradclip_hf.report import build_report, load_run, render_text
from gradclip_hf.report.load import SPIKE_FILE
from gradclip_hf.spikefile import read_records as read_spike_file
from gradclip_hf.report.stats import clip_rate, outliers, percentile, phases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- builders
def stock_history(norms, losses=None, logging_steps=1):
    """A stock Trainer's log_history: one entry per logging window with the last step's grad_norm."""
    losses = losses or [2.0] * len(norms)
    return [{"loss": l, "grad_norm": n, "learning_rate": 1e-3, "epoch": 0.1, "step": (i + 1) * logging_steps}
            for i, (n, l) in enumerate(zip(norms, losses))]


def pack_history(norms, threshold=1.0, logging_steps=1, **per_window):
    """A GradClipTrainer log_history; ``per_window`` gives lists of other gradclip/* values."""
    history = stock_history(norms, logging_steps=logging_steps)
    for i, entry in enumerate(history):
        entry.update({"gradclip/norm_mean": norms[i], "gradclip/norm_max": norms[i],
                      "gradclip/norm_post": min(norms[i], threshold), "gradclip/threshold": threshold,
                      "gradclip/clip_rate": float(norms[i] > threshold), "gradclip/nonfinite_steps": 0,
                      "gradclip/skipped_steps": 0, "gradclip/spikes": 0, "gradclip/spike_factor": 1.0})
        entry.update({f"gradclip/{k}": v[i] for k, v in per_window.items()})
    return history


def write_run(path, history, logging_steps=1, strategy=None, spike_lines=None, checkpoint=None):
    """Write an output_dir (``trainer_state.json`` at top level or in ``checkpoint-N``) and a spike file."""
    path.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in history if "step" in h]
    state = {"log_history": history, "global_step": max(steps, default=0), "max_steps": max(steps, default=0),
             "logging_steps": logging_steps, "stateful_callbacks": {}}
    if strategy:
        state["stateful_callbacks"]["GradClipCallback"] = {"args": {"config": {"strategy": strategy}}}
    folder = path / f"checkpoint-{checkpoint}" if checkpoint else path
    folder.mkdir(exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if spike_lines is not None:
        (path / SPIKE_FILE).write_text("".join(line + "\n" for line in spike_lines))
    return path


def report_of(tmp_path, history, threshold=None, **kw):
    return build_report(str(write_run(tmp_path / "run", history, **kw)), threshold=threshold)


def ramp(n, lo, hi):
    return list(np.linspace(lo, hi, n))


# ---------------------------------------------------------------------------------------------- numbers
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=60), st.sampled_from([0, 10, 50, 90, 99, 100]))
def test_percentile_equals_numpy_default(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_percentile_equals_statistics_inclusive():
    values = [0.3, 1.7, 2.2, 0.9, 5.1, 2.2, 1.1]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    assert [percentile(values, 10 * k) for k in range(1, 10)] == pytest.approx(deciles)


def test_phases_are_the_first_tenth_then_thirds():
    assert [(p.name, p.first, p.last) for p in phases(100)] == [
        ("start", 1, 10), ("early", 11, 40), ("middle", 41, 70), ("late", 71, 100)]
    assert [(p.first, p.last) for p in phases(2)] == [(1, 1), (2, 2)]  # very short: empty phases left out


def test_norm_percentiles_per_phase_equal_numpy_on_the_logged_values(tmp_path):
    rng = np.random.default_rng(0)
    norms = list(rng.lognormal(0.5, 0.4, 100))
    r = report_of(tmp_path, stock_history(norms), threshold=2.0)
    slices = {"all": norms, "start": norms[:10], "early": norms[10:40], "middle": norms[40:70], "late": norms[70:],
              "after start": norms[10:]}
    rows = {row["name"]: row for row in [r["norms"]["all"], r["steady"]] + r["norms"]["phases"]}
    for name, values in slices.items():
        row = rows[name]
        assert row["n"] == len(values)
        for q in (50, 90, 99):
            assert row[f"p{q}"] == pytest.approx(np.percentile(values, q)), (name, q)
        assert row["max"] == max(values)
        # stock run, logging_steps=1: the clip rate is exact (grad_norm > max_grad_norm), not an estimate
        assert row["clip_rate"] == pytest.approx(np.mean(np.array(values) > 2.0)) and not row["clip_rate_estimated"]


def test_logged_clip_rate_is_weighted_by_window_and_max_comes_from_norm_max(tmp_path):
    norms = [2.0, 0.5, 0.5, 0.5]
    history = pack_history(norms, logging_steps=5, clip_rate=[1.0, 0.2, 0.0, 0.4], norm_max=[3.0, 9.0, 0.6, 0.7])
    history.insert(1, {"eval_loss": 1.5, "step": 5})
    r = report_of(tmp_path, history, logging_steps=5)
    assert r["run"]["sampled"] and r["norms"]["all"]["max_exact"]
    assert r["norms"]["all"]["max"] == 9.0  # the window max, not a logged last-step norm
    assert r["norms"]["all"]["p50"] == pytest.approx(np.percentile(norms, 50))
    assert r["norms"]["all"]["clip_rate"] == pytest.approx((1.0 + 0.2 + 0.0 + 0.4) / 4)
    assert not r["norms"]["all"]["clip_rate_estimated"]
    # a window of 10 steps weighs twice a window of 5
    windows = load_run(str(tmp_path / "run")).windows
    windows[1].first = windows[0].first  # pretend the first two windows were one of 10 steps
    assert clip_rate(windows[1:], None)[0] == pytest.approx((0.2 * 10 + 0.0 * 5 + 0.4 * 5) / 20)
    assert r["run"]["last_eval_loss"] == [5, 1.5]


def test_stock_clip_rate_with_sparse_logging_is_an_estimate(tmp_path):
    norms = [3.0, 0.5, 2.0, 0.1]
    r = report_of(tmp_path, stock_history(norms, logging_steps=10), threshold=1.0, logging_steps=10)
    assert r["norms"]["all"]["clip_rate"] == 0.5 and r["norms"]["all"]["clip_rate_estimated"]
    assert not r["norms"]["all"]["max_exact"]
    assert r["threshold"] == {"value": 1.0, "min": 1.0, "max": 1.0, "source": "--threshold", "clipping": True}


def test_outliers_rolling_robust_z():
    flat = [(i, 1.0 + 0.01 * (i % 3)) for i in range(1, 31)]
    assert outliers(flat) == []
    spiky = flat[:20] + [(21, 5.0)] + flat[20:]
    found = outliers(spiky)
    assert [o["step"] for o in found] == [21] and found[0]["z"] > 6
    assert outliers(flat[:9] + [(10, 50.0)]) == []  # fewer than 10 values before: no judgement


# ---------------------------------------------------------------------------------------------- advice rules
def advice_cases(tmp_path):
    """One constructed run per threshold rule (a constant threshold of 1.0 unless said otherwise)."""
    steady = ramp(40, 0.5, 1.2)   # after the start about a third of the norms are above 1.0
    cases = {
        "too_few_norms": (stock_history([2.0, 2.1, 2.2]), 1.0, {}),
        "no_clipping": (stock_history(ramp(40, 0.2, 0.4)), 0.0, {}),
        "not_a_norm_threshold": (pack_history(ramp(40, 0.2, 0.4), threshold=0.01), None, {"strategy": "value"}),
        "below_usual_norm": (stock_history(ramp(40, 1.5, 2.5)), 1.0, {}),
        "clips_often": (stock_history(steady), 1.0, {}),
        "never_acted": (stock_history(ramp(40, 0.2, 0.4)), 1.0, {}),
        "suits": (stock_history(ramp(40, 0.2, 0.4) + [2.0] * 4 + ramp(40, 0.2, 0.4)), 1.0, {}),
    }
    return {name: report_of(tmp_path / name, h, threshold=t, **kw) for name, (h, t, kw) in cases.items()}


def test_each_threshold_rule_fires_on_its_case_only(tmp_path):
    reports = advice_cases(tmp_path)
    for rule in rules.THRESHOLD_RULES:
        fired = sorted(name for name, r in reports.items() if rule(r) is not None)
        assert fired == [rule.__name__], (rule.__name__, fired)
    for name, r in reports.items():
        assert r["advice"][0]["rule"] == name
    assert reports["clips_often"]["steady"]["clip_rate"] == pytest.approx(np.mean(np.array(ramp(40, 0.5, 1.2)[4:]) > 1))


def test_suggested_thresholds_are_p90_from_above_and_p99_from_below(tmp_path):
    reports = advice_cases(tmp_path)
    tight = reports["below_usual_norm"]
    p90 = np.percentile(ramp(40, 1.5, 2.5)[4:], 90)
    assert tight["suggested_threshold"] == float(f"{p90:.2g}")
    assert "lower learning rate" in tight["advice"][0]["message"]
    assert "strategy 'zscore'" in tight["advice"][0]["message"]
    idle = reports["never_acted"]
    p99 = np.percentile(ramp(40, 0.2, 0.4)[4:], 99)
    assert idle["suggested_threshold"] == float(f"{p99:.2g}")
    assert "never acted" in idle["advice"][0]["message"] and "largest norm was 0.4" in idle["advice"][0]["message"]
    assert reports["no_clipping"]["suggested_threshold"] == float(f"{p99:.2g}")
    assert reports["suits"]["suggested_threshold"] is None and reports["too_few_norms"]["advice"][1:] == []
    assert reports["not_a_norm_threshold"]["suggested_threshold"] is None


def note_cases(tmp_path):
    base = ramp(40, 0.5, 0.6)
    loss = [2.0 + 0.01 * (i % 3) for i in range(40)]
    loss[30] = 9.0
    varied = pack_history(base)
    for i, h in enumerate(varied):
        h["gradclip/threshold"] = 1.0 if i < 20 else 0.7
    cases = {
        "start_clipping": (stock_history([5.0] * 4 + base[4:]), 1.0),
        "threshold_varied": (varied, None),
        "unclipped_outliers": (stock_history(base[:30] + [0.95] + base[31:]), 1.0),
        "loss_spikes_no_detector": (stock_history(base, losses=loss), 1.0),
        "nonfinite": (stock_history(base[:30] + [float("nan")] + base[31:]), 1.0),
        "clean": (stock_history(base), 1.0),
    }
    return {name: report_of(tmp_path / name, h, threshold=t) for name, (h, t) in cases.items()}


def test_each_note_fires_on_its_case_only(tmp_path):
    reports = note_cases(tmp_path)
    for rule in rules.NOTE_RULES:
        fired = sorted(name for name, r in reports.items() if rule(r) is not None)
        assert fired == [rule.__name__], (rule.__name__, fired)
    assert "31" in rules.nonfinite(reports["nonfinite"])["message"]
    assert "stock Trainer applies such a step" in rules.nonfinite(reports["nonfinite"])["message"]
    assert reports["nonfinite"]["nonfinite"] == {"count": 1, "steps": [31]}


def test_notes_come_with_too_few_norms(tmp_path):
    r = report_of(tmp_path, stock_history([float("nan")] * 3), threshold=1.0)
    assert [a["rule"] for a in r["advice"]] == ["too_few_norms", "nonfinite"]
    assert "only 0 finite gradient norm(s) logged (and 3 non-finite)" in r["advice"][0]["message"]


# ---------------------------------------------------------------------------------------------- skipped steps
BURST = range(61, 81)  # steps (as train/global_step names them) of 20 bad batches whose updates were skipped


def lora_burst(logging_steps=1, steps=130, threshold=1.0):
    """What a LoRA run of the pack logs (issue 23): clean adapter norms 0.2-0.34, never near the threshold of
    1.0, and a burst of 20 loss spikes at steps 61-80 (norms 3-5) whose updates were skipped; the logged
    gradclip/clip_rate counts every step whose norm was above the threshold, skipped ones too. Returns the
    log_history and the spike file's lines."""
    norm = {s: 0.2 + 0.14 * ((s * 7) % 10) / 9 for s in range(1, steps + 1)}
    norm.update({s: 3.0 + 2.0 * ((s * 3) % 7) / 6 for s in BURST})
    history = []
    for last in range(logging_steps, steps + 1, logging_steps):
        window = range(last - logging_steps + 1, last + 1)
        skipped = sum(s in BURST for s in window)
        history.append({"loss": 7.3 if last in BURST else 2.47, "grad_norm": norm[last], "step": last,
                        "gradclip/norm_max": max(norm[s] for s in window),
                        "gradclip/norm_post": 0.0 + min(norm[last], threshold),
                        "gradclip/threshold": threshold,
                        "gradclip/clip_rate": sum(norm[s] > threshold for s in window) / logging_steps,
                        "gradclip/nonfinite_steps": 0, "gradclip/skipped_steps": skipped, "gradclip/spikes": skipped,
                        "gradclip/spike_factor": 1.0})
    lines = [json.dumps({"event": "spike", "step": s, "kind": "loss", "action": "skip", "skipped": True,
                         "loss": 7.21 + 0.24 * i / 19, "loss_baseline": 2.47, "loss_z": 37 + 2 * i / 19,
                         "norm": norm[s], "threshold": threshold, "threshold_before": threshold,
                         "threshold_after": threshold, "top_layers": [["base_model.q_proj.lora_B", 2.0 + i / 19],
                                                                      ["base_model.v_proj.lora_B", 1.5]],
                         "batch": {"indices": [[s * 4, s * 4 + 1]], "fingerprint": f"{s:016x}", "text": "\x00\x01"}})
             for i, s in enumerate(BURST)]
    return history, lines, norm


def test_skipped_spike_steps_are_left_out_of_the_clip_rate_and_the_percentiles(tmp_path):
    history, lines, norm = lora_burst()
    raw = np.mean([h["gradclip/clip_rate"] for h in history[13:]])
    assert 0 < raw < rules.OFTEN  # counted the old way, the skipped spikes made the threshold look as if it "suits"
    r = report_of(tmp_path, history, spike_lines=lines)
    s = r["steady"]
    clean = [norm[step] for step in range(14, 131) if step not in BURST]
    assert s["clip_rate"] == 0 and s["flagged"] == 20 and s["n"] == len(clean)
    assert [s["p50"], s["p99"], s["max"]] == pytest.approx([np.percentile(clean, 50), np.percentile(clean, 99),
                                                            max(clean)])
    assert r["left_out"]["steps"] == 20 and r["left_out"]["skipped"] == 20
    assert r["left_out"]["norm_min"] == min(norm[s] for s in BURST)
    advice = r["advice"][0]
    assert advice["rule"] == "never_acted" and rules.suits(r) is None
    assert "never acted on an applied update" in advice["message"] and "spikes at steps 61-80" in advice["message"]
    assert advice["suggested_threshold"] == float(f"{np.percentile(clean, 99):.2g}")
    assert [o["skipped"] for o in r["outliers"]["norm"]] and all(o["skipped"] for o in r["outliers"]["norm"])
    assert rules.unclipped_outliers(r) is None  # a skipped outlier did not pass


def test_a_burst_is_a_few_report_lines(tmp_path):
    history, lines, _ = lora_burst()
    text = render_text(report_of(tmp_path, history, spike_lines=lines))
    spikes = text[text.index("\nspikes:"):text.index("\nskipped updates:")].strip().splitlines()
    assert spikes == [
        "spikes: 20 (logged gradclip/spikes)",
        "  20 flagged step(s) in the spike file, in 1 run(s) of consecutive steps (--json and the file have one "
        "entry per step):",
        "  steps 61-80: 20 loss spikes, loss 7.21-7.45 against 2.47 (37-39 sigma); updates skipped",
        "      top layers: base_model.q_proj.lora_B 2-3, base_model.v_proj.lora_B 1.5",
        "      batch of step 61 (the first): indices [[244,245]]; fingerprint 000000000000003d; text '\\x00\\x01'"]
    assert "skipped updates: 20 logged; steps 61-80" in text
    assert "norm outliers (> 6 sigma above the 50 logged values before): 61-80 (20 steps, 3-5, update skipped)" \
        in text


def test_a_rerun_writes_its_steps_again_and_the_report_keeps_the_last(tmp_path):
    history, lines, _ = lora_burst()
    listed = [json.dumps({"event": "skip_listed", "step": s, "kind": "listed", "action": "skip", "skipped": True})
              for s in BURST]
    r = report_of(tmp_path, history, spike_lines=lines + listed + lines[5:])  # the rerun resumed at step 65
    assert len(r["spikes"]["events"]) == 40 and [x["count"] for x in r["spikes"]["runs"]] == [20]
    assert r["spikes"]["runs"][0]["text"].endswith("updates skipped (listed in clip_skip_steps / clip_skip_steps_from)")
    assert any("15 line(s) for steps written again" in w for w in r["warnings"])
    assert r["left_out"]["steps"] == 20 and r["advice"][0]["rule"] == "never_acted"


def test_sparse_logging_without_a_spike_file_leaves_skipped_windows_out(tmp_path):
    history, _, norm = lora_burst(logging_steps=10)
    r = report_of(tmp_path, history)
    assert r["steady"]["clip_rate"] == 0 and r["steady"]["flagged"] == 20 and r["advice"][0]["rule"] == "never_acted"
    assert r["steady"]["max"] == max(h["gradclip/norm_max"] for h in history if h["step"] not in (70, 80))
    assert r["steady"]["max_exact"]  # windows 61-70 and 71-80 are all skipped: no clean step's norm was lost


def test_the_chart_draws_what_happened_on_skipped_steps(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import gradclip_hf.charts as charts

    drawn = {}
    real = charts.norms_chart

    def spy(path, steps, norms, **kw):  # the real chart, its inputs kept
        drawn.update(kw, steps=steps)
        return real(path, steps, norms, **kw)

    monkeypatch.setattr(charts, "norms_chart", spy)
    history, lines, norm = lora_burst(logging_steps=10)
    run = write_run(tmp_path / "run", history, logging_steps=10, spike_lines=lines)
    build_report(str(run), chart=str(tmp_path / "c.png"))
    post = dict(zip(drawn["steps"], drawn["norm_post"]))
    assert post[70] is None and post[80] is None and post[60] == pytest.approx(min(norm[60], 1.0))
    assert drawn["spikes"] == list(BURST) and drawn["spike_norms"] == {s: norm[s] for s in BURST}
    assert drawn["skipped"] == list(BURST)
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


# ---------------------------------------------------------------------------------------------- reading
def test_missing_state_names_the_path_and_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no trainer_state.json in .*empty.* and no checkpoint-N"):
        build_report(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        build_report(str(tmp_path / "nowhere"))


def test_corrupt_state_and_missing_keys(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text('{"log_history": [')
    with pytest.raises(ValueError, match=r"cannot read .*trainer_state.json.*Expecting value"):
        build_report(str(run))
    (run / "trainer_state.json").write_text('{"global_step": 3}')
    with pytest.raises(ValueError, match=r"trainer_state.json.* has no 'log_history' list"):
        build_report(str(run))
    (run / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}]}))
    with pytest.raises(ValueError, match=r"1 log entries but none with a 'grad_norm'"):
        build_report(str(run))
    # the README's mistake: 300 steps under the Trainer's default logging_steps=500 log no training step
    state = {"log_history": [{"train_runtime": 9.0, "step": 300}], "global_step": 300, "logging_steps": 500}
    (run / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"logging_steps is 500 but this state stops at step 300: the Trainer logs "
                                         r"every logging_steps steps \(default 500\), so it never logged; set logging_steps"):
        build_report(str(run))


def test_output_dir_reads_the_newest_readable_checkpoint(tmp_path):
    run = write_run(tmp_path / "run", stock_history([0.5] * 9), checkpoint=9)
    write_run(tmp_path / "run", stock_history([0.5] * 20), checkpoint=20)
    write_run(tmp_path / "run", stock_history([0.5] * 3), checkpoint=3)
    r = build_report(str(run), threshold=1.0)
    assert r["source"]["state_file"].endswith(os.path.join("checkpoint-20", "trainer_state.json"))
    (run / "checkpoint-20" / "trainer_state.json").write_text("{")
    r = build_report(str(run), threshold=1.0)
    assert r["source"]["state_file"].endswith(os.path.join("checkpoint-9", "trainer_state.json"))
    assert any("checkpoint-20" in w and "older checkpoint" in w for w in r["warnings"])


def test_checkpoint_dir_reads_the_spike_file_of_its_parent(tmp_path):
    lines = [json.dumps({"event": "spike", "step": step, "kind": "loss", "action": "skip", "skipped": True})
             for step in (11, 4)]
    run = write_run(tmp_path / "run", pack_history([0.5] * 8), checkpoint=8, spike_lines=lines)
    r = build_report(str(run / "checkpoint-8"))
    assert r["source"]["spike_file"] == str(run / SPIKE_FILE)
    assert r["source"]["output_dir"] == str(run)
    assert [(e["step"], e["after_state"]) for e in r["spikes"]["events"]] == [(4, False), (11, True)]
    assert r["skipped"]["steps"] == [4, 11]
    assert "  step 11: loss spike; update skipped [after this state's last step]" in render_text(r)


def test_malformed_spike_lines_are_skipped_with_one_warning_each(tmp_path):
    lines = [json.dumps({"event": "spike", "step": 7, "kind": "loss+norm", "action": "tighten", "loss": 8.5,
                         "loss_z": 9.25, "norm": 4.0, "threshold_before": 1.0, "threshold_after": 0.5,
                         "top_layers": [["lm_head.weight", 3.5], ["bad"], [1, 2]],
                         "batch": {"indices": [[[12, 13], [14, 15]]], "fingerprint": "ab12", "text": "def f():"}}),
             "{not json", "[1, 2]", "",
             json.dumps({"event": "nonfinite", "step": "x", "norm": "big", "skipped": "yes", "batch": 5}),
             json.dumps({"event": "nonfinite", "step": 9, "kind": "nonfinite", "skipped": True})]
    path = tmp_path / SPIKE_FILE
    path.write_text("\n".join(lines) + "\n")
    events, warnings = read_spike_file(str(path))
    assert [w.split(": ", 1)[0] for w in warnings] == [f"{path}:2", f"{path}:3"]
    assert len(events) == 3
    assert events[0].top_layers == [["lm_head.weight", 3.5]] and events[0].indices == [[[12, 13], [14, 15]]]
    assert (events[1].step, events[1].norm, events[1].skipped, events[1].indices) == (None, None, None, None)
    r = report_of(tmp_path, pack_history([0.5] * 12), spike_lines=lines)
    assert len(r["warnings"]) == 2 and r["nonfinite"]["steps"] == [9] and r["skipped"]["steps"] == [9]


def test_training_args_bin_gives_a_stock_run_its_threshold(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    run = write_run(tmp_path / "run", stock_history(ramp(20, 0.2, 0.4)), checkpoint=20)
    r = build_report(str(run))
    assert r["threshold"]["value"] == 1.0 and r["threshold"]["source"].startswith("assumed: the Trainer default")
    args = transformers.TrainingArguments(output_dir=str(run), max_grad_norm=0.3, report_to="none")
    torch.save(args, run / "training_args.bin")  # the output_dir's, when the checkpoint has none
    r = build_report(str(run))
    assert r["threshold"]["value"] == 0.3 and r["threshold"]["source"] == f"max_grad_norm from {run}/training_args.bin"
    args.max_grad_norm = 0.0
    torch.save(args, run / "checkpoint-20" / "training_args.bin")  # the checkpoint's own comes first
    r = build_report(str(run))
    assert not r["threshold"]["clipping"] and r["advice"][0]["rule"] == "no_clipping"
    assert build_report(str(run), threshold=0.7)["threshold"]["value"] == 0.7  # --threshold wins


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_training_args_bin_is_read_without_running_the_pickle(tmp_path):
    import torch

    from gradclip_hf.report.training_args import read_max_grad_norm

    payload, target = _Payload(), tmp_path / "made_by_the_pickle"
    payload.target = str(target)
    path = tmp_path / "training_args.bin"
    torch.save({"max_grad_norm": payload}, path)
    assert read_max_grad_norm(str(path)) is None and not target.exists()
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read .*training_args.bin.* as torch.save"):
        read_max_grad_norm(str(path))
    run = write_run(tmp_path / "run", stock_history(ramp(20, 0.2, 0.4)))
    (run / "training_args.bin").write_bytes(b"not a zip")
    r = build_report(str(run))
    assert r["threshold"]["value"] == 1.0 and any("cannot read" in w for w in r["warnings"])


def test_logged_threshold_ignores_the_option_and_says_so(tmp_path):
    r = report_of(tmp_path, pack_history([0.5] * 12, threshold=2.0), threshold=0.1)
    assert r["threshold"]["value"] == 2.0 and any("--threshold 0.1 ignored" in w for w in r["warnings"])
    with pytest.raises(ValueError, match="`threshold` must be a finite number >= 0"):
        build_report(str(tmp_path / "run"), threshold=-1.0)


# ---------------------------------------------------------------------------------------------- CLI and chart
def spiky_run(tmp_path):
    norms = ramp(30, 2.0, 1.0)
    norms[19] = float("nan")
    history = pack_history(norms, threshold=1.5, nonfinite_steps=[int(i == 19) for i in range(30)],
                           skipped_steps=[int(i in (19, 24)) for i in range(30)],
                           spikes=[int(i == 24) for i in range(30)])
    history.append({"step": 30, "gradclip/stop_reason": "GradClipTrainer stopped training at step 30: loss cap"})
    lines = [json.dumps({"event": "spike", "step": 25, "kind": "loss", "action": "skip", "skipped": True, "loss": 7.5,
                         "loss_baseline": 2.0, "loss_z": 11.0, "batch": {"indices": [[[40, 41, 42, 43]]],
                                                                         "text": "x" * 200}}),
             json.dumps({"event": "nonfinite", "step": 20, "kind": "nonfinite", "skipped": True})]
    return write_run(tmp_path / "run", history, spike_lines=lines)


def test_cli_prints_the_report_and_writes_the_chart(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = spiky_run(tmp_path)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    for text in ("steps 1-30 logged", "threshold: 1.5", "step 20: non-finite gradient (NaN/Inf); update skipped",
                 "step 25: loss spike, loss 7.5 against 2 (11 sigma); update skipped",
                 "batch of step 25: indices [[[40,41,42,43]]]; text 'xxxx", "skipped updates: 2",
                 "non-finite norms: 1 (steps 20)", "stopped at step 30: GradClipTrainer stopped", "advice:",
                 f"chart: {run / 'gradclip_report.png'}"):
        assert text in out, text
    assert (run / "gradclip_report.png").read_bytes()[:8] == PNG
    png = tmp_path / "elsewhere.png"
    assert main(["report", str(run), "--png", str(png), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # strict JSON: the NaN norm is null
    assert png.read_bytes()[:8] == PNG and data["chart"] == str(png)
    assert data["skipped"] == {"logged": 2, "steps": [20, 25]} and data["spikes"]["logged"] == 1
    assert data["advice"] == build_report(str(run))["advice"]


def test_cli_no_png_and_errors_exit_2(tmp_path, capsys):
    run = write_run(tmp_path / "run", stock_history(ramp(20, 0.2, 0.4)))
    assert main(["report", str(run), "--no-png", "--threshold", "1"]) == 0
    assert not (run / "gradclip_report.png").exists() and "[never_acted]" in capsys.readouterr().out
    for argv, message in ((["report", str(tmp_path / "nowhere")], "does not exist"),
                          (["report", str(tmp_path)], "no trainer_state.json in"),
                          (["report", str(run), "--threshold", "-1"], "--threshold must be a finite number"),
                          (["report", str(run), "--png", "a.png", "--no-png"], "not allowed with argument")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_python_m_gradclip_hf_report(tmp_path):
    run = write_run(tmp_path / "run", stock_history(ramp(20, 1.5, 2.5)))
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "gradclip_hf", "report", str(run), "--threshold", "1", "--no-png",
                           "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["advice"][0]["rule"] == "below_usual_norm"


def test_norms_chart_draws_gaps_marks_and_per_step_thresholds(tmp_path):
    pytest.importorskip("matplotlib")
    from gradclip_hf.charts import norms_chart

    steps = list(range(1, 21))
    norms = [1.0 + 0.1 * i for i in range(20)]
    norms[5], norms[6] = float("nan"), 0.0
    for threshold in (1.5, [1.5] * 10 + [None] * 10, None, 0.0):
        path = norms_chart(str(tmp_path / "c.png"), steps, norms, threshold=threshold, norm_post=[1.0] * 20,
                           norm_max=norms, spikes=[3, 99], skipped=[3], nonfinite=[6], lines={"injected": [4]})
        assert open(path, "rb").read(8) == PNG


# ---------------------------------------------------------------------------------------------- real runs
def _train(tmp_path, name, trainer_cls="stock", steps=20, logging_steps=1, spike_at=None, **clip):
    transformers = pytest.importorskip("transformers")
    import torch

    from gradclip_hf import ClipConfig, GradClipTrainer
    from gradclip_hf.standins import ByteLMDataset, SpikyByteStream, stdlib_text, tiny_llama

    torch.set_num_threads(1)
    data = ByteLMDataset(stdlib_text(80_000), block_size=64, num_blocks=128)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3,
        logging_steps=logging_steps, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="steps",
        save_steps=steps // 2, seed=0, lr_scheduler_type="constant", optim="adamw_torch", max_grad_norm=2.0)
    if trainer_cls == "stock":
        trainer = transformers.Trainer(model=tiny_llama(seed=0), args=args, train_dataset=data)
    else:
        train = SpikyByteStream(data, (spike_at,), samples_per_step=4) if spike_at is not None else data
        trainer = GradClipTrainer(model=tiny_llama(seed=0), args=args, train_dataset=train,
                                  clip_config=ClipConfig.recommended(**clip))
    trainer.train()
    return tmp_path / name, [h for h in trainer.state.log_history if "grad_norm" in h]


@pytest.mark.slow
def test_stock_trainer_run(tmp_path):
    out, logs = _train(tmp_path, "stock")
    norms = [h["grad_norm"] for h in logs]
    r = build_report(str(out), chart=str(out / "gradclip_report.png"))
    assert r["source"]["state_file"] == str(out / "checkpoint-20" / "trainer_state.json")
    assert r["threshold"]["value"] == 2.0  # max_grad_norm from the checkpoint's training_args.bin
    assert r["threshold"]["source"] == f"max_grad_norm from {out / 'checkpoint-20' / 'training_args.bin'}"
    a = r["norms"]["all"]
    assert a["n"] == 20 and a["max"] == max(norms)
    assert [a["p50"], a["p90"], a["p99"]] == pytest.approx(list(np.percentile(norms, [50, 90, 99])))
    assert a["clip_rate"] == pytest.approx(np.mean(np.array(norms) > 2.0)) and not a["clip_rate_estimated"]
    assert r["spikes"]["detector"] is False and r["advice"][0]["rule"] in {f.__name__ for f in rules.THRESHOLD_RULES}
    assert (out / "gradclip_report.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_gradclip_trainer_run_and_its_checkpoint(tmp_path, capsys):
    out, logs = _train(tmp_path, "pack", trainer_cls="pack", steps=40, logging_steps=2, spike_at=30, threshold=3.0,
                       spike_z=3.0)
    r = build_report(str(out))
    spike = next(e for e in r["spikes"]["events"] if e["event"] == "spike")
    assert spike["step"] == 31 and spike["skipped"] and r["left_out"]["steps"] == 1
    # the window 31-32 holds the skipped spike: its norm_max (the spike's norm) is left out of the max
    clean = [h for h in logs if h["step"] != 32]
    assert r["run"]["logging_steps"] == 2 and r["run"]["sampled"] and not r["norms"]["all"]["max_exact"]
    assert spike["norm"] == pytest.approx(next(h["gradclip/norm_max"] for h in logs if h["step"] == 32), rel=1e-6)
    assert r["norms"]["all"]["max"] == max(h["gradclip/norm_max"] for h in clean)
    assert r["norms"]["all"]["p50"] == pytest.approx(np.percentile([h["grad_norm"] for h in logs], 50))
    # the skipped step (norm below the threshold of 3: not counted as clipped) is out of the denominator
    assert r["norms"]["all"]["clip_rate"] == pytest.approx(sum(h["gradclip/clip_rate"] * 2 for h in logs) / 39)
    assert r["spikes"]["logged"] == sum(h["gradclip/spikes"] for h in logs) >= 1  # the injected batch at step 31
    assert r["skipped"]["logged"] == sum(h["gradclip/skipped_steps"] for h in logs)
    assert [w["last"] for w in r["spikes"]["windows"]] == [32] and r["run"]["strategy"] == "norm"
    half = build_report(str(out / "checkpoint-20"))  # a checkpoint: its own state, up to step 20
    assert half["run"]["last_step"] == 20 and half["norms"]["all"]["n"] == 10
    assert main(["report", str(out / "checkpoint-20")]) == 0
    assert (out / "checkpoint-20" / "gradclip_report.png").read_bytes()[:8] == PNG
    assert "steps 1-20 logged" in capsys.readouterr().out
