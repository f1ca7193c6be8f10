"""Fine-tuning from plainly sliced vs refitted (``--reconstruct``) weights, side by side:
SmolLM2, 30 layers x 768 MLP neurons (70% of the parameters), 30 steps of 4 x 256 tokens
with distillation from the full model, perplexity on the 4,096 held-out tokens after.

    python benchmarks/reconstruction_finetune.py        # ~9 min on 2 CPU cores
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from subnets.config import SubnetConfig
from subnets.quality import perplexity
from subnets.workspace import Workspace
from training.recovery import finetune
from training.settings import TrainSettings

torch.set_num_threads(2)
ws = Workspace.open("smollm2")
d = ws.space.dims
cfg = SubnetConfig.uniform(ws.base.base_id, range(d.num_layers), d.num_kv_heads, d.heads_per_group, 768)
tokens = ws.eval_tokens()
root = Path(tempfile.mkdtemp())
for rec in (False, True):
    t = time.time()
    s = TrainSettings(steps=30, kd="teacher", warmup_steps=3, checkpoint_every=1000)
    res, model = finetune("smollm2", cfg, ["stdlib"], s, root / f"ft{int(rec)}", reconstruct=rec)
    print(f"reconstruct={rec}: start loss {res.log[0]['loss']:.3f} end loss {res.log[-1]['loss']:.3f}; "
          f"perplexity after 30 steps {perplexity(model.eval(), tokens):.2f}; {time.time() - t:.0f} s", flush=True)
