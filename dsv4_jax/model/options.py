"""Per-call switches for training-time behaviour of the one model (the mode is an argument, never state)."""

from __future__ import annotations

import dataclasses

ATTENTION_MODES = ("sparse", "dense")


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
  """Static options of one forward pass (hashable: they select what is compiled).

  collect_aux: also return router statistics (expert load, sequence-wise balance loss, routing indices) and the
    indexer KL of every layer in `ModelOutput.aux`.
  attention: "sparse" = CSA layers attend the indexer's top-k compressed entries (the released model);
    "dense" = CSA layers attend every visible compressed entry (the dense stage of the sparsity curriculum).
  indexer_loss: compute KL(main attention ‖ indexer) over the attended compressed entries of CSA layers.
  detach_indexer_input: the indexer sees stop_gradient(x) (sparse stage: its KL never reaches the backbone).
  """
  collect_aux: bool = False
  attention: str = "sparse"
  indexer_loss: bool = False
  detach_indexer_input: bool = False

  def __post_init__(self):
    if self.attention not in ATTENTION_MODES:
      raise ValueError(f"ForwardOptions.attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
    if self.indexer_loss and not self.collect_aux:
      raise ValueError("ForwardOptions.indexer_loss needs collect_aux=True (the loss is returned in aux)")


INFERENCE = ForwardOptions()
