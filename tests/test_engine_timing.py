"""experiments/engine_timing.py (bench_serve's engine case): the engine decodes every slot at the synthetic
context, as many steps as timed, each request gets exactly its tokens, both engine modes; bad sizes refused."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

from bench_serve import fill_synthetic  # noqa: E402
from engine_timing import CharTokenizer, engine_backend, time_engine  # noqa: E402
from serve_fixtures import model, tok  # noqa: E402, F401 (fixtures)


@pytest.mark.parametrize("ahead", [True, False])
def test_engine_steps_at_the_synthetic_context(model, ahead):
  B, ctx, max_len = 2, 40, 64
  backend = engine_backend(model, B, max_len, "float32")
  fill = lambda cache: fill_synthetic(model.init_cache(B, max_len, kv_format="float32"), model.cfg, ctx, seed=1)
  e = time_engine(backend, fill, ctx, steps=3, warmup=1, dispatch_ahead=ahead)
  assert e["dispatch_ahead"] == ahead and (e["context"], e["batch"]) == (ctx, B)
  assert 0 < e["step_s"] < 60 and 0 < e["mean_s"] < 60 and e["first_s"] > 0
  assert backend._lengths == [None, None]  # every request ended and released its slot
  with pytest.raises(ValueError, match="max_len"):
    time_engine(backend, fill, max_len - 4, steps=3, warmup=1, dispatch_ahead=ahead)


def test_char_tokenizer_is_one_character_per_id():
  t = CharTokenizer()
  assert len(t.decode([0, 5, 129279])) == 3 and t.eos_id == -1
