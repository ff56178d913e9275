"""The `dsv4` command line: `dsv4 info` (more subcommands register themselves in SUBCOMMANDS).

  dsv4 info --config flash --context 1048576 [--json]
  python -m dsv4_jax.cli info --config configs/model_pro.py

`--config` takes a preset name, a checkpoint directory, a config.json, or an ml_collections `.py` file
(`path.py` or `path.py:arg`, calling `get_config()` / `get_config(arg)`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from typing import Any, Callable

from dsv4_jax import accounting
from dsv4_jax.config import PRESETS, RATIO_TO_KIND, ModelConfig, load_model_config as load_config


# ----- shared helpers (for every subcommand) -------------------------------------------------------------
def config_arg(spec: str, **overrides) -> ModelConfig:
  """load_config for a command-line argument: a bad config exits with a one-line message, no traceback."""
  try:
    return load_config(spec, **overrides)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"dsv4: error: --config {spec}: {e}") from None


def human(n: float) -> str:
  """284332240471 -> '284.3B': four significant digits, at least one decimal."""
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      x = n / scale
      break
  else:
    return str(n)
  decimals = max(1, 3 - int(math.floor(math.log10(abs(x)))))
  return f"{x:.{decimals}f}{unit}"


def human_bytes(n: float) -> str:
  """3688172544 -> '3.43 GiB'."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def schedule(ratios: tuple[int, ...], start: int = 0) -> str:
  """Layer types in run-length form, alternations folded: '0-1 swa, 2-41 (csa hca)x20, 42 csa'."""
  runs: list[list[Any]] = []  # [first, last, kind]
  for i, r in enumerate(ratios, start):
    kind = RATIO_TO_KIND[r]
    if runs and runs[-1][2] == kind:
      runs[-1][1] = i
    else:
      runs.append([i, i, kind])
  parts, i = [], 0
  while i < len(runs):
    a = runs[i]
    n = 0  # repeats of the single-layer pair (runs[i], runs[i+1])
    while (i + 2 * n + 1 < len(runs) and all(runs[i + 2 * n + j][0] == runs[i + 2 * n + j][1] for j in (0, 1))
           and runs[i + 2 * n][2] == a[2] and runs[i + 2 * n + 1][2] == runs[i + 1][2]):
      n += 1
    if n >= 2:
      parts.append(f"{a[0]}-{runs[i + 2 * n - 1][1]} ({a[2]} {runs[i + 1][2]})x{n}")
      i += 2 * n
    else:
      parts.append(f"{a[0]} {a[2]}" if a[0] == a[1] else f"{a[0]}-{a[1]} {a[2]}")
      i += 1
  return ", ".join(parts)


