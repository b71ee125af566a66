"""The real runs behind the examples in docs/report.md (about 20 s each on one CPU thread).

    python docs/report_example.py stock out/stock 1          # stock Trainer, max_grad_norm=1.0, logging_steps=1
    python docs/report_example.py stock out/stock2 1 2.0     # the same with max_grad_norm=2.0
    python docs/report_example.py pack out/pack 5            # GradClipTrainer, ClipConfig.recommended(), logging_steps=5
    gradclip-hf report out/stock

200 optimizer steps of a tiny Llama on the standard library's source, 8 blocks of 64 bytes per step; the 8
blocks of step 151 (0-based 150) are rare bytes the model has never seen: a loss and gradient spike.
"""

import sys

import torch
from transformers import Trainer, TrainingArguments

from gradclip_hf import ClipConfig, GradClipTrainer
from gradclip_hf.standins import ByteLMDataset, SpikyByteStream, stdlib_text, tiny_llama

torch.set_num_threads(1)
kind, out, logging_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
max_grad_norm = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
data = SpikyByteStream(ByteLMDataset(stdlib_text(300_000), block_size=64), spike_steps=(150,), samples_per_step=8)
args = TrainingArguments(output_dir=out, max_steps=200, per_device_train_batch_size=8, learning_rate=1e-3,
                         logging_steps=logging_steps, save_steps=100, report_to="none", use_cpu=True,
                         disable_tqdm=True, max_grad_norm=max_grad_norm)
if kind == "stock":
    trainer = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=data)
else:
    trainer = GradClipTrainer(model=tiny_llama(seed=0), args=args, train_dataset=data,
                              clip_config=ClipConfig.recommended())
trainer.train()
