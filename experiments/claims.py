"""The headline claims, from our own accounting: KV bytes and single-token inference FLOPs of V4-Flash and
V4-Pro against DeepSeek-V3.2 from 8K to 1M tokens of context.

  python experiments/claims.py [--out experiments/results] [--contexts 8192 ... 1048576]

Published (REPORT/CARD, spec §8.3): at 1M context V4-Pro needs 27% of V3.2's single-token FLOPs ("measured in
equivalent FP8 FLOPs") and 10% of its KV cache; V4-Flash 10% and 7% (Fig. 1: 3.7x / 9.8x fewer FLOPs,
9.5x / 13.7x smaller KV). Everything here is arithmetic on the configs (`dsv4_jax.accounting`: `kv_bytes`,
`kv_bytes_per_token`, `inference_flops_per_token`, `V32`); the counting rules are in the written report.
Writes claims.md and claims_{kv,flops,ratios,breakdown}.png.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv4_jax import accounting  # noqa: E402
from dsv4_jax.config import ModelConfig  # noqa: E402
from reporting import context_label, save_figure  # noqa: E402  (experiments/reporting.py)

GiB = 2**30
MILLION = 2**20  # "1M" = max_position_embeddings = 1,048,576, as in spec §8.3
CONTEXTS = tuple(2**k for k in range(13, 21))  # 8K ... 1M
PLOT_CONTEXTS = tuple(round(2 ** (k / 4)) for k in range(40, 81))  # 1K ... 1M, four points an octave
WEIGHTINGS = tuple(accounting.FLOP_WEIGHTINGS)  # raw, fp8, fp8_fp4
MAIN_WEIGHTING = "fp8_fp4"
# (FLOPs ratio, KV ratio) vs V3.2 at 1M, REPORT/CARD; Fig. 1 factors.
PUBLISHED = {"V4-Pro": (0.27, 0.10), "V4-Flash": (0.10, 0.07)}
FIG1 = {"V4-Pro": (3.7, 9.5), "V4-Flash": (9.8, 13.7)}
COLORS = {"V3.2": "tab:gray", "V4-Flash": "tab:blue", "V4-Pro": "tab:red"}


def models() -> dict:
  return {"V3.2": accounting.V32, "V4-Flash": ModelConfig.preset("flash"), "V4-Pro": ModelConfig.preset("pro")}


def claims_rows(contexts=CONTEXTS) -> list[dict]:
  """One row per (model, context): KV bytes, FLOPs by part and weighting, and ratios to V3.2."""
  ms, rows = models(), []
  for context in contexts:
    base_kv = accounting.kv_bytes(ms["V3.2"], context)
    base_f = accounting.inference_flops_per_token(ms["V3.2"], context)
    for name, cfg in ms.items():
      f = accounting.inference_flops_per_token(cfg, context)
      kv = accounting.kv_bytes(cfg, context)
      rows.append({
        "model": name, "context": context, "kv_bytes": kv, "kv_per_token": kv / context, "kv_ratio": kv / base_kv,
        "flops": {w: f.total(w) for w in WEIGHTINGS},
        "flops_ratio": {w: f.total(w) / base_f.total(w) for w in WEIGHTINGS},
        "parts": {"linear_fp8": f.linear_fp8, "linear_bf16": f.linear_bf16, "attention": f.attention,
                  "indexer": f.indexer},
        "indexer_precision": f.indexer_precision, "keys": f.keys, "index_keys": f.index_keys,
      })
  return rows


def compare_published(context: int = MILLION) -> list[dict]:
  """Ours vs published at `context`, per V4 model: KV ratio and FLOPs ratio under every weighting."""
  rows = {r["model"]: r for r in claims_rows((context,))}
  out = []
  for name, (flops_pub, kv_pub) in PUBLISHED.items():
    r = rows[name]
    out.append({"model": name, "kv_ratio": r["kv_ratio"], "kv_published": kv_pub,
                "flops_ratio": dict(r["flops_ratio"]), "flops_published": flops_pub,
                "fig1": FIG1[name]})
  return out


# ----- report ----------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


RULES = """\
Counting rules (all in `dsv4_jax/accounting.py`):