# ----- dsv4 info -----------------------------------------------------------------------------------------
def _add_info(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("info", help="layer schedule, parameter counts and KV-cache size of a config")
  p.add_argument("--config", required=True, help="preset name, checkpoint dir, config.json or ml_collections .py")
  p.add_argument("--context", type=int, default=None, help="tokens for the KV-cache size (default: max positions)")
  p.add_argument("--kv-format", choices=accounting.KV_FORMATS, default="fp8",
                 help="fp8: the 584-byte mixed entries of the release; bf16: all-BF16 (debugging)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(func=_run_info)


def info(cfg: ModelConfig, context: int | None = None, kv_format: str = "fp8") -> dict[str, Any]:
  """The facts `dsv4 info` prints, as a JSON-ready dict."""
  context = context or cfg.max_position_embeddings
  params, kv = accounting.count_params(cfg), accounting.kv_cache(cfg, context, kv_format)
  kinds = [RATIO_TO_KIND[r] for r in cfg.main_ratios]
  return {
    "schedule": schedule(cfg.main_ratios),
    "mtp_schedule": schedule(cfg.mtp_ratios, cfg.num_hidden_layers),
    "layer_counts": {k: kinds.count(k) for k in ("swa", "csa", "hca")},
    "total_params": params.total,
    "active_params": params.active,
    "mtp_params": params.mtp,
    "mtp_active_params": params.mtp_active,
    "total_params_with_mtp": params.total + params.mtp,
    "params_by_component": params.by_component(),
    "hash_table_entries": params.hash_table,
    "context": context,
    "kv_format": kv_format,
    "kv_entry_bytes": kv.entry_bytes,
    "indexer_key_bytes": kv.indexer_key_bytes,
    "kv_bytes_per_token": kv.per_token,
    "kv_bytes_total": kv.total,
    "kv_bytes": {"window": kv.window, "compressed": kv.compressed, "indexer": kv.indexer},
    "compressor_state_bytes": kv.compressor_state,
    "v32_kv_bytes_total": kv.v32_total,
    "kv_ratio_vs_v32": kv.ratio_vs_v32,
    "config_fields": cfg.to_dict(),
  }


def _format_info(name: str, cfg: ModelConfig, r: dict[str, Any]) -> str:
  counts = ", ".join(f"{n} {k}" for k, n in r["layer_counts"].items() if n)
  n_hash = cfg.num_hash_layers
  hash_note = {0: "", 1: "; layer 0 hash-routed"}.get(n_hash, f"; layers 0-{n_hash - 1} hash-routed")
  lines = [
    f"DeepSeek-V4 config {name}",
    f"  shape        {cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP, hidden {cfg.hidden_size},"
    f" {cfg.num_attention_heads} heads x {cfg.head_dim} (rope {cfg.qk_rope_head_dim}), vocab {cfg.vocab_size:,}",
    f"  experts      {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}) + {cfg.n_shared_experts} shared,"
    f" inter {cfg.moe_intermediate_size}{hash_note}",
    f"  schedule     {r['schedule']}; mtp {r['mtp_schedule']}  ({counts})",
    f"  checkpoint   weights {cfg.weight_quant or 'unquantized'}, experts {cfg.expert_dtype or 'unquantized'};"
    f" simulate_quant {cfg.simulate_quant}",
    f"  params       total {human(r['total_params'])} ({r['total_params']:,}; main model, excl. MTP)",
    f"               active {human(r['active_params'])} per token (excl. input embedding)",
    f"               MTP {human(r['mtp_params'])} (excl. shared embedding and head)",
    f"  kv cache     {r['context']:,} tokens, {r['kv_format']}: {human_bytes(r['kv_bytes_total'])},"
    f" {r['kv_bytes_per_token']:,.0f} B/token; {100 * r['kv_ratio_vs_v32']:.1f}% of DeepSeek-V3.2"
    f" ({human_bytes(r['v32_kv_bytes_total'])})",
  ]
  return "\n".join(lines)


def _run_info(args: argparse.Namespace) -> int:
  cfg = config_arg(args.config)
  r = info(cfg, args.context, args.kv_format)
  if args.json:
    print(json.dumps({"config": args.config, **r}, indent=2))
  else:
    print(_format_info(args.config, cfg, r))
  return 0


# ----- dsv4 train ------------------------------------------------------------------------------------------
def _add_train(sub) -> None:
  p = sub.add_parser(
      "train", help="train a model (the README's main job)",
      description="Train (or resume) a run. Flags (ml_collections config_flags):\n"
                  "  --config PATH.py[:ARG]       the run's config file (e.g. configs/train_tiny.py)\n"
                  "  --workdir DIR                checkpoints, metrics.jsonl, tb/, tokenizer.json, hf/\n"
                  "  --config.FIELD=VALUE         override any field, e.g. --config.steps=50 "
                  "--config.data.seq_len=128",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.set_defaults(func=_run_train, takes_flags=True)


def parse_train_flags(flag_args: list[str]):
  """(config, workdir) from `--config PATH --workdir DIR --config.X=V ...` via ml_collections config_flags."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  model_overrides, flag_args = _split_model_overrides(flag_args)
  argv = ["dsv4 train"] + list(flag_args)
  # sys_argv: config_flags reads the --config.X overrides from sys.argv unless told otherwise.
  config_flags.DEFINE_config_file("config", None, "the run's ml_collections config file", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "the run's directory", flag_values=fv)
  try:
    fv(argv)
  except flags.Error as e:
    raise SystemExit(f"dsv4 train: error: {e}") from None
  except (AttributeError, KeyError) as e:  # config_flags: an override of a field the config does not have
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
      e = e.args[0]
    first, _, hint = str(e.args[0] if e.args else e).partition("\n")  # "'name'" [+ "\nDid you mean ..."]
    name = first.strip("'\"")
    flag = next((a for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")), name)
    hint = f" ({hint.strip()})" if hint.strip() else ""
    raise SystemExit(f"dsv4 train: error: {flag}: the config has no field {name!r}{hint}") from None
  if fv.config is None:
    raise SystemExit("dsv4 train: error: --config is required (e.g. --config configs/train_tiny.py)")
  try:
    fv.config.keys()  # a config file that failed to load raises its (deferred) error on first access
  except OSError as e:
    reason = " ".join(str(e.__cause__ or e).split())
    raise SystemExit(f"dsv4 train: error: --config {fv['config'].config_filename}: {reason}") from None
  if not fv.workdir:
    raise SystemExit("dsv4 train: error: --workdir is required")
  if model_overrides:
    with fv.config.unlocked():
      for name, value in model_overrides.items():
        fv.config.model_overrides[name] = value
  return fv.config, fv.workdir


_MODEL_OVERRIDE = "--config.model_overrides."


def _split_model_overrides(flag_args):
  """`--config.model_overrides.FIELD=VALUE` flags (any ModelConfig field; config_flags cannot add keys to the
  empty override dict) parsed as Python literals, and the remaining flags."""
  import ast
  import dataclasses
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  overrides, rest = {}, []
  args = list(flag_args)
  i = 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith(_MODEL_OVERRIDE):
      rest.append(arg)
      i += 1
      continue
    name, eq, text = arg[len(_MODEL_OVERRIDE):].partition("=")
    if not eq:  # "--config.model_overrides.X VALUE"
      if i + 1 >= len(args):
        raise SystemExit(f"dsv4 train: error: {arg} needs a value")
      text, i = args[i + 1], i + 1
    if name not in fields:
      raise SystemExit(f"dsv4 train: error: {_MODEL_OVERRIDE}{name}: ModelConfig has no field {name!r}")
    try:
      overrides[name] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      overrides[name] = text  # a bare string such as bfloat16
    i += 1
  return overrides, rest


def _run_train(args) -> int:
  cfg, workdir = parse_train_flags(args.flags)
  from dsv4_jax.train.loop import train
  from dsv4_jax.train.checkpoint import IncompatibleCheckpoint
  try:
    last = train(cfg, workdir)
  except IncompatibleCheckpoint as e:
    raise SystemExit(f"dsv4 train: error: {e}") from None
  if last:
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()
             if k in ("step", "loss", "eval_loss", "tokens_per_s", "mfu")}
    print(f"done: {json.dumps(shown)}; model in {os.path.join(workdir, 'hf')}")
  return 0


# ----- dsv4 generate / dsv4 serve ----------------------------------------------------------------------------
def _add_generate(sub) -> None:
  p = sub.add_parser("generate", help="sample text from a checkpoint",
                     description="raw: continue the prompt as plain text (BOS first; base and freshly trained "
                                 "models). chat / thinking / max: the prompt is one user message in the V4 chat "
                                 "encoding, Non-think / Think High / Think Max.")
  p.add_argument("--checkpoint", required=True,
                 help="a model directory in the official format with tokenizer.json (e.g. WORKDIR/hf)")
  p.add_argument("--prompt", required=True)
  p.add_argument("--mode", choices=("raw", "chat", "thinking", "max"), default="raw")
  p.add_argument("--max-new-tokens", type=int, default=100)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stream", action="store_true", help="print text as it is generated")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="parameter and compute dtype")
  p.add_argument("--speculative", action="store_true",
                 help="MTP speculative decoding (same text; prints the draft acceptance rate to stderr)")
  p.add_argument("--layers", choices=("per-layer", "stacked"), default="per-layer",
                 help="per-layer: each layer its own parameters (faster decode steps: an H200 step at 128K x 64 "
                      "took 16.0 ms vs 20.2 ms stacked); stacked: layers of a kind scanned over stacked "
                      "parameters (compiles faster, ~4x for a 43-layer model on CPU: better for short runs)")
  p.set_defaults(func=_run_generate)


def _load_for_serving(cmd: str, checkpoint: str, dtype: str, layers: str = "per-layer"):
  """(model, tokenizer) of a checkpoint directory; problems exit with a one-line message. layers="per-layer"
  loads it unstacked (scan_layers=False, each layer its own parameters): decode steps then do not copy layer
  weights out of scanned stacks (dsv4_jax.model.unstack); "stacked" keeps the scanned stacks (faster compile)."""
  from dsv4_jax.tokenizer import Tokenizer
  from dsv4_jax.weights import load_pretrained
  if not os.path.isdir(checkpoint):
    raise SystemExit(f"dsv4 {cmd}: error: --checkpoint {checkpoint} is not a directory")
  try:
    tok = Tokenizer.load(checkpoint)
    model, _ = load_pretrained(checkpoint, dtype=dtype, progress=False, scan_layers=layers == "stacked")
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"dsv4 {cmd}: error: {e}") from None
  return model, tok


def _run_generate(args) -> int:
  from dsv4_jax.serve.backend import make_backend
  from dsv4_jax.serve.engine import Engine
  from dsv4_jax.serve.params import InvalidRequest, SamplingParams
  from dsv4_jax.serve.conversation import encode_chat
  model, tok = _load_for_serving("generate", args.checkpoint, args.dtype, args.layers)
  try:
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    if args.mode == "raw":
      prompt_ids, shown = [tok.bos_id] + tok.encode(args.prompt), args.prompt
    else:
      prompt_ids, thinking_mode = encode_chat(tok, [{"role": "user", "content": args.prompt}], args.mode)
      shown = "<think>" if thinking_mode == "thinking" else ""
    limit = model.cfg.max_position_embeddings
    if len(prompt_ids) + args.max_new_tokens > limit:
      raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds "
                           f"the model's max_position_embeddings ({limit})")
    backend = _serving_backend(model, 1, len(prompt_ids) + args.max_new_tokens, "auto", args.speculative)
    engine = Engine(backend, tok)
    write = (lambda t: (sys.stdout.write(t), sys.stdout.flush())) if args.stream else None
    if write:
      write(shown)
    handle = engine.submit(prompt_ids, params, on_delta=write)
    engine.run_until_idle()
    text = handle.result().text
  except ValueError as e:
    raise SystemExit(f"dsv4 generate: error: {e}") from None
  print("" if args.stream else shown + text)
  if args.speculative:
    print(f"dsv4 generate: {engine.stats.summary()}", file=sys.stderr)
  return 0


def _serving_backend(model, slots: int, max_len: int, kind: str, speculative: bool):
  """make_backend, or the MTP speculative backend (KV cache only) with --speculative."""
  from dsv4_jax.serve.backend import make_backend
  if not speculative:
    return make_backend(model, slots, max_len, kind)
  if kind == "full":
    raise ValueError("--speculative needs the KV-cache backend, not --backend full")
  from dsv4_jax.serve.speculative import SpeculativeBackend
  return SpeculativeBackend(model, slots, max_len)


def _add_serve(sub) -> None:
  p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
  p.add_argument("--checkpoint", required=True, help="a model directory with tokenizer.json")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
  p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
  p.add_argument("--slots", type=int, default=4, help="requests decoded together; more wait in a queue")
  p.add_argument("--max-len", type=int, default=None,
                 help="tokens per request, prompt + completion (default: min(8192, max_position_embeddings))")
  p.add_argument("--model-name", default=None, help="the `model` clients must send (default: directory name)")
  p.add_argument("--mode", choices=("chat", "thinking", "max"), default="chat",
                 help="chat reasoning mode when a request names none")
  p.add_argument("--backend", choices=("auto", "cached", "full"), default="auto",
                 help="auto: KV cache when available, else full forward per step")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="parameter and compute dtype")
  p.add_argument("--speculative", action="store_true",
                 help="MTP speculative decoding (same outputs; the acceptance rate is printed at shutdown)")
  p.add_argument("--layers", choices=("per-layer", "stacked"), default="per-layer",
                 help="per-layer: each layer its own parameters (faster decode steps: an H200 step at 128K x 64 "
                      "took 16.0 ms vs 20.2 ms stacked); stacked: layers of a kind scanned over stacked "
                      "parameters (compiles faster, ~4x for a 43-layer model on CPU: better for short runs)")
  p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
  import signal
  from dsv4_jax.serve.backend import make_backend
  from dsv4_jax.serve.engine import Engine
  from dsv4_jax.serve.server import Server
  import logging
  model, tok = _load_for_serving("serve", args.checkpoint, args.dtype, args.layers)
  request_log = logging.getLogger("dsv4_jax.serve.server")  # one line per request (log_requests below)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  request_log.addHandler(handler)
  request_log.setLevel(logging.INFO)
  max_len = args.max_len or min(8192, model.cfg.max_position_embeddings)
  name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
  try:
    backend = _serving_backend(model, args.slots, max_len, args.backend, args.speculative)
    server = Server(Engine(backend, tok), tok, name, args.host, args.port, default_mode=args.mode,
                    log_requests=True)
  except (ValueError, NotImplementedError, OSError) as e:
    raise SystemExit(f"dsv4 serve: error: {e}") from None

  def stop(signum, frame):
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, stop)
  print(f"dsv4 serve: model {name!r} on {server.url} ({args.slots} slots, max_len {max_len}, "
        f"{type(backend).__name__})", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  if args.speculative:
    print(f"dsv4 serve: {backend.stats.summary()}", flush=True)
  print("dsv4 serve: stopped", flush=True)
  return 0


# ----- entry point ---------------------------------------------------------------------------------------
# Each entry adds one subparser and sets `func` (args -> exit code); append new subcommands here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_train, _add_generate,
                                                                    _add_serve]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in JAX")
  sub = parser.add_subparsers(dest="command", required=True)
  for add in SUBCOMMANDS:
    add(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if getattr(args, "takes_flags", False):
    args.flags = extra  # absl-style flags, parsed by the subcommand
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
