"""Spike detector, threshold controller and snapshots (torch only)."""

import json
import math

import pytest
from host_sync import no_host_sync
import torch

from gradclip_hf import (GradClipper, NormClip, SpikeController, SpikeDetector, TrainingSnapshot, ZScoreClip)


def losses(n, seed=0, spikes=(), height=10.0):
    g = torch.Generator().manual_seed(seed)
    base = 3.0 * torch.exp(-torch.arange(n, dtype=torch.float64) / 200) + 2.0  # a decreasing loss curve
    noisy = base + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    for s in spikes:
        noisy[s] += height
    return noisy


@pytest.mark.parametrize("method", ["ema", "mad"])
def test_detector_flags_injected_spikes_exactly(method):
    detector = SpikeDetector(z=6.0, warmup_steps=20, method=method)
    spikes = (40, 41, 120, 300)
    flagged = [s for s, x in enumerate(losses(400, spikes=spikes)) if detector.update(x.reshape(()))[0]]
    assert flagged == list(spikes)


@pytest.mark.parametrize("method", ["ema", "mad"])
@pytest.mark.parametrize("seed", range(3))
def test_detector_quiet_on_clean_sequence(method, seed):
    detector = SpikeDetector(z=6.0, warmup_steps=20, method=method)
    assert not any(bool(detector.update(x.reshape(()))[0]) for x in losses(600, seed=seed))


