"""A plain generation loop (full forward per token, no cache): enough to sample from a freshly trained small
model. The cached prefill/decode engine is `dsv4_jax.serve.engine` (serving issue)."""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.serve.sampling import sample

_BUCKET = 64  # sequences are padded to a multiple of this, so the forward compiles once per bucket


def generate_tokens(model, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
  """Yields new token ids one at a time (stops at max_new_tokens or a stop id, which is yielded)."""
  if not prompt_ids:
    raise ValueError("the prompt is empty: give at least one token (e.g. BOS)")
  limit = model.cfg.max_position_embeddings
  if len(prompt_ids) + max_new_tokens > limit:
    raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's max_position_embeddings ({limit})")
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_logits(state, tokens_1S, last):
    out = nnx.merge(graphdef, state)(tokens_1S, with_mtp=False)
    return out.logits[0, last]

  ids = list(prompt_ids)
  key = jax.random.key(seed)
  for _ in range(max_new_tokens):
    n = len(ids)
    padded = np.zeros((1, -(-n // _BUCKET) * _BUCKET), np.int32)
    padded[0, :n] = ids
    logits_V = next_logits(state, jnp.asarray(padded), n - 1)
    key, sub = jax.random.split(key)
    tok = int(sample(logits_V[None], sub, temperature=temperature, top_k=top_k, top_p=top_p)[0])
    ids.append(tok)
    yield tok
    if tok in stop_ids:
      return


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 100,
                  on_text: Callable[[str], None] | None = None, **sampling) -> str:
  """Completes `prompt` (BOS prepended); `on_text` receives the text as it grows (streaming)."""
  prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  new: list[int] = []
  shown = ""
  for tok in generate_tokens(model, prompt_ids, max_new_tokens=max_new_tokens,
                             stop_ids=(tokenizer.eos_id,), **sampling):
    if tok == tokenizer.eos_id:
      break
    new.append(tok)
    text = tokenizer.decode(new)
    if on_text is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
      on_text(text[len(shown):])
      shown = text
  text = tokenizer.decode(new)
  if on_text is not None and len(text) > len(shown):
    on_text(text[len(shown):])
  return text
