"""``AcceleratorClipper`` misuse (issue 22.4): each refused with a message that says what to pass, before it can
count a step twice, break on a shape, or let an update through that it reported as skipped. A real
``Accelerator`` on CPU and a small real model; the documented loop is in ``test_accelerate.py``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.integrations.accelerate import AcceleratorClipper  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def setup(config=None, accum=1, **kwargs):
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = acc.prepare(model, optimizer)
    clipper = AcceleratorClipper(acc, config, model, optimizer, max_grad_norm=1.0, **kwargs)
    return acc, model, optimizer, clipper


def backward(acc, model, scale=1.0):
    loss = model(torch.randn(4, 8)).pow(2).mean() * scale
    acc.backward(loss)
    return loss


def test_clip_twice_for_one_step_is_refused_and_does_not_count_a_step():
    acc, model, optimizer, clipper = setup(ClipConfig(schedule="cosine", threshold=1.0, threshold_final=0.1),
                                           total_steps=10)
    loss = backward(acc, model)
    assert clipper.clip_(loss) is not None
    with pytest.raises(RuntimeError, match=r"clip_\(\) was called twice for one optimizer step .*call "
                                           r"optimizer\.step\(\) after it"):
        clipper.clip_(loss)
    assert clipper.global_step == 1  # the schedule did not advance twice
    optimizer.step()
    optimizer.zero_grad()
    for _ in range(3):  # the documented loop goes on
        loss = backward(acc, model)
        assert clipper.clip_(loss) is not None
        optimizer.step()
        optimizer.zero_grad()
    assert clipper.global_step == 4
    clipper.close()


def test_gradient_accumulation_micro_steps_are_not_mistaken_for_a_second_call():
    acc, model, optimizer, clipper = setup(accum=2)
    reports = []
    for _ in range(6):
        with acc.accumulate(model):
            loss = backward(acc, model)
            reports.append(clipper.clip_(loss))
            optimizer.step()
            optimizer.zero_grad()
    assert [r is not None for r in reports] == [False, True] * 3 and clipper.global_step == 3
    clipper.close()


@pytest.mark.parametrize("loss, match", [
    (torch.ones(4), r"`loss` must be the micro-batch loss as a one-element tensor .*loss\.mean\(\) for a per-sample "
                    r"loss.*got 'a tensor of shape \[4\]'"),
    (2.5, r"`loss` must be the micro-batch loss as a one-element tensor .*got 2\.5\. A Python number has left the "
          r"device \(loss\.item\(\)\): pass the tensor itself"),
    ("2.5", r"`loss` must be the micro-batch loss as a one-element tensor"),
])
def test_a_loss_that_is_not_one_element_tensor_is_refused_saying_what_to_pass(loss, match):
    acc, model, optimizer, clipper = setup(ClipConfig(spike_detection="loss", spike_warmup_steps=2))
    backward(acc, model)
    with pytest.raises(ValueError, match=match):
        clipper.clip_(loss)
    assert clipper.global_step == 0
    clipper.clip_(torch.ones(1))  # a one-element tensor of shape [1] is a loss
    assert clipper.global_step == 1
    clipper.close()


def test_clip_after_close_is_refused_and_a_nan_update_cannot_land():
    acc, model, optimizer, clipper = setup()
    loss = backward(acc, model)
    clipper.clip_(loss)
    optimizer.step()
    optimizer.zero_grad()
    clipper.close()
    before = [p.detach().clone() for p in model.parameters()]
    backward(acc, model, scale=math.nan)
    with pytest.raises(RuntimeError, match=r"clip_\(\) after close\(\): .*Make a new AcceleratorClipper"):
        clipper.clip_(loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert not optimizer.optimizer._optimizer_step_pre_hooks  # close() left no hook behind


def test_step_is_a_deprecated_name_of_global_step():
    acc, model, optimizer, clipper = setup(ClipConfig())
    backward(acc, model)
    clipper.clip_(torch.ones(()))
    with pytest.warns(DeprecationWarning, match="use AcceleratorClipper.global_step"):
        assert clipper.step == clipper.global_step == 1
    clipper.close()


@pytest.mark.parametrize("weight, match", [(-1.0, r"`weight` must be .*>= 0"), (float("nan"), r"`weight`")])
def test_a_gate_weight_that_is_negative_or_nan_is_refused(weight, match):
    acc, model, optimizer, clipper = setup(ClipConfig(spike_detection="loss", spike_gate="micro_batch"), accum=2)
    loss = model(torch.randn(4, 8)).pow(2).mean()
    with pytest.raises(ValueError, match=match):
        clipper.gate(loss, weight=weight)
