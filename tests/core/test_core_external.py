"""``ExternalClip``: one threshold ahead per step for optimizers that clip inside their own step (DeepSpeed ZeRO).

Same statistics as :meth:`GradClipper.clip_` given the same norms; thresholds from the steps before (one-step
lag); a loss spike tightens its own step, a gradient-norm spike the next; the report says what an engine
clipping at the threshold did."""

import math

import pytest
import torch
from torch import nn

from gradclip_hf import ClipConfig
from gradclip_hf.core import GradClipper, NormClip, OptionError, QuantileClip, SpikeController, ValueClip, ZScoreClip
from gradclip_hf.core.clipper import ClipGroup
from gradclip_hf.core.external import ExternalClip

NORMS = [1.0, 1.2, 0.9, 1.1, 1.0, 5.0, 1.05, 0.95, 1.0, 1.1]


def grads_with_norm(param: nn.Parameter, norm: float) -> None:
    param.grad = torch.full_like(param, norm / math.sqrt(param.numel()))


@pytest.mark.parametrize("make", [lambda: ZScoreClip(warmup_steps=3, max_grad_norm=None),
                                  lambda: QuantileClip(quantile=0.5, history=4)], ids=["zscore", "quantile"])
def test_statistics_are_those_of_clip_given_the_same_norms(make):
    param = nn.Parameter(torch.zeros(16))
    inline, external = GradClipper(make()), ExternalClip(GradClipper(make()))
    for step, norm in enumerate(NORMS):
        grads_with_norm(param, norm)
        inline.clip_([param], step=step)
        external.before(step)
        external.after(torch.tensor(norm))
        a, b = inline.state_dict()["strategies"]["default"], external.state_dict()["strategies"]["default"]
        assert a.keys() == b.keys() and a["count"] == b["count"]
        for key in a:
            if key != "count":
                assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_zscore_threshold_lags_one_step():
    external = ExternalClip(GradClipper(ZScoreClip(warmup_steps=3, z_thresh=2.0, max_grad_norm=10.0)))
    thresholds = []
    for step, norm in enumerate(NORMS):
        thresholds.append(float(external.before(step)))
        external.after(norm)
    assert thresholds[:3] == [10.0] * 3  # warmup: the cap
    first = torch.tensor(NORMS[:3], dtype=torch.float64)
    mean, std = first.mean(), ((first - first.mean()) ** 2).mean().sqrt()
    assert thresholds[3] == pytest.approx(float(mean + 2.0 * (std + 1e-6)))  # from steps 0-2 only
    assert thresholds[5] < 5.0 and thresholds[6] < thresholds[5] * 2  # the 5.0 spike is clipped at the boundary


def test_report_is_what_an_engine_clipping_at_the_threshold_did():
    external = ExternalClip(GradClipper(NormClip(1.0)))
    external.before(0)
    r = external.after(4.0).to_floats()
    assert r["norm"] == 4.0 and r["norm_post"] == pytest.approx(1.0 * 4.0 / (4.0 + 1e-6))
    assert r["clipped"] == 1.0 and r["threshold"] == 1.0 and r["skip"] == 0.0
    external.before(1)
    r = external.after(0.5).to_floats()
    assert r["norm_post"] == 0.5 and r["clipped"] == 0.0
    external.before(2)
    r = external.after(float("inf")).to_floats()  # the engine skipped it (overflow)
    assert r["nonfinite"] == 1.0 and r["skip"] == 1.0 and r["clipped"] == 0.0


def test_loss_spike_tightens_its_own_step_norm_spike_the_next():
    spikes = SpikeController(detect_loss=True, detect_norm=True, warmup_steps=3, z=4.0, spike_factor=0.5)
    external = ExternalClip(GradClipper(NormClip(1.0), spikes=spikes))
    losses = [2.0, 2.01, 1.99, 2.0, 9.0, 2.0, 2.0, 2.0]
    norms = [1.0, 1.01, 0.99, 1.0, 1.0, 1.0, 8.0, 1.0]
    thresholds, flags = [], []
    for step, (loss, norm) in enumerate(zip(losses, norms)):
        thresholds.append(float(external.before(step, torch.tensor(loss))))
        flags.append(bool(external.after(norm).spike.spike))
    assert flags == [False] * 4 + [True, False, True, False]
    assert thresholds[:4] == [1.0] * 4 and thresholds[4] == 0.5  # the loss spike: this step
    assert 0.5 < thresholds[6] < 0.6  # the norm spike at step 6 is not known before its step...
    halved = thresholds[6] * 0.5  # ...it halves the factor for the next one, which then relaxes as usual
    assert thresholds[7] == pytest.approx(1 - (1 - halved) * 0.5 ** (1 / 20))
    events, total = spikes.read_events(0)
    assert total == 2 and [e.step for e in events] == [5, 7] and events[0].loss_spike and events[1].norm_spike


