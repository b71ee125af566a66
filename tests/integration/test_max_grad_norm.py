"""One behaviour for ``max_grad_norm`` at the three entry points (issues 22.1 and 23.1).

0 (or ``None``), negative numbers, ``inf`` and values above the float32 maximum mean "no clipping, norms measured",
as in the stock Trainer (which clips only when ``max_grad_norm > 0`` and accepts ``inf``: ``clip_grad_norm_(inf)``
multiplies by 1); the spike controller still acts when configured. NaN and non-numbers are refused when the Trainer (or the arguments) are built,
naming ``max_grad_norm``.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from helpers import make_args, train_logs
from gradclip_hf.config import ClipConfig
from gradclip_hf.core import MeasureOnly
from gradclip_hf.standins import SpikyByteStream, tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402

from helpers import StepRecorder  # noqa: E402

from gradclip_hf.integrations.transformers import (GradClipCallback, GradClipTrainer,  # noqa: E402
                                                   GradClipTrainingArguments)

ENTRIES = ["callback", "trainer", "arguments"]
NAN_MESSAGE = r"`max_grad_norm` must be a number \(0, negative or inf: no clipping, norms still measured\), got nan\. NaN"


def _trainer(entry, tmp_path, dataset, max_grad_norm, steps=3, **clip):
    if entry == "arguments":
        args = make_args(tmp_path, cls=GradClipTrainingArguments, max_steps=steps, max_grad_norm=max_grad_norm,
                         **{"clip_" + k: v for k, v in clip.items()})
        return GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset)
    args = make_args(tmp_path, max_steps=steps, max_grad_norm=max_grad_norm)
    if entry == "trainer":
        return GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset,
                               clip_config=ClipConfig(**clip) if clip else None)
    return Trainer(model=tiny_llama(0), args=args, train_dataset=dataset, callbacks=[GradClipCallback(**clip)])


# ---------------------------------------------------------------- refused when built, naming max_grad_norm
@pytest.mark.parametrize("value, match", [(math.nan, NAN_MESSAGE), ("x", r"`max_grad_norm` must be a number .*got 'x'")])
def test_the_arguments_refuse_nan_and_text(tmp_path, value, match):
    with pytest.raises(ValueError, match=match):
        GradClipTrainingArguments(output_dir=str(tmp_path), report_to="none", max_grad_norm=value)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_refuses_nan_when_the_trainer_is_built(tmp_path, dataset, entry):
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        _trainer(entry, tmp_path, dataset, math.nan)


@pytest.mark.parametrize("value", [0.0, None, -1.0, math.inf, 1e39])
def test_zero_inf_and_beyond_float32_build_a_measure_only_clipper(tmp_path, value):
    config = ClipConfig()
    assert config.resolved_threshold(value if value is not None else 0.0) == math.inf
    assert isinstance(config.build(10, value if value is not None else 0.0).strategy, MeasureOnly)
    assert ClipConfig(strategy="zscore").build(10, value or 0.0).strategy.max_grad_norm in (None, math.inf)  # no cap
    if value is not None:
        args = GradClipTrainingArguments(output_dir=str(tmp_path), report_to="none", max_grad_norm=value)
        assert args.max_grad_norm == value  # never changed
    with pytest.raises(ValueError, match=r"`threshold` must be a number > 0 with schedule 'cosine'"):
        ClipConfig(schedule="cosine", threshold_final=0.3).build(10, value or 0.0)


# ---------------------------------------------------------------- 0 and inf: what the stock Trainer does
def _stock(tmp_path, dataset, max_grad_norm):
    trainer = Trainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=3, max_grad_norm=max_grad_norm),
                      train_dataset=dataset)
    trainer.train()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("max_grad_norm", [0.0, math.inf])
def test_zero_and_inf_measure_without_clipping_at_every_entry_point_as_the_stock_trainer(tmp_path, dataset,
                                                                                         max_grad_norm, caplog):
    stock = _stock(tmp_path / "stock", dataset, max_grad_norm)
    stock_weights = [p.detach().clone() for p in stock.model.parameters()]
    stock_norms = [h.get("grad_norm") for h in train_logs(stock)]
    if max_grad_norm == math.inf or transformers.__version__ >= "5":
        assert all(n is not None and n > 1.0 for n in stock_norms)  # measured, above 1: nothing clips them
    for entry in ENTRIES:
        trainer = _trainer(entry, tmp_path / entry, dataset, max_grad_norm)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="transformers.gradclip_hf"):
            trainer.train()
        assert any(f"threshold none (max_grad_norm={max_grad_norm:g}: no clipping, norms measured)" in r.getMessage()
                   for r in caplog.records), entry
        logs = train_logs(trainer)
        assert [h["gradclip/threshold"] for h in logs] == [math.inf] * 3, entry
        assert [h["gradclip/norm_post"] for h in logs] == [h["grad_norm"] for h in logs], entry
        assert [h["gradclip/clip_rate"] for h in logs] == [0.0] * 3, entry
        if stock_norms[0] is not None:
            assert [h["grad_norm"] for h in logs] == pytest.approx(stock_norms, rel=1e-6), entry
        assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), stock_weights)), entry
        assert trainer.args.max_grad_norm == max_grad_norm  # never changed


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_spike_actions_still_act_when_max_grad_norm_turns_clipping_off(tmp_path, dataset, entry):
    stream = SpikyByteStream(dataset, spike_steps=(24,), samples_per_step=4)
    clip = dict(spike_detection="loss", spike_action="skip", spike_warmup_steps=10)
    trainer = _trainer(entry, tmp_path, stream, 0.0, steps=26, **clip)
    trainer.args.learning_rate = 3e-3
    source = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradClipCallback))
    recorder = StepRecorder(source, keep_state=True)
    trainer.add_callback(recorder)
    trainer.train()
    logs = train_logs(trainer)
    assert [h["step"] for h in logs if h["gradclip/spikes"]] == [25]
    assert [h["step"] for h in logs if h["gradclip/skipped_steps"]] == [25]
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[23], recorder.weights[24]))  # the update skipped
    assert not all(torch.equal(a, b) for a, b in zip(recorder.weights[22], recorder.weights[23]))
    assert all(h["gradclip/threshold"] == math.inf and h["gradclip/clip_rate"] == 0.0 for h in logs)
