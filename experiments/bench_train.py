"""Train-step throughput and MFU of a ~2B-parameter V4-shaped MoE on one accelerator.

  python experiments/bench_train.py [--seq 4096 32768] [--steps 6] [--out experiments/results/train.md]

Times the real `dsv4_jax.train.step` (Muon + AdamW, LM + MTP + balance + indexer losses, bias update) on
random tokens (never zeros), after compile and two warm-up steps; reports the median step. FLOPs are the work
actually done (`accounting.train_flops_per_token`: active matmuls, attention over the selected keys, the
indexer), over the measured bf16 matmul rate and over the datasheet peak (989 TFLOP/s dense bf16, H100/H200).
Also times the forward + loss alone and the optimizer update alone, to say where the time goes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv4_jax import accounting  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model.transformer import DeepSeekV4  # noqa: E402
from dsv4_jax.train import optimizer as opt_lib  # noqa: E402
from dsv4_jax.train import step as step_lib  # noqa: E402

import timing  # noqa: E402  (experiments/timing.py)

DATASHEET_BF16 = 989e12


SMOKE = False  # --smoke: the tiny preset, to check the script on a CPU
FP32 = False  # --fp32-matmuls
MOE_IMPL = "capacity"  # --moe-impl


def bench_config(seq: int) -> ModelConfig:
  """Flash-shaped (head_dim 512, 64-dim RoPE, CSA m=4 + HCA m=128, window 128, mHC ×4, MTP, hash layers),
  narrowed to ~2B parameters: d=2048, 6 layers + MTP, 16 heads, 32 experts top-6 (inter 1024) + 1 shared."""
  if SMOKE:
    return ModelConfig.preset("tiny", moe_impl=MOE_IMPL, dtype="bfloat16", fp32_matmuls=FP32)
  return ModelConfig.preset(
      "flash", hidden_size=2048, num_hidden_layers=6, compress_ratios=(0, 4, 128, 4, 128, 4, 0),
      num_hash_layers=1, num_attention_heads=16, q_lora_rank=512, o_groups=4, o_lora_rank=512,
      index_n_heads=32, index_topk=512, n_routed_experts=32, num_experts_per_tok=6, moe_intermediate_size=1024,
      max_position_embeddings=max(seq, 65536), expert_dtype=None, weight_quant=None, simulate_quant=False,
      dtype="bfloat16", param_dtype="float32", moe_impl=MOE_IMPL, fp32_matmuls=FP32)


def timed(fn, *args, steps: int, warmup: int = 2):
  """(median seconds, each run's seconds) of fn(*args) (outputs blocked on); fn must not donate its inputs."""
  times = timing.run_times(fn, *args, steps=steps, warmup=warmup)
  return statistics.median(times), times


def random_batch(cfg, batch: int, seq: int, seed: int):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, cfg.vocab_size, (batch, seq), dtype=np.int32)
  # two documents per row, so packing and segment-aware compression are exercised
  seg = np.ones((batch, seq), np.int32)
  seg[:, seq // 3:] = 2
  pos = np.concatenate([np.arange(seq // 3), np.arange(seq - seq // 3)]).astype(np.int32)
  return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(np.broadcast_to(pos, (batch, seq)).copy())}


def plans_for(seq: int) -> tuple[int, int]:
  """(batch, grad_accum) per sequence length: 32K tokens per microbatch."""
  return {4096: (8, 2), 8192: (4, 2), 16384: (2, 2), 32768: (1, 2)}.get(seq, (max(1, 32768 // seq), 2))


def run_case(seq: int, batch: int, accum: int, steps: int, remat: str, ceiling: float):
  cfg = bench_config(seq)
  model = DeepSeekV4(cfg, rngs=nnx.Rngs(0))
  graphdef, params, buffers = step_lib.split_model(model)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  tx = opt_lib.build_optimizer(params, learning_rate=1e-4)
  state = step_lib.init_state(model, tx)
  del model
  scfg = step_lib.StepConfig(grad_accum=accum, stage="sparse", remat=remat)
  step_fn = jax.jit(step_lib.make_train_step(graphdef, tx, scfg))
  batch_arrays = random_batch(cfg, batch * accum, seq, seed=seq)
  hp = {"mtp_weight": jnp.float32(0.3), "lr_scale": jnp.float32(1.0)}

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays, hp).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  step_s, all_s = timed(compiled, state, batch_arrays, hp, steps=steps)
  _, metrics = compiled(state, batch_arrays, hp)
  loss = float(metrics["loss"])

  # forward + loss only (no gradient), and the optimizer update alone, for the breakdown
  def fwd(params, buffers, b):
    m = nnx.merge(graphdef, params, buffers)
    out = m(b["tokens"], b["segment_ids"], b["positions"], options=scfg.forward_options())
    return jnp.mean(out.logits[..., :8]) + jnp.mean(out.mtp_logits[..., :8])
  mb = jax.tree.map(lambda a: a[:batch], batch_arrays)
  fwd_s, _ = timed(jax.jit(fwd), state.params, state.buffers, mb, steps=steps)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape, p.dtype) * 1e-3, state.params)
  upd = jax.jit(lambda g, o, p: tx.update(g, o, p))
  opt_s, _ = timed(upd, grads, state.opt_state, state.params, steps=steps)

  tokens = batch * accum * seq
  fpt = accounting.train_flops_per_token(cfg, seq)
  flops = fpt * tokens
  return dict(seq=seq, batch=batch, accum=accum, tokens=tokens, params=n_params, remat=remat,
              compile_s=compile_s, step_s=step_s, all_s=all_s, fwd_s=fwd_s * accum, opt_s=opt_s,
              tok_s=tokens / step_s, tflops=flops / step_s / 1e12, mfu_ceiling=flops / step_s / ceiling,
              mfu_datasheet=flops / step_s / DATASHEET_BF16, loss=loss,
              temp_gib=getattr(mem, "temp_size_in_bytes", 0) / 2**30,
              arg_gib=getattr(mem, "argument_size_in_bytes", 0) / 2**30)


def breakdown(seq: int, batch: int, steps: int, ceiling: float) -> list[tuple[str, float, float]]:
  """(component, fwd+bwd seconds, useful TFLOP/s) at the bench shape: where a step's time goes."""
  import pallas_kernels
  from dsv4_jax.model.moe import RoutedExperts
  from dsv4_jax.model.transformer import Block, LayerSpec
  from dsv4_jax.model.context import make_context
  cfg = bench_config(seq)
  T = batch * seq
  d, V = cfg.hidden_size, cfg.vocab_size
  key = jax.random.key(7)
  rows = []

  def time_grad(name, f, args, flops):
    g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=tuple(range(len(args)))))
    t, _ = timed(g, *args, steps=steps)
    rows.append((name, t, flops / t / 1e12))
    print(f"  {name}: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s useful", flush=True)

  feats = jax.random.normal(key, (batch, seq, d), jnp.bfloat16)
  head = jax.random.normal(key, (d, V), jnp.float32) * d ** -0.5
  for dt in (jnp.float32, jnp.bfloat16):
    time_grad(f"head d→V ({jnp.dtype(dt).name} matmul)",
              lambda f, h, dt=dt: jax.nn.logsumexp(jnp.einsum("BSD,DV->BSV", f.astype(dt), h.astype(dt),
                                                                 preferred_element_type=jnp.float32), -1),
              (feats, head), 6 * T * d * V)
  H, D, K = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window + cfg.index_topk
  q = jax.random.normal(key, (batch, seq, H, D), jnp.bfloat16)
  kv = jax.random.normal(key, (batch, seq + seq // 4, D), jnp.bfloat16)
  t_S = jnp.arange(seq)[:, None]
  win = t_S - jnp.arange(cfg.sliding_window)[None]
  comp = seq + jax.random.randint(key, (seq, cfg.index_topk), 0, seq // 4)
  idx = jnp.broadcast_to(jnp.concatenate([jnp.where(win >= 0, win, -1), comp], 1), (batch, seq, K)).astype(jnp.int32)
  sink = jnp.zeros((H,), jnp.float32)
  time_grad("sparse attention (reference), window 128 + top-512",
            lambda q, kv: pallas_kernels.sparse_attention(q, kv, sink, idx, scale=D ** -0.5)[0], (q, kv),
            3 * 4 * T * H * D * K)
  experts = RoutedExperts(cfg, rngs=nnx.Rngs(0))
  gd, est = nnx.split(experts)
  x = jax.random.normal(key, (T, d), jnp.bfloat16)
  e = jax.random.randint(key, (T, cfg.num_experts_per_tok), 0, cfg.n_routed_experts)
  w = jax.random.uniform(key, (T, cfg.num_experts_per_tok))
  time_grad("routed experts (capacity 1.25)", lambda st, x: nnx.merge(gd, st)(x, w, e), (est, x),
            3 * 2 * 3 * T * cfg.num_experts_per_tok * d * cfg.moe_intermediate_size)
  block = Block(cfg, LayerSpec(4, False), rngs=nnx.Rngs(0))
  gb, bst = nnx.split(block)
  tokens = jax.random.randint(key, (batch, seq), 2, V)
  ctx_fn = lambda: make_context(cfg, tokens)
  h = jax.random.normal(key, (batch, seq, cfg.hc_mult, d), jnp.bfloat16)
  per_tok = accounting.train_flops_per_token(cfg.replace(num_hidden_layers=1, compress_ratios=(4, 0),
                                                         num_hash_layers=0), seq, with_mtp=False)
  head_flops = 6 * d * V
  time_grad("one CSA block (mHC + attention + MoE)", lambda st, h: nnx.merge(gb, st)(h, ctx_fn(), tokens)[0],
            (bst, h), T * (per_tok - head_flops))
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seq", type=int, nargs="+", default=[4096, 32768])
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--out", default="experiments/results/train.md")
  p.add_argument("--remat", default="save_dots")
  p.add_argument("--smoke", action="store_true", help="tiny model, for a CPU check of the script")
  p.add_argument("--fp32-matmuls", action="store_true", help="official float32 head/compressor matmuls")
  p.add_argument("--breakdown", action="store_true", help="also time the components at the first --seq")
  p.add_argument("--moe-impl", default="capacity", choices=["capacity", "ragged", "alltoall"],
                 help="routed-expert path (alltoall needs a jax.set_mesh mesh with an expert axis, else = capacity)")
  args = p.parse_args()
  global SMOKE, FP32, MOE_IMPL
  SMOKE, FP32, MOE_IMPL = args.smoke, args.fp32_matmuls, args.moe_impl
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}, jax {jax.__version__}, python {platform.python_version()}", flush=True)
  ceiling = timing.matmul_rate(8192)
  print(f"measured bf16 matmul (8192^3, random): {ceiling / 1e12:.0f} TFLOP/s", flush=True)
  parts = breakdown(args.seq[0], *plans_for(args.seq[0])[:1], args.steps, ceiling) if args.breakdown else []
  rows = []
  for seq in args.seq:
    batch, accum = plans_for(seq)
    for remat in (args.remat, "full"):
      try:
        r = run_case(seq, batch, accum, args.steps, remat, ceiling)
        rows.append(r)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "all_s"}, flush=True)
        break
      except Exception as e:  # noqa: BLE001 - e.g. out of memory: retry with full remat
        print(f"seq {seq} remat {remat}: {type(e).__name__}: {str(e)[:300]}", flush=True)
  date = datetime.date.today().isoformat()
  lines = [
      f"# Train step throughput ({date})",
      "",
      f"Machine: 1 × {dev.device_kind}; jax {jax.__version__}; Python {platform.python_version()}. "
      f"Measured bf16 matmul ceiling (8192³, random data): {ceiling / 1e12:.0f} TFLOP/s; datasheet 989.",
      "Model: `experiments/bench_train.py:bench_config` — Flash-shaped, d=2048, 6 layers (SWA, CSA, HCA, CSA, "
      "HCA, CSA) + MTP, 16 heads × 512, 32 routed experts top-6 (inter 1024) + 1 shared, vocab 129,280, "
      "fp32 master weights, bf16 compute, capacity-bucketed experts (factor 1.25). Full train step: Muon + AdamW, "
      "LM + MTP + balance + indexer-KL losses (sparse stage), bias update. Median of the timed steps after 2 "
      "warm-ups; random tokens, two packed documents per row.",
      "",
      "| seq | batch × accum | tokens/step | params | remat | step (s) | tokens/s | useful TFLOP/s | MFU vs measured | "
      "MFU vs datasheet | fwd+loss ×accum (s) | optimizer (s) | compile (s) | temp GiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['seq']} | {r['batch']} × {r['accum']} | {r['tokens']} | {r['params'] / 1e9:.2f}B | {r['remat']} | "
        f"{r['step_s']:.3f} | {r['tok_s']:.0f} | {r['tflops']:.0f} | {r['mfu_ceiling']:.1%} | "
        f"{r['mfu_datasheet']:.1%} | {r['fwd_s']:.3f} | {r['opt_s']:.3f} | {r['compile_s']:.0f} | "
        f"{r['temp_gib']:.1f} |")
  if parts:
    lines += ["", f"Components at seq {args.seq[0]} (forward + backward, one microbatch; useful TFLOP/s):", "",
              "| component | time (ms) | useful TFLOP/s | vs measured ceiling |", "|---|---|---|---|"]
    lines += [f"| {n} | {t * 1e3:.1f} | {f:.0f} | {f * 1e12 / ceiling:.0%} |" for n, t, f in parts]
  lines.append("")
  lines.append(f"Reproduce: `python experiments/bench_train.py --seq {' '.join(map(str, args.seq))}` on the H200.")
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  out_dir = os.environ.get("OUT")
  if out_dir:
    with open(os.path.join(out_dir, "train.md"), "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
