"""``AcceleratorClipper`` where ``transformers`` cannot be imported (issue 24.1): a real accelerate loop in a
subprocess whose import system refuses ``transformers``, with gradient accumulation, a loss spike skipped inside
``optimizer.step()`` and the metrics read once per logging step. The model is a byte-level bigram model on the
standard library's own text (torch only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOP = r'''
import json, sys


class NoTransformers:  # the import system refuses transformers, as where it is not installed
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NoTransformers())
import sysconfig

import torch
from accelerate import Accelerator

from gradclip_hf import ClipConfig
from gradclip_hf.integrations.accelerate import AcceleratorClipper

try:
    import transformers  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

torch.manual_seed(0)
text = open(sysconfig.get_paths()["stdlib"] + "/os.py", "rb").read()[:40_000]
data = torch.tensor(list(text), dtype=torch.long)
model = torch.nn.Sequential(torch.nn.Embedding(256, 32), torch.nn.Linear(32, 256))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
model, optimizer = accelerator.prepare(model, optimizer)
config = ClipConfig(spike_detection="loss", spike_action="skip", spike_warmup_steps=5, spike_factor=1.0,
                    spike_ratio=1.6)
clipper = AcceleratorClipper(accelerator, config, model, optimizer, max_grad_norm=1.0)
SPIKE = 30  # optimizer step whose micro-batches are random bytes the model has never seen (a loss spike)
unchanged, logged, micro = None, [], 0
for step in range(40):
    for _ in range(2):
        with accelerator.accumulate(model):
            start = (micro * 64) % (len(data) - 65)
            x, y = data[start:start + 64], data[start + 1:start + 65]
            if step == SPIKE:
                x = y = torch.randint(128, 256, (64,), generator=torch.Generator().manual_seed(micro))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            report = clipper.clip_(loss)
            before = [p.detach().clone() for p in model.parameters()] if report is not None else None
            optimizer.step()
            optimizer.zero_grad()
            if report is not None and step == SPIKE:
                unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            micro += 1
    if (step + 1) % 10 == 0:
        logged.append(clipper.metrics())
clipper.close()
print(json.dumps({"blocked": blocked, "transformers": sorted(m for m in sys.modules if m.startswith("transformers")),
                  "unchanged": unchanged, "spikes": [e.step for e in clipper.spike_events], "logged": logged,
                  "steps": clipper.global_step}))
'''


def test_a_real_accelerate_loop_runs_without_transformers(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOOP], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocked"] and out["transformers"] == []  # nothing of transformers was imported, or could be
    assert out["steps"] == 40 and out["spikes"] == [31]  # train/global_step numbering: step 30 is the 31st
    assert out["unchanged"] is True  # the spike's update was skipped inside optimizer.step()
    assert [m["gradclip/skipped_steps"] for m in out["logged"]] == [0, 0, 0, 1]
    assert all(m["gradclip/threshold"] == 1.0 for m in out["logged"])
