"""Pieces shared by the report writers of the accounting experiments (claims.py, kv_cache_measured.py)."""

from __future__ import annotations


def context_label(context: int) -> str:
  """"1M" (2^20 tokens), "128K", or the count itself when it is not a whole number of K."""
  if context % 2**20 == 0:
    return f"{context // 2**20}M"
  if context % 1024 == 0:
    return f"{context // 1024}K"
  return f"{context:,}"


def save_figure(fig, path: str) -> str:
  """Lays out, writes (PNG, 120 dpi) and closes a matplotlib figure; returns the path."""
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
