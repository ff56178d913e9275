"""What every layer of one forward pass shares: positions, documents, RoPE tables, window and block layout.

Computed once per call (not per layer). Packed documents (spec §5.3): `segment_ids` mark documents; positions
restart at each document start, compression blocks restart there too, and no window, overlap or compressed entry
crosses a document boundary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4_jax.model import rope
from dsv4_jax.model.options import INFERENCE, ForwardOptions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Compressed entries ("slots") of one ratio m: slot k pools the m tokens ending at `end_BN[k]`.

  N = S // m slots (an upper bound on complete blocks); unused slots have `valid_BN` False.
  """
  end_BN: jax.Array  # int32 token index of the block's last token
  valid_BN: jax.Array  # bool
  block_BN: jax.Array  # int32 block index inside its document (RoPE position = block · m)
  segment_BN: jax.Array  # int32 document id
  has_prev_BN: jax.Array  # bool: the previous block's m tokens are in this sequence and document (CSA overlap)

  def visible_BCN(self, t_C, segment_BC):
    """Slot k is visible to query t iff it is complete by t and in t's document: i < floor((pos_t+1)/m)."""
    return (self.valid_BN[:, None, :] & (self.end_BN[:, None, :] <= t_C[None, :, None])
            & (self.segment_BN[:, None, :] == segment_BC[:, :, None]))

  def visible_indices_BSN(self, segment_BS, offset: int):
    """Every visible slot per query (dense HCA selection): slot index + offset, -1 where not visible."""
    t_S = jnp.arange(segment_BS.shape[1], dtype=jnp.int32)
    n = self.end_BN.shape[1]
    slots_N = jnp.arange(n, dtype=jnp.int32)
    return jnp.where(self.visible_BCN(t_S, segment_BS), slots_N + offset, -1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardContext:
  tokens_BS: jax.Array
  positions_BS: jax.Array
  segment_BS: jax.Array
  rope_plain: tuple  # (cos, sin) [B, S, R/2] for SWA-only layers
  rope_yarn: tuple  # (cos, sin) [B, S, R/2] for CSA/HCA layers
  window_BSW: jax.Array  # int32 raw-token indices of the sliding window, -1 = none
  layouts: dict  # ratio -> BlockLayout
  opts: ForwardOptions = dataclasses.field(default=INFERENCE, metadata=dict(static=True))


def document_positions(segment_BS):
  """Index of each token inside its document (documents are contiguous runs of equal segment id)."""
  S = segment_BS.shape[1]
  t_S = jnp.arange(S, dtype=jnp.int32)
  starts_BS = jnp.concatenate(
      [jnp.ones_like(segment_BS[:, :1], bool), segment_BS[:, 1:] != segment_BS[:, :-1]], axis=1)
  start_idx_BS = jax.lax.cummax(jnp.where(starts_BS, t_S[None, :], 0), axis=1)
  return (t_S[None, :] - start_idx_BS).astype(jnp.int32)


def window_indices(segment_BS, window: int):
  """[B, S, W]: the last W tokens up to and including t, in t's document; -1 where none."""
  S = segment_BS.shape[1]
  t_S = jnp.arange(S, dtype=jnp.int32)
  j_SW = t_S[:, None] - window + 1 + jnp.arange(window, dtype=jnp.int32)[None, :]
  in_range = j_SW >= 0
  same_doc = jnp.take_along_axis(segment_BS[:, None, :], jnp.clip(j_SW, 0, S - 1)[None], axis=2) \
      == segment_BS[:, :, None]
  return jnp.where(in_range[None] & same_doc, j_SW[None], -1).astype(jnp.int32)


def block_layout(positions_BS, segment_BS, ratio: int) -> BlockLayout:
  """Slots for the blocks whose m tokens all lie in this sequence and in one document.

  Positions need not start at 0 (a document continued from an earlier chunk): a block whose first tokens are
  not in the sequence is not emitted, and an overlap with a previous block that is not here is masked.
  """
  S = positions_BS.shape[1]
  n = S // ratio
  t_S = jnp.arange(S, dtype=jnp.int32)

  def same_doc_back(steps):  # token t - steps exists and is in t's document
    back_S = t_S - steps
    seg_back = jnp.take_along_axis(segment_BS, jnp.maximum(back_S, 0)[None].repeat(segment_BS.shape[0], 0), 1)
    return (back_S >= 0)[None] & (seg_back == segment_BS)

  is_end_BS = ((positions_BS % ratio) == ratio - 1) & same_doc_back(ratio - 1)
  end_BN = jax.vmap(lambda e: jnp.nonzero(e, size=n, fill_value=-1)[0])(is_end_BS).astype(jnp.int32)
  valid_BN = end_BN >= 0
  safe_BN = jnp.maximum(end_BN, 0)
  block_BN = jnp.take_along_axis(positions_BS, safe_BN, axis=1) // ratio
  segment_BN = jnp.take_along_axis(segment_BS, safe_BN, axis=1)
  has_prev_BN = jnp.take_along_axis(same_doc_back(2 * ratio - 1), safe_BN, axis=1) & (block_BN >= 1)
  return BlockLayout(end_BN, valid_BN, block_BN.astype(jnp.int32), segment_BN, has_prev_BN)


def make_context(cfg, tokens_BS, segment_ids=None, positions=None, opts: ForwardOptions = INFERENCE
                 ) -> ForwardContext:
  B, S = tokens_BS.shape
  if segment_ids is None:
    segment_BS = jnp.zeros((B, S), jnp.int32)
  else:
    segment_BS = jnp.asarray(segment_ids, jnp.int32)
  if positions is None:
    positions_BS = document_positions(segment_BS)
  else:
    positions_BS = jnp.asarray(positions, jnp.int32)
  ratios = sorted({r for r in cfg.compress_ratios if r})
  return ForwardContext(
      tokens_BS=tokens_BS,
      positions_BS=positions_BS,
      segment_BS=segment_BS,
      rope_plain=rope.rope_table(positions_BS, rope.layer_frequencies(cfg, compressed=False)),
      rope_yarn=rope.rope_table(positions_BS, rope.layer_frequencies(cfg, compressed=True)),
      window_BSW=window_indices(segment_BS, cfg.sliding_window),
      layouts={r: block_layout(positions_BS, segment_BS, r) for r in ratios},
      opts=opts,
  )
