"""The sharded train and serve steps on several GPUs of one host (one process drives them all), against one GPU.

  python experiments/bench_multi_gpu.py --part train    # loss parity, train throughput, a model too big for 1 GPU
  python experiments/bench_multi_gpu.py --part serve    # decode on tensor / expert meshes vs 1 GPU
  python experiments/bench_multi_gpu.py --report        # experiments/results/multi_gpu.md from the parts' JSON
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python experiments/bench_multi_gpu.py --part all --smoke   # checks the script on 2 CPU devices

Each part writes multi_gpu_<part>.json (to --out, and to $OUT when set); --report renders them. Every mesh
uses the library's own machinery: parameters and optimizer state born sharded by their logical axes
(`dsv4_jax.train.loop.init_sharded_state`), the batch on `sharding.batch_sharding`, the step traced under the
mesh (`loop.traced_under`) so moe_impl "alltoall" finds its "expert" axis and the kernels run per shard; the
serve steps are `dsv4_jax.serve.steps.make_decode(model, mesh)` with the cache sharded by `shard_cache`.

Train, three experiments (each step is the full `dsv4_jax.train.step`, state donated as in training):
* parity: a small V4-shaped model whose routed experts drop nothing (capacity factor E/k), the same initial
  state and batches on 1 device and on each 2-device mesh (fsdp, expert with the all-to-all dispatch, data with
  replicated parameters, tensor); the per-step losses must agree.
* throughput: `bench_train.bench_config` (~2.1B Flash-shaped), the same rows per device on 1 and N devices
  (weak scaling): tokens/s and MFU per device, scaling efficiency = per-device tokens/s on N / on 1. Expert
  parallelism (all-to-all, experts split) is measured against replicated experts (data parallel, every device
  holds all experts) and against fsdp (experts split by their model dim, gathered per layer).
* big: a V4-shaped MoE whose training state alone exceeds one GPU's memory, trained on the N-device mesh.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shlex
import statistics
import sys
import time

for _k in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS"):  # NVLink multicast stays off (device/KINDS.md)
  os.environ.setdefault(_k, "0" if _k == "NCCL_NVLS_ENABLE" else "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsv4_jax import accounting, sharding  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from dsv4_jax.model import cache as cache_lib  # noqa: E402
from dsv4_jax.model.transformer import DeepSeekV4  # noqa: E402
from dsv4_jax.serve.steps import make_decode  # noqa: E402
from dsv4_jax.train import loop  # noqa: E402
from dsv4_jax.train import optimizer as opt_lib  # noqa: E402
from dsv4_jax.train import step as step_lib  # noqa: E402

import bench_serve  # noqa: E402  (experiments/)
import bench_train  # noqa: E402
import timing  # noqa: E402
from reporting import without_options  # noqa: E402

GiB = 2 ** 30
HERE = os.path.dirname(os.path.abspath(__file__))
SMOKE = False
NOTES_MARKER = "<!-- notes: kept when the tables above are re-rendered -->"


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mesh_of(sizes: tuple[int, int, int, int], n: int):
  """A (data, fsdp, expert, tensor) mesh over the first n devices."""
  return sharding.make_mesh(*sizes, devices=jax.devices()[:n])


def mesh_name(mesh) -> str:
  parts = [f"{a} {s}" for a, s in mesh.shape.items() if s > 1]
  return " × ".join(parts) if parts else "1 device"


# ----- models ---------------------------------------------------------------------------------------------
def parity_config() -> ModelConfig:
  """Small V4 shape (SWA, CSA, HCA, CSA + MTP; 16 experts top-4) with the exact MoE (capacity E/k drops nothing),
  float32 compute and the reference attention: what differs between meshes is then reduction order alone."""
  if SMOKE:
    base = ModelConfig.preset("tiny", dtype="float32")
  else:
    base = ModelConfig.preset(
        "flash", hidden_size=1024, num_hidden_layers=4, compress_ratios=(0, 4, 128, 4, 0), num_hash_layers=1,
        num_attention_heads=8, q_lora_rank=256, o_groups=4, o_lora_rank=256, index_n_heads=16, index_topk=256,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=512, max_position_embeddings=65536,
        expert_dtype=None, weight_quant=None, simulate_quant=False, dtype="float32", param_dtype="float32",
        fp32_matmuls=False)
  return base.replace(moe_capacity_factor=base.n_routed_experts / base.num_experts_per_tok,
                      attention_impl="reference")


def throughput_config(attention_impl: str, moe_impl: str) -> ModelConfig:
  bench_train.SMOKE = SMOKE
  return bench_train.bench_config(4096).replace(attention_impl=attention_impl, moe_impl=moe_impl)


def big_config(attention_impl: str, experts: int) -> ModelConfig:
  """Flash's per-layer shape (d 4096, 64 heads × 512, experts of width 2048, top-6) at 4 layers + MTP."""
  if SMOKE:
    return ModelConfig.preset("tiny", dtype="bfloat16", moe_impl="alltoall", attention_impl=attention_impl)
  return ModelConfig.preset(
      "flash", num_hidden_layers=4, compress_ratios=(0, 4, 128, 4, 0), num_hash_layers=1, n_routed_experts=experts,
      max_position_embeddings=65536, expert_dtype=None, weight_quant=None, simulate_quant=False,
      dtype="bfloat16", param_dtype="float32", fp32_matmuls=False, moe_impl="alltoall",
      attention_impl=attention_impl)


