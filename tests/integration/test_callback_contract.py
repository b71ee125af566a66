"""Contract every callback of the pack passes: construct, train twice, save/resume, GA 1 and 2."""

from __future__ import annotations

import pytest

from helpers import make_args, train_logs
from gradclip_hf.standins import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402
from transformers.trainer_callback import ExportableState  # noqa: E402

from gradclip_hf.integrations.transformers import GradClipCallback  # noqa: E402

pytestmark = pytest.mark.slow

# every callback class of the pack, with options that make it do real work on a short run
CALLBACKS = [
    pytest.param(lambda: GradClipCallback(strategy="zscore", threshold=5.0, zscore_warmup_steps=2, zscore_z=1.0),
                 id="GradClipCallback-zscore"),
    pytest.param(lambda: GradClipCallback(strategy="quantile", threshold=None, quantile=0.5),
                 id="GradClipCallback-quantile"),
]


@pytest.fixture
def fit(dataset):
    def build(tmp_path, callback, **overrides):
        args = make_args(tmp_path, max_grad_norm=0.0, **overrides)
        return Trainer(model=tiny_llama(0), args=args, train_dataset=dataset, callbacks=[callback])
    return build


@pytest.mark.parametrize("make", CALLBACKS)
def test_construct_and_state_is_json(make):
    import json

    callback = make()
    assert isinstance(callback, ExportableState)
    state = callback.state()
    json.dumps(state)
    assert state["args"] == {"_restore": True}  # options are never restored from a checkpoint: the user's win
    rebuilt = type(callback)(**state["args"])  # outside a Trainer there is no live session to take over
    assert rebuilt.config == type(callback)().config


@pytest.mark.parametrize("make", CALLBACKS)
@pytest.mark.parametrize("ga", [1, 2])
def test_train_twice_same_object(tmp_path, make, ga, fit):
    callback = make()
    first = fit(tmp_path / "a", callback, max_steps=4, gradient_accumulation_steps=ga)
    first.train()
    second = fit(tmp_path / "b", callback, max_steps=4, gradient_accumulation_steps=ga)
    second.train()
    a, b = train_logs(first), train_logs(second)
    assert len(a) == len(b) == 4 and callback.run.num_clips == 4
    assert [h["gradclip/threshold"] for h in a] == [h["gradclip/threshold"] for h in b]
    assert [h["loss"] for h in a] == [h["loss"] for h in b]
    assert "training_step" not in first.__dict__ and "log" not in first.__dict__  # unwrapped at train end


@pytest.mark.parametrize("make", CALLBACKS)
def test_save_and_resume(tmp_path, make, fit):
    full = fit(tmp_path / "run", make(), max_steps=8, save_strategy="steps", save_steps=4)
    full.train()
    expected = {h["step"]: h["gradclip/threshold"] for h in train_logs(full) if h["step"] > 4}
    resumed = fit(tmp_path / "run", make(), max_steps=8, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    got = {h["step"]: h["gradclip/threshold"] for h in train_logs(resumed) if h["step"] > 4}
    assert got == pytest.approx(expected, rel=1e-6)
