"""Helpers shared by the multi-process workers (run under torchrun, never collected by pytest)."""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.distributed as dist


def init() -> int:
    """Join the gloo process group torchrun set up; return the rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank()


def out_dir() -> str:
    return sys.argv[1]


def floats(report) -> dict:
    """The report's scalars and spike decision as floats (NaN as None, infinities kept: json reads them back)."""
    values = report.to_floats()
    if report.spike is not None:
        s = report.spike
        values.update(spike=float(s.spike), loss_spike=float(s.loss_spike), norm_spike=float(s.norm_spike),
                      factor=float(s.factor), loss=float(s.loss))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def dump(name: str, payload) -> None:
    path = os.path.join(out_dir(), f"{name}.rank{dist.get_rank()}.json")
    with open(path, "w") as f:
        json.dump(payload, f)  # NaN is already None; an infinite threshold (ZScoreClip uncapped) is kept


class CollectiveCounter:
    """Counts calls of the ``torch.distributed`` collectives a clipper could issue (monkeypatched)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "all_gather_object", "reduce")

    def __init__(self):
        self.counts = {name: 0 for name in self.NAMES}
        self._orig = {}

    def __enter__(self):
        for name in self.NAMES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapper(*args, _name=name, _orig=orig, **kwargs):
                self.counts[_name] += 1
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)
