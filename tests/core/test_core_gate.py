"""The micro-batch gate (issue 25.1) in the core: a dropped micro-batch adds nothing, the kept gradient is rescaled
to the mean of the kept micro-batches (by count and by tokens) through the clip multiplier, nothing kept is a
skip, a NaN loss is left to the non-finite guard, no host read; its settings and state."""

from __future__ import annotations

import math

import pytest
import torch
from host_sync import no_host_sync
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradclip_hf import ClipConfig, GradClipper, NormClip, OptionError, SpikeController, SpikeDetector, StateError
from gradclip_hf.core.gate import MicroBatchGate
from gradclip_hf.core.spikes import per_micro_batch

GA = 4
BIG = 1e9  # a threshold that never clips: the gradients are compared as they are


def controller(**options):
    return SpikeController(detect_loss=True, detect_norm=False, warmup_steps=3, action="skip", spike_factor=1.0,
                           micro_batches=GA, **options)


def batches(step, rows=(3, 5, 2, 6), bad=None):
    """``GA`` micro-batches of a linear regression with ``rows`` samples each (the tokens of a token-weighted
    loss); micro-batch ``bad`` has targets 100 off."""
    gen = torch.Generator().manual_seed(step)
    out = []
    for i, n in enumerate(rows):
        x, y = torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randn(n, 1, generator=gen,
                                                                                  dtype=torch.float64)
        out.append((x, y + (100.0 if i == bad else 0.0)))
    return out


def step_grads(model, clipper, step, data, by, hand_off=False):
    """One optimizer step through the gate: each micro-batch judged before its backward (by count: mean loss /
    GA; by tokens: summed loss / the step's rows), then plan and apply. Returns the report and the gradients."""
    total = sum(len(x) for x, _ in data)
    for x, y in data:
        errors = (model(x) - y) ** 2
        if by == "count":
            loss, mean, weight = errors.mean() / GA, errors.mean(), 1.0
        else:
            loss, mean, weight = errors.sum() / total, errors.mean(), float(len(x))
        keep = clipper.spikes.gate.judge(mean.detach(), weight)
        (loss * keep.to(loss.dtype)).backward()
    report = clipper.plan(model, step=step, loss=None, gate=clipper.spikes.gate.close())
    coef = clipper.apply_(report, hand_off=hand_off)
    grads = [p.grad.clone() * (1.0 if coef is None else coef.to(p.grad.dtype)) for p in model.parameters()]
    clipper.spikes.gate.finish()
    model.zero_grad()
    return report, grads


def expected_grads(model, data, kept, by):
    """The gradient of a step made of the kept micro-batches only: their mean loss (count) or token mean."""
    model.zero_grad()
    if by == "count":
        loss = sum(((model(x) - y) ** 2).mean() for i, (x, y) in enumerate(data) if i in kept) / len(kept)
    else:
        rows = sum(len(data[i][0]) for i in kept)
        loss = sum(((model(x) - y) ** 2).sum() for i, (x, y) in enumerate(data) if i in kept) / rows
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("by", ["count", "tokens"])
@pytest.mark.parametrize("hand_off", [False, True], ids=["in_place", "grad_scale"])
def test_the_kept_mean_gradient_is_the_gradient_without_the_dropped_micro_batch(by, hand_off):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    clipper = GradClipper(NormClip(BIG), spikes=controller())
    for step in range(4):  # calm steps: the micro-batch detector warms up (3 steps of 4 micro-batches)
        report, _ = step_grads(model, clipper, step, batches(step), by, hand_off)
        assert float(report.gate.dropped) == 0 and float(report.gate.rescale) == 1.0
    data = batches(4, bad=2)
    report, grads = step_grads(model, clipper, 4, data, by, hand_off)
    assert float(report.gate.dropped) == 1 and bool(report.gate.kept) and bool(report.spike.spike)
    assert not bool(report.spike.act)  # a dropped micro-batch is not a step spike: the update is made
    rows = [len(x) for x, _ in data]
    expected_rescale = GA / 3 if by == "count" else sum(rows) / (sum(rows) - rows[2])
    assert float(report.gate.rescale) == pytest.approx(expected_rescale, rel=1e-6)
    assert int(report.gate.mask) == 0b100
    for got, want in zip(grads, expected_grads(model, data, kept={0, 1, 3}, by=by)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # the norm measured and clipped is that of the kept mean, what a run without the micro-batch would see
    want_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in expected_grads(model, data, {0, 1, 3}, by)]))
    assert float(report.norm) == pytest.approx(float(want_norm), rel=1e-6)