* **Context**: one sequence; the decoded token is the last of `context` tokens in the cache. "1M" = 1,048,576
  (max_position_embeddings; the spec's §8.3 arithmetic uses it).
* **KV bytes** (production formats): V4 (`kv_cache(...).total`): 584-byte entries (448 FP8 NoPE + 64 BF16 RoPE +
  7 ue8m0 scales + 1 pad) for min(context, 128) window tokens in every layer and floor(context/m) compressed
  entries in every CSA (m = 4) / HCA (m = 128) layer, plus a 68-byte FP4 indexer key per CSA entry; compressor
  tails (fixed fp32 state, 1-4 MiB per sequence) and paging slack are not KV and are left out. V3.2:
  61 layers x (656 B FP8 MLA latent + 132 B FP8 indexer key) per token (spec §8.1, FlashMLA layout).
* **Linear FLOPs** = 2 x active parameters per token: every weight a token multiplies (attention projections,
  the shared expert and the k routed experts it is sent to, dense FFNs of V3.2's first 3 layers, the router,
  the indexer's projections, V4's compressor and mHC projections, the output head); not the input embedding
  (a lookup), not MTP. V3.2 decodes MLA in absorbed form, so its wkv_b (up-projection) FLOPs are still
  2 x its parameters.
* **Attention FLOPs** over the keys the query really attends: V4 4 x heads x 512 per key (q.k and p.v on the
  one shared K=V head) over the window + the top-k (CSA) or all visible (HCA) compressed entries; V3.2
  2 x 128 heads x (576 + 512) per key (absorbed MLA: q.k over the 512 latent + 64 RoPE dims, p.v over the
  latent) over min(context, 2048) tokens.
* **Indexer FLOPs** = index keys x 64 heads x (2 x 128 + 2) (q.k, ReLU-weighted head sum): V3.2 scores all
  `context` tokens in every layer; V4 scores all floor(context/4) compressed entries in every CSA layer.
* **Not counted**: norms, softmax, RoPE, top-k selection, Sinkhorn, compressor pooling (elementwise work).
* **Precision weighting** ("equivalent FP8 FLOPs"): each FLOP is weighted by the GEMM precision it runs in.
  FP8: the linear layers of both models (V4's FP4 experts run as FP8 after their lossless FP4 -> FP8
  dequantisation, spec §9) and V3.2's FP8 indexer. BF16: the core attention of both (FP8 caches are
  dequantised to BF16 for the attention math), the head, routers, mHC, compressor and indexer-weight
  projections (fp32 in the official code; counted as BF16). FP4: V4's indexer q.k (both operands FP4).
  * `raw`: every FLOP weighs 1 (FP8 FLOPs count the same as BF16 FLOPs);
  * `fp8`: FP8 = 1, BF16 = 2 (an FP8 FLOP counts half a BF16 FLOP), FP4 = 1 (FP4 at the FP8 rate, Hopper);
  * `fp8_fp4`: as `fp8`, and FP4 = 1/2 (FP4 x FP4 at twice the FP8 rate, Blackwell). Headline weighting.
