"""Where a decode step's device time goes, per model component (attention, indexer, compressors, cache, MoE, mHC, head).

  python experiments/profile_decode.py                             # the H200 run: 128K context, batch 64
  JAX_PLATFORMS=cpu python experiments/profile_decode.py --small   # tiny shapes: checks the script on a CPU

The model, the synthetic cache and the step are bench_serve's (`bench_config`, `fill_synthetic`, the serving
step `make_decode` over `model.decode`, timed by `time_decode`). After compile and warm-up, `--profile-steps`
steps (each synced, as bench_serve times them) run under `jax.profiler`; the trace (plugins/profile/<run>/
*.trace.json.gz, or the .xplane.pb through `jax.profiler.ProfileData` when no JSON was written) gives every
device op's start and duration with its HLO instruction name (`hlo_op`).

Attribution: the compiled step's HLO text (`compiled.as_text()`) gives each instruction's metadata: `op_name`
(coarse here: jit(body)/while/body/...) and `stack_frame_id`, an index into the module's stack-frame table
(FileNames / FunctionNames / FileLocations / StackFrames at the top of the text), i.e. the Python call stack
(function, file, line) that emitted the op. `model_component` maps that stack to a component by the functions
on it (Attention.attend -> attention core, index_scores -> indexer scores, write_entries -> page write, Router
-> MoE router, ...). A fusion takes its own metadata (XLA gives a fusion its root's), else its fused
instructions' majority component; the top-op table also lists the other components fused into it. An op XLA
built without a precise stack (none, or only a `lax.scan(...)` call line) takes that of its nearest producer,
else consumer, that has one (marked "from a neighbour"); copies and loop control without a stack go by opcode.
The op_names alone are too coarse, but the stacks separate every component: no jax.named_scope was added.

Which trace events are kernels: on a GPU/TPU the device process (/device:GPU:0) has one thread per stream
("Stream #N(...)": raw kernels and copies, name = kernel, args hlo_op / hlo_module) and derived lines
("XLA Ops", "XLA Modules", framework scopes) that repeat them: only the stream threads are summed (the
"XLA Ops" line if no stream thread has op events). On the CPU the ops run as host thunks on several
threads (events whose args carry hlo_op, plus "end: ..." markers that are skipped), partly in parallel: there
the kernel sum can exceed the busy time (union of intervals). Events are kept when their hlo_module is the
step's module. Command buffers (CUDA graphs) are switched off for the whole run (XLA_FLAGS
--xla_gpu_enable_command_buffer=, unless XLA_FLAGS already sets it): a graph shows in the trace as one
`command_buffer_N` event named after its first kernel, which hides what ran inside it (`--command-buffers`
keeps XLA's default, the way bench_serve and the engine run: for the host-side table and the gaps). On the
H200 the step's wall time is the same either way (20.19 ms with graphs, 20.32 ms without, 128K x 64,
2026-11-29).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import gzip
import json
import linecache
import os
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if ("xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", "")  # before jax starts (docstring)
    and "--command-buffers" not in sys.argv[1:]):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_serve import bench_config, fill_synthetic, log, served_moe_impl, step_moe_path, time_decode  # noqa: E402
from reporting import without_options  # noqa: E402


# ----- HLO text: instructions, their metadata and the stack-frame table ----------------------------------
@dataclasses.dataclass(frozen=True)
class Frame:
  func: str
  file: str
  line: int

  def text(self) -> str:
    return linecache.getline(self.file, self.line).strip() if self.file else ""


@dataclasses.dataclass
class HloOp:
  name: str
  opcode: str
  computation: str
  op_name: str = ""
  frame_id: int | None = None
  calls: tuple = ()
  fusion_kind: str = ""
  target: str = ""  # custom_call_target
  operands: tuple = ()
  backend_kind: str = ""  # a custom fusion's backend ("__triton_gemm", ...)
  source: tuple | None = None  # (file, line) of older metadata without stack frames


@dataclasses.dataclass
class HloModule:
  name: str
  ops: dict  # instruction name -> HloOp
  computations: dict  # computation name -> [instruction names]
  roots: dict  # computation name -> root instruction name
  frames: dict  # stack frame id -> (Frame, parent id or None)
  users: dict = dataclasses.field(default_factory=dict)  # instruction name -> [names of its users]

  def stack(self, op: HloOp) -> list[Frame]:
    """Python frames of op, innermost first ([] if it has none)."""
    if op.frame_id is None:
      if op.source:
        return [Frame(_enclosing_function(*op.source), op.source[0], op.source[1])]
      return []
    out, seen, fid = [], set(), op.frame_id
    while fid is not None and fid in self.frames and fid not in seen:
      seen.add(fid)
      frame, fid = self.frames[fid]
      out.append(frame)
    return out


_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE_RE = re.compile(r"(?:^|[\s)}\]])([a-z][a-z0-9_\-]*)\(")
_KV_RE = re.compile(r"(\w+)=(\"(?:[^\"\\]|\\.)*\"|\d+)")


def parse_hlo(text: str) -> HloModule:
  """Instructions (name, opcode, metadata, called computations) and stack frames of an HLO module's text."""
  name, section = "", None
  tables = {s: {} for s in _SECTIONS}
  ops, comps, roots, comp = {}, {}, {}, None
  for line in text.splitlines():
    if line.startswith("HloModule "):
      name = line.split()[1].rstrip(",")
      continue
    s = line.strip()
    if s in _SECTIONS:
      section = s
      continue
    if section:
      m = re.match(r"^(\d+)\s+(.*)$", s)
      if m:
        tables[section][int(m.group(1))] = m.group(2)
        continue
      section = None
    m = _COMP_RE.match(line)
    if m and comp is None:
      comp = m.group(2)
      comps[comp] = []
      continue
    if s == "}" and comp is not None:
      comp = None
      continue
    m = _INSTR_RE.match(line)
    if comp is None or not m:
      continue
    is_root, iname, rest = m.groups()
    om = _OPCODE_RE.search(rest)
    op = HloOp(iname, om.group(1) if om else "?", comp)
    if om:
      op.operands = tuple(re.findall(r"%([\w.\-]+)", _balanced(rest, om.end() - 1)))
    md = re.search(r"metadata=\{(.*?)\}(?:,|\s*$)", rest)
    if md:
      kv = dict(_KV_RE.findall(md.group(1)))
      op.op_name = kv.get("op_name", '""')[1:-1]
      if "stack_frame_id" in kv:
        op.frame_id = int(kv["stack_frame_id"])
      elif "source_file" in kv and "source_line" in kv:
        op.source = (kv["source_file"][1:-1], int(kv["source_line"]))
    cm = re.search(r"calls=\{?([^},]+(?:,\s*%[\w.\-]+)*)\}?", rest)
    if cm:
      op.calls = tuple(c.strip().lstrip("%") for c in cm.group(1).split(","))
    km = re.search(r"kind=(k\w+)", rest)
    op.fusion_kind = km.group(1) if km else ""
    bm = re.search(r'"kind":"([^"]+)"', rest)
    op.backend_kind = bm.group(1) if bm else ""
    tm = re.search(r'custom_call_target="([^"]*)"', rest)
    op.target = tm.group(1) if tm else ""
    ops[iname] = op
    comps[comp].append(iname)
    if is_root:
      roots[comp] = iname
  users = collections.defaultdict(list)
  for op in ops.values():
    for o in op.operands:
      users[o].append(op.name)
  return HloModule(name, ops, comps, roots, _frames(tables), dict(users))


