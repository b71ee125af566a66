"""Question C: accumulation scenarios (issue 25 item 2), the whole-step oracle (item 3) and a prototype
micro-batch gate (item 1), through the gallery's harness.

A scenario here = a pretrain fault placed on *items* of the optimizer steps: ``StepStream`` gives step t the
items t*8 .. t*8+7 (batch 8 = GA x micro-batch); under GA g with micro-batch 8/g, micro-batch k of step t is
items k*8/g .. (k+1)*8/g - 1 of that step. ``SubStepStream`` replaces only the listed items of a fault step
(the clean counterfactual keeps them), so the data order is that of the GA-1 gallery.

Methods: stock; recommended() (whole-step skip on a step-loss spike); ``oracle_step`` (recommended + skip
exactly the steps that hold a bad item: the skip floor); ``oracle_micro`` (drop exactly the bad micro-batches,
rescale the kept gradient to their mean: the gate's floor); ``gate`` (recommended + a per-micro-batch gate:
loss x keep before backward, keep judged against a per-micro-batch running baseline; rescale at the step).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainingArguments

from gradclip_hf.experiments import faults, training
from gradclip_hf.experiments.methods import METHODS
from i25lib import CUSTOM, HERE, Cache, Method, custom_scenario, per_sample_nll, run, setup_threads

BAD_ITEMS: dict[str, Any] = {"items": None}  # item indices (within a step) replaced at a fault step; None: all


class SubStepStream(faults.StepStream):
    def batch(self, step):
        n, b = len(self.items), self.samples_per_step
        clean = [self.items[(step * b + j) % n] for j in range(b)]
        if step not in self.fault_steps:
            return clean
        idx = BAD_ITEMS["items"]
        idx = list(range(b)) if idx is None else idx
        bad = self.fault([clean[j] for j in idx], step, self.seed)
        out = list(clean)
        for j, item in zip(idx, bad):
            out[j] = item
        return out


training.StepStream = SubStepStream


@dataclass(frozen=True)
class AccScenario:
    name: str
    fault: str
    steps: tuple[int, ...]
    length: int
    ga: int
    items: tuple[int, ...] | None  # bad items within a fault step; None: the whole step
    total: int = 300

    def scenario(self):
        return custom_scenario(self.name, "pretrain", self.fault, self.steps, length=self.length, total=self.total)

    def bad_micro(self) -> set[int]:
        mb = 8 // self.ga
        return set(range(self.ga)) if self.items is None else {i // mb for i in self.items}


ISO = (120, 159, 201, 240)  # the gallery's garbage_batches steps
SCENARIOS = {s.name: s for s in [
    AccScenario("ga4_isolated_mb", "garbage", ISO, 1, 4, (2, 3)),            # 1 of 4 micro-batches bad
    AccScenario("ga8_isolated_mb", "garbage", ISO, 1, 8, (3,)),              # 1 of 8 micro-batches bad
    AccScenario("ga4_one_sample", "garbage", ISO, 1, 4, (5,)),               # 1 bad sample of 8 (half a micro-batch)
    AccScenario("ga4_shard_whole_steps", "utf16_shard", (150,), 30, 4, None),  # a shard spanning whole steps
    AccScenario("ga4_shard_interleaved", "utf16_shard", (150,), 30, 4, (4, 5)),  # 1 of 4 micro-batches, 30 steps
]}


# ------------------------------------------------------------------ the gate
def _gate_trainer(kind: str, acc: AccScenario | None):
    from detectors import EMA, Either, LowDiff
    from gradclip_hf.config import ClipConfig
    from gradclip_hf.integrations.transformers import GradClipTrainer

    from b_methods import Base

    class GateCallback(Base):
        pass

    class GateTrainer(GradClipTrainer):
        """compute_loss returns loss * keep; keep = 0 for a micro-batch whose mean token loss is a spike
        against the running per-micro-batch baseline (``gate``) or that holds a fault item (``oracle_micro``).
        After the step's last backward the gradient is multiplied by total / kept tokens; nothing kept:
        the step is skipped."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            ga = self.args.gradient_accumulation_steps
            if kind == "gate2":  # the early rule alone (fewer per-micro-batch FPs, A), adapt_after counted in steps
                self.det = LowDiff(min_ratio=1.5, adapt_after=50 * ga)
            elif kind == "gate3":  # both rules, warmup / EMA memory / adapt_after counted in optimizer steps
                self.det = Either(first=EMA(warmup=20 * ga, alpha=0.9 ** (1 / ga), adapt_after=50 * ga),
                                  second=LowDiff(min_ratio=1.5, adapt_after=50 * ga), adapt_after=50 * ga)
            else:
                self.det = Either(first=EMA(), second=LowDiff(min_ratio=1.5))
            self.det_state = None
            self.micro, self.kept_tok, self.total_tok = 0, 0.0, 0.0
            self.gcb = GateCallback()
            self.gcb.trainer = self
            self.add_callback(self.gcb)
            self.gate_flags: list[tuple[int, int]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if model.training:
                with torch.no_grad():
                    s, n = per_sample_nll(outputs.logits, inputs["labels"])
                    tokens = n.sum().to(torch.float64)
                    mean = s.sum().to(torch.float64) / tokens.clamp(min=1)
                    step = int(self.state.global_step)
                    if kind == "oracle_micro":
                        bad = acc is not None and step in set(acc.scenario().fault_steps(acc.total)) and self.micro in acc.bad_micro()
                        keep = torch.tensor(0.0 if bad else 1.0, dtype=torch.float64)
                    else:
                        if self.det_state is None:
                            self.det_state = self.det.fresh((), mean.device, torch.float64)
                        spike, _, _ = self.det.update(self.det_state, mean)
                        keep = (~spike).to(torch.float64)  # a device tensor: no host read needed
                    if float(keep) == 0.0:  # prototype bookkeeping only
                        self.gate_flags.append((step, self.micro))
                    self.kept_tok += float(keep * tokens)
                    self.total_tok += float(tokens)
                loss = loss * keep.to(loss.dtype)
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, *args, **kwargs):
            out = super().training_step(model, inputs, *args, **kwargs)
            self.micro += 1
            if self.micro == self.args.gradient_accumulation_steps:
                with torch.no_grad():
                    if self.kept_tok == 0:
                        self.gcb.skip_now = True
                    elif self.kept_tok < self.total_tok:
                        scale = self.total_tok / self.kept_tok
                        for p in model.parameters():
                            if p.grad is not None:
                                p.grad.mul_(scale)
                self.micro, self.kept_tok, self.total_tok = 0, 0.0, 0.0
            return out

    def build(m: Method, args_kwargs, **kw):
        t = GateTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=1.0), clip_config=ClipConfig.recommended(), **kw)
        t._proto = None
        return t

    return build


