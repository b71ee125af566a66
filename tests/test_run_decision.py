"""The one decision of a step (``gradclip_hf.run.skip_update``, issue 24.1) on real reports of a real clipper, with
the local backend on a real optimizer: what skips an update, and where the path can no longer hold it back."""

from __future__ import annotations

import math

import torch

from gradclip_hf.core import GradClipper, NormClip, SpikeController
from gradclip_hf.run import LocalStep, StepBackend, skip_update


class AlreadyStepped(StepBackend):
    """A path whose optimizer has stepped when the run decides (as a DeepSpeed engine inside backward)."""

    holds = False

    def __init__(self, clipper):
        self.guard = True
        self.clipper = clipper


def model_with_grads(nan=False):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if nan:
        model.weight.grad[0, 0] = math.nan
    return model


def spiking_clipper():
    clipper = GradClipper(NormClip(1.0), spikes=SpikeController(detect_norm=False, warmup_steps=3, action="skip"))
    for step in range(5):
        clipper.clip_(model_with_grads(), step, loss=torch.tensor(2.0 + 0.01 * (step % 2)))
    return clipper


def test_a_nonfinite_step_is_skipped_where_the_path_guards_it():
    model = model_with_grads(nan=True)
    for policy, expected in (("skip", True), ("ignore", False)):
        clipper = GradClipper(NormClip(1.0), nonfinite=policy)
        backend = LocalStep(clipper, torch.optim.AdamW(model.parameters()))
        assert bool(skip_update(clipper.plan(model, 0), backend, listed=False)) is expected


def test_a_spike_skips_only_where_the_update_can_still_be_held_back():
    for make, expected in ((lambda c: LocalStep(c, None), True), (AlreadyStepped, False)):
        clipper = spiking_clipper()
        report = clipper.plan(model_with_grads(), 5, loss=torch.tensor(40.0))
        assert bool(report.spike.act)
        assert bool(skip_update(report, make(clipper), listed=False)) is expected


def test_a_listed_step_is_always_skipped_and_a_calm_one_never():
    clipper = GradClipper(NormClip(1.0))
    backend = LocalStep(clipper, None)
    report = clipper.plan(model_with_grads(), 0)
    assert not bool(skip_update(report, backend, listed=False))
    assert bool(skip_update(report, backend, listed=True))


def test_the_gates_old_home_still_imports_with_a_deprecation_warning():
    import importlib

    import pytest

    from gradclip_hf.run import StepGate

    old = importlib.import_module("gradclip_hf.integrations.optim")
    with pytest.warns(DeprecationWarning, match="moved to gradclip_hf.run.StepGate"):
        assert old.StepGate is StepGate


def test_before_an_engine_steps_only_a_listed_step_or_a_holding_loss_spike_is_skipped():
    """Where the update happens inside the last backward (DeepSpeed): what is known before it decides."""
    from gradclip_hf.core import SpikeAction
    from gradclip_hf.run.decision import skip_before_update

    for action in SpikeAction:
        held = action is not SpikeAction.TIGHTEN  # skip, rollback and stop hold the spike's update back
        assert skip_before_update(True, action, listed=False) is held
        assert skip_before_update(False, action, listed=False) is False
        assert skip_before_update(False, action, listed=True) is True
    assert skip_before_update(False, None, listed=True) and not skip_before_update(True, None, listed=False)


def test_a_refused_lr_guard_closes_what_the_backend_set_up():
    """A backend that refuses ``lr_guard`` (its optimizer steps out of the pack's reach): the run raises the
    ``ValueError`` at train start, and what the backend set up (an engine's wrappers) is undone first."""
    import pytest

    from gradclip_hf import ClipConfig
    from gradclip_hf.run import ClipRun

    closed = []

    class Elsewhere(AlreadyStepped):
        name = "elsewhere"

        def close(self):
            closed.append(True)

    args = type("Args", (), {"output_dir": None, "max_grad_norm": 1.0})()
    state = type("State", (), {"max_steps": 4, "global_step": 0, "is_world_process_zero": True})()
    with pytest.raises(ValueError, match=r"lr_guard caps the learning rate of each optimizer step, which the "
                                         r"elsewhere path does not reach: set lr_guard=None"):
        ClipRun(ClipConfig(lr_guard=3.0), None, args=args, state=state, owner="test", backend=Elsewhere)
    assert closed == [True]


def test_the_skip_list_line_says_whether_the_listed_batches_are_computed(caplog):
    """Through the Trainer they are not computed; under DeepSpeed they are (the engine steps inside backward) and
    the update is skipped through its overflow path: the train-begin line says which."""
    import logging

    from gradclip_hf.run.skiplists import check_start

    with caplog.at_level(logging.INFO, logger="transformers.gradclip_hf"):
        check_start(frozenset({3}), 0, 10, None)
        check_start(frozenset({3}), 0, 10, None, computed=True)
    lines = [r.getMessage() for r in caplog.records if "skip list" in r.getMessage()]
    assert len(lines) == 2
    assert "consumed without being computed" in lines[0]
    assert "consumed and computed, the update skipped" in lines[1]