def _balanced(text: str, start: int) -> str:
  """text[start:end] where text[start] == '(' and end is just past its matching ')'."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return text[start:i + 1]
  return text[start:]


def _frames(tables) -> dict:
  """stack frame id -> (Frame, parent id or None). The printed parent_frame_id is the parent's id + 1 in the
  XLA versions seen so far (the outermost frame shows itself as its parent); detected, not assumed."""
  val = lambda s: s[1:-1] if s.startswith('"') else s
  files = {k: val(v) for k, v in tables["FileNames"].items()}
  funcs = {k: val(v) for k, v in tables["FunctionNames"].items()}
  locs = {}
  for k, v in tables["FileLocations"].items():
    kv = {a: int(b) for a, b in _KV_RE.findall(v) if b.isdigit()}
    locs[k] = Frame(funcs.get(kv.get("function_name_id"), "?"), files.get(kv.get("file_name_id"), ""),
                    kv.get("line", 0))
  raw = {}
  for k, v in tables["StackFrames"].items():
    kv = {a: int(b) for a, b in _KV_RE.findall(v) if b.isdigit()}
    raw[k] = (kv.get("file_location_id"), kv.get("parent_frame_id", 0))
  shift = 1 if any(p == k for k, (_, p) in raw.items()) else 0
  out = {}
  for k, (loc, parent) in raw.items():
    p = parent - shift
    out[k] = (locs.get(loc, Frame("?", "", 0)), p if p > 0 and p != k else None)
  return out


def _enclosing_function(path: str, line: int) -> str:
  """Name of the innermost def around `line` of a source file (for metadata with only source_file/line)."""
  import ast
  try:
    with open(path) as f:
      tree = ast.parse(f.read())
  except (OSError, SyntaxError, ValueError):
    return "?"
  best, best_span = "?", None

  def visit(node, prefix):
    nonlocal best, best_span
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        qual = f"{prefix}{child.name}"
        if child.lineno <= line <= (child.end_lineno or child.lineno) and not isinstance(child, ast.ClassDef):
          span = (child.end_lineno or child.lineno) - child.lineno
          if best_span is None or span <= best_span:
            best, best_span = qual, span
        visit(child, qual + ("." if isinstance(child, ast.ClassDef) else ".<locals>."))
      else:
        visit(child, prefix)

  visit(tree, "")
  return best


# ----- components ----------------------------------------------------------------------------------------
def _has(funcs, *prefixes) -> bool:
  return any(f == p or f.startswith(p) for f in funcs for p in prefixes)


def model_component(frames: list[Frame], op: HloOp) -> str | None:
  """The model component a stack (innermost first) belongs to; None when no rule matches."""
  fn = [f.func for f in frames]
  files = [f.file for f in frames]
  if any("serve/sampling" in p for p in files):
    return "sampling"
  if _has(fn, "Attention.attend", "sparse_attention", "_attend_chunk"):
    return "attention: core (sparse attention)"
  if _has(fn, "top_visible"):
    return "indexer: top-k"
  if _has(fn, "paged_index_scores_gpu"):
    return "indexer: scores (paged FP4 kernel)"
  if _has(fn, "gather_keys"):
    return "cache: dequant (unpack entries/keys)"
  if _has(fn, "indexer_topk", "select_topk", "index_scores", "paged_index_scores", "read_index_scores"):
    if "index_scores" in fn or any("index_scores" in f.text() for f in frames if f.func.startswith("indexer_topk")):
      return "indexer: scores (q·k, relu, head weights)"
    return "indexer: top-k"
  if _has(fn, "unpack_entries", "unpack_keys"):
    return "cache: dequant (unpack entries/keys)"
  if _has(fn, "pack_entries", "pack_keys"):
    return "cache: quantize (pack entries/keys)"
  if _has(fn, "write_entries"):
    return "cache: page write (scatter)"
  if _has(fn, "read_all", "read_entries", "_locate"):
    return "cache: page read (gather)"
  if _has(fn, "Compressor."):
    return "indexer: key compressor" if "_index_step" in fn else "compressor (KV entries)"
  if _has(fn, "Indexer."):
    return "indexer: queries + head weights"
  if _has(fn, "_index_step"):
    return "indexer: other"
  if _has(fn, "Attention.queries", "Attention.window_kv", "Attention.output"):
    return "attention: q / kv / out projections (+norm, rope)"
  if _has(fn, "attention_step"):
    return "attention: window ring + key/index assembly"
  if _has(fn, "Router."):
    return "MoE: router"
  if _has(fn, "RoutedExperts."):
    return "MoE: routed experts"
  if _has(fn, "SharedExpert."):
    return "MoE: shared expert"
  if _has(fn, "MoE."):
    return "MoE: dispatch / combine"
  if _has(fn, "HyperConnection.", "sinkhorn", "_mixes"):
    return "mHC (pre / post / sinkhorn)"
  if _has(fn, "DeepSeekV4.logits"):
    return "head: logits matmul"
  if _has(fn, "HyperHead."):
    return "head: hc head + final norm"
  if _has(fn, "RMSNorm.", "rms_normalize"):
    outer = [f for f in fn if not f.startswith(("RMSNorm.", "rms_normalize"))]
    return "head: hc head + final norm" if outer[:1] == ["cached_forward"] else "norms (attn / ffn pre-norm)"
  if fn[0] == "stack_step":  # the layer scan's own line: its while loop, ops XLA made from the loop
    return "control flow / loop (no source)" if op.opcode in _CONTROL else "layer scan (loop-level ops)"
  if _has(fn, "stack_step"):
    return "cache: per-layer state slice / update (scan)"
  if _has(fn, "_open_step", "_close_step", "make_step_context", "allocate_pages", "_ring_landing"):
    return "step setup / close (pages, positions, rope tables)"
  if _has(fn, "cached_forward"):
    return "embedding + other (cached_forward)"
  return None


_CONTROL = {"while", "conditional", "call", "tuple", "get-tuple-element", "parameter", "constant", "bitcast",
            "after-all", "partition-id", "replica-id"}


def no_source_component(op: HloOp) -> str:
  if op.opcode.startswith("copy"):
    return "XLA copies (no source: loop carries, layout)"
  if op.opcode in _CONTROL or op.opcode == "compare":
    return "control flow / loop (no source)"
  return f"unattributed ({op.opcode})"


_LOOP_CALL = re.compile(r"\b(scan|while_loop|fori_loop|map|cond|switch)\(")


def _own_stack(module: HloModule, op: HloOp, rules=None) -> list[Frame]:
  """op's frames; for a fusion without metadata of its own, those of its fused instructions' majority
  component (by `rules`; without rules, its root's), else of its first fused instruction that has some."""
  frames = module.stack(op)
  for comp in op.calls if not frames and op.opcode == "fusion" else ():
    names = module.computations.get(comp, [])
    if rules is not None:
      votes, first = collections.Counter(), {}
      for n in names:
        fr = module.stack(module.ops[n])
        if fr and module.ops[n].opcode not in _CONTROL and not _LOOP_CALL.search(fr[0].text()):
          c = rules(fr, module.ops[n]) or fr[0].func
          votes[c] += 1
          first.setdefault(c, fr)
      if votes:
        return first[votes.most_common(1)[0][0]]
    root = module.ops.get(module.roots.get(comp, ""))
    frames = module.stack(root) if root else []
    for name in names if not frames else ():
      frames = module.stack(module.ops[name])
      if frames:
        break
  return frames


def op_stack(module: HloModule, op: HloOp, rules=None) -> tuple[list[Frame], bool]:
  """(the frames that stand for op, whether they were inferred).

  An op XLA built without a precise source (no metadata, or only the `lax.scan(...)` call line, as for ops
  hoisted out of or rewritten inside a loop) takes the stack of the nearest producer (through up to 3
  operand hops), else consumer, that has a precise one. Copies and loop control are left alone (they go by
  opcode).
  """
  frames = _own_stack(module, op, rules)
  precise = lambda fr: bool(fr) and not _LOOP_CALL.search(fr[0].text())
  if precise(frames) or op.opcode in _CONTROL or op.opcode.startswith("copy"):
    return frames, False
  for neighbours in (lambda n: module.ops[n].operands, lambda n: module.users.get(n, ())):
    seen, layer = {op.name}, [op.name]
    for _ in range(3):
      nxt = []
      for n in layer:
        for m in neighbours(n):
          if m in seen or m not in module.ops:
            continue
          seen.add(m)
          nxt.append(m)
          if module.ops[m].opcode not in ("parameter", "constant", "tuple", "get-tuple-element", "while"):
            fr = _own_stack(module, module.ops[m], rules)
            if precise(fr):
              return fr, True
      layer = nxt
  return frames, False


def classify(module: HloModule, name: str, rules=model_component) -> str:
  """Component of HLO instruction `name` (rules(frames, op) -> str | None; unmatched stacks go by function)."""
  op = module.ops.get(name)
  if op is None:
    return "unmapped (not in the compiled module)"
  frames, _ = op_stack(module, op, rules)
  if not frames:
    return no_source_component(op)
  return rules(frames, op) or f"other: {frames[0].func}"


def fused_mix(module: HloModule, name: str, rules=model_component) -> collections.Counter:
  """Components of the instructions fused into `name` (by count of instructions with a stack)."""
  op, mix = module.ops.get(name), collections.Counter()
  for comp in op.calls if op is not None and op.opcode == "fusion" else ():
    for n in module.computations.get(comp, []):
      inner = module.ops[n]
      frames = module.stack(inner)
      if frames and inner.opcode not in _CONTROL and not _LOOP_CALL.search(frames[0].text()):
        mix[rules(frames, inner) or f"other: {frames[0].func}"] += 1
  return mix


def component_group(component: str) -> str:
  """'MoE: router' -> 'MoE', 'compressor (KV entries)' -> 'compressor', 'XLA copies (...)' -> 'XLA copies'."""
  return component.split("(")[0].split(":")[0].strip() or component


def op_kind(op: HloOp | None) -> str:
  if op is None:
    return "?"
  if op.opcode == "fusion":
    return f"fusion ({op.fusion_kind[1:].lower() or '?'}{' ' + op.backend_kind if op.backend_kind else ''})"
  if op.opcode == "custom-call":
    return f"custom-call {op.target}"
  return op.opcode


# ----- the trace -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Event:
  process: str
  thread: str
  name: str
  ts: float  # µs
  dur: float  # µs
  args: dict
  self_us: float | None = None  # dur less the events nested in it on its thread (set by kernel_events)


def find_trace(log_dir: str) -> str:
  """The newest *.trace.json.gz under log_dir (else the newest *.xplane.pb)."""
  for pattern in ("*.trace.json.gz", "*.xplane.pb"):
    found = sorted(glob.glob(os.path.join(log_dir, "**", pattern), recursive=True), key=os.path.getmtime)
    if found:
      return found[-1]
  raise FileNotFoundError(f"no *.trace.json.gz or *.xplane.pb under {log_dir}")


def load_events(path: str) -> list[Event]:
  """Complete events of a profiler trace (Chrome-trace JSON, gzipped or not, or an XSpace .xplane.pb)."""
  if path.endswith(".pb"):
    from jax.profiler import ProfileData
    out = []
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for e in line.events:
          out.append(Event(plane.name, line.name, e.name, e.start_ns / 1e3, e.duration_ns / 1e3,
                           {k: v for k, v in e.stats}))
    return out
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  raw = data["traceEvents"] if isinstance(data, dict) else data
  procs, threads = {}, {}
  for e in raw:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  out = []
  for e in raw:
    if e.get("ph") == "X" and "ts" in e:
      pid, tid = e.get("pid"), e.get("tid")
      out.append(Event(procs.get(pid, str(pid)), threads.get((pid, tid), str(tid)), str(e.get("name", "")),
                       float(e["ts"]), float(e.get("dur", 0.0)), e.get("args") or {}))
  return out


_HLO_OP_IN_TEXT = re.compile(r"hlo_op=([\w.\-]+)")


def event_hlo_op(e: Event) -> str | None:
  """The HLO instruction an event ran: args hlo_op, else 'hlo_op=' inside a string arg, else long_name's
  first token ('%fusion.3 = ...'); None when none."""
  a = e.args
  if a.get("hlo_op"):
    return str(a["hlo_op"])
  for v in a.values():
    m = _HLO_OP_IN_TEXT.search(v) if isinstance(v, str) else None
    if m:
      return m.group(1)
  if isinstance(a.get("long_name"), str) and a["long_name"].strip():
    return a["long_name"].split()[0].lstrip("%")
  if e.thread.strip().lower() == "xla ops" and e.name:
    return e.name  # the derived op line names its events after the op
  return None


_DERIVED_LINES = ("xla ops", "xla modules", "framework", "tensorflow", "source code", "steps", "launch stats",
                  "xla traceme", "host offload", "sparsecore", "counters")


def kernel_events(events: list[Event], module: str | None = None) -> tuple[list[Event], dict]:
  """(the op executions to sum, a description of what was found and chosen).

  Device processes (name starts with /device:) win over the host; among their threads the streams
  ("Stream #...") win, then "XLA Ops", then any other non-derived thread. On the host (CPU backend): events
  with an hlo_op. Events of other HLO modules than `module` (matched as 'jit_body' or 'jit_body(123)') dropped.
  """
  by_thread = collections.defaultdict(list)
  bare = collections.Counter()  # device stream events without an op (e.g. memcpys of loop predicates): µs
  for e in events:
    if event_hlo_op(e) is not None and not e.name.startswith("end: "):
      by_thread[(e.process, e.thread)].append(e)
    elif e.process.startswith("/device:") and "stream" in e.thread.lower():
      bare[e.name[:60]] += e.dur
  found = {f"{p} | {t}": len(v) for (p, t), v in sorted(by_thread.items())}
  device = {k: v for k, v in by_thread.items() if k[0].startswith("/device:")}
  pool = device or by_thread
  streams = {k: v for k, v in pool.items() if "stream" in k[1].lower()}
  xla_ops = {k: v for k, v in pool.items() if k[1].strip().lower() == "xla ops"}
  others = {k: v for k, v in pool.items() if not k[1].strip().lower().startswith(_DERIVED_LINES)}
  chosen = streams or (xla_ops if device else None) or others or pool
  out = []
  for v in chosen.values():
    out.extend(v)
  dropped = 0
  if module:
    keep = [e for e in out if _same_module(e.args.get("hlo_module"), module)]
    dropped = len(out) - len(keep)
    out = keep
  out.sort(key=lambda e: e.ts)
  nested = set_self_times(out)
  info = dict(threads_with_ops=found, chosen=[f"{p} | {t}" for p, t in sorted(chosen)],
              source="device streams" if device and streams else ("device XLA Ops line" if device and xla_ops and
                                                                  not streams else
                                                                  ("device" if device else "host threads")),
              other_module_events_dropped=dropped, events=len(out), nested=nested,
              stream_events_without_op_us=dict(bare.most_common(10)))
  return out, info


def set_self_times(events: list[Event], eps: float = 1e-3) -> int:
  """Sets each event's self_us: its duration less that of the events nested directly inside it on the same
  thread (the CPU backend traces a while/call op around its body's ops; GPU kernels do not nest). Returns
  how many events were nested in another."""
  nested = 0
  by_thread = collections.defaultdict(list)
  for e in events:
    e.self_us = e.dur
    by_thread[(e.process, e.thread)].append(e)
  for evs in by_thread.values():
    stack = []
    for e in sorted(evs, key=lambda e: (e.ts, -e.dur)):
      while stack and e.ts >= stack[-1].ts + stack[-1].dur - eps:
        stack.pop()
      if stack and e.ts + e.dur <= stack[-1].ts + stack[-1].dur + eps:
        stack[-1].self_us -= e.dur
        nested += 1
      stack.append(e)
  for e in events:
    e.self_us = max(e.self_us, 0.0)
  return nested


def _same_module(arg, module: str) -> bool:
  if arg is None:
    return True  # no module recorded on the event: keep (the op name is checked against the module later)
  a = str(arg)
  return a == module or a.startswith(module + "(") or a.split("(")[0] == module


def busy_us(events: list[Event]) -> float:
  """Length of the union of the events' [ts, ts + dur) intervals."""
  total, end = 0.0, -float("inf")
  for e in sorted(events, key=lambda e: e.ts):
    lo, hi = max(e.ts, end), e.ts + e.dur
    if hi > lo:
      total += hi - lo
    end = max(end, hi)
  return total


def host_summary(events: list[Event], steps: int, top: int = 20) -> list[dict]:
  """Host-side events (processes other than /device:*): per name, inclusive µs and calls per step, the `top`
  largest; nested events (a launch inside an execute) each count their own full duration."""
  agg = collections.defaultdict(lambda: [0.0, 0, collections.Counter()])
  for e in events:
    if e.process.startswith("/device:") or e.dur <= 0:
      continue
    rec = agg[e.name[:90]]
    rec[0] += e.dur
    rec[1] += 1
    rec[2][e.thread[:40]] += 1
  rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
  return [dict(name=n, us=v[0] / steps, calls=v[1] / steps, thread=v[2].most_common(1)[0][0]) for n, v in rows]


def split_steps(events: list[Event], steps: int) -> list[list[Event]]:
  """Events cut into `steps` groups at the steps - 1 widest idle gaps (the steps were synced one by one)."""
  ev = sorted(events, key=lambda e: e.ts)
  if steps <= 1 or len(ev) < steps:
    return [ev]
  gaps, end = [], ev[0].ts + ev[0].dur
  for i in range(1, len(ev)):
    gaps.append((ev[i].ts - end, i))
    end = max(end, ev[i].ts + ev[i].dur)
  cuts = sorted(i for _, i in sorted(gaps, reverse=True)[:steps - 1])
  return [ev[a:b] for a, b in zip([0] + cuts, cuts + [len(ev)])]


# ----- attribution ---------------------------------------------------------------------------------------
def attribute(events: list[Event], module: HloModule, steps: int, rules=model_component, top: int = 25) -> dict:
  """Per component and per HLO op: µs per step and kernels per step; plus busy / span figures."""
  per_op = collections.defaultdict(lambda: [0.0, 0, ""])  # op -> [µs, count, a kernel name]
  for e in events:
    raw = (event_hlo_op(e) or "?").strip() or "?"
    name = raw.lstrip("%").split()[0]
    if name not in module.ops and ":" in name:  # e.g. 'fusion.3:kernel_name'
      name = name.split(":")[0]
    rec = per_op[name]
    rec[0] += e.dur if e.self_us is None else e.self_us
    rec[1] += 1
    rec[2] = rec[2] or e.name
  comps = collections.defaultdict(lambda: [0.0, 0, 0])  # component -> [µs, kernels, distinct ops]
  ops = []
  for name, (us, n, kernel) in per_op.items():
    comp = classify(module, name, rules)
    c = comps[comp]
    c[0] += us
    c[1] += n
    c[2] += 1
    op = module.ops.get(name)
    frames, inferred = op_stack(module, op, rules) if op else ([], False)
    ops.append(dict(op=name, component=comp, us=us / steps, kernels=n / steps, kind=op_kind(op),
                    kernel=kernel, op_name=op.op_name if op else "",
                    source=("(from a neighbour) " if inferred else "")
                    + " < ".join(f"{f.func}:{f.line}" for f in frames[:4]),
                    fused=dict(fused_mix(module, name, rules).most_common(4))))
  ops.sort(key=lambda o: -o["us"])
  total = sum(c[0] for c in comps.values())
  components = [dict(component=k, us=v[0] / steps, pct=100 * v[0] / total if total else 0.0,
                     kernels=v[1] / steps, ops=v[2]) for k, v in comps.items()]
  components.sort(key=lambda c: -c["us"])
  groups_us = collections.defaultdict(float)
  for c in components:
    groups_us[component_group(c["component"])] += c["us"]
  kinds = collections.defaultdict(lambda: [0.0, 0.0])
  for o in ops:
    kinds[o["kind"]][0] += o["us"]
    kinds[o["kind"]][1] += o["kernels"]
  groups = split_steps(events, steps)
  spans = [max(e.ts + e.dur for e in g) - g[0].ts for g in groups if g] if len(groups) == steps else []
  counts = [len(g) for g in groups]
  return dict(
      steps=steps, kernel_us=total / steps, kernels=len(events) / steps, busy_us=busy_us(events) / steps,
      span_us=statistics.median(spans) if spans else None, step_kernel_counts=counts,
      split_ok=len(groups) == steps and max(counts) - min(counts) <= max(2, 0.02 * max(counts)),
      components=components, groups=sorted(groups_us.items(), key=lambda kv: -kv[1]), top=ops[:top],
      ops=len(ops),
      kinds=sorted(([k, v[0], v[1]] for k, v in kinds.items()), key=lambda r: -r[1]),
      unmapped=sum(1 for o in ops if o["component"].startswith("unmapped")))


# ----- the step ------------------------------------------------------------------------------------------
def jitted_step(decode):
  """(the jax.jit object, the params) inside dsv4_jax.serve.steps.make_decode's closure (no mesh), to read the
  compiled module's text; None when the closure is not laid out so."""
  def cells(fn):
    code = getattr(fn, "__code__", None)
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ()))) if code else {}

  for fn in cells(decode).values():
    inner = cells(fn) if callable(fn) else {}
    if hasattr(inner.get("step"), "lower") and "params" in inner:  # params: the flat list of arrays
      return inner["step"], inner["params"]
  return None


