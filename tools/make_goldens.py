#!/usr/bin/env python
"""Golden parity data from DeepSeek's OFFICIAL DeepSeek-V4 inference code.

Run with the side venv (torch CPU), never with the project venv:

  /work/side/refvenv/bin/python tools/make_goldens.py \
      --official-dir /work/side/official/inference --out tests/goldens

The official `model.py` / `kernel.py` are imported from --official-dir (they are not
part of this repository). Tiny random models are built, run fully in fp32 on CPU, and one
`.npz` per case is written. See tests/goldens/README.md for the format and the rounding
rules of the QAT simulation (fp8 e4m3 window/compressed KV, fp4 e2m1 indexer q/k).
"""
import argparse
import importlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


B = 2
MAX_SEQ_LEN = 512

# name -> (ModelArgs overrides, sequence length, seed)
_COMMON = dict(
  vocab_size=160, dim=64, n_mtp_layers=1, head_dim=128, rope_head_dim=64,
  q_lora_rank=32, o_lora_rank=32, n_routed_experts=8, n_shared_experts=1,
  n_activated_experts=2, moe_inter_dim=32, score_func="sqrtsoftplus", swiglu_limit=10.0,
  index_n_heads=4, index_head_dim=64, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
  norm_eps=1e-6, rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0,
  original_seq_len=65536, beta_fast=32, beta_slow=1,
)
CASES = {
  "tiny_flash": (dict(
    _COMMON, n_layers=4, compress_ratios=(0, 4, 128, 4, 0), n_heads=4, o_groups=2,
    window_size=16, n_hash_layers=2, route_scale=1.5, index_topk=8), 301, 1234),
  "tiny_pro": (dict(
    _COMMON, n_layers=5, compress_ratios=(128, 128, 4, 128, 4, 0), n_heads=8, o_groups=4,
    window_size=32, n_hash_layers=3, route_scale=2.5, index_topk=16), 263, 5678),
}


# ----------------------------------------------------------------------------------------
# QAT simulation with the exact rounding of the production tilelang kernels
# (kernel_tilelang.py: fast_log2_ceil / fast_pow2 / fast_round_scale, act_quant_kernel,
# fp4_quant_kernel). All math in fp32.
# ----------------------------------------------------------------------------------------
_F32 = torch.float32
_FP8_MAX = 448.0
_FP4_MAX = 6.0
_FP8_MAX_INV = torch.tensor(1.0 / _FP8_MAX, dtype=_F32)  # fp32 constant, as in the kernel
_FP4_MAX_INV = torch.tensor(1.0 / _FP4_MAX, dtype=_F32)
_FP8_AMAX_MIN = torch.tensor(1e-4, dtype=_F32)
_FP4_AMAX_MIN = torch.tensor(6 * 2.0 ** -126, dtype=_F32)


def pow2_ceil_bits(v):
  """2**ceil(log2(v)) for positive normal fp32 v, by IEEE bit manipulation (exact)."""
  bits = v.contiguous().view(torch.int32)
  exp = (bits >> 23) & 0xFF
  man = bits & ((1 << 23) - 1)
  k = exp - 127 + (man != 0).to(torch.int32)
  return ((k + 127) << 23).view(_F32)


def round_e2m1_rne(v):
  """Round fp32 values already clamped to [-6, 6] to the FP4 e2m1 grid
  {0, 0.5, 1, 1.5, 2, 3, 4, 6}, round-to-nearest, ties to even mantissa."""
  a = v.abs()
  step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0)).to(_F32)
  r = torch.round(a / step) * step  # torch.round: half to even; a/step is exact
  return torch.copysign(r, v)


def sim_act_quant(x, block_size=128, scale_fmt=None, scale_dtype=None, inplace=False):
  """FP8 e4m3 quant -> dequant, in place (what model.py uses for window/compressed KV)."""
  assert inplace, "goldens only exercise the in-place (quant-dequant) path"
  n = x.size(-1)
  assert n % block_size == 0
  xb = x.float().unflatten(-1, (-1, block_size))
  amax = torch.maximum(xb.abs().amax(-1, keepdim=True), _FP8_AMAX_MIN)
  s = amax * _FP8_MAX_INV
  if scale_fmt is not None:
    s = pow2_ceil_bits(s)
  q = (xb / s).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).to(_F32)
  x.copy_((q * s).flatten(-2).to(x.dtype))
  return x


