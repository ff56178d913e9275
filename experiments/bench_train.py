"""Train-step throughput and MFU of a ~2B-parameter V4-shaped MoE on one accelerator or a device mesh.

  python experiments/bench_train.py [--seq 4096 32768] [--steps 6] [--out experiments/results/train.md]
      [--mesh DATA,FSDP,EXPERT,TENSOR] [--moe-impl capacity|ragged|alltoall] [--batch B --accum A]

The state is born sharded on the mesh as the Trainer does it (`loop.init_sharded_state`: parameters by their
logical axes, optimizer state like its parameter), the batch is split over the batch axes, and the step is traced
under the mesh (`loop.traced_under`), so moe_impl "alltoall" finds its "expert" axis. Default mesh: every local
device on fsdp (one device: the plain single-accelerator run). Tokens/s and MFU are also given per device.

Times the real `dsv4_jax.train.step` (Muon + AdamW, LM + MTP + balance + indexer losses, bias update) on
random tokens (never zeros), after compile and two warm-up steps; reports the median step. FLOPs are the work
actually done (`accounting.train_flops_per_token`: active matmuls, attention over the selected keys, the
indexer), over the measured bf16 matmul rate and over the datasheet peak (989 TFLOP/s dense bf16, H100/H200).
Also times the forward + loss alone and the optimizer update alone, to say where the time goes.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv4_jax import accounting, sharding  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model.transformer import DeepSeekV4  # noqa: E402
from dsv4_jax.train import loop  # noqa: E402
from dsv4_jax.train import optimizer as opt_lib  # noqa: E402
from dsv4_jax.train import step as step_lib  # noqa: E402

import timing  # noqa: E402  (experiments/timing.py)

DATASHEET_BF16 = 989e12


SMOKE = False  # --smoke: the tiny preset, to check the script on a CPU
FP32 = False  # --fp32-matmuls
MOE_IMPL = "capacity"  # --moe-impl
ATTENTION_IMPL = "reference"  # --attention-impl


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
      dtype="bfloat16", param_dtype="float32", moe_impl=MOE_IMPL, fp32_matmuls=FP32,
      attention_impl=ATTENTION_IMPL)


def timed(fn, *args, steps: int, warmup: int = 2):
  """(median seconds, each run's seconds) of fn(*args) (outputs blocked on); fn must not donate its inputs."""
  times = timing.run_times(fn, *args, steps=steps, warmup=warmup)
  return statistics.median(times), times


def random_batch(cfg, batch: int, seq: int, seed: int):
  """Host (numpy) int32 [batch, seq] tokens, segment_ids, positions."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, cfg.vocab_size, (batch, seq), dtype=np.int32)
  # two documents per row, so packing and segment-aware compression are exercised
  seg = np.ones((batch, seq), np.int32)
  seg[:, seq // 3:] = 2
  pos = np.concatenate([np.arange(seq // 3), np.arange(seq - seq // 3)]).astype(np.int32)
  return {"tokens": tokens, "segment_ids": seg, "positions": np.broadcast_to(pos, (batch, seq)).copy()}


def parse_mesh(text: str | None):
  """`--mesh data,fsdp,expert,tensor` (one size may be -1: the rest) -> Mesh; None: all devices on fsdp."""
  if text is None:
    return sharding.make_mesh()
  try:
    sizes = [int(x) for x in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != len(sharding.MESH_AXES):
    raise SystemExit(f"--mesh {text!r}: expected {len(sharding.MESH_AXES)} comma-separated integers "
                     f"({','.join(sharding.MESH_AXES)}), e.g. 1,-1,1,1")
  try:
    return sharding.make_mesh(*sizes)
  except ValueError as e:
    raise SystemExit(f"--mesh {text!r}: {e}") from None


def mesh_text(mesh) -> str:
  return " × ".join(f"{name} {size}" for name, size in mesh.shape.items())


COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def collective_counts(hlo: str) -> dict[str, int]:
  """Collective ops in compiled HLO text, by kind (sync `op(` and async `op-start(` forms), plus "expert
  all-to-all": those over the expert axis alone (the MoE dispatch; GSPMD's resharding all-to-alls run over other
  axes). -1 when the HLO names its replica groups by device ids rather than by mesh axes."""
  counts = {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}
  a2a = [ln for ln in hlo.splitlines() if re.search(r"\ball-to-all(?:-start)?\(", ln)]
  named = all("replica_groups=mesh[" in ln for ln in a2a)
  counts["expert all-to-all"] = sum("{'expert'}" in ln for ln in a2a) if named else -1
  return counts


def plans_for(seq: int) -> tuple[int, int]:
  """(batch, grad_accum) per sequence length: 32K tokens per microbatch."""
  return {4096: (8, 2), 8192: (4, 2), 16384: (2, 2), 32768: (1, 2)}.get(seq, (max(1, 32768 // seq), 2))


def run_case(seq: int, batch: int, accum: int, steps: int, remat: str, ceiling: float, mesh,
             hlo_out: str | None = None):
  cfg = bench_config(seq)
  n_dev = mesh.size
  batch_sh = sharding.batch_sharding(mesh)
  n_batch = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if batch % n_batch:
    raise ValueError(f"batch {batch} (one microbatch) must be divisible by the mesh's batch axes "
                     f"{'×'.join(sharding.BATCH_AXES)} = {n_batch}; pass --batch")
  replicated = NamedSharding(mesh, P())
  abstract = nnx.eval_shape(lambda: DeepSeekV4(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, _ = step_lib.split_model(abstract)
  tx = opt_lib.build_optimizer(abstract_params, learning_rate=1e-4)
  state = loop.init_sharded_state(cfg, tx, mesh, seed=0)
  state_sh = jax.tree.map(lambda a: a.sharding, state)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  scfg = step_lib.StepConfig(grad_accum=accum, stage="sparse", remat=remat)
  step_fn = jax.jit(loop.traced_under(mesh, step_lib.make_train_step(graphdef, tx, scfg)),
                    in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated))
  host_batch = random_batch(cfg, batch * accum, seq, seed=seq)
  batch_arrays = jax.device_put(host_batch, batch_sh)
  hp = jax.device_put({"mtp_weight": jnp.float32(0.3), "lr_scale": jnp.float32(1.0)}, replicated)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays, hp).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(hlo)
  collectives = collective_counts(hlo)
  if cfg.moe_impl == "alltoall" and mesh.shape["expert"] > 1 and not (
      collectives["expert all-to-all"] if collectives["expert all-to-all"] >= 0 else collectives["all-to-all"]):
    raise RuntimeError(f"moe_impl='alltoall' on an expert axis > 1 compiled without expert all-to-alls "
                       f"({collectives})")
  mem = compiled.memory_analysis()
  step_s, all_s = timed(compiled, state, batch_arrays, hp, steps=steps)
  _, metrics = compiled(state, batch_arrays, hp)
  loss = float(metrics["loss"])

  # forward + loss only (no gradient), and the optimizer update alone, for the breakdown
  def fwd(params, buffers, b):
    m = nnx.merge(graphdef, params, buffers)
    out = m(b["tokens"], b["segment_ids"], b["positions"], options=scfg.forward_options())
    return jnp.mean(out.logits[..., :8]) + jnp.mean(out.mtp_logits[..., :8])
  mb = jax.device_put(jax.tree.map(lambda a: a[:batch], host_batch), batch_sh)
  fwd_fn = jax.jit(loop.traced_under(mesh, fwd), in_shardings=(state_sh.params, state_sh.buffers, batch_sh))
  fwd_s, _ = timed(fwd_fn, state.params, state.buffers, mb, steps=steps)
  grads = jax.jit(lambda ps: jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape, p.dtype) * 1e-3,
                                          ps), out_shardings=state_sh.params)(state.params)
  upd = jax.jit(loop.traced_under(mesh, lambda g, o, p: tx.update(g, o, p)),
                in_shardings=(state_sh.params, state_sh.opt_state, state_sh.params))
  opt_s, _ = timed(upd, grads, state.opt_state, state.params, steps=steps)

  tokens = batch * accum * seq
  fpt = accounting.train_flops_per_token(cfg, seq)
  flops = fpt * tokens
  return dict(seq=seq, batch=batch, accum=accum, tokens=tokens, params=n_params, remat=remat, devices=n_dev,
              compile_s=compile_s, step_s=step_s, all_s=all_s, fwd_s=fwd_s * accum, opt_s=opt_s,
              tok_s=tokens / step_s, tok_s_dev=tokens / step_s / n_dev, tflops_dev=flops / step_s / n_dev / 1e12,
              mfu_ceiling=flops / step_s / n_dev / ceiling, mfu_datasheet=flops / step_s / n_dev / DATASHEET_BF16,
              loss=loss, collectives=collectives,
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


MOE_TEXT = {
    "capacity": "capacity-bucketed experts (factor {f})",
    "ragged": "ragged (grouped-matmul) experts",
    "alltoall": "expert-parallel experts: all-to-all dispatch over the mesh's expert axis, capacity factor {f} "
                "per device's token group",
}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seq", type=int, nargs="+", default=[4096, 32768])
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--out", default="experiments/results/train.md")
  p.add_argument("--remat", default="save_dots")
  p.add_argument("--smoke", action="store_true", help="tiny model (and a 1024³ matmul ceiling), for a CPU check")
  p.add_argument("--fp32-matmuls", action="store_true", help="official float32 head/compressor matmuls")
  p.add_argument("--breakdown", action="store_true", help="also time the components at the first --seq (1 device)")
  p.add_argument("--moe-impl", default="capacity", choices=["capacity", "ragged", "alltoall"],
                 help="routed-expert path (alltoall needs --mesh with an expert axis > 1, else = capacity)")
  p.add_argument("--attention-impl", default="reference", choices=["reference", "gpu", "auto"],
                 help="cfg.attention_impl ('gpu': the Mosaic GPU sparse-attention and compression kernels)")
  p.add_argument("--mesh", default=None, metavar="DATA,FSDP,EXPERT,TENSOR",
                 help="mesh axis sizes, one may be -1 (the rest); default: every device on fsdp")
  p.add_argument("--batch", type=int, default=None, help="rows per microbatch (global; default: 32K tokens)")
  p.add_argument("--accum", type=int, default=None, help="microbatches per step (default 2)")
  p.add_argument("--hlo-out", default=None, help="write the first case's compiled step HLO text here")
  args = p.parse_args()
  global SMOKE, FP32, MOE_IMPL, ATTENTION_IMPL
  SMOKE, FP32, MOE_IMPL, ATTENTION_IMPL = args.smoke, args.fp32_matmuls, args.moe_impl, args.attention_impl
  mesh = parse_mesh(args.mesh)
  n_batch = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  plans = {seq: (args.batch or plans_for(seq)[0], args.accum or plans_for(seq)[1]) for seq in args.seq}
  for seq, (batch, _) in plans.items():
    if batch % n_batch:
      raise SystemExit(f"seq {seq}: batch {batch} rows per microbatch is not divisible by the mesh's batch axes "
                       f"({'×'.join(sharding.BATCH_AXES)} = {n_batch}); pass --batch")
  if MOE_IMPL == "alltoall" and mesh.shape["expert"] == 1:
    print("warning: --moe-impl alltoall on an expert axis of 1 is the capacity path", flush=True)
  dev = jax.devices()[0]
  print(f"device: {mesh.size} × {dev.device_kind}, mesh {mesh_text(mesh)}, jax {jax.__version__}, "
        f"python {platform.python_version()}", flush=True)
  ceiling_n = 1024 if SMOKE else 8192
  ceiling = timing.matmul_rate(ceiling_n)
  print(f"measured bf16 matmul ({ceiling_n}^3, random, one device): {ceiling / 1e12:.1f} TFLOP/s", flush=True)
  parts = breakdown(args.seq[0], plans[args.seq[0]][0], args.steps, ceiling) if args.breakdown else []
  rows = []
  for i, seq in enumerate(args.seq):
    batch, accum = plans[seq]
    for remat in (args.remat, "full"):
      try:
        r = run_case(seq, batch, accum, args.steps, remat, ceiling, mesh, args.hlo_out if i == 0 else None)
        rows.append(r)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "all_s"}, flush=True)
        break
      except Exception as e:  # noqa: BLE001 - e.g. out of memory: retry with full remat
        print(f"seq {seq} remat {remat}: {type(e).__name__}: {str(e)[:300]}", flush=True)
  date = datetime.date.today().isoformat()
  cfg = bench_config(args.seq[0])
  moe_text = MOE_TEXT[MOE_IMPL].format(f=cfg.moe_capacity_factor)
  model_text = ("the `tiny` preset (--smoke)" if SMOKE else
                "Flash-shaped, d=2048, 6 layers (SWA, CSA, HCA, CSA, HCA, CSA) + MTP, 16 heads × 512, 32 routed "
                "experts top-6 (inter 1024) + 1 shared, vocab 129,280")
  lines = [
      f"# Train step throughput ({date})",
      "",
      f"Machine: {mesh.size} × {dev.device_kind}; mesh {mesh_text(mesh)}; jax {jax.__version__}; "
      f"Python {platform.python_version()}. Measured bf16 matmul ceiling ({ceiling_n}³, random data, one device): "
      f"{ceiling / 1e12:.1f} TFLOP/s; datasheet {DATASHEET_BF16 / 1e12:.0f}.",
      f"Model: `experiments/bench_train.py:bench_config` — {model_text}, fp32 master weights, bf16 compute, "
      f"{moe_text} (`--moe-impl {MOE_IMPL}`), attention `{ATTENTION_IMPL}`. Parameters and optimizer state "
      "sharded by their logical axes (dsv4_jax.sharding.RULES), batch split over data × fsdp × expert. Full train step: Muon + AdamW, "
      "LM + MTP + balance + indexer-KL losses (sparse stage), bias update. Median of the timed steps after 2 "
      "warm-ups; random tokens, two packed documents per row. Per-device columns divide by the "
      f"{mesh.size} device(s); MFU is per device.",
      "",
      "| seq | batch × accum | tokens/step | params | remat | step (s) | tokens/s | tokens/s per device | "
      "useful TFLOP/s per device | MFU vs measured | MFU vs datasheet | fwd+loss ×accum (s) | optimizer (s) | "
      "compile (s) | temp GiB per device | ops: all-to-all (over expert) / all-gather / reduce-scatter / all-reduce |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    c = r["collectives"]
    lines.append(
        f"| {r['seq']} | {r['batch']} × {r['accum']} | {r['tokens']} | {r['params'] / 1e9:.2f}B | {r['remat']} | "
        f"{r['step_s']:.3f} | {r['tok_s']:.0f} | {r['tok_s_dev']:.0f} | {r['tflops_dev']:.1f} | "
        f"{r['mfu_ceiling']:.1%} | {r['mfu_datasheet']:.1%} | {r['fwd_s']:.3f} | {r['opt_s']:.3f} | "
        f"{r['compile_s']:.0f} | {r['temp_gib']:.1f} | {c['all-to-all']} ({c['expert all-to-all']}) / "
        f"{c['all-gather']} / {c['reduce-scatter']} / {c['all-reduce']} |")
  if parts:
    lines += ["", f"Components at seq {args.seq[0]} (forward + backward, one microbatch on one device; useful "
              "TFLOP/s):", "", "| component | time (ms) | useful TFLOP/s | vs measured ceiling |", "|---|---|---|---|"]
    lines += [f"| {n} | {t * 1e3:.1f} | {f:.0f} | {f * 1e12 / ceiling:.0%} |" for n, t, f in parts]
  lines.append("")
  flags = sys.argv[1:]
  lines.append(f"Reproduce: `python experiments/bench_train.py {shlex.join(flags)}` on {mesh.size} × "
               f"{dev.device_kind}.")
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
