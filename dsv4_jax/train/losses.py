"""The V4 training losses (spec §10–§12): next-token and MTP cross-entropy on packed documents, the
sequence-wise balance loss, and the lightning indexer's KL; each returned separately for logging."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shifted_targets(tokens_BS, segment_BS, shift: int):
  """(targets [B, S], mask [B, S]): token t + shift as the target of position t, where it is in t's document.

  Segment id 0 marks padding and is never a target or a source.
  """
  B, S = tokens_BS.shape
  pad = ((0, 0), (0, shift))
  targets_BS = jnp.pad(tokens_BS[:, shift:], pad)
  next_seg_BS = jnp.pad(segment_BS[:, shift:], pad, constant_values=-1)
  mask_BS = (next_seg_BS == segment_BS) & (segment_BS != 0)
  return targets_BS, mask_BS


def cross_entropy(logits_BSV, targets_BS, mask_BS):
  """(sum of −log p(target) over masked positions, number of masked positions), in float32."""
  logits_BSV = logits_BSV.astype(jnp.float32)
  lse_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
  picked_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
  nll_BS = jnp.where(mask_BS, lse_BS - picked_BS, 0.0)
  return jnp.sum(nll_BS), jnp.sum(mask_BS.astype(jnp.float32))


def lm_losses(out, tokens_BS, segment_BS, *, hash_routed, has_indexer):
  """Per-term sums and counts for one (micro)batch. `out` is a ModelOutput with aux collected.

  hash_routed / has_indexer: static per-MoE-layer flags in aux order (DeepSeekV4.moe_layer_flags).
  Returns a dict of scalars: ce_sum, ce_count, mtp_sum, mtp_count, balance (summed over bias-routed layers),
  indexer_kl (summed over indexer layers).
  """
  targets, mask = shifted_targets(tokens_BS, segment_BS, 1)
  ce_sum, ce_count = cross_entropy(out.logits, targets, mask)
  terms = dict(ce_sum=ce_sum, ce_count=ce_count, mtp_sum=jnp.zeros(()), mtp_count=jnp.zeros(()))
  if out.mtp_logits is not None:
    targets2, mask2 = shifted_targets(tokens_BS, segment_BS, 2)
    terms["mtp_sum"], terms["mtp_count"] = cross_entropy(out.mtp_logits, targets2, mask2)
  routed = jnp.asarray([not h for h in hash_routed], jnp.float32)
  terms["balance"] = jnp.sum(out.aux["balance"] * routed)
  terms["indexer_kl"] = jnp.sum(out.aux["indexer_kl"] * jnp.asarray(has_indexer, jnp.float32))
  return terms


def total_loss(terms, *, mtp_weight, balance_weight: float, indexer_weight: float, n_micro: int = 1):
  """The optimised scalar: mean CE + mtp_weight · mean MTP CE + balance and indexer terms.

  Sums and counts come from all microbatches, so accumulation gives the same loss as one big batch;
  balance and indexer terms are per-microbatch means, averaged over `n_micro`.
  """
  ce = terms["ce_sum"] / jnp.maximum(terms["ce_count"], 1.0)
  mtp = terms["mtp_sum"] / jnp.maximum(terms["mtp_count"], 1.0)
  return (ce + mtp_weight * mtp + balance_weight * terms["balance"] / n_micro
          + indexer_weight * terms["indexer_kl"] / n_micro)