def write_report(path: str, r: dict) -> str:
  a, ms = r["attribution"], lambda us: f"{us / 1e3:.3f}"
  wall = r["wall"]
  lines = [f"# Decode step profile ({r['date']})", "",
           f"Machine: {r['device']}; jax {r['jax']}, jaxlib {r['jaxlib']}, flax {r['flax']}; Python {r['python']}.",
           "",
           f"Model: `experiments/bench_serve.py:bench_config` ({r['model']}), {r['params'] / 1e9:.3f}B parameters; "
           f"KV cache `{r['fmt']}`; attention `{r['attention_impl']}`; synthetic cache (`fill_synthetic`) at "
           f"context {r['context']:,}, batch {r['batch']}; the serving step `make_decode` (max_context "
           f"{r['max_context']:,})" + (f"; routed experts `{r['moe']}`" if r.get("moe") else "") + ".", "",
           f"Wall time per step, measured the bench_serve way (`time_decode`: median of {r['steps']} synced steps "
           f"after {r['warmup']} warm-up; back-to-back = mean of {r['steps']} unsynced): **{ms(wall['step_us'])} "
           f"ms** (back-to-back {ms(wall['pipelined_us'])} ms; compile + first step {wall['first_s']:.1f} s).", "",
           f"Profiled: {a['steps']} synced steps under `jax.profiler` (host wall per profiled step, median: "
           f"{ms(r['profiled_step_us'])} ms). Kernels from: {a['source']} ({', '.join(a['chosen'])}).", "",
           "| per step | ms | of wall |", "|---|---|---|",
           f"| wall (unprofiled, synced) | {ms(wall['step_us'])} | 100% |",
           f"| wall while profiled (host, synced) | {ms(r['profiled_step_us'])} | "
           f"{100 * r['profiled_step_us'] / wall['step_us']:.0f}% |",
           f"| sum of kernel times | {ms(a['kernel_us'])} | {100 * a['kernel_us'] / wall['step_us']:.0f}% |",
           f"| device busy (union of kernel intervals) | {ms(a['busy_us'])} | "
           f"{100 * a['busy_us'] / wall['step_us']:.0f}% |"]
  if a["span_us"] is not None:
    lines.append(f"| device span (first kernel start to last end, median step) | {ms(a['span_us'])} | "
                 f"{100 * a['span_us'] / wall['step_us']:.0f}% |")
  lines += ["", f"Gaps: span − busy = idle inside the step (launch latency, host syncs such as while-loop "
                f"predicates); wall − span = dispatch + sync around it. {a['kernels']:.0f} kernels per step from "
                f"{a['ops']} HLO ops" + ("" if a["split_ok"] else f" (step split by gaps uneven: "
                                         f"{a['step_kernel_counts']}, span unreliable)") + ".", "",
            ]
  bare = r.get("trace_info", {}).get("stream_events_without_op_us") or {}
  if bare:
    lines += [f"Device stream events without an hlo_op (not in the sums): {sum(bare.values()) / a['steps'] / 1e3:.3f} "
              f"ms / step ({', '.join(list(bare)[:4])}).", ""]
  lines += ["## Per component (device time per step)", "",
            "| component | ms / step | % of kernel time | % of wall | kernels / step | HLO ops |",
            "|---|---|---|---|---|---|"]
  for c in a["components"]:
    lines.append(f"| {c['component']} | {ms(c['us'])} | {c['pct']:.1f}% | {100 * c['us'] / wall['step_us']:.1f}% "
                 f"| {c['kernels']:.0f} | {c['ops']} |")
  lines.append(f"| **total** | **{ms(a['kernel_us'])}** | 100% | {100 * a['kernel_us'] / wall['step_us']:.1f}% "
               f"| {a['kernels']:.0f} | {a['ops']} |")
  lines += ["", "By group: " + "; ".join(f"{g} {ms(us)} ms ({100 * us / wall['step_us']:.0f}% of wall)"
                                       for g, us in a["groups"]) + ".",
            "", f"## Top {len(a['top'])} HLO ops by time", "",
            "| # | HLO op | kind | ms / step | runs / step | component | also fused in | "
            "Python stack (innermost first) | op_name |",
            "|---|---|---|---|---|---|---|---|---|"]
  for i, o in enumerate(a["top"], 1):
    fused = ", ".join(f"{k} ×{v}" for k, v in o["fused"].items() if k != o["component"])
    kind = o["kind"] + (f" `{o['kernel'][:48]}`" if o["kernel"] and o["kernel"] != o["op"] else "")
    lines.append(f"| {i} | `{o['op']}` | {kind} | {ms(o['us'])} | {o['kernels']:.0f} | {o['component']} | "
                 f"{fused} | {o['source']} | `{o['op_name'][-90:]}` |")
  lines += ["", "## By op kind", "", "| kind | ms / step | kernels / step |", "|---|---|---|"]
  for k, us, n in a["kinds"][:15]:
    lines.append(f"| {k} | {ms(us)} | {n:.0f} |")
  if r.get("host"):
    lines += ["", f"## Host side (inclusive time per step, top {len(r['host'])})", "",
              "Events of the host threads while profiled (XLA/PjRt TraceMe scopes, CUDA driver calls); a scope "
              "includes the calls made inside it.", "", "| host event | ms / step | calls / step | thread |",
              "|---|---|---|---|"]
    for h in r["host"]:
      lines.append(f"| `{h['name']}` | {ms(h['us'])} | {h['calls']:.1f} | {h['thread']} |")
  lines += ["", "Attribution: each kernel's HLO instruction (trace arg `hlo_op`) → its Python stack in the compiled "
                "module's stack-frame table → a component by the functions on the stack "
                "(`experiments/profile_decode.py:model_component`); a fusion by its own (root's) metadata, other "
                "components fused into it listed beside it.", "",
            f"Reproduce: `{r['command']}`.", ""]
  if r.get("notes"):
    lines += ["Notes: " + " ".join(r["notes"]), ""]
  text = "\n".join(lines)
  with open(path, "w") as f:
    f.write(text)
  return text