def sim_fp4_act_quant(x, block_size=32, inplace=False):
  """FP4 e2m1 quant -> dequant with ue8m0 scales, in place (indexer q / compressed keys)."""
  assert inplace, "goldens only exercise the in-place (quant-dequant) path"
  n = x.size(-1)
  assert n % block_size == 0
  xb = x.float().unflatten(-1, (-1, block_size))
  amax = torch.maximum(xb.abs().amax(-1, keepdim=True), _FP4_AMAX_MIN)
  s = pow2_ceil_bits(amax * _FP4_MAX_INV)
  q = round_e2m1_rne((xb / s).clamp(-_FP4_MAX, _FP4_MAX))
  x.copy_((q * s).flatten(-2).to(x.dtype))
  return x


def identity_act_quant(x, *args, **kwargs):
  return x


def self_test_rounding():
  # e2m1: exhaustive against nearest-grid search with explicit even-mantissa tie break.
  grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
  even = torch.tensor([True, False, True, False, True, False, True, False])
  v = torch.linspace(0, 6, 6 * 64 + 1)  # includes every midpoint exactly
  d = (v[:, None] - grid[None]).abs()
  dmin = d.min(1, keepdim=True).values
  cand = d == dmin
  ref = torch.where((cand & even).any(1), grid[(cand & even).float().argmax(1)],
                    grid[cand.float().argmax(1)])
  ref = torch.where(cand.sum(1) == 1, grid[cand.float().argmax(1)], ref)
  got = round_e2m1_rne(v)
  assert torch.equal(got, ref), "e2m1 RNE mismatch"
  assert torch.equal(round_e2m1_rne(-v), -ref)
  mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
  assert round_e2m1_rne(mids).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
  # e4m3fn cast is RNE in torch: ties 1+2^-4 -> 1, 1+3*2^-4 -> 1.25, 2^-10 -> 0 (subnormal tie)
  t = torch.tensor([1 + 2 ** -4, 1 + 3 * 2 ** -4, 2.0 ** -10, 3 * 2.0 ** -10, 448.0])
  assert t.to(torch.float8_e4m3fn).float().tolist() == [1.0, 1.25, 0.0, 2.0 ** -8, 448.0]
  # pow2 ceil: exact powers stay, anything above goes up
  p = torch.tensor([1.0, 1.0000001, 0.75, 2.0 ** -20, 3 * 2.0 ** -20], dtype=_F32)
  assert pow2_ceil_bits(p).tolist() == [1.0, 2.0, 1.0, 2.0 ** -20, 2.0 ** -18]