def _oracle_step(acc: AccScenario):
    from b_methods import OracleSkip, make_builder

    return make_builder(lambda: OracleSkip(acc.scenario().fault_steps(acc.total)))


def extras(trainer, callbacks):
    out = {}
    if hasattr(trainer, "gate_flags"):
        out["gate"] = trainer.gate_flags
    if getattr(trainer, "_proto", None) is not None:
        out.update(trainer._proto.extras())
    return out


def method_for(name: str, acc: AccScenario | None) -> Method:
    if name in ("stock", "recommended"):
        return METHODS[name]
    kind = f"acc:{name}:{acc.name if acc else 'clean'}"
    if name in ("gate", "gate2", "gate3", "oracle_micro"):
        CUSTOM[kind] = _gate_trainer(name, acc)
    elif name == "oracle_step":
        CUSTOM[kind] = _oracle_step(acc)
    return Method(name, kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["stock", "recommended", "oracle_step", "oracle_micro", "gate"])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ns = ap.parse_args()
    setup_threads()
    cache = Cache(HERE / "cache" / "acc.jsonl")
    for seed in ns.seeds:
        for sname in ns.scenarios:
            acc = SCENARIOS[sname]
            args = {"per_device_train_batch_size": 8 // acc.ga, "gradient_accumulation_steps": acc.ga}
            sc = acc.scenario()
            BAD_ITEMS["items"] = list(acc.items) if acc.items is not None else None
            for name in ns.methods:
                tag = f"{name}_v1"
                clean_name = "recommended" if name.startswith("oracle") else name
                run(cache, f"{clean_name}_v1", method_for(clean_name, None), sc, seed, False, arguments=args,
                    extras=extras, label=f"ga{acc.ga}")
                run(cache, tag, method_for(name, acc), sc, seed, True, arguments=args, extras=extras,
                    key_extra={"items": acc.items}, label=sname)
    print("done")


if __name__ == "__main__":
    main()
