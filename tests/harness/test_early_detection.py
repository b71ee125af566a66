"""``benchmarks/early_detection.py`` without training: the replay of the shipped loss detector over a step-loss
series with injected jumps (closed form on a synthetic descent; the replay from a copied state equals a full
replay of the jumped series), and its summary's arithmetic."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import early_detection as ed  # noqa: E402


def descent(steps=90, seed=0):
    """A loss falling steeply from 5.5 towards 2.5 with 3 % noise (the shape of the gallery's pretraining)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(steps, generator=gen, dtype=torch.float64) * 0.03
    return [(2.5 + 3.0 * math.exp(-t / 8)) * math.exp(float(noise[t])) for t in range(steps)]


def test_the_detector_is_the_recommended_loss_detector_with_and_without_the_early_rule():
    for early in (True, False):
        d = ed.detector(early)
        assert (d.early, d.z, d.warmup_steps, d.adapt_after, d.ratio) == (early, 6.0, 20, 50, None)


def test_inject_multiplies_only_the_jumped_steps():
    assert ed.inject([1.0, 2.0, 3.0, 4.0], 1, 2.0, 2) == [1.0, 4.0, 6.0, 4.0]
    assert ed.inject([1.0, 2.0], 1, 3.0, 5) == [1.0, 6.0]  # a jump past the end stops there


def test_the_replay_from_a_copied_state_equals_a_full_replay_of_the_jumped_series():
    series, after = descent(steps=70), 10
    for early in (True, False):
        r = ed.replay(early, series, [10, 26], [1.5, 3.0], [1, 3], after)
        clean = ed.feed(ed.detector(early), series)
        assert r["clean"] == [t for t, flag in enumerate(clean) if flag]
        assert len(r["jumps"]) == 2 * 2 * 2
        for (p, factor, n), j in r["jumps"].items():
            flags = ed.feed(ed.detector(early), ed.inject(series, p, factor, n))
            assert j["hit"] == sum(flags[p:p + n])
            assert j["extra"] == sum(flags[p + n:p + n + after]) - sum(clean[p + n:p + n + after])


def test_a_2x_jump_at_step_10_is_caught_by_the_early_rule_only_and_later_by_both():
    series = descent()
    early = ed.replay(True, series, [10, 60], [2.0], [1], after=5)
    before = ed.replay(False, series, [10, 60], [2.0], [1], after=5)
    assert early["clean"] == [] == before["clean"]
    assert early["jumps"][(10, 2.0, 1)]["hit"] == 1
    assert before["jumps"][(10, 2.0, 1)]["hit"] == 0  # the running statistics' warmup: 20 steps
    assert early["jumps"][(60, 2.0, 1)]["hit"] == before["jumps"][(60, 2.0, 1)]["hit"] == 1


def test_the_summary_averages_the_share_of_jumped_steps_over_seeds_and_lengths():
    def one(hits, clean):
        return {"clean": clean, "jumps": {(10, 2.0, n): {"hit": h, "extra": 1} for n, h in zip((1, 2), hits)}}

    replays = {(v, "pretrain", 0): one((1, 2), [3]) for v in ed.VARIANTS}
    replays.update({(v, "pretrain", 1): one((0, 1), []) for v in ed.VARIANTS})
    ns = SimpleNamespace(tasks=["pretrain"], seeds_list=[0, 1], lengths=[1, 2], positions=[10], factors=[2.0],
                         lengths_of={("pretrain", 0): 30, ("pretrain", 1): 30})
    table = ed.summarise(replays, ns)
    row = table["early"]["pretrain"]
    assert row["detect"]["2.0"]["10"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert (row["clean_flags"], row["clean_values"], row["clean_flagged"], row["extra_after"]) == (1, 60, [[0, 3]], 4)
    assert table["before"]["all"]["detect"]["2.0"]["10"] == row["detect"]["2.0"]["10"]