def test_a_clip_applies_to_the_kept_mean_and_nothing_dropped_changes_nothing():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    gated = GradClipper(NormClip(0.5), spikes=controller())
    for step in range(4):
        step_grads(model, gated, step, batches(step), "count")
    data = batches(4, bad=1)
    report, grads = step_grads(model, gated, 4, data, "count")
    want = expected_grads(model, data, kept={0, 2, 3}, by="count")
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in want]))
    assert float(norm) > 0.5  # the kept mean is clipped to the threshold, as clip_grad_norm_ would
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w * (0.5 / (norm + 1e-6)), rtol=1e-6, atol=1e-9)
    # a calm step: exactly the gradients of the same step without a gate (rescale 1, bit-identical)
    plain = GradClipper(NormClip(0.5))
    data = batches(5)
    _, gated_grads = step_grads(model, gated, 5, data, "count")
    for x, y in data:
        (((model(x) - y) ** 2).mean() / GA).backward()
    plain.clip_(model, step=5)
    assert all(torch.equal(a, p.grad) for a, p in zip(gated_grads, model.parameters()))


def test_nothing_kept_is_a_skip_and_stays_out_of_the_statistics():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    clipper = GradClipper(NormClip(BIG), spikes=controller())
    for step in range(4):
        step_grads(model, clipper, step, batches(step), "count")
    gen = torch.Generator().manual_seed(9)
    data = [(torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.full((3, 1), 100.0, dtype=torch.float64))
            for _ in range(GA)]
    report, grads = step_grads(model, clipper, 4, data, "count")
    assert float(report.gate.dropped) == GA and not bool(report.gate.kept)
    assert math.isnan(float(report.gate.loss)) and float(report.gate.rescale) == 1.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)  # loss x 0: not a single gradient
    events, _ = clipper.spikes.read_events(0)
    assert [(e.step, e.dropped, e.micro_batches, e.outcome) for e in events] == [(5, GA, GA, "skip")]


def test_a_nan_loss_is_not_dropped_but_left_to_the_nonfinite_guard():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    clipper = GradClipper(NormClip(BIG), spikes=controller())
    for step in range(4):
        step_grads(model, clipper, step, batches(step), "count")
    gate = clipper.spikes.gate
    data = batches(4)
    for i, (x, y) in enumerate(data):
        loss = ((model(x) - y) ** 2).mean() * (math.nan if i == 1 else 1.0)
        keep = gate.judge(loss.detach())
        assert bool(keep)  # NaN x 0 would still be NaN: a multiply cannot drop it
        (loss * keep.to(loss.dtype) / GA).backward()
    report = clipper.plan(model, step=4, gate=gate.close())
    assert bool(report.nonfinite) and bool(report.skip) and float(report.gate.dropped) == 0
    assert math.isnan(float(report.gate.loss))  # the step detector does not learn from it


def test_a_micro_batch_without_tokens_counts_for_nothing():
    gate = MicroBatchGate(SpikeDetector(warmup_steps=2))
    for value, weight in ((1.0, 2.0), (math.nan, 0.0), (3.0, 6.0)):  # 0 tokens: a 0/0 mean, weight 0
        assert bool(gate.judge(torch.tensor(value), weight))
    step = gate.close()
    assert float(step.loss) == pytest.approx((2 * 1.0 + 6 * 3.0) / 8) and float(step.micro_batches) == 3


def test_when_only_micro_batches_without_tokens_are_kept_the_step_is_skipped():
    gate = prefilled_gate()
    assert not bool(gate.judge(torch.tensor(9.0), 4.0))  # dropped (9x its baseline)
    assert bool(gate.judge(torch.tensor(1.0), 0.0))  # kept, but no label tokens: no gradient to make a step of
    step = gate.close()
    assert not bool(step.kept) and float(step.rescale) == 1.0


def prefilled_gate() -> MicroBatchGate:
    detector = SpikeDetector(warmup_steps=2, adapt_after=100)
    detector.load_state_dict({"count": 10, "run": 0, "mean": 1.0, "var": 0.0001})
    return MicroBatchGate(detector)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 50.0), st.booleans()), min_size=1, max_size=12))
