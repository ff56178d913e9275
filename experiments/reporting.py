"""Pieces shared by the experiments' report writers (claims.py, kv_cache_measured.py; the reproduce lines of
bench_serve.py, bench_multi_gpu.py, profile_decode.py)."""

from __future__ import annotations


def without_options(argv, options=("--out",)) -> list[str]:
  """argv less each `OPTION VALUE` / `OPTION=VALUE` of `options`: a reproduce line names the measurement, not the
  scratch paths it was written to."""
  out, skip = [], False
  for a in argv:
    if skip or a.startswith(tuple(o + "=" for o in options)):
      skip = False
      continue
    skip = a in options
    if not skip:
      out.append(a)
  return out


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
