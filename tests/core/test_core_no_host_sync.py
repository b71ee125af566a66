"""The default path never reads a device value on the host, and the package imports torch only.

Every Python-level way to pull a tensor value to the host (``item``, ``bool``, ``tolist``, ``float``,
``int``, ``index``) is patched to raise around ``clip_`` only. On CPU, torch's own kernels used here
(``_foreach_norm``, ``nanquantile``, ``scatter_``, ``where``...) are C++ and never go through these
Python methods, so a raise can only come from Python code on the path: ours, or torch's Python
helpers (``_group_tensors_by_device_and_dtype``, ``_has_foreach_support``), which this test shows do
not sync either. (C++-internal syncs, which matter on CUDA only, are out of reach of this test.)
"""

import math
import subprocess
import sys

import pytest
import torch
from host_sync import HostSync, no_host_sync
from torch import nn

from gradclip_hf import (AGC, ClipGroup, Cosine, GradClipper, NormClip, QuantileClip, ValueClip, Warmup,
                         ZScoreClip)

@pytest.mark.parametrize("sync", [
    lambda t: t.item(), lambda t: bool(t), lambda t: t.tolist(), lambda t: float(t), lambda t: int(t),
    lambda t: [1, 2][t], lambda t: t > 0 and 1, lambda t: 1 if t.any() else 0,
], ids=["item", "bool", "tolist", "float", "int", "index", "and", "if"])
def test_the_guard_catches_every_host_read(sync):
    t = torch.tensor(1)
    with no_host_sync(), pytest.raises(HostSync):
        sync(t)
    sync(t)  # unpatched again


STRATEGIES = {
    "norm": lambda: NormClip(1.0),
    "norm_inf": lambda: NormClip(1.0, "inf"),
    "value": lambda: ValueClip(0.05),
    "agc": lambda: AGC(0.01),
    "zscore": lambda: ZScoreClip(warmup_steps=3, max_grad_norm=1.0),
    "zscore_percentile_nocap": lambda: ZScoreClip(warmup_steps=3, max_grad_norm=None, mode="percentile",
                                                  skip_update_on_spike=True),
    "zscore_mean": lambda: ZScoreClip(warmup_steps=3, clip_option="mean"),
    "quantile": lambda: QuantileClip(0.5, history=4),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def set_grads(model, step):
    gen = torch.Generator().manual_seed(step)
    scale = 50.0 if step == 6 else 1.0  # a spike after warmup
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale
    if step == 7:
        model[0].weight.grad[0, 0] = math.nan


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("factor", ["tensor", "float"])
@pytest.mark.parametrize("nonfinite", ["skip", "zero", "ignore"])
def test_clip_never_syncs(name, factor, nonfinite):
    model = make_model()
    clipper = GradClipper(STRATEGIES[name](), schedule=Cosine(1.0, 0.5, total_steps=10), nonfinite=nonfinite,
                          groups=[ClipGroup("last", [r"^2\."], NormClip(2.0))] if name == "norm" else ())
    reports = []
    for step in range(10):  # warmup -> EMA transition, a ring that wraps, a spike, a NaN step
        set_grads(model, step)
        f = torch.tensor(0.9) if factor == "tensor" else 0.9
        with no_host_sync():
            reports.append(clipper.clip_(model, step=step, factor=f))
    # outside the guard: the reports are real
    assert [bool(r.nonfinite) for r in reports] == [s == 7 for s in range(10)]
    assert bool(reports[7].skip) is (nonfinite == "skip")
    assert all(not bool(r.skip) for r in reports[:7])
    assert bool(reports[6].clipped)
    assert reports[0].to_floats()["scale"] == pytest.approx(0.9)


def test_named_schedules_and_spike_free_path_with_warmup_schedule():
    model = make_model()
    clipper = GradClipper(ZScoreClip(warmup_steps=2), schedule=Warmup(2.0, 1.0, warmup_steps=4))
    for step in range(6):
        set_grads(model, step)
        with no_host_sync():
            clipper.clip_(list(model.named_parameters()), step=step, factor=torch.tensor(1.0))
    assert clipper.strategy.statistics["count"].item() == 2


def test_import_does_not_load_transformers_or_wandb():
    code = ("import sys, gradclip_hf, gradclip_hf.core\n"
            "gradclip_hf.GradClipper(gradclip_hf.NormClip())\n"
            "bad = sorted(m for m in ('transformers', 'wandb') if m in sys.modules)\n"
            "print('loaded:', bad)\n"
            "sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded: []" in result.stdout
