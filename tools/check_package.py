"""Build the sdist and the wheel, check them with twine, install the wheel into a fresh virtualenv (torch pinned
first) and use it from there: ``import gradclip_hf``, the ``gradclip-hf`` console script, a 2-step
``GradClipTrainer`` run on the stand-ins, and ``gradclip-hf demo`` (10 steps per run). The wheel holds the package
only: the research harness (``benchmarks/``) stays in the repository. ``make test`` runs it (``make test-package``).

    python tools/check_package.py [--torch torch==2.13.0]
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = r"""
import tempfile, torch, transformers
import gradclip_hf
from gradclip_hf import ClipConfig, GradClipTrainer
from gradclip_hf.standins import ByteLMDataset, stdlib_text, tiny_llama
assert "GradClipTrainer" in dir(gradclip_hf) and gradclip_hf.__file__.find("site-packages") > 0, gradclip_hf.__file__
args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=2,
                                      report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True)
trainer = GradClipTrainer(model=tiny_llama(0), args=args, clip_config=ClipConfig.recommended(),
                          train_dataset=ByteLMDataset(stdlib_text(20_000), block_size=32, num_blocks=8))
trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h]
assert len(logs) == 2 and all("gradclip/threshold" in h for h in logs), logs
print("wheel OK:", gradclip_hf.__version__, gradclip_hf.__file__)
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement installed first")
    opts = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradclip-package-") as tmp:
        dist = os.path.join(tmp, "dist")
        run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, ROOT])
        artifacts = sorted(glob.glob(os.path.join(dist, "*")))
        run([sys.executable, "-m", "twine", "check", "--strict", *artifacts])
        wheel = next(a for a in artifacts if a.endswith(".whl"))
        tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
        if any(t != "gradclip_hf" and not t.endswith(".dist-info") for t in tops):
            raise SystemExit(f"the wheel holds more than the package: {sorted(tops)}")
        venv = os.path.join(tmp, "venv")
        run([sys.executable, "-m", "venv", venv])
        py = os.path.join(venv, "bin", "python")
        pip = [py, "-m", "pip", "install", "--quiet"]
        run(pip + [opts.torch])
        run(pip + [f"{wheel}[transformers]", "matplotlib"])
        run([os.path.join(venv, "bin", "gradclip-hf"), "--help"], stdout=subprocess.DEVNULL)
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": ""}
        run([py, "-c", SMOKE], cwd=tmp, env=env)
        run([os.path.join(venv, "bin", "gradclip-hf"), "demo", "--steps", "10", "--no-wandb", "--no-progress",
             "--output-dir", "demo_output"], cwd=tmp, env=env, stdout=subprocess.DEVNULL)
        if not os.path.isfile(os.path.join(tmp, "demo_output", "report.md")):
            raise SystemExit("gradclip-hf demo from the wheel wrote no report.md")
        print(f"package check passed in {time.perf_counter() - start:.0f} s: {', '.join(map(os.path.basename, artifacts))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