"""


def write_markdown(path: str, rows: list[dict], cmp: list[dict]) -> None:
  by = {(r["model"], r["context"]): r for r in rows}
  contexts = sorted({r["context"] for r in rows})
  names = list(models())
  today = datetime.date.today().isoformat()
  L = [f"# Headline claims reproduced: KV cache and single-token FLOPs vs DeepSeek-V3.2 ({today})", "",
       "`python experiments/claims.py` (pure arithmetic on the configs; no device). V3.2 is the public "
       "`inference/config_671B_v3.2.json` of deepseek-ai/DeepSeek-V3.2-Exp (61 layers, d 7168, MLA kv_lora 512 + "
       "rope 64, 128 heads, 256 experts top-8, indexer 64 x 128 top-2048); V4 are the `flash` / `pro` presets "
       "(spec §1).", "", RULES, "## At 1M tokens: ours vs published", "",
       "| model | KV vs V3.2 | published | FLOPs vs V3.2 `raw` | `fp8` | **`fp8_fp4`** | published | "
       "Fig. 1 (FLOPs x, KV x) | ours (FLOPs x, KV x) |", "|---|---|---|---|---|---|---|---|---|"]
  for c in cmp:
    fr = c["flops_ratio"]
    L.append(f"| {c['model']} | {_pct(c['kv_ratio'])} | {_pct(c['kv_published'])} | {_pct(fr['raw'])} | "
             f"{_pct(fr['fp8'])} | **{_pct(fr['fp8_fp4'])}** | {_pct(c['flops_published'])} | "
             f"{c['fig1'][0]}x, {c['fig1'][1]}x | {1 / fr['fp8_fp4']:.1f}x, {1 / c['kv_ratio']:.1f}x |")
  L += ["", "## KV cache per sequence", "", "| context | " + " | ".join(
      f"{n} GiB (B/token)" for n in names) + " | Flash / V3.2 | Pro / V3.2 |", "|---" * (len(names) + 3) + "|"]
  for ctx in contexts:
    cells = [f"{by[n, ctx]['kv_bytes'] / GiB:.3f} ({by[n, ctx]['kv_per_token']:,.0f})" for n in names]
    L.append(f"| {context_label(ctx)} | " + " | ".join(cells) + f" | {_pct(by['V4-Flash', ctx]['kv_ratio'])} | "
             f"{_pct(by['V4-Pro', ctx]['kv_ratio'])} |")
  L += ["", f"## Single-token FLOPs (GFLOP, `{MAIN_WEIGHTING}` FP8-equivalent) and ratios under each weighting",
        "", "| context | " + " | ".join(names) + " | Flash / V3.2 raw, fp8, fp8_fp4 | Pro / V3.2 raw, fp8, fp8_fp4 |",
        "|---" * (len(names) + 3) + "|"]
  for ctx in contexts:
    cells = [f"{by[n, ctx]['flops'][MAIN_WEIGHTING] / 1e9:,.1f}" for n in names]
    rat = {n: ", ".join(_pct(by[n, ctx]["flops_ratio"][w]) for w in WEIGHTINGS) for n in ("V4-Flash", "V4-Pro")}
    L.append(f"| {context_label(ctx)} | " + " | ".join(cells) + f" | {rat['V4-Flash']} | {rat['V4-Pro']} |")
  L += ["", "## Where the FLOPs go at 1M (GFLOP before weighting; keys per token summed over layers)", "",
        "| model | linear FP8 | linear BF16 | attention (BF16) | indexer | attended keys | indexer keys |",
        "|---|---|---|---|---|---|---|"]
  for n in names:
    r = by.get((n, MILLION))
    if r is None:
      continue
    p = r["parts"]
    L.append(f"| {n} | {p['linear_fp8'] / 1e9:,.1f} | {p['linear_bf16'] / 1e9:,.1f} | {p['attention'] / 1e9:,.1f} | "
             f"{p['indexer'] / 1e9:,.1f} ({r['indexer_precision'].upper()}) | {r['keys']:,} | {r['index_keys']:,} |")
  L += ["", discussion(by, cmp) if ("V3.2", MILLION) in by else "", "",
        "Plots: [KV vs context](claims_kv.png), [FLOPs vs context](claims_flops.png), "
        "[ratios vs context](claims_ratios.png), [FLOPs by part at 1M](claims_breakdown.png).", ""]
  with open(path, "w") as f:
    f.write("\n".join(L))


def discussion(by: dict, cmp: list[dict]) -> str:
  """The reading of the tables, its numbers taken from them (`by`: (model, context) -> row, at 8K and 1M)."""
  c = {x["model"]: x for x in cmp}
  fr = lambda n, w: _pct(c[n]["flops_ratio"][w])
  v, f, p = (by[n, MILLION] for n in ("V3.2", "V4-Flash", "V4-Pro"))
  vp = v["parts"]
  at_1e6 = {x["model"]: x["flops_ratio"][MAIN_WEIGHTING] for x in compare_published(10**6)}
  short = by.get(("V4-Pro", CONTEXTS[0]))
  lines = [
    "## Reading", "",
    f"* **KV cache: reproduced exactly.** {_pct(f['kv_ratio'])} (Flash) and {_pct(p['kv_ratio'])} (Pro) of "
    f"V3.2 at 1M, i.e. {1 / f['kv_ratio']:.1f}x and {1 / p['kv_ratio']:.1f}x as in Fig. 1; the published 7% and "
    "10% are these rounded down. V4's per-token cost is nearly flat in context: past a few thousand tokens it is "
    "(584 + 68) / 4 B per CSA layer + 584 / 128 B per HCA layer, against V3.2's 788 B in every layer. The ratio "
    "is lowest at 1M because the window (a fixed 128 entries per layer) is amortised over more tokens.",
    f"* **FLOPs: reproduced only with a precision weighting, and the weighting decides the number.** At 1M the "
    f"per-token work of V3.2 is {100 * vp['indexer'] / sum(vp.values()):.0f}% (raw) its indexer: 64 heads x 128 "
    f"dims over all 1M tokens in all 61 layers ({vp['indexer'] / 1e12:.2f} TFLOP), against "
    f"{(vp['linear_fp8'] + vp['linear_bf16']) / 1e9:.0f} GFLOP of linear layers and {vp['attention'] / 1e9:.0f} "
    "GFLOP of attention over its 2048 selected tokens. V4 cuts the indexer's keys 4x (it scores compressed "
    "entries) and runs it in 30 (Pro) / 21 (Flash) layers instead of 61, so V4's indexer does "
    f"{_pct(p['parts']['indexer'] / vp['indexer'])} (Pro) / {_pct(f['parts']['indexer'] / vp['indexer'])} (Flash) "
    "of V3.2's indexer FLOPs; but V4 attends more keys per layer (dense HCA over 8192 entries at 1M) with a "
    f"512-dim head, so its attention costs {p['parts']['attention'] / vp['attention']:.1f}x (Pro) / "
    f"{f['parts']['attention'] / vp['attention']:.1f}x (Flash) V3.2's.",
    f"  * `raw` (FP8 = BF16): Pro {fr('V4-Pro', 'raw')}, Flash {fr('V4-Flash', 'raw')}. Pro is close; Flash is "
    "not.",
    f"  * `fp8` (BF16 FLOPs twice FP8, FP4 as FP8): Pro {fr('V4-Pro', 'fp8')}, Flash {fr('V4-Flash', 'fp8')}: "
    "neither matches, because V4's BF16 attention now weighs double.",
    f"  * `fp8_fp4` (as `fp8`, and V4's FP4 x FP4 indexer at half an FP8 FLOP): **Pro "
    f"{fr('V4-Pro', MAIN_WEIGHTING)}, Flash {fr('V4-Flash', MAIN_WEIGHTING)}**, i.e. "
    f"{1 / c['V4-Pro']['flops_ratio'][MAIN_WEIGHTING]:.1f}x and "
    f"{1 / c['V4-Flash']['flops_ratio'][MAIN_WEIGHTING]:.1f}x "
    "against Fig. 1's 3.7x and 9.8x. Both published numbers are matched to within half a point, so we read "
    "\"equivalent FP8 FLOPs\" as this weighting. The report does not give its method (spec §18); what we "
    "cannot pin down stays below half a point: whether the fp32 matmuls (head, compressor, mHC) and the "
    "ReLU/weighting work were counted, and whether \"1M\" meant 2^20 or 10^6 tokens (at 10^6: Pro "
    f"{_pct(at_1e6['V4-Pro'])}, Flash {_pct(at_1e6['V4-Flash'])}).",
  ]
  if short is not None:
    lines.append(
      f"* **The FLOPs saving is a long-context saving.** At {context_label(CONTEXTS[0])} V4-Pro needs "
      f"{_pct(short['flops_ratio'][MAIN_WEIGHTING])} of V3.2's FLOPs (it has more active parameters: 49B against "
      "V3.2's 37B); V4-Flash, with 13B active, is cheaper at every length. The KV saving holds at every length.")
  return "\n".join(lines)


# ----- plots -----------------------------------------------------------------------------------------------
def plot(out_dir: str, contexts=PLOT_CONTEXTS) -> list[str]:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: PLC0415

  rows = claims_rows(contexts)
  names = list(models())
  series = lambda n, f: [f(r) for r in rows if r["model"] == n]
  xs = list(contexts)
  ticks = [2**k for k in range(10, 21, 2)]

  def setup(ax, ylabel, title):
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(x) // MILLION}M" if x >= MILLION
                                               else f"{int(x) // 1024}K"))
    ax.set_xlabel("context length (tokens, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)

  paths = []
  # KV bytes.
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for n in names:
    ax.plot(xs, series(n, lambda r: r["kv_bytes"] / GiB), label=n, color=COLORS[n], lw=2)
  ax.set_yscale("log")
  setup(ax, "KV cache per sequence (GiB, log scale)", "KV cache vs context (production FP8/FP4 formats)")
  for n, dy in (("V3.2", -14), ("V4-Flash", -14), ("V4-Pro", 6)):
    v = series(n, lambda r: r["kv_bytes"] / GiB)[-1]
    ax.annotate(f"{v:.2f} GiB at 1M", (xs[-1], v), textcoords="offset points", xytext=(-8, dy), ha="right",
                fontsize=8, color=COLORS[n])
  ax.legend()
  paths.append(_save(fig, out_dir, "claims_kv.png"))
  # FLOPs per token.
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for n in names:
    ax.plot(xs, series(n, lambda r: r["flops"][MAIN_WEIGHTING] / 1e9), label=f"{n} (FP8-equivalent, fp8_fp4)",
            color=COLORS[n], lw=2)
    ax.plot(xs, series(n, lambda r: r["flops"]["raw"] / 1e9), label=f"{n} (raw FLOPs)", color=COLORS[n], lw=1,
            ls=":")
  ax.set_yscale("log")
  setup(ax, "FLOPs per decoded token (GFLOP, log scale)", "Single-token inference FLOPs vs context")
  ax.legend(fontsize=8)
  paths.append(_save(fig, out_dir, "claims_flops.png"))
  # Ratios.
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for n in ("V4-Flash", "V4-Pro"):
    ax.plot(xs, series(n, lambda r: 100 * r["kv_ratio"]), color=COLORS[n], lw=2, label=f"{n} KV cache")
    ax.plot(xs, series(n, lambda r: 100 * r["flops_ratio"][MAIN_WEIGHTING]), color=COLORS[n], lw=2, ls="--",
            label=f"{n} FLOPs (fp8_fp4)")
    ax.plot(xs, series(n, lambda r: 100 * r["flops_ratio"]["raw"]), color=COLORS[n], lw=1, ls=":",
            label=f"{n} FLOPs (raw)")
    flops_pub, kv_pub = PUBLISHED[n]
    x_pub = MILLION * (1.2 if n == "V4-Pro" else 1 / 1.2)  # side by side: Flash FLOPs and Pro KV are both 10%
    ax.plot([x_pub], [100 * flops_pub], marker="*", ms=14, color=COLORS[n], ls="none", mec="k", zorder=5)
    ax.plot([x_pub], [100 * kv_pub], marker="o", ms=8, color=COLORS[n], ls="none", mec="k", zorder=5)
  ax.plot([], [], marker="*", ms=11, color="w", mec="k", ls="none", label="published FLOPs ratio at 1M")
  ax.plot([], [], marker="o", ms=7, color="w", mec="k", ls="none", label="published KV ratio at 1M")
  setup(ax, "percent of DeepSeek-V3.2 (%)", "V4 cost relative to V3.2 (lower is cheaper)")
  ax.set_ylim(0, None)
  ax.legend(fontsize=7, ncol=2)
  paths.append(_save(fig, out_dir, "claims_ratios.png"))
  # Breakdown at 1M.
  r1m = {r["model"]: r for r in claims_rows((MILLION,))}
  w = accounting.FLOP_WEIGHTINGS[MAIN_WEIGHTING]
  parts = [("linear FP8", lambda r: w["fp8"] * r["parts"]["linear_fp8"]),
           ("linear BF16", lambda r: w["bf16"] * r["parts"]["linear_bf16"]),
           ("attention (BF16)", lambda r: w["bf16"] * r["parts"]["attention"]),
           ("indexer (V3.2 FP8, V4 FP4)", lambda r: w[r["indexer_precision"]] * r["parts"]["indexer"])]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  bottom = [0.0] * len(names)
  for (label, f), color in zip(parts, ("tab:green", "tab:olive", "tab:purple", "tab:orange")):
    vals = [f(r1m[n]) / 1e9 for n in names]
    ax.bar(names, vals, bottom=bottom, label=label, color=color)
    bottom = [b + v for b, v in zip(bottom, vals)]
  for i, b in enumerate(bottom):
    ax.annotate(f"{b:,.0f}", (i, b), ha="center", va="bottom", fontsize=9)
  ax.set_ylabel("GFLOP per decoded token (FP8-equivalent, fp8_fp4)")
  ax.set_title("Where single-token FLOPs go at 1M context")
  ax.legend()
  ax.grid(True, axis="y", alpha=0.3)
  paths.append(_save(fig, out_dir, "claims_breakdown.png"))
  return paths


def _save(fig, out_dir: str, name: str) -> str:
  return save_figure(fig, os.path.join(out_dir, name))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
  p.add_argument("--no-plots", action="store_true")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows, cmp = claims_rows(tuple(args.contexts)), compare_published()
  write_markdown(os.path.join(args.out, "claims.md"), rows, cmp)
  paths = [] if args.no_plots else plot(args.out)
  for c in cmp:
    print(f"{c['model']}: KV {_pct(c['kv_ratio'])} (published {_pct(c['kv_published'])}), FLOPs "
          + ", ".join(f"{w} {_pct(v)}" for w, v in c["flops_ratio"].items())
          + f" (published {_pct(c['flops_published'])})")
  print("wrote", os.path.join(args.out, "claims.md"), *paths)
  return 0


if __name__ == "__main__":
  sys.exit(main())
