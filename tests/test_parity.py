"""Parity with DeepSeek's official inference code (goldens made by tools/make_goldens.py, see goldens/README.md).

Each golden holds a tiny config (HF config.json), random weights under their official names, tokens, and the
official code's fp32 main and MTP logits. simulate_quant off: relative error ≤ 1e-4. On: single FP8/FP4 rounding
flips change top-k picks, so the bound is end-to-end (≤ 8e-2, argmax agreement ≥ 93%); the rounding itself is
tested bit-exactly against the production kernels' rules in `test_quant_vectors`.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax import sharding
from dsv4_jax.config import ModelConfig
from dsv4_jax.model import quant
from dsv4_jax.model.transformer import DeepSeekV4
from dsv4_jax.weights import load_official_state

GOLDENS = pathlib.Path(__file__).parent / "goldens"
CASES = ["tiny_flash_q0", "tiny_flash_q1", "tiny_pro_q0", "tiny_pro_q1"]


def relative_error(ours, ref):
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def run_golden(case):
  golden = np.load(GOLDENS / f"{case}.npz")
  cfg = ModelConfig.from_hf(json.loads(str(golden["config_json"])), simulate_quant=bool(golden["simulate_quant"]),
                            dtype="float32", param_dtype="float32")
  model = sharding.create_sharded(DeepSeekV4, cfg, None)
  load_official_state(model, golden, prefix="param/")
  with jax.default_matmul_precision("highest"):
    out = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(golden["tokens"]))
  return golden, np.asarray(out.logits), np.asarray(out.mtp_logits)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_official(case):
  golden, logits, mtp = run_golden(case)
  ref, ref_mtp = golden["logits"], golden["mtp_logits"][:, :-1]  # the last MTP position is undefined
  mtp = mtp[:, :-1]
  errors = dict(main=relative_error(logits, ref), mtp=relative_error(mtp, ref_mtp),
                main_argmax=float(np.mean(logits.argmax(-1) == ref.argmax(-1))),
                mtp_argmax=float(np.mean(mtp.argmax(-1) == ref_mtp.argmax(-1))))
  print(f"\n{case}: {errors}")
  if bool(golden["simulate_quant"]):
    assert errors["main"] <= 8e-2 and errors["mtp"] <= 8e-2, errors
    assert errors["main_argmax"] >= 0.93 and errors["mtp_argmax"] >= 0.93, errors
  else:
    assert errors["main"] <= 1e-4 and errors["mtp"] <= 1e-4, errors


def test_quant_vectors():
  """FP8 / FP4 quant-dequant equal the production tilelang kernels' rules, bit for bit, on edge cases."""
  vectors = np.load(GOLDENS / "quant_vectors.npz")
  fp8 = np.asarray(quant.fp8_e4m3_qdq(jnp.asarray(vectors["fp8_x"]), 64))
  fp4 = np.asarray(quant.fp4_e2m1_qdq(jnp.asarray(vectors["fp4_x"]), 32))
  np.testing.assert_array_equal(fp8, vectors["fp8_y"])
  np.testing.assert_array_equal(fp4, vectors["fp4_y"])