def test_the_rescale_makes_the_kept_sum_the_weighted_mean_of_the_kept(micro_batches):
    """For any weights and any drops: ``rescale * sum(kept w x) / sum(all w)`` is the kept weighted mean,
    nothing kept is reported, and nothing dropped is a rescale of exactly 1."""
    gate = prefilled_gate()
    for weight, bad in micro_batches:
        gate.judge(torch.tensor(100.0 if bad else 1.0), weight)
    step = gate.close()
    kept = [w for w, bad in micro_batches if not bad]
    total = sum(w for w, _ in micro_batches)
    assert float(step.dropped) == len(micro_batches) - len(kept)
    assert bool(step.kept) == bool(kept)
    assert int(step.mask) == sum(2 ** i for i, (_, bad) in enumerate(micro_batches) if bad)
    if kept and len(kept) < len(micro_batches):
        assert float(step.rescale) * sum(kept) / total == pytest.approx(1.0, rel=1e-6)
        assert float(step.loss) == pytest.approx(1.0)
    else:
        assert float(step.rescale) == 1.0


def test_close_is_shared_until_the_step_ends_and_says_when_nothing_was_judged():
    gate = prefilled_gate()
    assert gate.close() is None
    gate.judge(torch.tensor(1.0))
    first = gate.close()
    assert gate.close() is first and gate.judged == 1
    gate.finish()
    assert gate.close() is None and gate.judged == 0


def test_the_gate_never_reads_the_host():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    clipper = GradClipper(NormClip(1.0), spikes=controller(), nonfinite="skip")
    for step in range(6):
        data = batches(step, bad=2 if step == 5 else None)
        with no_host_sync():
            for x, y in data:
                loss = ((model(x) - y) ** 2).mean()
                keep = clipper.spikes.gate.judge(loss.detach(), 1.0)
                (loss * keep.to(loss.dtype) / GA).backward()
            report = clipper.plan(model, step=step, gate=clipper.spikes.gate.close())
            clipper.apply_(report, hand_off=True)
            clipper.spikes.gate.finish()
        model.zero_grad()
    assert float(report.gate.dropped) == 1


def test_the_micro_batch_detector_counts_its_time_in_steps():
    common = dict(ratio=None, warmup_steps=20, method="ema", alpha=0.9, window=100, adapt_after=50)
    m = per_micro_batch(common, 8)
    assert (m["warmup_steps"], m["window"], m["adapt_after"]) == (160, 800, 400)
    assert m["alpha"] ** 8 == pytest.approx(0.9)  # the EMA forgets as much per step of 8 values
    assert per_micro_batch(common, 1) == common


def test_state_saves_the_micro_batch_detector_and_loads_a_state_without_it():
    a = controller()
    gate = a.gate
    for value in (1.0, 1.1, 0.9, 1.0, 1.05):
        gate.judge(torch.tensor(value))
    state = a.state_dict()
    assert state["micro_batch_detector"]["count"] == 5
    b = controller()
    b.load_state_dict(state)
    assert b.state_dict()["micro_batch_detector"] == state["micro_batch_detector"]
    c = controller()
    c.load_state_dict({k: v for k, v in state.items() if k != "micro_batch_detector"})  # saved before the gate
    assert c.gate.state_dict() == {}
    bad = dict(state, micro_batch_detector={**state["micro_batch_detector"], "count": -1})
    with pytest.raises(StateError, match=r"micro_batch_detector\.count"):
        controller().load_state_dict(bad)


def test_the_option_is_checked_with_the_detection_it_needs():
    built = ClipConfig(spike_detection="loss", spike_gate="micro_batch").build(micro_batches=4)
    assert built.spikes.gate is not None and built.spikes.gate.detector.warmup_steps == 80
    assert ClipConfig(spike_detection="loss").build(micro_batches=4).spikes.gate is None
    with pytest.raises(ValueError, match=r"`spike_gate` must be 'step' while spike_detection is 'norm'.*'loss' or "
                                         r"'both'"):
        ClipConfig(spike_detection="norm", spike_gate="micro_batch")
    with pytest.raises(ValueError, match=r"`spike_gate` must be one of 'step', 'micro_batch', got 'batch'"):
        ClipConfig(spike_detection="loss", spike_gate="batch")
    with pytest.raises(OptionError, match="micro_batches"):
        SpikeController(detect_loss=False, detect_norm=True, micro_batches=2)