def test_spike_does_not_poison_statistics():
    detector = SpikeDetector(z=6.0, warmup_steps=5)
    for x in losses(30):
        detector.update(x.reshape(()))
    before = detector.state_dict()
    spike, z, baseline = detector.update(torch.tensor(100.0))
    assert bool(spike) and float(z) > 6.0
    after = detector.state_dict()
    assert (after["mean"], after["var"], after["count"]) == (before["mean"], before["var"], before["count"])
    spike, *_ = detector.update(torch.tensor(math.nan))
    assert not bool(spike)  # non-finite values belong to the non-finite guard, not to the detector
    assert detector.state_dict()["mean"] == before["mean"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_is_neither_a_spike_nor_observed_nor_tightens(value):
    detector = SpikeDetector(warmup_steps=10)
    assert not bool(detector.update(torch.tensor(50.0))[0])  # warmup: large values are not flagged
    before = detector.state_dict()
    assert not bool(detector.update(torch.tensor(value))[0])
    assert detector.state_dict() == before
    controller = SpikeController(warmup_steps=3, detect_norm=False)
    run_controller(controller, [2.0, 2.1, 1.9, 2.0, 2.05])
    decision = decide(controller, torch.tensor(value), torch.tensor(1.0), step=5)
    assert not bool(decision.spike) and float(decision.factor) == 1.0


def test_level_shift_is_adopted_after_adapt_after_spikes():
    detector = SpikeDetector(z=6.0, warmup_steps=10, adapt_after=3)
    for x in losses(50):
        detector.update(x.reshape(()))
    flags = [bool(detector.update(torch.tensor(20.0 + 0.01 * i))[0]) for i in range(60)]
    assert flags[:4] == [True] * 4
    assert not any(flags[-10:]), "the detector must follow a lasting change of level"


def test_ratio_criterion():
    detector = SpikeDetector(z=1000.0, ratio=1.5, warmup_steps=5)
    for _ in range(10):
        detector.update(torch.tensor(2.0))
    assert not bool(detector.update(torch.tensor(2.9))[0])
    assert bool(detector.update(torch.tensor(3.3))[0])  # the baseline moved to ~2.09 with the 2.9


def decide(controller, loss, norm, step, **kwargs):
    """Both phases of one step: the loss, then the norm."""
    return controller.decide(controller.observe_loss(loss, step, norm.device), norm, **kwargs)


def run_controller(controller, values, norm=1.0):
    out = []
    for step, x in enumerate(values):
        d = decide(controller, torch.tensor(float(x)), torch.tensor(norm), step)
        out.append((bool(d.spike), float(d.factor)))
    return out


def test_controller_tightens_at_once_and_relaxes_with_half_life():
    controller = SpikeController(warmup_steps=5, spike_factor=0.5, relax_half_life=10, min_factor=0.05,
                                 detect_norm=False)
    values = [2.0, 2.1, 1.9, 2.0, 2.05, 2.0, 1.95] + [50.0] + [2.0] * 20
    out = run_controller(controller, values)
    spike_step = 7
    assert [s for s, (spike, _) in enumerate(out) if spike] == [spike_step]
    assert out[spike_step - 1][1] == 1.0
    assert out[spike_step][1] == pytest.approx(0.5)  # tightened on the spike step itself
    assert out[spike_step + 10][1] == pytest.approx(0.75)  # distance to 1 halves in 10 calm steps
    assert out[spike_step + 20][1] == pytest.approx(0.875)


def test_repeated_spikes_tighten_down_to_the_floor():
    controller = SpikeController(warmup_steps=5, spike_factor=0.5, min_factor=0.1, detect_norm=False,
                                 relax_half_life=1000)
    values = [2.0, 2.1, 1.9, 2.0, 2.05, 2.0] + [50.0, 2.0] * 6
    factors = [f for spike, f in run_controller(controller, values) if spike]
    assert factors[:3] == pytest.approx([0.5, 0.25, 0.125], rel=5e-3)  # one calm step of relaxing between spikes
    assert min(factors) == pytest.approx(0.1)


def test_norm_spike_without_loss_spike():
    controller = SpikeController(warmup_steps=5)
    for step in range(10):
        d = decide(controller, torch.tensor(2.0), torch.tensor(1.0 + 0.01 * step), step)
        assert not bool(d.spike)
    d = decide(controller, torch.tensor(2.0), torch.tensor(40.0), 10)
    assert bool(d.spike) and bool(d.norm_spike) and not bool(d.loss_spike)


def test_one_factor_rule_in_two_phases_a_norm_spike_tightens_the_factor_in_force_when_found():
    """Issue 24.2: the loss phase sets the factor in force (tightened on a loss spike, else relaxed); a norm
    spike found before the step is clipped tightens the factor of the step before (GradClipper), one found after
    the optimizer clipped tightens the factor it clipped at (ExternalClip), from the next step on."""
    def primed():
        controller = SpikeController(warmup_steps=5, spike_factor=0.5, relax_half_life=10)
        for step in range(8):
            decide(controller, torch.tensor(2.0 + 0.01 * (step % 2)), torch.tensor(1.0 + 0.01 * (step % 3)), step)
        decide(controller, torch.tensor(2.0), torch.tensor(40.0), 8)  # a norm spike: the factor is 0.5 now
        return controller
    relaxed = 1 - 0.5 * 0.5 ** (1 / 10)
    for applied, expected in ((False, 0.25), (True, relaxed * 0.5)):
        controller = primed()
        assert float(controller.factor) == 0.5
        phase = controller.observe_loss(torch.tensor(2.0), 9, "cpu")
        assert float(phase.factor) == pytest.approx(relaxed) and float(controller.factor) == pytest.approx(relaxed)
        d = controller.decide(phase, torch.tensor(60.0), factor_applied=applied)
        assert bool(d.norm_spike) and float(d.factor) == pytest.approx(expected)
        events, _ = controller.read_events(1)
        assert [(e.step, e.factor_before, e.factor_after) for e in events] == [(10, 0.5, pytest.approx(expected))]


def test_clipper_threshold_follows_the_factor_and_spikes_stay_out_of_strategy_statistics():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    strategy = ZScoreClip(warmup_steps=3, max_grad_norm=1.0)
    clipper = GradClipper(strategy, spikes=SpikeController(warmup_steps=5, detect_norm=False))
    thresholds, counts = [], []
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.05, 2.0, 30.0, 2.0]):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.2)  # a calm norm of 0.89, below the cap of 1.0
        report = clipper.clip_(model, step=step, loss=torch.tensor(loss))
        thresholds.append(float(report.threshold))
        counts.append(int(strategy.statistics["count"]) if step < 3 else None)
        if step == 6:
            stats_at_spike = {k: float(v) for k, v in strategy.statistics.items()}
            assert bool(report.spike.spike) and float(report.scale) == pytest.approx(0.5)
            assert thresholds[5] == pytest.approx(1.0)  # calm norm: the threshold in force is the cap
            assert thresholds[6] == pytest.approx(0.5)  # the loss spike halves it: the calm norm is clipped
            assert bool(report.clipped) and float(report.norm_post) == pytest.approx(0.5, rel=1e-5)
        if step == 5:
            stats_before = {k: float(v) for k, v in strategy.statistics.items()}
    assert stats_at_spike == stats_before


def test_state_round_trip_mid_recovery_continues_identically():
    def make():
        return GradClipper(NormClip(1.0), spikes=SpikeController(warmup_steps=5, method="mad", window=20))

    values = list(losses(30, spikes=(12,))) + list(losses(30, seed=1))
    model = torch.nn.Linear(3, 3)

    def run(clipper, steps):
        out = []
        for step in steps:
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.2 + 0.01 * (step % 5))
            r = clipper.clip_(model, step=step, loss=values[step].reshape(()).float())
            out.append((float(r.threshold), bool(r.spike.spike)))
        return out

    reference = run(make(), range(40))
    first = make()
    run(first, range(15))  # stop 3 steps after the spike, while the factor relaxes
    second = make()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run(second, range(15, 40)) == reference[15:]