def test_host_threshold_only_without_device_statistics():
    assert ExternalClip(ClipConfig(schedule="linear", threshold=1.0, threshold_final=0.5).build(10)).host_threshold(
        5) == pytest.approx(0.75)
    assert ExternalClip(ClipConfig(strategy="none").build(10)).host_threshold(0) == math.inf
    assert ExternalClip(ClipConfig(strategy="zscore").build(10)).host_threshold(0) is None
    assert ExternalClip(ClipConfig(spike_detection="loss").build(10)).host_threshold(0) is None


@pytest.mark.parametrize("clipper, match", [
    (GradClipper(ValueClip(1.0)), "strategy"),
    (GradClipper(NormClip(1.0, norm_type=1.0)), "norm_type"),
    (GradClipper(NormClip(1.0), exclude=["bias"]), "exclude"),
    (GradClipper(NormClip(1.0), include=["lora_"]), "include"),
    (GradClipper(NormClip(1.0), groups=[ClipGroup("emb", ["embed"], NormClip(5.0))]), "groups"),
    (GradClipper(NormClip(1.0), nonfinite="zero"), "nonfinite"),
])
def test_clippers_it_cannot_drive_are_refused(clipper, match):
    with pytest.raises(OptionError, match=match):
        ExternalClip(clipper)


def test_after_needs_before():
    with pytest.raises(RuntimeError, match="before"):
        ExternalClip(GradClipper(NormClip(1.0))).after(1.0)


@pytest.mark.parametrize("make", [lambda: ZScoreClip(warmup_steps=3, max_grad_norm=None),
                                  lambda: QuantileClip(quantile=0.5, history=4)], ids=["zscore", "quantile"])
def test_a_dropped_step_is_a_skip_that_measures_and_learns_nothing(make):
    """``after(norm, dropped=True)``: the caller made the step's gradients non-finite so that the engine skips it
    (the pack's skip under DeepSpeed): a skip, not a non-finite step; its norm NaN (not measured); the statistics and
    the detectors as if the step had not happened; the loss detector still saw its loss (as on the local path)."""
    def controller():
        return SpikeController(detect_loss=True, detect_norm=True, warmup_steps=3, z=4.0, spike_factor=1.0)

    spikes, others = controller(), controller()
    with_drop, without = ExternalClip(GradClipper(make(), spikes=spikes)), ExternalClip(GradClipper(make(), spikes=others))
    for step, norm in enumerate(NORMS):
        with_drop.before(step, torch.tensor(2.0))
        if step == 4:
            r = with_drop.after(float("inf"), dropped=True)
            values = r.to_floats()
            assert values["skip"] == 1.0 and values["nonfinite"] == 0.0 and values["clipped"] == 0.0
            assert math.isnan(values["norm"]) and math.isnan(values["norm_post"]) and values["coef"] == 1.0
            assert not bool(r.spike.norm_spike)
            continue
        without.before(step, torch.tensor(2.0))
        assert not bool(with_drop.after(norm).skip)
        without.after(norm)
    assert with_drop.state_dict()["strategies"] == without.state_dict()["strategies"]
    assert spikes.norm_detector.state_dict() == others.norm_detector.state_dict()
    assert spikes.loss_detector.state_dict()["count"] == others.loss_detector.state_dict()["count"] + 1


def test_loss_spike_flag_of_the_prepared_step():
    external = ExternalClip(GradClipper(NormClip(1.0), spikes=SpikeController(detect_norm=False, warmup_steps=3)))
    assert external.loss_spike is None  # nothing prepared
    for step, loss in enumerate([2.0, 2.01, 1.99, 2.0, 50.0]):
        external.before(step, torch.tensor(loss))
        assert bool(external.loss_spike) is (step == 4)
        external.after(1.0)
    assert ExternalClip(GradClipper(NormClip(1.0))).loss_spike is None
