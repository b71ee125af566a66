"""What the pack refuses under DeepSpeed, checked at train start with the fix spelled out (``check_deepspeed``: no
engine needed; the real engines run in tests/deepspeed, ``make test-deepspeed``)."""

import pytest

from gradclip_hf import ClipConfig
from gradclip_hf.core import GradClipper, NormClip, ValueClip
from gradclip_hf.integrations.deepspeed import check_deepspeed

DS = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}


def check(config=None, clipper=None, ds=DS, stage=2):
    check_deepspeed(config, clipper, ds, stage, "GradClipTrainer")


@pytest.mark.parametrize("options, match", [
    (dict(spike_detection="norm", spike_action="skip"), r"spike_action='skip' cannot skip a gradient-norm spike: "
                                                        r"its norm is known only after the engine stepped.*Use "
                                                        r"spike_detection='loss' \(as ClipConfig.recommended\(\)\), "
                                                        r"or spike_action='rollback'"),
    (dict(spike_detection="both", spike_action="skip"), r"cannot skip a gradient-norm spike"),
    (dict(nonfinite="zero"), r"nonfinite='zero' cannot be done.*Use nonfinite='skip' \(DeepSpeed skips"),
    (dict(strategy="value", threshold=0.1), r"strategy='value' cannot be applied.*Use strategy 'norm', 'zscore'"),
    (dict(strategy="agc", threshold=0.01), r"strategy='agc' cannot be applied"),
    (dict(norm_type=1.0), r"norm_type=1.0 cannot be applied.*Use norm_type=2.0"),
    (dict(exclude=["bias"]), r"exclude=\['bias'\].*Leave exclude and include unset"),
    (dict(include=["lora_"]), r"include=\['lora_'\]"),
])
def test_refused_with_the_fix(options, match):
    with pytest.raises(ValueError, match=r"GradClipTrainer: under DeepSpeed \(ZeRO stage 2\) " + ".*" + match):
        check(ClipConfig(**options))


@pytest.mark.parametrize("options", [dict(), dict(strategy="zscore"), dict(strategy="quantile"), dict(strategy="none"),
                                     dict(spike_detection="both", spike_action="tighten"),
                                     dict(spike_detection="loss", spike_action="stop"), dict(nonfinite="ignore"),
                                     dict(schedule="cosine", threshold_final=0.3, schedule_steps=10),
                                     ClipConfig.recommended().to_dict(), dict(skip_steps=[5]),
                                     dict(spike_detection="loss", spike_action="skip", spike_factor=0.5),
                                     dict(spike_detection="both", spike_action="rollback"),
                                     dict(spike_detection="norm", spike_action="stop"), dict(nonfinite="raise")])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_accepted(options, stage):
    check(ClipConfig(**options), stage=stage)


def test_stage0_and_no_norm_refused():
    with pytest.raises(ValueError, match=r"ZeRO stage 0 has no per-step clip_grad.*Use zero_optimization.stage 1, 2 or 3"):
        check(ClipConfig(), stage=0)
    with pytest.raises(ValueError, match=r"compute_grad_norm=false leaves no gradient norm.*Set zero_optimization."
                                         r"compute_grad_norm to true"):
        check(ClipConfig(), ds={"zero_optimization": {"stage": 2, "compute_grad_norm": False}})


def test_bf16_without_overflow_check_refuses_every_skip_on_zero12():
    """ZeRO-1/2 bf16 with check_grad_overflow false apply a step with NaN gradients (measured: tests/deepspeed):
    neither a non-finite step nor the pack's own skip (through the engine's overflow path) can hold there."""
    ds = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "check_grad_overflow": False}}
    with pytest.raises(ValueError, match=r"bf16.check_grad_overflow=false.*so nonfinite='skip' cannot hold.*Set "
                                         r"bf16.check_grad_overflow to true \(the default\), or nonfinite='ignore'"):
        check(ClipConfig(), ds=ds)
    for options in (dict(skip_steps=[3]), dict(spike_detection="loss", spike_action="skip"),
                    dict(spike_detection="loss", spike_action="rollback"), dict(spike_detection="loss", spike_action="stop")):
        with pytest.raises(ValueError, match=r"so the pack's skip \(spike_action, skip_steps\) cannot hold"):
            check(ClipConfig(nonfinite="ignore", **options), ds=ds)
    check(ClipConfig(nonfinite="ignore"), ds=ds)
    check(ClipConfig(nonfinite="ignore", spike_detection="both"), ds=ds)  # tighten: nothing skipped
    check(ClipConfig.recommended(), ds=ds, stage=3)  # ZeRO-3 skips non-finite norms whatever the dtype


def test_a_clipper_whose_skip_cannot_hold_is_refused():
    from gradclip_hf.core import SpikeController

    with pytest.raises(ValueError, match=r"cannot skip a gradient-norm spike"):
        check(clipper=GradClipper(NormClip(1.0), spikes=SpikeController(action="skip")))
    check(clipper=GradClipper(NormClip(1.0), spikes=SpikeController(detect_norm=False, action="skip")))


def test_a_clipper_it_cannot_drive_is_refused():
    with pytest.raises(ValueError, match=r"the GradClipper cannot be driven \(`strategy`"):
        check(clipper=GradClipper(ValueClip(1.0)))
    check(clipper=GradClipper(NormClip(1.0)))
