"""The claims experiments (experiments/claims.py, experiments/kv_cache_measured.py) at small settings."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import claims  # noqa: E402
import kv_cache_measured  # noqa: E402

from dsv4_jax import accounting  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402

CONTEXTS = (8192, 65536, 2**20)


def test_ratios_in_unit_interval_and_falling_with_context():
  rows = claims.claims_rows(CONTEXTS)
  for name in ("V4-Flash", "V4-Pro"):
    mine = [r for r in rows if r["model"] == name]
    assert [r["context"] for r in mine] == list(CONTEXTS)
    kv = [r["kv_ratio"] for r in mine]
    assert all(0 < x < 1 for x in kv) and kv == sorted(kv, reverse=True)
    assert [r["kv_bytes"] for r in mine] == sorted(r["kv_bytes"] for r in mine)
    for w in claims.WEIGHTINGS:
      flops = [r["flops_ratio"][w] for r in mine]
      assert all(0 < x < 1 for x in flops) and flops == sorted(flops, reverse=True), (name, w, flops)
  for r in rows:
    if r["model"] == "V3.2":
      assert r["kv_ratio"] == 1.0 and all(v == 1.0 for v in r["flops_ratio"].values())
      assert r["kv_per_token"] == accounting.V32_BYTES_PER_TOKEN


def test_published_claims_at_1m():
  cmp = {c["model"]: c for c in claims.compare_published()}
  for name, (flops, kv) in claims.PUBLISHED.items():
    assert abs(cmp[name]["kv_ratio"] - kv) < 0.006  # 7.3% and 10.5%, published rounded down
    assert abs(cmp[name]["flops_ratio"][claims.MAIN_WEIGHTING] - flops) < 0.005
  assert round(1 / cmp["V4-Pro"]["kv_ratio"], 1) == 9.5 and round(1 / cmp["V4-Flash"]["kv_ratio"], 1) == 13.7


def test_claims_main_writes_table_and_plots(tmp_path):
  assert claims.main(["--out", str(tmp_path), "--contexts", "8192", str(2**20)]) == 0
  text = (tmp_path / "claims.md").read_text()
  assert "## At 1M tokens: ours vs published" in text and "| 8K |" in text and "| 1M |" in text
  for name in ("kv", "flops", "ratios", "breakdown"):
    png = tmp_path / f"claims_{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("context", [512, 1000])
def test_allocated_cache_equals_accounting_up_to_page_rounding(context):
  cfg = ModelConfig.preset("small")
  real = kv_cache_measured.measure(cfg, context, allocate=True)
  shapes = kv_cache_measured.measure(cfg, context, allocate=False)
  assert real["mode"] == "allocated" and shapes["mode"] == "eval_shape"
  assert real["parts"] == shapes["parts"]
  assert real["buffer_nbytes"] == real["all_allocated"]
  acc = accounting.kv_cache(cfg, context)
  assert real["parts"]["window"] == acc.window
  assert real["parts"]["compressor_state"] == acc.compressor_state
  assert real["kv_allocated"] - acc.total == real["gap"] == real["page_rounding"]
  assert real["num_pages"] == real["pages"] == -(-context // real["page_tokens"])
  if context % real["page_tokens"] == 0:
    assert real["gap"] == 0 and real["padding_tokens"] == 0
  else:  # the last page is partly used: the gap is the padding tokens' entries, nothing else
    assert real["padding_tokens"] == real["pages"] * real["page_tokens"] - context > 0 and real["gap"] > 0


def test_pro_schedule_1m_shapes_equal_accounting():
  r = kv_cache_measured.measure(ModelConfig.preset("pro"), 2**20, allocate=False)
  assert r["gap"] == 0 and r["kv_allocated"] == accounting.kv_cache(ModelConfig.preset("pro"), 2**20).total
  assert r["parts"]["metadata"] > 0 and r["pages"] == 2**20 // r["page_tokens"]


def test_kv_cache_measured_main_shapes_only(tmp_path):
  argv = ["--out", str(tmp_path), "--models", "flash", "--contexts", "1024", "1000", "--shapes-only"]
  assert kv_cache_measured.main(argv) == 0
  text = (tmp_path / "kv_cache_measured.md").read_text()
  assert "| V4-Flash | 1K | eval_shape |" in text and "| V4-Flash | 1,000 | eval_shape |" in text
  assert (tmp_path / "kv_cache_measured.png").read_bytes()[:4] == b"\x89PNG"