# ----- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true", help="tiny shapes (bench_serve --small's model): a CPU check")
  ap.add_argument("--context", type=int, default=None, help="cached tokens per slot (default 131072; small 512)")
  ap.add_argument("--batch", type=int, default=None, help="slots (default 64; small 4)")
  ap.add_argument("--experts", type=int, default=32)
  ap.add_argument("--kv-format", default="fp8")
  ap.add_argument("--attention-impl", default="reference", choices=("reference", "auto", "gpu"))
  ap.add_argument("--no-scan", action="store_true",
                  help="scan_layers=False: every layer its own parameters (no per-layer slices of stacked weights)")
  ap.add_argument("--steps", type=int, default=10, help="synced steps for the wall time (bench_serve way)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--profile-steps", type=int, default=5, help="synced steps captured by the profiler")
  ap.add_argument("--trace-dir", default=None, help="profiler log dir (default /tmp/dsv4_profile_decode)")
  ap.add_argument("--dump-hlo", default=None, help="also write the compiled step's HLO text to this file")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  ap.add_argument("--command-buffers", action="store_true",
                  help="keep XLA's CUDA graphs (read before jax starts; the default switches them off)")
  ap.add_argument("--time-budget", type=float, default=220.0,
                  help="seconds; past it after the timing phase, the profile captures one step only")
  args = ap.parse_args(argv)
  t_start = time.perf_counter()
  ctx = args.context or (512 if args.small else 131072)
  B = args.batch or (4 if args.small else 64)
  dev = jax.devices()[0]
  log(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")

  from flax import nnx

  from dsv4_jax.model.transformer import DeepSeekV4
  from dsv4_jax.serve.steps import make_decode

  cfg = bench_config(args.small, args.experts, attention_impl=args.attention_impl)
  if args.no_scan:
    cfg = cfg.replace(scan_layers=False)
  t = time.perf_counter()
  model = DeepSeekV4(cfg, rngs=nnx.Rngs(0))
  jax.block_until_ready(nnx.state(model))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  log(f"model: {params / 1e9:.3f}B params, built in {time.perf_counter() - t:.1f} s")

  needed = 1 + args.warmup + 2 * args.steps + 2 + args.profile_steps
  max_len = ctx + 256 * -(-needed // 256)
  log(f"filling a {max_len}-token cache for {B} slots at context {ctx}")
  cache = fill_synthetic(model.init_cache(B, max_len, kv_format=args.kv_format), cfg, ctx, seed=ctx + B)
  jax.block_until_ready(cache)
  decode = make_decode(model)
  log(f"compile + timing: {args.warmup} warm-up, {args.steps} synced and {args.steps} back-to-back steps")
  step_s, pipe_s, first_s, cache = time_decode(decode, cache, B, cfg.vocab_size, args.steps, args.warmup,
                                               max_context=max_len)
  log(f"  step {step_s * 1e3:.3f} ms (back-to-back {pipe_s * 1e3:.3f} ms), compile + first {first_s:.1f} s")

  tokens = jnp.asarray(np.random.default_rng(B).integers(2, cfg.vocab_size, (B, 1)), jnp.int32)
  found = jitted_step(decode)
  if found is None:
    raise RuntimeError("could not find the jitted step inside make_decode's closure (dsv4_jax.serve.steps "
                       "changed?): the compiled module's text is needed for the attribution")
  step, step_params = found
  t = time.perf_counter()
  hlo_text = step.lower(step_params, cache, tokens, None, None, max_context=max_len).compile().as_text()
  module = parse_hlo(hlo_text)
  if args.dump_hlo:
    with open(args.dump_hlo, "w") as f:
      f.write(hlo_text)
  with_frames = sum(1 for o in module.ops.values() if o.frame_id is not None or o.source)
  log(f"compiled module {module.name}: {len(module.ops)} instructions ({with_frames} with a Python stack), "
      f"{len(module.frames)} stack frames, text {len(hlo_text) / 1e6:.1f} MB ({time.perf_counter() - t:.1f} s)")

  n_prof = args.profile_steps
  if time.perf_counter() - t_start > args.time_budget:
    n_prof = 1
    log(f"past the {args.time_budget:.0f} s budget: profiling 1 step only")
  trace_dir = args.trace_dir or os.path.join("/tmp", "dsv4_profile_decode")
  run_dir = os.path.join(trace_dir, time.strftime("%Y%m%d-%H%M%S"))
  for _ in range(2):
    logits, cache = decode(tokens, cache, max_context=max_len)
  jax.block_until_ready((logits, cache.lengths))
  log(f"profiling {n_prof} synced steps into {run_dir}")
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  walls = []
  jax.profiler.start_trace(run_dir, profiler_options=options)
  try:
    for _ in range(n_prof):
      t = time.perf_counter()
      logits, cache = decode(tokens, cache, max_context=max_len)
      jax.block_until_ready((logits, cache.lengths))
      walls.append(time.perf_counter() - t)
  finally:
    jax.profiler.stop_trace()
  if not bool(jnp.all(jnp.isfinite(logits))) or bool(cache.overflow):
    raise RuntimeError("decode produced non-finite logits or overflowed the cache")
  path = find_trace(run_dir)
  t = time.perf_counter()
  events = load_events(path)
  kernels, info = kernel_events(events, module.name)
  log(f"trace {os.path.relpath(path, run_dir)}: {len(events)} complete events, read in "
      f"{time.perf_counter() - t:.1f} s")
  for k, n in info["threads_with_ops"].items():
    log(f"  events with an hlo_op on {k}: {n}")
  if info["stream_events_without_op_us"]:
    log(f"  stream events without an hlo_op (not summed), µs over all steps: "
        f"{info['stream_events_without_op_us']}")
  log(f"  summing {info['source']}: {', '.join(info['chosen'])}; {info['events']} events of {module.name} "
      f"({info['other_module_events_dropped']} of other modules dropped)")
  if dev.platform != "cpu" and not info["source"].startswith("device"):
    log("  WARNING: no op events on a /device: process (is CUPTI / the device tracer available?): the sums "
        "below are host-side events, not kernel times")
  if not kernels:
    raise RuntimeError(f"no op events of module {module.name} in {path}; threads with ops: "
                       f"{info['threads_with_ops']}")
  a = attribute(kernels, module, n_prof)
  a.update(source=info["source"], chosen=info["chosen"])
  if not with_frames:
    log("  WARNING: no instruction of the compiled module has a Python stack (stack_frame_id or source_file): "
        "components fall back to opcodes")
  if a["unmapped"]:
    log(f"  WARNING: {a['unmapped']} traced op names are not instructions of the compiled module")

  notes = []
  if dev.platform == "cpu":
    notes.append("CPU backend: ops run as host thunks on several threads, partly in parallel, so the kernel "
                 "sum can exceed busy time and wall; shapes are tiny, so this only checks the tooling.")
  if dev.platform == "gpu" and args.command_buffers:
    notes.append("Command buffers on (`--command-buffers`): a CUDA graph's kernels may show as one event, so "
                 "per-component times are coarse; the gaps and the host table are what this run is for.")
  if dev.platform == "gpu":
    notes.append("While profiling, XLA runs command buffers (CUDA graphs) op by op, so profiled steps can be "
                 "slower than the unprofiled wall time.")
  r = dict(date=datetime.date.today().isoformat(),
           device=f"{jax.device_count()} × {dev.device_kind}" + (" (CPU)" if dev.platform == "cpu" else ""),
           jax=jax.__version__, jaxlib=__import__("jaxlib").__version__, flax=__import__("flax").__version__,
           python=platform.python_version(), params=params, fmt=args.kv_format, attention_impl=args.attention_impl,
           model=("tiny: d 64, 4 layers" if args.small else
                  f"d {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts"),
           context=ctx, batch=B, max_context=max_len, steps=args.steps, warmup=args.warmup,
           moe=f"{served_moe_impl(model)} ({step_moe_path(served_moe_impl(model), B)} at batch {B})",
           wall=dict(step_us=step_s * 1e6, pipelined_us=pipe_s * 1e6, first_s=first_s),
           profiled_step_us=statistics.median(walls) * 1e6, trace=path, trace_info=info, attribution=a,
           host=host_summary(events, n_prof), command_buffers=args.command_buffers,
           notes=notes, command=" ".join(["python experiments/profile_decode.py"] + without_options(
               sys.argv[1:] if argv is None else argv, ("--out", "--trace-dir"))))
  os.makedirs(args.out, exist_ok=True)
  md = os.path.join(args.out, "decode_profile.md")
  text = write_report(md, r)
  with open(os.path.splitext(md)[0] + ".json", "w") as f:
    json.dump(r, f, indent=1, default=str)
  print(text, flush=True)
  log(f"wrote {md} (+ .json); total {time.perf_counter() - t_start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
