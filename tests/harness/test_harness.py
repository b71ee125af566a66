"""The evidence harness without training: statistics, metrics, faults, scenarios, methods, the OLMo rule."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.harness import faults, stats  # noqa: E402
from benchmarks.harness.methods import METHODS, method  # noqa: E402
from benchmarks.harness.olmo import OlmoSkipRule, SkipStepAdamW  # noqa: E402
from benchmarks.harness.scenarios import GALLERY, Scenario  # noqa: E402
from benchmarks.harness.sft import IGNORE, pad_collate, sft_examples  # noqa: E402
from gradclip_hf.demo import metrics  # noqa: E402
from gradclip_hf.standins import BOS_ID, ByteLMDataset, stdlib_text  # noqa: E402


# ---------------------------------------------------------------------------------------------- statistics
def test_t_quantiles_and_interval():
    assert stats.t975(1) == 12.706 and stats.t975(9) == 2.262 and stats.t975(35) == 2.042  # df 30 below 35
    assert stats.t975(10_000) == 1.96
    with pytest.raises(ValueError, match="df"):
        stats.t975(0)
    iv = stats.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182 * statistics.stdev([1, 2, 3, 4]) / 2
    assert iv.mean == 2.5 and iv.n == 4 and iv.low == pytest.approx(2.5 - half) and iv.high == pytest.approx(2.5 + half)
    assert stats.mean_interval([1.0, math.nan]).n == 1 and math.isnan(stats.mean_interval([]).mean)
    a, b = {0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 3: 9.0}
    assert stats.paired(a, b).mean == pytest.approx(0.75) and stats.paired(a, b).n == 2
    assert stats.ratio(a, b).mean == pytest.approx(2.0) and stats.ratio(a, b).std == 0.0
    assert stats.mean_interval([0.1, 0.3]).text() == "+0.2000 [-1.0706, +1.4706]"


# ---------------------------------------------------------------------------------------------- metrics
def test_damage_counts_a_diverged_run_as_the_uniform_predictor():
    assert metrics.damage({"eval_loss": 2.5}, {"eval_loss": 2.0}) == 0.5
    assert metrics.damage({"eval_loss": math.nan}, {"eval_loss": 2.0}) == pytest.approx(math.log(259) - 2.0)


def test_excursion_and_recovery_against_the_clean_run():
    clean = [2.0] * 40
    faulted = [2.0] * 10 + [9.0] + [3.0, 2.6, 2.3] + [2.0] * 26
    m = metrics.excursion(faulted, clean, [10])
    assert m["worst"] == pytest.approx(1.0)  # the fault step itself is left out
    assert m["recover"] == 4  # from step 14 on, the mean gap of the next 5 steps is within 2 % of the clean loss
    assert metrics.excursion([2.0] * 10 + [3.0] * 30, clean, [10])["recover"] is None
    assert metrics.excursion([2.0] * 11 + [math.nan] * 29, clean, [10])["worst"] == math.inf


# ---------------------------------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def items():
    data = ByteLMDataset(stdlib_text(20_000), block_size=16)
    return [data[i] for i in range(40)]


def _batches(stream, steps):
    it = iter(stream)
    return [[next(it) for _ in range(stream.samples_per_step)] for _ in range(steps)]


@pytest.mark.parametrize("kind", sorted(faults.BATCH_FAULTS))
def test_faulted_stream_differs_from_the_clean_one_only_at_fault_steps(items, kind):
    clean = _batches(faults.StepStream(items, 4), 12)
    bad = _batches(faults.StepStream(items, 4, [3, 7], faults.batch_fault(kind), seed=1), 12)
    again = _batches(faults.StepStream(items, 4, [3, 7], faults.batch_fault(kind), seed=1), 12)
    for t in range(12):
        same = all(torch.equal(a[k], b[k]) for a, b in zip(clean[t], bad[t]) for k in a)
        assert same == (t not in (3, 7)), (kind, t)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(bad[t], again[t]) for k in a)  # deterministic
    first = bad[3][0]
    assert first["input_ids"][0] == BOS_ID and first["input_ids"].shape == items[0]["input_ids"].shape
    if kind == "garbage":
        assert ((first["input_ids"][1:] >= 128) & (first["input_ids"][1:] < 256)).all()
    if kind == "utf16_shard":
        assert (first["input_ids"][2::2] == 0).all() and torch.equal(first["input_ids"][1:8:2], clean[3][0]["input_ids"][1:5])
    if kind == "label_noise":
        assert torch.equal(first["input_ids"], clean[3][0]["input_ids"])
        assert not torch.equal(first["labels"], clean[3][0]["labels"])


def test_unknown_fault_and_stream_options_are_errors(items):
    with pytest.raises(ValueError, match="'gargabe'"):
        faults.batch_fault("gargabe")
    with pytest.raises(ValueError, match="samples_per_step"):
        faults.StepStream(items, 0)
    with pytest.raises(ValueError, match="fault_steps"):
        faults.StepStream(items, 2, [1])


def test_lr_fault_multiplies_the_learning_rate_of_its_steps_only():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    cb = faults.LRFault([5], 10.0)
    for step, expected in ((4, 0.1), (5, 1.0)):
        cb.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, optimizer=opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)
        cb.on_optimizer_step(None, SimpleNamespace(global_step=step), None, optimizer=opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_nonfinite_fault_makes_the_training_loss_nan_at_its_steps_only():
    from gradclip_hf.standins import tiny_llama

    model = tiny_llama(0, hidden_size=16, layers=1, heads=2)
    ids = torch.randint(0, 250, (2, 8))
    cb = faults.NonFiniteFault([3])
    cb.on_train_begin(None, None, None, model=model)
    for step, nan in ((2, False), (3, True)):
        cb.on_step_begin(None, SimpleNamespace(global_step=step), None)
        model.train()
        assert math.isnan(float(model(input_ids=ids, labels=ids).loss)) == nan
    model.eval()  # evaluation is never hit
    assert math.isfinite(float(model(input_ids=ids, labels=ids).loss))
    cb.on_train_end(None, None, None)
    model.train()
    assert math.isfinite(float(model(input_ids=ids, labels=ids).loss))


def test_sft_examples_mask_prompt_and_padding():
    examples = sft_examples(stdlib_text(60_000), max_len=64)
    assert len(examples) > 20 and len({len(e["input_ids"]) for e in examples}) > 5  # variable lengths
    e = examples[0]
    newline = (e["input_ids"] == ord("\n")).nonzero()[0, 0]
    assert (e["labels"][: newline + 1] == IGNORE).all() and (e["labels"][newline + 1:] != IGNORE).all()
    batch = pad_collate(examples[:4])
    n = max(len(x["input_ids"]) for x in examples[:4])
    assert batch["input_ids"].shape == (4, n) and batch["attention_mask"].sum() == sum(len(x["input_ids"]) for x in examples[:4])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


# ---------------------------------------------------------------------------------------------- gallery
def test_gallery_has_six_fault_types_after_every_warmup():
    kinds = {s.fault for s in GALLERY.values()} - {"none"}
    assert len([s for s in GALLERY.values() if s.fault != "none"]) >= 6 and len(kinds) >= 5
    assert {s.task for s in GALLERY.values()} == {"pretrain", "lora", "sft", "pretrain_ga4", "pretrain_ga8"}
    for s in GALLERY.values():
        steps = s.fault_steps(300)
        assert all(t >= 64 + 20 for t in steps), s.name  # OLMo needs 64 values; our detectors 25 + 20
        assert bool(steps) == (s.fault != "none")
    with pytest.raises(ValueError, match="fault 'oops'"):
        Scenario("x", "x", "pretrain", "oops")
    assert Scenario("x", "x", "pretrain", "lr", starts=(0.5,), length=3).fault_steps(100) == [50, 51, 52]


def test_methods_by_name_or_pack_spec():
    assert {"none", "stock", "zclip", "olmo", "recommended"} <= set(METHODS)
    m = method("pack:strategy=norm,threshold=0.5,spike_detection=loss")
    assert m.kind == "pack" and m.clip_config().strategy == "norm" and m.describe()["config"]["threshold"] == 0.5
    with pytest.raises(ValueError, match="spike_detection"):
        method("pack:spike_detection=sometimes")
    with pytest.raises(ValueError, match="unknown method 'sotck'"):
        method("sotck")


# ---------------------------------------------------------------------------------------------- OLMo rule
def test_olmo_rule_waits_for_half_a_window_then_skips_6_sigma_outliers():
    rule = OlmoSkipRule(window=128, sigma=6.0)
    for step in range(63):
        rule.add_loss(2.0 + 0.01 * (step % 3))
        assert not rule.decide(1.0 + 0.01 * (step % 5), step)
    rule.add_loss(50.0)
    assert not rule.decide(1.0, 63)  # 63 values so far: not checked yet
    rule.add_loss(50.0)
    assert rule.decide(1.0, 64)  # the spike at 63 entered the window, 50 is still > 6 sigma above
    rule.add_loss(2.0)
    assert rule.decide(100.0, 65)  # the norm alone
    rule.add_loss(math.nan)
    assert rule.decide(1.0, 66) and rule.skipped == [64, 65, 66]
    assert len(rule.losses) == 66  # the non-finite step stayed out of the window


def test_skip_step_adamw_clips_and_leaves_everything_untouched_on_a_skip():
    p = torch.nn.Parameter(torch.ones(4))
    rule = SimpleNamespace(decide=lambda norm, step: step == 1, norms=[])
    opt = SkipStepAdamW([p], rule=rule, max_norm=1.0, lr=0.1)
    p.grad = torch.full((4,), 10.0)
    opt.step()  # step 0: clipped to norm 1, then an update
    assert torch.linalg.vector_norm(p.grad) == pytest.approx(1.0) and not torch.equal(p.detach(), torch.ones(4))
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((4,), 10.0)
    opt.step()  # step 1: skipped
    assert torch.equal(p.detach(), before) and all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_byte_tokenizer_maps_bytes_to_their_values():
    pytest.importorskip("tokenizers")
    from gradclip_hf.standins import BOS_ID, byte_tokenizer

    tok = byte_tokenizer()
    text = "def f(x): return 'é'"
    assert tok(text)["input_ids"] == [BOS_ID, *text.encode("utf-8")]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