def state_bytes(cfg: ModelConfig) -> dict:
  """Bytes of the training state (f32 parameters + optimizer state), from shapes alone."""
  abstract = nnx.eval_shape(lambda: DeepSeekV4(cfg, rngs=nnx.Rngs(0)))
  _, params, _ = step_lib.split_model(abstract)
  tx = opt_lib.build_optimizer(params, learning_rate=1e-4)
  opt = jax.eval_shape(tx.init, params)
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  n = sum(x.size for x in jax.tree.leaves(params))
  return dict(params=n, param_bytes=nbytes(params), opt_bytes=nbytes(opt))


# ----- train ----------------------------------------------------------------------------------------------
class TrainRun:
  """One compiled, donated train step of `cfg` on `mesh`, with its state."""

  def __init__(self, cfg: ModelConfig, mesh, batch: int, seq: int, accum: int = 1, remat: str = "save_dots"):
    self.cfg, self.mesh, self.batch, self.seq, self.accum = cfg, mesh, batch, seq, accum
    abstract = nnx.eval_shape(lambda: DeepSeekV4(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, _ = step_lib.split_model(abstract)
    self.tx = opt_lib.build_optimizer(abstract_params, learning_rate=1e-3)
    t = time.perf_counter()
    self.state = loop.init_sharded_state(cfg, self.tx, mesh, seed=0)
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t
    state_sh = jax.tree.map(lambda a: a.sharding, self.state)
    self.batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    scfg = step_lib.StepConfig(grad_accum=accum, stage="sparse", remat=remat)
    fn = jax.jit(loop.traced_under(mesh, step_lib.make_train_step(graphdef, self.tx, scfg)),
                 in_shardings=(state_sh, self.batch_sh, replicated), out_shardings=(state_sh, replicated),
                 donate_argnums=(0,))
    self.hp = jax.device_put({"mtp_weight": jnp.float32(0.3), "lr_scale": jnp.float32(1.0)}, replicated)
    b0 = self.batch_for(0)
    t = time.perf_counter()
    self.compiled = fn.lower(self.state, b0, self.hp).compile()
    self.compile_s = time.perf_counter() - t
    self.collectives = bench_train.collective_counts(self.compiled.as_text())
    mem = self.compiled.memory_analysis()
    self.mem = {k: getattr(mem, f"{k}_size_in_bytes", 0) / GiB for k in ("argument", "temp", "output")}

  def batch_for(self, i: int):
    host = bench_train.random_batch(self.cfg, self.batch * self.accum, self.seq, seed=1000 + i)
    return jax.device_put(host, self.batch_sh)

  def steps(self, n: int, warmup: int = 0, distinct: bool = True) -> tuple[list[float], list[dict]]:
    """Runs n steps (after `warmup` untimed ones); (seconds of each, metrics of each). `distinct`: a new batch
    per step (parity); else one batch reused (throughput: no host work between steps). self.first_loss: the
    first step's loss (the forward of the initial state: comparable across meshes)."""
    times, metrics = [], []
    self.first_loss = None
    fixed = None if distinct else self.batch_for(0)
    for i in range(warmup + n):
      b = self.batch_for(i) if distinct else fixed
      jax.block_until_ready(b)
      t = time.perf_counter()
      self.state, m = self.compiled(self.state, b, self.hp)
      m = jax.device_get(m)
      dt = time.perf_counter() - t
      if self.first_loss is None:
        self.first_loss = float(m["loss"])
      if i >= warmup:
        times.append(dt)
        metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
    return times, metrics


def train_parity(steps: int, only=None) -> dict:
  cfg = parity_config()
  n = jax.device_count()
  seq, batch = (64, 4) if SMOKE else (2048, 4)
  meshes = [("1 device", (1, 1, 1, 1), 1, "capacity"), ("fsdp", (1, n, 1, 1), n, "capacity"),
            ("expert, all-to-all", (1, 1, n, 1), n, "alltoall"), ("data (replicated)", (n, 1, 1, 1), n, "capacity"),
            ("tensor", (1, 1, 1, n), n, "capacity")]
  meshes = [m for m in meshes if not only or m[0].split(",")[0].split(" ")[0] in only or m[2] == 1]
  rows = []
  for name, sizes, ndev, moe in meshes:
    log(f"parity: {name} {sizes}, moe {moe}")
    run = TrainRun(cfg.replace(moe_impl=moe), mesh_of(sizes, ndev), batch, seq)
    _, metrics = run.steps(steps)
    rows.append(dict(name=name, mesh=mesh_name(run.mesh), devices=ndev, moe=moe, compile_s=run.compile_s,
                     losses=[m["loss"] for m in metrics], metrics=metrics, collectives=run.collectives))
    log(f"  losses {[round(m['loss'], 6) for m in metrics]} (compile {run.compile_s:.0f} s)")
    del run
  base = rows[0]["losses"]
  for r in rows:
    r["max_abs_diff"] = max(abs(a - b) for a, b in zip(r["losses"], base))
    r["max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base))
  return dict(cfg=cfg.to_dict(), params=state_bytes(cfg)["params"], seq=seq, batch=batch, steps=steps, rows=rows)


def train_throughput(attention_impl: str, steps: int, rows_per_device: int, ceiling: float, only=None,
                     progress=lambda r: None) -> dict:
  """`only`: the case names to run (default all); `progress(partial result)` after each case."""
  n = jax.device_count()
  seq = 256 if SMOKE else 4096
  cases = [("1 device", (1, 1, 1, 1), 1, "capacity"),
           ("data: replicated experts", (n, 1, 1, 1), n, "capacity"),
           ("fsdp", (1, n, 1, 1), n, "capacity"),
           ("expert: all-to-all", (1, 1, n, 1), n, "alltoall")]
  cases = [c for c in cases if not only or c[0].split(":")[0] in only]
  rows = []
  base = throughput_config(attention_impl, "capacity")
  result = dict(cfg=base.to_dict(), params=state_bytes(base)["params"], rows=rows, steps=steps)
  for name, sizes, ndev, moe in cases:
    progress(result)
    cfg = throughput_config(attention_impl, moe)
    log(f"throughput: {name} {sizes}, moe {moe}, {rows_per_device * ndev} rows × {seq}")
    try:
      run = TrainRun(cfg, mesh_of(sizes, ndev), rows_per_device * ndev, seq)
      times, metrics = run.steps(steps, warmup=2, distinct=False)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the other cases go on
      log(f"  FAILED {type(e).__name__}: {str(e)[:300]}")
      rows.append(dict(name=name, devices=ndev, moe=moe, error=f"{type(e).__name__}: {str(e)[:300]}"))
      continue
    step_s = statistics.median(times)
    tokens = run.batch * seq
    flops = accounting.train_flops_per_token(cfg, seq) * tokens
    rows.append(dict(name=name, mesh=mesh_name(run.mesh), devices=ndev, moe=moe, batch=run.batch, seq=seq,
                     tokens=tokens, step_s=step_s, times=times, tok_s=tokens / step_s,
                     tok_s_dev=tokens / step_s / ndev, tflops_dev=flops / step_s / ndev / 1e12,
                     mfu=flops / step_s / ndev / ceiling, mfu_datasheet=flops / step_s / ndev / bench_train.DATASHEET_BF16,
                     first_loss=run.first_loss, compile_s=run.compile_s, mem=run.mem, collectives=run.collectives))
    log(f"  step {step_s:.3f} s, {tokens / step_s / ndev:,.0f} tok/s/device, MFU {rows[-1]['mfu']:.1%}, "
        f"compile {run.compile_s:.0f} s, temp {run.mem['temp']:.1f} GiB/device")
    del run
    one = next((r for r in rows if r["devices"] == 1 and "error" not in r), None)
    for r in rows:
      if one and "error" not in r:
        r["scaling"] = r["tok_s_dev"] / one["tok_s_dev"]
  progress(result)
  return result


def train_big(attention_impl: str, experts: int, steps: int, rows_per_device: int, ceiling: float,
              gpu_bytes: float) -> dict:
  n = jax.device_count()
  cfg = big_config(attention_impl, experts)
  sb = state_bytes(cfg)
  seq = 256 if SMOKE else 4096
  out = dict(cfg=cfg.to_dict(), **sb, gpu_bytes=gpu_bytes, seq=seq, devices=n)
  log(f"big: {sb['params'] / 1e9:.2f}B params, state {(sb['param_bytes'] + sb['opt_bytes']) / GiB:.1f} GiB "
      f"(one device holds {gpu_bytes / GiB:.0f} GiB)")
  try:
    run = TrainRun(cfg, mesh_of((1, 1, n, 1), n), rows_per_device * n, seq)
    times, metrics = run.steps(steps, warmup=2, distinct=True)
  except Exception as e:  # noqa: BLE001
    log(f"  FAILED {type(e).__name__}: {str(e)[:300]}")
    out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out
  step_s = statistics.median(times)
  tokens = run.batch * seq
  flops = accounting.train_flops_per_token(cfg, seq) * tokens
  out.update(mesh=mesh_name(run.mesh), batch=run.batch, step_s=step_s, tok_s_dev=tokens / step_s / n,
             tflops_dev=flops / step_s / n / 1e12, mfu=flops / step_s / n / ceiling,
             losses=[m["loss"] for m in metrics], compile_s=run.compile_s, mem=run.mem, collectives=run.collectives,
             peak_gib=[d.memory_stats().get("peak_bytes_in_use", 0) / GiB for d in jax.devices()
                       if hasattr(d, "memory_stats") and d.memory_stats()])
  log(f"  step {step_s:.3f} s, {out['tok_s_dev']:,.0f} tok/s/device, MFU {out['mfu']:.1%}, losses "
      f"{[round(x, 4) for x in out['losses']]}, args {run.mem['argument']:.1f} GiB/device")
  return out


# ----- serve ----------------------------------------------------------------------------------------------
def serve_decode(contexts: list[int], batch: int, steps: int, bw: float, only=None) -> dict:
  n = jax.device_count()
  cfg = bench_serve.bench_config(SMOKE, 8 if SMOKE else 32).replace(scan_layers=False)
  fmt = "fp8"
  path = bench_serve.step_moe_path("exact", batch)  # what the serving steps run at this batch
  served = f"exact: {'capacity, C = tokens' if path == 'capacity' else path} (serving default)"
  cases = [("1 device", None, served),
           ("tensor", (1, 1, 1, n), served),
           ("expert", (1, 1, n, 1), "capacity, C = tokens (exact)"),
           ("data", (n, 1, 1, 1), served)]
  cases = [c for c in cases if not only or c[0] in only]
  rows = []
  for name, sizes, moe in cases:
    mesh = None if sizes is None else mesh_of(sizes, n)
    log(f"serve: {name} {sizes}")
    model = sharding.create_sharded(DeepSeekV4, cfg, mesh if mesh is not None else mesh_of((1, 1, 1, 1), 1))
    jax.block_until_ready(nnx.state(model))
    if moe.startswith("capacity"):
      decode = bench_serve.direct_decode(model) if mesh is None else _direct_decode_on(model, mesh)
    else:
      decode = make_decode(model, mesh)
    for ctx in contexts:
      try:
        max_len = ctx + 256 * -(-(2 * steps + 6) // 256)
        shards = 1 if mesh is None else cache_lib.mesh_page_shards(mesh, batch)  # a slot's pages on its device
        cache = bench_serve.fill_synthetic(model.init_cache(batch, max_len, kv_format=fmt, page_shards=shards),
                                           cfg, ctx, seed=ctx)
        if mesh is not None:
          cache = cache_lib.shard_cache(cache, mesh)
        step_s, pipe_s, first_s, cache = bench_serve.time_decode(decode, cache, batch, cfg.vocab_size, steps, 3,
                                                                 max_context=max_len)
        del cache
      except Exception as e:  # noqa: BLE001
        log(f"  FAILED {type(e).__name__}: {str(e)[:300]}")
        rows.append(dict(name=name, context=ctx, error=f"{type(e).__name__}: {str(e)[:300]}"))
        continue
      nb = bench_serve.decode_bytes(cfg, batch, ctx, fmt)
      rows.append(dict(name=name, mesh="1 device" if mesh is None else mesh_name(mesh), moe=moe, context=ctx,
                       batch=batch, step_s=step_s, pipelined_s=pipe_s, first_s=first_s, tok_s=batch / step_s,
                       floor_1dev_s=nb["total"] / bw))
      log(f"  {ctx}: step {step_s * 1e3:.2f} ms (back-to-back {pipe_s * 1e3:.2f}), {batch / step_s:,.0f} tok/s")
    del model, decode
  for r in rows:
    one = next((o for o in rows if o["name"] == "1 device" and o["context"] == r["context"] and "error" not in o),
               None)
    if one and "error" not in r:
      r["speedup"] = one["step_s"] / r["step_s"]
  return dict(cfg=cfg.to_dict(), batch=batch, rows=rows, bw=bw)


def _direct_decode_on(model, mesh):
  """model.decode as configured (capacity MoE), cache kept sharded like make_decode's."""
  graphdef, params = nnx.split(model)
  steps = {}

  def run(tokens, cache, max_context=None):
    sh = cache_lib.cache_shardings(cache, mesh)
    key = (jax.tree.structure(sh), tuple(jax.tree.leaves(sh)), max_context)
    if key not in steps:
      steps[key] = jax.jit(lambda p, c, t: nnx.merge(graphdef, p).decode(t, c, max_context=max_context),
                           donate_argnums=(1,), in_shardings=(None, sh, None), out_shardings=(None, sh))
    return steps[key](params, cache_lib.shard_cache(cache, mesh), tokens)

  return run


# ----- report ---------------------------------------------------------------------------------------------
def write_report(out_dir: str) -> str:
  parts = {}
  for p in sorted(glob.glob(os.path.join(out_dir, "multi_gpu_*.json"))):
    with open(p) as f:
      parts[os.path.basename(p)[len("multi_gpu_"):-5]] = json.load(f)
  if not parts:
    raise SystemExit(f"no multi_gpu_*.json in {out_dir}: run --part train / serve first")
  L = ["# Multi-GPU: the sharded train and serve steps on several GPUs of one host", ""]
  for key, r in parts.items():
    env = r["env"]
    L += [f"`{key}` part: {env['date']}, {env['devices']}, jax {env['jax']}, Python {env['python']}; measured bf16 "
          f"matmul (one device) {env['matmul'] / 1e12:.0f} TFLOP/s, copy {env['bw'] / 1e12:.2f} TB/s.", ""]

  def reproduce(section: dict) -> list[str]:
    cmds = list(dict.fromkeys(row["command"] for row in section.get("rows", [section]) if "command" in row))
    return [f"Reproduce: {'; '.join(f'`{c}`' for c in cmds)}.", ""] if cmds else []
  tr = parts.get("train")
  if tr and "parity" in tr:
    p = tr["parity"]
    L += ["## Train: losses on N devices equal 1 device", "",
          f"Model: {p['params'] / 1e9:.2f}B parameters (`parity_config`: d {p['cfg']['hidden_size']}, layers "
          f"{p['cfg']['compress_ratios']} with MTP, {p['cfg']['n_routed_experts']} experts top-"
          f"{p['cfg']['num_experts_per_tok']}, capacity factor E/k so no expert drops a token), attention "
          f"`{p['cfg']['attention_impl']}`, float32 compute and weights; {p['batch']} rows × {p['seq']} "
          f"tokens, {p['steps']} successive steps (state donated, new batch each step).", "",
          "| mesh | MoE path | losses per step | max abs diff vs 1 device | max rel diff |", "|---|---|---|---|---|"]
    for r in p["rows"]:
      L.append(f"| {r['mesh']} | {r['moe']} | {', '.join(f'{x:.5f}' for x in r['losses'])} | "
               f"{r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e} |")
    if p.get("repeat_1_device_losses"):
      rep = p["repeat_1_device_losses"]
      L.append(f"Run-to-run spread on the GPU: the same 1-device run repeated (`{p['repeat_command']}`) gave "
               f"{', '.join(f'{x:.5f}' for x in rep)}, up to "
               f"{max(abs(a - b) for a, b in zip(rep, p['rows'][0]['losses'])):.2e} from the row above.")
    L.append("")
    L += reproduce(p)
  if tr and "throughput" in tr:
    t = tr["throughput"]
    L += ["## Train: throughput and scaling (same rows per device on 1 and N devices)", "",
          f"Model: `bench_train.bench_config` ({t['params'] / 1e9:.2f}B parameters, Flash-shaped d 2048, 6 layers "
          f"+ MTP, 32 experts top-6), attention `{t['cfg']['attention_impl']}`, capacity factor "
          f"{t['cfg']['moe_capacity_factor']}, seq 4096, remat save_dots; median of {t['steps']} steps after 2 "
          "warm-ups. MFU per device against the measured matmul rate (and the 989 TFLOP/s datasheet).", "",
          "| mesh | MoE | rows × seq | step (s) | tokens/s | tokens/s per device | TFLOP/s per device | MFU "
          "(datasheet) | scaling efficiency | first-step loss | temp GiB/device | all-to-all (expert) / all-gather / "
          "reduce-scatter / all-reduce |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
      if "error" in r:
        L.append(f"| {r['name']} | {r['moe']} | failed: {r['error'][:120]} ||||||||||")
        continue
      c = r["collectives"]
      L.append(f"| {r['name']} ({r['mesh']}) | {r['moe']} | {r['batch']} × {r['seq']} | {r['step_s']:.3f} | "
               f"{r['tok_s']:,.0f} | {r['tok_s_dev']:,.0f} | {r['tflops_dev']:.0f} | {r['mfu']:.1%} "
               f"({r['mfu_datasheet']:.1%}) | {r.get('scaling', float('nan')):.0%} | {r['first_loss']:.5f} | "
               f"{r['mem']['temp']:.1f} | "
               f"{c['all-to-all']} ({c['expert all-to-all']}) / {c['all-gather']} / {c['reduce-scatter']} / "
               f"{c['all-reduce']} |")
    L.append("")
    L += reproduce(t)
  if tr and "big" in tr:
    b = tr["big"]
    state = (b["param_bytes"] + b["opt_bytes"]) / GiB
    L += ["## Train: a model that does not fit on one GPU", "",
          f"Model: `big_config` (Flash per-layer shape: d 4096, 64 heads × 512, experts of width 2048 top-6; "
          f"{len(b['cfg']['compress_ratios']) - 1} layers + MTP, {b['cfg']['n_routed_experts']} routed experts): "
          f"{b['params'] / 1e9:.2f}B parameters; f32 parameters {b['param_bytes'] / GiB:.1f} GiB + optimizer "
          f"state {b['opt_bytes'] / GiB:.1f} GiB = {state:.1f} GiB before any gradient or activation, against "
          f"{b['gpu_bytes'] / GiB:.1f} GiB on one GPU; with its f32 gradients "
          f"({b['param_bytes'] / GiB:.1f} GiB) the step needs {state + b['param_bytes'] / GiB:.1f} GiB before activations.", ""]
    if "error" in b:
      L.append(f"On {b['devices']} devices: failed: {b['error']}")
    else:
      L += [f"On {b['devices']} devices ({b['mesh']}, all-to-all dispatch, {b['batch']} rows × {b['seq']}): "
            f"step {b['step_s']:.3f} s, {b['tok_s_dev']:,.0f} tokens/s per device, {b['tflops_dev']:.0f} TFLOP/s "
            f"per device (MFU {b['mfu']:.1%}); arguments {b['mem']['argument']:.1f} GiB + temp "
            f"{b['mem']['temp']:.1f} GiB per device; peak in use {', '.join(f'{x:.1f}' for x in b['peak_gib'])} "
            f"GiB; losses {', '.join(f'{x:.4f}' for x in b['losses'])} (compile {b['compile_s']:.0f} s)."]
    L.append("")
    L += reproduce(b)
  sv = parts.get("serve")
  if sv:
    d = sv["decode"]
    L += ["## Serve: decode on N devices vs 1", "",
          f"Model: `bench_serve.bench_config` (Flash per-layer shape, 6 layers, 32 experts, bf16, per-layer "
          f"weights), FP8 cache filled synthetically to the context, batch {d['batch']}; median step.", "",
          "| mesh | MoE path | context | step (ms) | back-to-back (ms) | tokens/s | vs 1 device | 1-device HBM floor "
          "(ms) |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
      if "error" in r:
        L.append(f"| {r['name']} | | {r['context']} | failed: {r['error'][:120]} |||||")
        continue
      L.append(f"| {r['mesh']} | {r['moe']} | {r['context']} | {r['step_s'] * 1e3:.2f} | "
               f"{r['pipelined_s'] * 1e3:.2f} | {r['tok_s']:,.0f} | {r.get('speedup', float('nan')):.2f}× | "
               f"{r['floor_1dev_s'] * 1e3:.2f} |")
    L.append("")
    L += reproduce(d)
  text = "\n".join(L) + "\n"
  path = os.path.join(out_dir, "multi_gpu.md")
  if os.path.exists(path):  # keep the hand-written reading of the results below the marker
    with open(path) as f:
      old = f.read()
    if NOTES_MARKER in old:
      text += "\n" + old[old.index(NOTES_MARKER):]
  with open(path, "w") as f:
    f.write(text)
  return text


# ----- main -----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--part", choices=("train", "serve", "all"), default=None)
  ap.add_argument("--report", action="store_true", help="render multi_gpu.md from the parts' JSON in --out")
  ap.add_argument("--out", default=os.path.join(HERE, "results"))
  ap.add_argument("--smoke", action="store_true", help="tiny models: check the script on CPU devices")
  ap.add_argument("--attention-impl", default="gpu", choices=("reference", "gpu", "auto"))
  ap.add_argument("--skip", nargs="*", default=[], choices=("parity", "throughput", "big"))
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--only", nargs="*", default=None, choices=("1 device", "data", "fsdp", "expert", "tensor"),
                  help="meshes to run (default all; parity always runs 1 device)")
  ap.add_argument("--rows-per-device", type=int, default=None, help="throughput rows per device (default 8)")
  ap.add_argument("--big-experts", type=int, default=None, help="routed experts of the big model (default 96)")
  ap.add_argument("--contexts", type=int, nargs="+", default=None, help="decode contexts (default 131072)")
  ap.add_argument("--batch", type=int, default=None, help="decode batch (default 64)")
  args = ap.parse_args(argv)
  global SMOKE
  SMOKE = args.smoke
  if args.report:
    print(write_report(args.out))
    return 0
  if args.part is None:
    ap.error("give --part train|serve|all, or --report")
  n = jax.device_count()
  if n < 2:
    raise SystemExit(f"needs at least 2 devices, have {n} ({jax.devices()[0].device_kind}); on a CPU use "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=2")
  attention_impl = "reference" if SMOKE and args.attention_impl == "gpu" else args.attention_impl
  dev = jax.devices()[0]
  log(f"{n} × {dev.device_kind}, jax {jax.__version__}, NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
  mm = timing.matmul_rate(1024 if SMOKE else 8192)
  bw = timing.copy_bandwidth(jax.random.normal(jax.random.key(0), ((32 << 20) if SMOKE else (1 << 30),),
                                               jnp.bfloat16))
  log(f"matmul {mm / 1e12:.1f} TFLOP/s, copy {bw / 1e12:.2f} TB/s (one device)")
  stats = (dev.memory_stats() if hasattr(dev, "memory_stats") else None) or {}
  # one device's memory: an H200's 143,771 MiB (nvidia-smi), else what the allocator may use
  gpu_bytes = 143771 * 2 ** 20 if "H200" in dev.device_kind else float(stats.get("bytes_limit", 141 * GiB))
  env = dict(date=datetime.date.today().isoformat(), devices=f"{n} × {dev.device_kind}", jax=jax.__version__,
             python=platform.python_version(), matmul=mm, bw=bw,
             command=shlex.join(["python", "experiments/bench_multi_gpu.py"]
                                + without_options(sys.argv[1:] if argv is None else argv)))
  os.makedirs(args.out, exist_ok=True)

  def save(key: str, r: dict) -> None:
    for section in r.values():  # each row says which command measured it (reports may merge several runs)
      for row in section.get("rows", [section]):
        row.setdefault("command", env["command"])
    for d in filter(None, (args.out, os.environ.get("OUT"))):
      with open(os.path.join(d, f"multi_gpu_{key}.json"), "w") as f:
        json.dump(dict(r, env=env), f, indent=1, default=str)

  steps = args.steps or (3 if SMOKE else 5)
  if args.part in ("train", "all"):
    r = {}
    if "parity" not in args.skip:
      r["parity"] = train_parity(steps=min(steps, 4), only=args.only)
      save("train", r)
    if "throughput" not in args.skip:
      r["throughput"] = train_throughput(attention_impl, steps, args.rows_per_device or (2 if SMOKE else 8), mm,
                                         only=args.only, progress=lambda t: save("train", dict(r, throughput=t)))
      save("train", r)
    if "big" not in args.skip:
      r["big"] = train_big(attention_impl, args.big_experts or (8 if SMOKE else 96), min(steps, 4),
                           args.rows_per_device or (2 if SMOKE else 4), mm, gpu_bytes)
      save("train", r)
  if args.part in ("serve", "all"):
    r = {"decode": serve_decode(args.contexts or ([512] if SMOKE else [131072]), args.batch or (4 if SMOKE else 64),
                                steps, bw, only=args.only)}
    save("serve", r)
  return 0


if __name__ == "__main__":
  sys.exit(main())