def test_events_and_message():
    controller = SpikeController(warmup_steps=5, detect_norm=False, max_events=2)
    run_controller(controller, [2.0, 2.1, 1.9, 2.0, 2.05, 2.0, 9.0, 2.0, 9.5, 2.0, 10.0])
    events, total = controller.read_events(0)
    # only the last max_events are kept; steps are numbered from 1, as train/global_step
    assert total == 3 and [e.step for e in events] == [9, 11]
    message = events[0].describe(base_threshold=1.0, action="skip")
    assert message.startswith("step 9: loss 9.5 is ") and "sigma above its mean 2." in message
    # the factor relaxed for one calm step (half-life 20) before the second spike halved it
    assert message.endswith("clip threshold 0.517 -> 0.2585; update skipped")
    assert events[0].norm_z is None and events[0].norm_baseline is None  # not measured: no norm detector
    assert controller.read_events(total) == ([], total)
    calm = SpikeController(warmup_steps=5, detect_norm=False, spike_factor=1.0)  # skip without tightening
    run_controller(calm, [2.0, 2.1, 1.9, 2.0, 2.05, 2.0, 9.0])
    (event,), _ = calm.read_events(0)
    assert event.describe(base_threshold=1.0, action="skip").endswith("clip threshold 1 (unchanged); update skipped")
    assert event.describe(action="skip").endswith("clip factor 1 (unchanged); update skipped")


def test_default_path_makes_no_host_sync():
    model = torch.nn.Linear(4, 4)
    clipper = GradClipper(ZScoreClip(warmup_steps=2), spikes=SpikeController(warmup_steps=3), nonfinite="skip")
    for step in range(8):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with no_host_sync():
            clipper.clip_(model, step=step, loss=torch.tensor(2.0 + step % 2))


@pytest.mark.parametrize("kwargs, match", [
    ({"z": 0}, "`z` must be > 0"),
    ({"ratio": 1.0}, "`ratio` must be > 1"),
    ({"warmup_steps": 1}, "`warmup_steps` must be an int >= 2"),
    ({"method": "median"}, "`method` must be one of 'ema', 'mad'"),
    ({"action": "pause"}, "`action` must be one of 'tighten', 'skip', 'rollback', 'stop'"),
    ({"spike_factor": 0.0}, "`spike_factor` must be > 0"),
    ({"spike_factor": 1.5}, "`spike_factor` must be <= 1"),
    ({"relax_half_life": 0}, "`relax_half_life` must be > 0"),
    ({"min_factor": 2}, "`min_factor` must be <= 1"),
    ({"detect_loss": False, "detect_norm": False}, "needs `detect_loss` or `detect_norm`"),
])
def test_controller_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpikeController(**kwargs)


def test_detector_validation_and_bad_state():
    with pytest.raises(ValueError, match="`window` must be >= `warmup_steps`"):
        SpikeDetector(method="mad", window=5, warmup_steps=10)
    with pytest.raises(TypeError, match="`z` must be a number"):
        SpikeDetector(z="6")
    with pytest.raises(ValueError, match="state field `factor` must be present"):
        SpikeController().load_state_dict({"spikes": 1})
    with pytest.raises(ValueError, match="state field `run` must be present"):
        SpikeDetector().load_state_dict({"count": 1})
    with pytest.raises(TypeError, match="`spikes` must be a SpikeController"):
        GradClipper(NormClip(), spikes="on")


def test_snapshot_restores_weights_and_optimizer_state_bit_identically():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def train_step():
        model(torch.randn(3, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    snapshot = TrainingSnapshot(every=2)
    with pytest.raises(RuntimeError, match="No snapshot"):
        snapshot.restore(model.parameters(), optimizer)
    train_step()
    assert snapshot.due(1)
    snapshot.take(1, model.parameters(), optimizer)
    assert not snapshot.due(2) and snapshot.due(3)
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[model[1].weight].items()}
    train_step()
    train_step()
    assert not torch.equal(weights[2], model[1].weight)
    assert snapshot.restore(model.parameters(), optimizer) == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    restored = optimizer.state[model[1].weight]
    assert all(torch.equal(state[k], restored[k]) for k in state)
    train_step()  # the optimizer still drives the same parameter tensors
    assert not torch.equal(weights[2], model[1].weight)
