"""Question B prototypes: mechanisms against a learning-rate mistake, on top of ClipConfig.recommended().

Each is a TrainerCallback added to a GradClipTrainer(recommended()); the pack clips and skips loss spikes as
today, the prototype adds one mechanism. Prototype code: host reads (``float(...)``) are allowed here; the
device-side form is described in FINDINGS.md.

* ``UpdateGuard`` (mechanism 3: Levanter's clip_update_norm, made relative): before AdamW applies a step,
  compute the norm of the update it is about to make (from the gradient and the moments, no weight copy)
  and scale this step's learning rate so that the norm is at most ``cap`` x its running baseline (EMA of
  past uncapped update norms; capped steps stay out, ``adapt_after`` capped steps in a row let a new level in).
* ``NormUndo`` (mechanism 1): a gradient-norm spike without a loss spike at step t means the weights moved
  into a bad region at the last applied update: undo that update exactly (AdamW's step inverted from the
  moments it left: no snapshot) and skip step t. ``escalate=True``: the first such spike only skips; undo
  when the next step spikes again (the weights are still bad after a skip).
* ``SnapRollback`` (mechanism 1, snapshot form): loss or norm spike -> skip; a second flagged step in a row ->
  restore an in-memory snapshot (weights + optimizer state) taken at least 2 steps before the episode began
  (two slots, one every ``every`` unflagged steps), and skip.
* ``SpamReset`` (mechanism 2, SPAM on detection): on a gradient-norm spike, the tensors whose own gradient
  norm is > ``hit`` x their running norm get Adam's moments and step count reset (fresh Adam for them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from detectors import EMA
from i25lib import CUSTOM, Method


def inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _step_of(opt) -> int:
    for g in opt.param_groups:
        for p in g["params"]:
            s = opt.state.get(p, {}).get("step")
            if s is not None:
                return int(float(s))
    return 0


class Scalar:
    """A host wrapper of a 0-dim detector from detectors.py (prototype)."""

    def __init__(self, det):
        self.det, self.st = det, det.fresh(())

    def update(self, x: float):
        s, z, b = self.det.update(self.st, torch.tensor(float(x), dtype=torch.float64))
        return bool(s), float(z), float(b)

    def peek(self, x: float):
        st = {k: v.clone() for k, v in self.st.items()}
        s, z, b = self.det.update(st, torch.tensor(float(x), dtype=torch.float64))
        return bool(s), float(z), float(b)


class Base(TrainerCallback):
    """Installs optimizer pre/post hooks once; hides all gradients for a step when ``self.skip_now``;
    tracks whether the last step was applied and the learning rate each group used."""

    def __init__(self):
        self.trainer = None
        self.opt = None
        self.skip_now = False
        self.hidden: list = []
        self.flags: dict[str, list[int]] = {}
        self.last_lrs: list[float] | None = None
        self.last_applied = False
        self._step_before = 0

    def flag(self, kind: str, step: int):
        self.flags.setdefault(kind, []).append(step)

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.opt = inner(optimizer)
        self.opt.register_step_pre_hook(self._pre)
        self.opt.register_step_post_hook(self._post)

    def _pre(self, opt, args, kwargs):
        self._step_before = _step_of(opt)
        if self.skip_now:
            for g in opt.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        self.hidden.append((p, p.grad))
                        p.grad = None
        self.pre_step(opt)

    def _post(self, opt, args, kwargs):
        self.post_step(opt)
        for p, g in self.hidden:
            p.grad = g
        self.hidden = []
        if _step_of(opt) != self._step_before:  # applied (a skip leaves the last applied update undoable)
            self.last_applied = True
            self.last_lrs = [float(g["lr"]) for g in opt.param_groups]
        self.skip_now = False

    def pre_step(self, opt):
        pass

    def post_step(self, opt):
        pass

    def report(self):
        run = self.trainer.clip_run
        return run.last_report if run is not None else None


# ------------------------------------------------------------------ AdamW algebra (torch's foreach AdamW)
def adamw_update(opt, with_current_grad: bool):
    """Per parameter: the update AdamW makes (``with_current_grad``: the coming step, from p.grad and the
    moments; else the last applied step, from the moments it left). Returns [(p, u, group)], u such that
    p_new = p * (1 - lr wd) - u."""
    out = []
    for group in opt.param_groups:
        b1, b2 = group["betas"]
        eps, lr = group["eps"], float(group["lr"])
        for p in group["params"]:
            st = opt.state.get(p, {})
            if with_current_grad:
                if p.grad is None:
                    continue
                g = p.grad.float()
                m = st["exp_avg"] * b1 + (1 - b1) * g if st else (1 - b1) * g
                v = st["exp_avg_sq"] * b2 + (1 - b2) * g * g if st else (1 - b2) * g * g
                step = (float(st["step"]) if st else 0.0) + 1
            else:
                if not st:
                    continue
                m, v, step = st["exp_avg"], st["exp_avg_sq"], float(st["step"])
            bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
            denom = v.sqrt() / math.sqrt(bc2) + eps
            out.append((p, (lr / bc1) * m / denom, group))
    return out


# ------------------------------------------------------------------ mechanism 3: the update-norm guard
class UpdateGuard(Base):
    def __init__(self, cap: float = 2.0, warmup: int = 20, alpha: float = 0.9, adapt_after: int = 50,
                 first_moment: bool = False, follow: bool = False):
        super().__init__()
        self.cap, self.first_moment, self.follow = cap, first_moment, follow
        # the baseline: EMA mean of accepted update norms (cumulative during warmup), as SpikeDetector
        self.det = Scalar(EMA(z_max=1e9, ratio=cap, warmup=warmup, alpha=alpha, adapt_after=adapt_after))
        self.rows: list[tuple[int, float, float, float]] = []
        self._scaled: list[tuple[dict, float]] = []
        self._pending = None

    def pre_step(self, opt):
        if not any(p.grad is not None for g in opt.param_groups for p in g["params"]):
            self._pending = None
            return
        with torch.no_grad():
            ups = adamw_update(opt, True)
            if self.first_moment:  # the norm of the first moment instead of the update
                norm = math.sqrt(sum(float(((opt.state[p]["exp_avg"] if opt.state.get(p) else 0 * p) * g["betas"][0]
                                            + (1 - g["betas"][0]) * p.grad).pow(2).sum()) for p, _, g in ups))
            else:
                norm = math.sqrt(sum(float((u + float(g["lr"]) * g["weight_decay"] * p).pow(2).sum())
                                     for p, u, g in ups))
        spike, z, base = self.det.peek(norm)
        scale = min(1.0, self.cap * base / norm) if spike and norm > 0 else 1.0
        self._pending = (norm, scale)
        if scale < 1.0:
            self._scaled = [(g, g["lr"]) for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = g["lr"] * scale

    def post_step(self, opt):
        for g, lr in self._scaled:
            g["lr"] = lr
        self._scaled = []
        if self._pending is None:
            return
        norm, scale = self._pending
        applied = _step_of(opt) != self._step_before
        if applied:  # skipped steps (the pack's loss-spike skip) stay out of the baseline
            # follow: a capped step enters the baseline at its capped norm (the baseline then rises by at most
            # (1 - alpha) * (cap - 1) per step: an automatic re-warmup); else capped steps stay out (adapt_after)
            self.det.update(norm * scale * (0.999 if scale < 1.0 else 1.0) if self.follow else norm)
            step = int(self.trainer.state.global_step)
            self.rows.append((step, norm, scale, 0.0))
            if scale < 1.0:
                self.flag("capped", step)
        self._pending = None

    def extras(self):
        return {"flags": self.flags, "capped_scales": [r[2] for r in self.rows if r[2] < 1.0][:50]}


# ------------------------------------------------------------------ mechanism 1a: undo the last update
class NormUndo(Base):
    def __init__(self, z: float = 6.0, warmup: int = 20, escalate: bool = False, adapt_after: int = 50):
        super().__init__()
        self.det = Scalar(EMA(z_max=z, warmup=warmup, adapt_after=adapt_after))
        self.escalate = escalate
        self.prev_flag = False

    def on_pre_optimizer_step(self, args, state, control, **kw):
        rep = self.report()
        if rep is None:
            return
        step = int(state.global_step)
        norm = float(rep.norm)
        loss_spike = bool(rep.spike.loss_spike) if rep.spike is not None else False
        if not math.isfinite(norm):
            return
        if loss_spike:  # a bad batch: the pack skips it; keep it out of the norm statistics too
            self.det.peek(norm)
            self.prev_flag = False
            return
        spike, _, _ = self.det.update(norm)
        if not spike:
            self.prev_flag = False
            return
        self.flag("norm_spike", step)
        self.skip_now = True
        if (not self.escalate or self.prev_flag) and self.last_applied:
            self.undo(step)
        self.prev_flag = True

    @torch.no_grad()
    def undo(self, step):
        opt = self.opt
        lrs = self.last_lrs or [float(g["lr"]) for g in opt.param_groups]
        saved = [g["lr"] for g in opt.param_groups]
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p, u, g in adamw_update(opt, False):
            p.add_(u.to(p.dtype))
            wd = float(g["lr"]) * g["weight_decay"]
            if wd:
                p.div_(1 - wd)
        for g, lr in zip(opt.param_groups, saved):
            g["lr"] = lr
        self.last_applied = False  # one update can be undone once
        self.flag("undo", step)

    def extras(self):
        return {"flags": self.flags}


# ------------------------------------------------------------------ mechanism 1b: snapshot rollback, escalating
class SnapRollback(Base):
    def __init__(self, z: float = 6.0, warmup: int = 20, every: int = 10, adapt_after: int = 50, margin: int = 2):
        super().__init__()
        self.det = Scalar(EMA(z_max=z, warmup=warmup, adapt_after=adapt_after))
        self.every, self.margin = every, margin
        self.slots: list[tuple[int, list, list]] = []  # (step, params, optimizer state) newest last, at most 2
        self.prev_flag = False
        self.episode_start = None
        self.clean_run = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        rep = self.report()
        if rep is None:
            return
        step = int(state.global_step)
        norm = float(rep.norm)
        loss_spike = bool(rep.spike.loss_spike) if rep.spike is not None else False
        norm_spike = False
        if math.isfinite(norm):
            norm_spike = self.det.peek(norm)[0] if loss_spike else self.det.update(norm)[0]
        flagged = loss_spike or norm_spike
        if not flagged:
            self.prev_flag, self.episode_start = False, None
            self.clean_run += 1
            if self.clean_run >= self.every or not self.slots:
                self.take(step)
                self.clean_run = 0
            return
        self.flag("flag", step)
        self.skip_now = True
        if self.episode_start is None:
            self.episode_start = step
        if self.prev_flag:
            self.rollback(step)
        self.prev_flag = True

    def _params(self):
        return [p for g in self.opt.param_groups for p in g["params"]]

    @torch.no_grad()
    def take(self, step):
        ps = self._params()
        state = [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in self.opt.state.get(p, {}).items()}
                 for p in ps]
        self.slots.append((step, [p.detach().clone() for p in ps], state))
        self.slots = self.slots[-2:]

    @torch.no_grad()
    def rollback(self, step):
        target = [s for s in self.slots if s[0] <= self.episode_start - self.margin]
        if not target:
            return
        at, params, state = target[-1]
        for p, saved, st in zip(self._params(), params, state):
            p.copy_(saved)
            cur = self.opt.state.get(p)
            if not st:
                self.opt.state.pop(p, None)
                continue
            for k, v in st.items():
                if torch.is_tensor(v) and cur is not None and torch.is_tensor(cur.get(k)):
                    cur[k].copy_(v)
                else:
                    self.opt.state[p][k] = v.clone() if torch.is_tensor(v) else v
        self.slots = [s for s in self.slots if s[0] <= at]
        self.flag("rollback", step)
        self.flag("rollback_to", at)

    def extras(self):
        return {"flags": self.flags}


# ------------------------------------------------------------------ mechanism 2: SPAM-style moment reset on detection
class SpamReset(Base):
    def __init__(self, z: float = 6.0, warmup: int = 20, hit: float = 3.0, adapt_after: int = 50):
        super().__init__()
        self.det = Scalar(EMA(z_max=z, warmup=warmup, adapt_after=adapt_after))
        self.hit = hit
        self.tensor_ema: torch.Tensor | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        rep = self.report()
        if rep is None:
            return
        step = int(state.global_step)
        norm = float(rep.norm)
        if not math.isfinite(norm):
            return
        loss_spike = bool(rep.spike.loss_spike) if rep.spike is not None else False
        per = rep.per_tensor_norms.detach().double().cpu()
        spike = False if loss_spike else self.det.update(norm)[0]
        if self.tensor_ema is None:
            self.tensor_ema = per.clone()
        if spike:
            ratio = per / self.tensor_ema.clamp(min=1e-12)
            names = [n for n, r in zip(rep.names, ratio.tolist()) if r > self.hit]
            self.reset(model, names, step)
        elif not loss_spike:
            self.tensor_ema.mul_(0.9).add_(0.1 * per)

    @torch.no_grad()
    def reset(self, model, names, step):
        by_name = dict(model.named_parameters())
        for n in names:
            p = by_name.get(n)
            st = self.opt.state.get(p) if p is not None else None
            if st:
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()
                st["step"].zero_() if torch.is_tensor(st["step"]) else st.__setitem__("step", 0)
        self.flag("reset", step)
        self.flags.setdefault("reset_tensors", []).append(len(names))

    def extras(self):
        return {"flags": self.flags}


# ------------------------------------------------------------------ oracle: skip exactly the fault steps
class OracleSkip(Base):
    def __init__(self, steps=()):
        super().__init__()
        self.steps = set(steps)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if int(state.global_step) in self.steps:
            self.skip_now = True
            self.flag("oracle", int(state.global_step))

    def extras(self):
        return {"flags": self.flags}


# ------------------------------------------------------------------ builders
def make_builder(factory):
    def build(m: Method, args_kwargs: dict[str, Any], **kw):
        from gradclip_hf.config import ClipConfig
        from gradclip_hf.integrations.transformers import GradClipTrainer

        trainer = GradClipTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=1.0),
                                  clip_config=ClipConfig.recommended(), **kw)
        cb = factory()
        cb.trainer = trainer
        trainer.add_callback(cb)
        trainer._proto = cb
        return trainer

    return build


PROTOS = {
    "guard_c2": lambda: UpdateGuard(cap=2.0),
    "guard_c3": lambda: UpdateGuard(cap=3.0),
    "guard_c1.5": lambda: UpdateGuard(cap=1.5),
    "mguard_c2": lambda: UpdateGuard(cap=2.0, first_moment=True),
    "guard_c2_follow": lambda: UpdateGuard(cap=2.0, follow=True),
    "undo1": lambda: NormUndo(),
    "undo_esc": lambda: NormUndo(escalate=True),
    "snap_esc": lambda: SnapRollback(),
    "spam_reset": lambda: SpamReset(),
    "oracle_lr": lambda: OracleSkip(range(150, 160)),
}
for _name, _factory in PROTOS.items():
    CUSTOM["b:" + _name] = make_builder(_factory)


def method_for(name: str) -> Method:
    return Method(name, "b:" + name)


def extras(trainer, callbacks):
    cb = getattr(trainer, "_proto", None)
    out = cb.extras() if cb is not None else {}
    run = getattr(trainer, "clip_run", None)
    return out

PROTOS.update({
    "guard_c3_follow": lambda: UpdateGuard(cap=3.0, follow=True),
    "guard_c1.5_follow": lambda: UpdateGuard(cap=1.5, follow=True),
    "guard_c2_follow_a7": lambda: UpdateGuard(cap=2.0, follow=True, alpha=0.7),
})
for _name in ("guard_c3_follow", "guard_c1.5_follow", "guard_c2_follow_a7"):
    CUSTOM["b:" + _name] = make_builder(PROTOS[_name])
