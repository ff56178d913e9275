"""The README's main job: a tiny DeepSeek-V4 (all three attention types, MoE, mHC, MTP) trained on the Python
standard library's source in a few minutes on 2 CPU cores.

  dsv4 train --config configs/train_tiny.py --workdir runs/tiny
  dsv4 generate --checkpoint runs/tiny/hf --prompt "def " --max-new-tokens 60
"""

from dsv4_jax.train.config import default_config


def get_config():
  c = default_config()
  c.model = "tiny"  # 4 layers (SWA, CSA, HCA, CSA) + MTP, d=64, 8 experts (top-2); vocab from data
  c.data.vocab_size = 4096
  c.data.seq_len = 256
  c.data.global_batch = 8
  c.steps = 300
  c.optimizer.peak_lr = 3e-3
  c.optimizer.warmup_steps = 20
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  return c
