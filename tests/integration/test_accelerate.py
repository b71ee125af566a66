"""``AcceleratorClipper`` in one process: a real ``Accelerator`` (CPU), a tiny Llama, real stdlib text.

The two-process runs (bit-identical to ``accelerator.clip_grad_norm_``, a spike on one rank skipped on both)
are in ``tests/distributed/test_accelerate_loop.py``.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from host_sync import no_host_sync  # noqa: E402

from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.standins import tiny_llama  # noqa: E402
from gradclip_hf.integrations.accelerate import AcceleratorClipper  # noqa: E402

BATCH = 2


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def setup(accum=1, fused=False, scaler=None, seed=0):
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accum,
                                 mixed_precision="fp16" if scaler is not None else "no")
    acc.scaler = scaler  # accelerate makes no GradScaler on CPU: a real one, before prepare() hands it on
    model = tiny_llama(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=fused or None)
    model, optimizer = acc.prepare(model, optimizer)
    if scaler is not None:
        acc.native_amp = True  # after prepare (no fp16 autocast of the forward): unscale_gradients acts
    return acc, model, optimizer


def batches(dataset, n):
    for i in range(n):
        items = [dataset[(i * BATCH + j) % len(dataset)] for j in range(BATCH)]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]}


def loop(acc, model, optimizer, clipper, dataset, micro_steps):
    """The documented loop; returns the reports of the optimizer steps and the micro-batch losses."""
    reports, losses = [], []
    for batch in batches(dataset, micro_steps):
        with acc.accumulate(model):
            loss = model(**batch).loss
            losses.append(float(loss.detach()))
            acc.backward(loss)
            report = clipper.clip_(loss)
            assert (report is not None) == acc.sync_gradients
            if report is not None:
                reports.append(report)
            optimizer.step()
            optimizer.zero_grad()
    return reports, losses


def test_clips_once_per_optimizer_step_with_the_mean_micro_batch_loss(dataset):
    acc, model, optimizer = setup(accum=2)
    config = ClipConfig(spike_detection="loss", spike_warmup_steps=2)
    with AcceleratorClipper(acc, config, model, optimizer, max_grad_norm=0.5) as clipper:
        reports, losses = loop(acc, model, optimizer, clipper, dataset, 6)
        metrics = clipper.metrics()
    assert [r.step for r in reports] == [0, 1, 2] and clipper.global_step == 3
    step_losses = [(losses[i] + losses[i + 1]) / 2 for i in (0, 2, 4)]
    assert [float(r.spike.loss) for r in reports] == pytest.approx(step_losses, rel=1e-6)
    assert metrics["gradclip/threshold"] == 0.5 and metrics["grad_norm"] == pytest.approx(float(reports[-1].norm))
    assert clipper.metrics() == {}  # nothing new since the last read
    assert len(optimizer.optimizer._optimizer_step_pre_hooks) == 0  # the gate left with close()


def test_the_loss_is_required_when_the_spike_controller_watches_it(dataset):
    acc, model, optimizer = setup()
    clipper = AcceleratorClipper(acc, ClipConfig(spike_detection="loss"), model, optimizer)
    batch = next(batches(dataset, 1))
    acc.backward(model(**batch).loss)
    with pytest.raises(ValueError, match=r"clip_\(loss\)"):
        clipper.clip_()
    with pytest.raises(ValueError, match="prepared model and optimizer"):
        AcceleratorClipper(acc, ClipConfig())


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_step_is_skipped_inside_optimizer_step(dataset, fused):
    acc, model, optimizer = setup(fused=fused)
    weights, states = [], []

    def poison(micro, m):
        if micro == 3:
            next(m.parameters()).grad[0, 0] = math.nan

    clipper = AcceleratorClipper(acc, None, model, optimizer)
    for micro, batch in enumerate(batches(dataset, 5)):
        loss = model(**batch).loss
        acc.backward(loss)
        poison(micro, model)
        report = clipper.clip_(loss)
        optimizer.step()
        optimizer.zero_grad()
        weights.append([p.detach().clone() for p in model.parameters()])
        states.append([{k: v.clone() for k, v in optimizer.optimizer.state[p].items()} for p in model.parameters()])
    assert bool(report.nonfinite) is False and clipper.metrics()["gradclip/skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(states[2], states[3]) for k in a)
    assert not all(torch.equal(a, b) for a, b in zip(weights[3], weights[4]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_optimizer_step_path_reads_nothing_on_the_host(dataset):
    acc, model, optimizer = setup(fused=True)
    config = ClipConfig.recommended(spike_warmup_steps=2)
    clipper = AcceleratorClipper(acc, config, model, optimizer)
    for micro, batch in enumerate(batches(dataset, 4)):
        loss = model(**batch).loss
        acc.backward(loss)
        if micro >= 2:  # after the lazy state exists
            with no_host_sync():
                clipper.clip_(loss)
                optimizer.step()
        else:
            clipper.clip_(loss)
            optimizer.step()
        optimizer.zero_grad()
    assert clipper.run.defer and len(clipper.metrics()) > 5


def test_the_micro_batch_gate_on_a_fused_optimizer_reads_nothing_on_the_host(dataset):
    acc, model, optimizer = setup(accum=2, fused=True)
    config = ClipConfig.recommended(spike_warmup_steps=2, spike_gate="micro_batch")
    clipper = AcceleratorClipper(acc, config, model, optimizer)
    for micro, batch in enumerate(batches(dataset, 12)):
        with acc.accumulate(model):
            loss = model(**batch).loss
            if micro == 9:
                loss = loss * 10  # a micro-batch whose loss spikes: dropped, the other one of its step kept
            with no_host_sync() if micro >= 4 else contextlib.nullcontext():
                acc.backward(clipper.gate(loss))
                clipper.clip_(loss)
                optimizer.step()
            optimizer.zero_grad()
    metrics = clipper.metrics()
    assert metrics["gradclip/dropped_micro_batches"] == 1 and metrics["gradclip/skipped_steps"] == 0
    assert [(e.step, e.outcome) for e in clipper.spike_events] == [(5, "drop")]
    clipper.close()
    plain = AcceleratorClipper(acc, ClipConfig(), model, optimizer)
    assert plain.gate(loss) is loss  # without the gate: the loss as it was
    with pytest.raises(ValueError, match=r"`loss` must be the micro-batch loss as a one-element tensor"):
        plain.gate(torch.ones(3))
    plain.close()


def test_fp16_is_unscaled_through_accelerate_once_per_optimizer_step(dataset):
    runs = {}
    for scaled in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaled else None
        acc, model, optimizer = setup(accum=2, scaler=scaler)
        calls = []
        original = acc.unscale_gradients
        acc.unscale_gradients = lambda optimizer=None: (calls.append(1), original(optimizer))[1]
        clipper = AcceleratorClipper(acc, ClipConfig(threshold=0.5), model, optimizer)
        reports, _ = loop(acc, model, optimizer, clipper, dataset, 6)
        runs[scaled] = ([float(r.norm) for r in reports], len(calls), scaler)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    (plain, plain_calls, _), (fp16, unscales, scaler) = runs[False], runs[True]
    assert plain_calls == 0 and unscales == 3  # once per optimizer step; a second unscale_ in a step raises
    assert fp16 == pytest.approx(plain, rel=1e-5)  # measured after unscaling, not at the loss scale (2**10)
    assert scaler.get_scale() == 2.0 ** 10  # scaler.step/update ran, no overflow