def quant_vectors():
  """Inputs with edge cases and the outputs of the two simulated quantizers (block 64 fp8
  with ue8m0 scales, as used on the KV; block 32 fp4), for exact unit tests of a port."""
  g = torch.Generator().manual_seed(7)
  e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
  e4m3 = torch.unique(e4m3[torch.isfinite(e4m3) & (e4m3 >= 0)])
  e4m3_mid = (e4m3[1:] + e4m3[:-1]) / 2
  e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
  e2m1_mid = (e2m1[1:] + e2m1[:-1]) / 2

  def build(n, block, qmax, grid, mid):
    rows = []
    for _ in range(48):  # random blocks over a wide dynamic range
      mag = 10.0 ** (torch.rand((), generator=g) * 8 - 5)
      rows.append(torch.randn(n, generator=g) * mag)
    rows.append(torch.zeros(n))  # amax clamp
    rows.append(torch.full((n,), 3e-7) * torch.randn(n, generator=g))  # amax below clamp
    for k in range(-14, 15, 2):  # amax exactly qmax * 2^k, and one fp32 ulp above / below
      for f in (1.0, 1.0 + 2.0 ** -23, 1.0 - 2.0 ** -24):
        r = torch.randn(n, generator=g).clamp(-2, 2) * (qmax * 2.0 ** k / 4)
        r[::block] = qmax * 2.0 ** k * f
        rows.append(r)
    # every grid midpoint (ties) and grid point, +/-, at scale 1 (block amax = qmax)
    pts = torch.cat([mid, -mid, grid, -grid])
    nb = n // block
    per_row = nb * (block - 1)
    nrow = -(-len(pts) // per_row)
    pts = torch.cat([pts, torch.randn(nrow * per_row - len(pts), generator=g)])
    for r in pts.view(nrow, nb, block - 1):
      rows.append(torch.cat([torch.full((nb, 1), qmax), r], 1).flatten())
    # random points near ties at scale 2^-3
    r = mid[torch.randint(len(mid), (n,), generator=g)] * (1 + 1e-6 * torch.randn(n, generator=g))
    r[::block] = qmax
    rows.append(r * 2.0 ** -3)
    return torch.stack(rows).float()

  out = {}
  x8 = build(128, 64, _FP8_MAX, e4m3, e4m3_mid)
  x4 = build(64, 32, _FP4_MAX, e2m1, e2m1_mid)
  out["fp8_x"], out["fp8_y"] = x8, sim_act_quant(x8.clone(), 64, "ue8m0", None, True)
  out["fp4_x"], out["fp4_y"] = x4, sim_fp4_act_quant(x4.clone(), 32, True)
  out["fp8_scale"] = pow2_ceil_bits(torch.maximum(
    x8.unflatten(-1, (-1, 64)).abs().amax(-1), _FP8_AMAX_MIN) * _FP8_MAX_INV)
  out["fp4_scale"] = pow2_ceil_bits(torch.maximum(
    x4.unflatten(-1, (-1, 32)).abs().amax(-1), _FP4_AMAX_MIN) * _FP4_MAX_INV)
  return {k: v.numpy().astype(np.float32) for k, v in out.items()}


def check_against_kernel_py(kernel, qv):
  """kernel.py (scale + clamp only) must agree with ours up to the grid rounding: on blocks
  whose scale agrees, rounding kernel.py's output gives ours bit for bit. Returns the number
  of blocks whose scale differs (kernel.py's torch.log2-based ceil is inexact just above
  a power of two; the tilelang kernel's bit-exact ceil is what we follow)."""
  res = {}
  for kind, blk, qmax in (("fp8", 64, _FP8_MAX), ("fp4", 32, _FP4_MAX)):
    x = torch.from_numpy(qv[f"{kind}_x"])
    sb = torch.from_numpy(qv[f"{kind}_scale"]).unsqueeze(-1)
    if kind == "fp8":
      ref = kernel.act_quant(x.clone(), blk, "ue8m0", torch.float32, True)
      rnd = lambda v: v.to(torch.float8_e4m3fn).float()
    else:
      ref = kernel.fp4_act_quant(x.clone(), blk, True)
      rnd = round_e2m1_rne
    mine = torch.from_numpy(qv[f"{kind}_y"]).unflatten(-1, (-1, blk))
    refb = ref.unflatten(-1, (-1, blk))
    # kernel.py output is clamp(x / s, +-qmax) * s: same scale iff that reproduces it
    same_scale = (refb == (x.unflatten(-1, (-1, blk)) / sb).clamp(-qmax, qmax) * sb).all(-1)
    ok = (rnd(refb / sb) * sb == mine).all(-1)
    assert bool(ok[same_scale].all()), f"{kind}: rounding of kernel.py output != ours"
    res[kind] = int((~same_scale).sum())
  return res


# ----------------------------------------------------------------------------------------
# Official code import and patches
# ----------------------------------------------------------------------------------------
def load_official(official_dir):
  official_dir = os.path.abspath(official_dir)
  sys.path.insert(0, official_dir)
  kernel = importlib.import_module("kernel")
  model = importlib.import_module("model")
  assert os.path.dirname(os.path.abspath(model.__file__)) == official_dir, model.__file__

  # rotate_activation asserts bf16; same normalized Walsh-Hadamard (kernel.py fallback,
  # Sylvester order, scale dim**-0.5) without the dtype assert.
  def rotate_activation(x):
    return kernel.hadamard_transform(x, scale=x.size(-1) ** -0.5)
  model.rotate_activation = rotate_activation

  # ParallelHead.get_logits keeps only the last position; return all positions.
  def get_logits(self, x):
    return F.linear(x.float(), self.weight)
  model.ParallelHead.get_logits = get_logits
  return model, kernel


def set_simulate_quant(model, on):
  # model.py did `from kernel import act_quant, fp4_act_quant`: patch its namespace.
  model.act_quant = sim_act_quant if on else identity_act_quant
  model.fp4_act_quant = sim_fp4_act_quant if on else identity_act_quant


def build_model(model, overrides):
  args = model.ModelArgs(
    max_batch_size=B, max_seq_len=MAX_SEQ_LEN, dtype="bf16", scale_fmt="ue8m0",
    expert_dtype=None, scale_dtype="fp32", **overrides)
  prev = torch.get_default_dtype()
  torch.set_default_dtype(torch.float32)
  try:
    m = model.Transformer(args)
  finally:
    torch.set_default_dtype(prev)
  assert model.scale_fmt == "ue8m0"
  for p in m.parameters():
    if p.is_floating_point():
      p.data = p.data.float()
  for name, b in m.named_buffers():
    if b.is_floating_point() and b.dtype != torch.float32:
      raise AssertionError(f"buffer {name} is {b.dtype}")
  m.eval()
  return args, m


def to_bf16_grid(v):
  """Round to the nearest bf16 value (RNE), kept in fp32."""
  return v.to(torch.bfloat16).to(torch.float32)


def to_mxfp4_grid(v):
  """Quantize-dequantize a 2-D weight to MXFP4 along its input (last) dim: e2m1 values times
  a power-of-two (ue8m0) scale per 32 inputs, the format of the released routed experts.
  Exact in fp32 and bf16; keeps the .npz files small (low-entropy mantissas)."""
  return sim_fp4_act_quant(v.clone(), 32, True)


def init_params(m, args, gen):
  d = args.dim

  def randn(shape):
    return torch.randn(shape, generator=gen, dtype=torch.float32)

  done = set()
  # named_parameters() de-duplicates the embed/head that MTPBlock shares with the model.
  for name, p in m.named_parameters():
    leaf = name.split(".")[-1]
    shape = tuple(p.shape)
    if name.endswith("gate.tid2eid"):
      n_exp = args.n_routed_experts
      rows = [torch.randperm(n_exp, generator=gen)[:shape[1]] for _ in range(shape[0])]
      val = torch.stack(rows).to(torch.int32)
    elif name == "embed.weight":
      val = to_mxfp4_grid(randn(shape))
    elif name == "head.weight":
      val = to_mxfp4_grid(randn(shape) / d ** 0.5)
    elif leaf == "attn_sink":
      val = to_bf16_grid(randn(shape))
    elif leaf == "ape":
      val = to_bf16_grid(0.5 * randn(shape))
    elif leaf.startswith("hc_") and leaf.endswith("_fn"):
      val = to_mxfp4_grid(0.1 * randn(shape) / shape[1] ** 0.5)
    elif leaf.startswith("hc_") and leaf.endswith("_scale"):
      val = to_bf16_grid(0.5 + torch.rand(shape, generator=gen, dtype=torch.float32))
    elif leaf.startswith("hc_") and leaf.endswith("_base"):
      val = to_bf16_grid(0.5 * randn(shape))
    elif name.endswith("ffn.gate.weight"):
      val = to_mxfp4_grid(randn(shape) / d ** 0.5)
    elif name.endswith("ffn.gate.bias"):
      val = to_bf16_grid(0.1 * randn(shape))
    elif name.endswith("norm.weight"):
      val = to_bf16_grid(1.0 + 0.1 * randn(shape))
    elif leaf == "weight" and p.ndim == 2:  # every Linear: N(0, 1/fan_in)
      val = to_mxfp4_grid(randn(shape) / shape[1] ** 0.5)
    else:
      raise AssertionError(f"no init rule for {name} {shape}")
    assert val.shape == p.shape, name
    p.data = val
    done.add(name)
  names = {n for n, _ in m.named_parameters()}
  assert done == names
  for name, p in m.named_parameters():
    assert torch.isfinite(p.float()).all(), name
    if p.is_floating_point():
      assert p.dtype == torch.float32 and torch.equal(p, to_bf16_grid(p)), name
  return sorted(names)


def hf_config(args):
  n = args.n_layers
  return {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": args.vocab_size,
    "hidden_size": args.dim,
    "num_hidden_layers": n,
    "num_attention_heads": args.n_heads,
    "num_key_value_heads": 1,
    "head_dim": args.head_dim,
    "qk_rope_head_dim": args.rope_head_dim,
    "q_lora_rank": args.q_lora_rank,
    "o_groups": args.o_groups,
    "o_lora_rank": args.o_lora_rank,
    "sliding_window": args.window_size,
    "compress_ratios": list(args.compress_ratios[:n + args.n_mtp_layers]),
    "n_routed_experts": args.n_routed_experts,
    "n_shared_experts": args.n_shared_experts,
    "num_experts_per_tok": args.n_activated_experts,
    "moe_intermediate_size": args.moe_inter_dim,
    "num_hash_layers": args.n_hash_layers,
    "routed_scaling_factor": args.route_scale,
    "scoring_func": args.score_func,
    "norm_topk_prob": True,
    "topk_method": "noaux_tc",
    "swiglu_limit": args.swiglu_limit,
    "hidden_act": "silu",
    "index_n_heads": args.index_n_heads,
    "index_head_dim": args.index_head_dim,
    "index_topk": args.index_topk,
    "hc_mult": args.hc_mult,
    "hc_sinkhorn_iters": args.hc_sinkhorn_iters,
    "hc_eps": args.hc_eps,
    "rms_norm_eps": args.norm_eps,
    "rope_theta": args.rope_theta,
    "compress_rope_theta": args.compress_rope_theta,
    "rope_scaling": {
      "type": "yarn",
      "factor": args.rope_factor,
      "original_max_position_embeddings": args.original_seq_len,
      "beta_fast": args.beta_fast,
      "beta_slow": args.beta_slow,
    },
    "max_position_embeddings": args.max_seq_len,
    "num_nextn_predict_layers": args.n_mtp_layers,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "expert_dtype": None,
  }


# ----------------------------------------------------------------------------------------
# Forward passes with debug capture
# ----------------------------------------------------------------------------------------
_TORCH_TOPK = torch.Tensor.topk


class Capture:
  """Forward hooks + wrappers that record intermediate tensors (debug files only)."""

  def __init__(self, model, m, S):
    self.model, self.m, self.S = model, m, S
    self.on = False
    self.store = {}
    self.handles = []
    self.stack = []  # names of the Attention / Indexer / Compressor modules being run
    self.head_key = self.embed_key = None

  def put(self, key, t):
    if self.on:
      assert key not in self.store, key
      self.store[key] = t.detach().clone()

  def out_hook(self, key):
    def hook(mod, inp, out):
      self.put(key, out)
    return hook

  def install(self):
    m, model, h = self.m, self.model, self.handles
    h.append(m.embed.register_forward_hook(lambda mod, i, o: self.put(self.embed_key, o)))
    h.append(m.head.register_forward_pre_hook(lambda mod, a: self.put(self.head_key, a[0])))
    blocks = [(f"layer{i}", f"{i}", l) for i, l in enumerate(m.layers)]
    blocks += [("mtp_streams_block", "mtp", m.mtp[0])]
    for key, sfx, blk in blocks:
      if key.startswith("layer"):
        h.append(blk.register_forward_hook(self.out_hook(key)))
      h.append(blk.attn.register_forward_hook(self.out_hook(dkey("attn", sfx))))
      h.append(blk.ffn.register_forward_hook(self.out_hook(dkey("ffn", sfx))))

      def gate_hook(mod, inp, out, sfx=sfx):
        w, idx = out
        shp = (-1, self.S, idx.shape[-1])
        self.put(dkey("gate_idx", sfx), idx.to(torch.int32).reshape(shp))
        self.put(dkey("gate_w", sfx), w.reshape(shp))
      h.append(blk.ffn.gate.register_forward_hook(gate_hook))
      if getattr(blk.attn, "indexer", None) is not None:
        def topk_hook(mod, inp, out, sfx=sfx):
          self.put(dkey("topk", sfx), sorted_topk(out, self.S))
        h.append(blk.attn.indexer.register_forward_hook(topk_hook))
    # module-name stack, used to name index scores and quantizer inputs/outputs
    for name, mod in m.named_modules():
      if isinstance(mod, (model.Attention, model.Indexer, model.Compressor)):
        h.append(mod.register_forward_pre_hook(lambda mod, a, n=name: self.stack.append(n)))
        h.append(mod.register_forward_hook(lambda mod, a, o: self.pop()))

  def pop(self):
    self.stack.pop()  # returns None: a forward hook's return value would replace the output

  def remove(self):
    for hd in self.handles:
      hd.remove()
    self.handles = []

  def wrap_quant(self, fn, kind):
    def wrapped(x, *a, **kw):
      name = self.stack[-1] if self.stack else "?"
      self.put(f"quant_in/{name}/{kind}", x)
      y = fn(x, *a, **kw)
      self.put(f"quant_out/{name}/{kind}", x)
      return y
    return wrapped

  def stable_topk(self):
    """torch.topk with ties broken toward the LOWER index (like jax.lax.top_k). torch's CPU
    topk breaks ties arbitrarily, and the indexer has exact ties (score 0 when every head's
    ReLU is 0); the official code leaves tie order unspecified."""
    cap = self

    def topk(x, k, dim=-1, largest=True, sorted=True):
      assert largest
      if cap.stack and cap.stack[-1].endswith("indexer"):
        cap.put(f"iscore/{cap.stack[-1]}", x)
      v, i = torch.sort(x, dim=dim, descending=True, stable=True)
      return torch.return_types.topk((v.narrow(dim, 0, k), i.narrow(dim, 0, k)))
    return topk


def dkey(what, sfx):
  return f"mtp_{what}" if sfx == "mtp" else f"{what}{sfx}"


def sorted_topk(idx, offset):
  """Indexer output (compressed-entry ids offset by S, -1 = none) -> ids sorted per query,
  -1 padded at the end."""
  big = torch.iinfo(torch.int64).max
  v = idx.long()
  v = torch.where(v < 0, big, v - offset)
  v = v.sort(-1).values
  return torch.where(v == big, -1, v).to(torch.int32)


def run_case(model, m, args, tokens, quant):
  set_simulate_quant(model, quant)
  S = tokens.shape[1]
  cap = Capture(model, m, S)
  cap.install()
  model.act_quant = cap.wrap_quant(model.act_quant, "fp8")
  model.fp4_act_quant = cap.wrap_quant(model.fp4_act_quant, "fp4")
  torch.Tensor.topk = cap.stable_topk()
  try:
    with torch.inference_mode():
      cap.on, cap.head_key, cap.embed_key = True, "final_streams", "embed"
      logits = m(tokens, 0)
      cap.on = False
      # main hidden streams, recomputed explicitly (embed + main blocks, before hc_head)
      h = m.embed(tokens).unsqueeze(2).repeat(1, 1, args.hc_mult, 1)
      for layer in m.layers:
        h = layer(h, 0, tokens)
      assert torch.equal(h, cap.store["final_streams"]), "manual stream pass differs"
      next_ids = torch.zeros_like(tokens)
      next_ids[:, :-1] = tokens[:, 1:]
      cap.on, cap.head_key, cap.embed_key = True, "mtp_streams", "mtp_embed"
      mtp_logits = m.mtp[0](h, 0, next_ids)
      cap.on = False
  finally:
    torch.Tensor.topk = _TORCH_TOPK
    cap.remove()
    set_simulate_quant(model, quant)
  assert not cap.stack
  assert logits.shape == (tokens.shape[0], S, args.vocab_size), logits.shape
  assert mtp_logits.shape == logits.shape, mtp_logits.shape
  debug = {k: v.numpy() for k, v in cap.store.items()}
  debug["mtp_next_ids"] = next_ids.numpy().astype(np.int32)
  return logits.float().numpy(), mtp_logits.float().numpy(), debug


def stats(name, x):
  std, mx = float(x.std()), float(np.abs(x).max())
  print(f"  {name:<11s} std {std:.4f}  max|.| {mx:.4f}  mean {float(x.mean()):+.4f}")
  assert np.isfinite(x).all(), f"{name} not finite"
  assert 0.05 < std < 100 and mx < 1e3, f"{name} degenerate or exploding: std {std} max {mx}"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--official-dir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--cases", default=",".join(CASES))
  opts = ap.parse_args()

  torch.set_num_threads(min(8, os.cpu_count() or 1))
  torch.use_deterministic_algorithms(True)
  self_test_rounding()
  model, kernel = load_official(opts.official_dir)
  os.makedirs(os.path.join(opts.out, "debug"), exist_ok=True)
  qv = quant_vectors()
  nscale = check_against_kernel_py(kernel, qv)
  np.savez_compressed(os.path.join(opts.out, "quant_vectors.npz"), **qv)
  print(f"quant_vectors: fp8 {qv['fp8_x'].shape} fp4 {qv['fp4_x'].shape}; blocks whose "
        f"kernel.py scale differs from the tilelang bit-exact scale: {nscale}")

  for case in opts.cases.split(","):
    overrides, S, seed = CASES[case]
    assert S <= MAX_SEQ_LEN
    args, m = build_model(model, overrides)
    gen = torch.Generator().manual_seed(seed)
    names = init_params(m, args, gen)
    tokens = torch.randint(0, args.vocab_size, (B, S), generator=gen, dtype=torch.int64)
    cfg = json.dumps(hf_config(args))
    params = {}
    for n, p in m.named_parameters():
      a = p.detach().numpy()
      params["param/" + n] = a.astype(np.int32) if n.endswith("tid2eid") else a.astype(np.float32)

    print(f"== {case}: B={B} S={S} params={sum(v.size for v in params.values())} "
          f"({len(names)} tensors)")
    results = {}
    for quant in (False, True):
      logits, mtp_logits, debug = run_case(model, m, args, tokens, quant)
      tag = f"{case}_q{int(quant)}"
      print(f" {tag}")
      stats("logits", logits)
      stats("mtp_logits", mtp_logits[:, :-1])
      results[quant] = (logits, mtp_logits, debug)
      np.savez_compressed(
        os.path.join(opts.out, f"{tag}.npz"),
        config_json=np.array(cfg), simulate_quant=np.array(quant),
        tokens=tokens.numpy().astype(np.int32), logits=logits, mtp_logits=mtp_logits,
        **params)
      np.savez_compressed(os.path.join(opts.out, "debug", f"{tag}.npz"), **debug)

    (l0, m0, d0), (l1, m1, d1) = results[False], results[True]
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(a))
    print(f" {case} q0 vs q1: logits rel {rel(l0, l1):.3e}, mtp_logits rel "
          f"{rel(m0[:, :-1], m1[:, :-1]):.3e}")
    for k in sorted(k for k in d0 if k.startswith("topk")):
      diff = (d0[k] != d1[k]).any(-1)
      print(f"   {k}: queries with a different top-k set q0 vs q1: {diff.mean():.3f} "
            f"({int(diff.sum())}/{diff.size})")


if __name__ == "__main__":
  main()
