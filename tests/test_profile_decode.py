"""experiments/profile_decode.py: the HLO-text parser (stack frames, fusions), the trace reader (CPU form from a
real profile of a tiny jitted function, GPU form from a hand-written trace), the attribution, and the model's
component rules; then the whole script end to end on the tiny model."""

from __future__ import annotations

import collections
import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import profile_decode as pd  # noqa: E402

# ----- the HLO text parser on a hand-written module -------------------------------------------------------
# Printed as XLA does: a stack frame's parent_frame_id is the parent's id + 1, the outermost frame shows itself.
HLO = """HloModule jit_f, is_scheduled=true, entry_computation_layout={(f32[8,8]{1,0})->f32[8]{0}}

FileNames
1 "/src/model.py"

FunctionNames
1 "main"
2 "proj"
3 "mix"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=5}
2 {file_name_id=1 function_name_id=2 line=3 end_line=3 column=1 end_column=5}
3 {file_name_id=1 function_name_id=3 line=6 end_line=6 column=1 end_column=5}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}

%fused_computation (param_0.1: f32[8,8]) -> f32[8] {
  %param_0.1 = f32[8,8]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0.1, %constant.1), dimensions={1}, to_apply=%add, metadata={op_name="jit(f)/reduce_sum" stack_frame_id=3}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%a, %b)
}

ENTRY %main.5 (Arg_0.1: f32[8,8]) -> f32[8] {
  %Arg_0.1 = f32[8,8]{1,0} parameter(0)
  %dot.3 = f32[8,8]{1,0} dot(%Arg_0.1, %Arg_0.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general" stack_frame_id=2}
  %dot.9 = f32[8,8]{1,0} dot(%dot.3, %Arg_0.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %copy.4 = f32[8,8]{0,1} copy(%dot.9)
  ROOT %reduce_fusion = f32[8]{0} fusion(%copy.4), kind=kInput, calls=%fused_computation
}
"""


def rules(frames, op):
  fn = [f.func for f in frames]
  return "projection" if "proj" in fn[:1] else ("mixing" if "mix" in fn[:1] else None)


def test_parse_hlo_frames_fusions_and_classification():
  m = pd.parse_hlo(HLO)
  assert m.name == "jit_f"
  assert set(m.ops) >= {"dot.3", "dot.9", "copy.4", "reduce_fusion", "reduce.1", "add.2"}
  assert m.ops["dot.3"].opcode == "dot" and m.ops["dot.3"].op_name == "jit(f)/dot_general"
  assert m.ops["dot.3"].operands == ("Arg_0.1", "Arg_0.1")
  fusion = m.ops["reduce_fusion"]
  assert (fusion.opcode, fusion.fusion_kind, fusion.calls) == ("fusion", "kInput", ("fused_computation",))
  assert m.roots["fused_computation"] == "reduce.1"
  # frame 3 (mix) prints parent 3 = frame 2 (proj), whose parent is frame 1 (main), the outermost
  assert [(f.func, f.line) for f in m.stack(m.ops["reduce.1"])] == [("mix", 6), ("proj", 3), ("main", 10)]
  assert [f.func for f in m.stack(m.ops["dot.3"])] == ["proj", "main"]
  assert pd.classify(m, "dot.3", rules) == "projection"
  assert pd.classify(m, "reduce_fusion", rules) == "mixing"  # no metadata of its own: its root's
  assert pd.classify(m, "dot.9", rules) == "projection"  # no metadata: from its operand dot.3
  assert pd.op_stack(m, m.ops["dot.9"])[1] is True
  assert pd.classify(m, "copy.4", rules).startswith("XLA copies")  # copies are never inferred
  assert pd.classify(m, "nope", rules).startswith("unmapped")


# ----- a real CPU trace of a tiny jitted function ---------------------------------------------------------
def proj(x, w):
  return jnp.tanh(x @ w)


def mix(y):
  return jnp.cumsum(jnp.sin(y) * 2.0, axis=0)


def tiny_rules(frames, op):
  names = [f.func.rsplit(".", 1)[-1] for f in frames]
  for n in names:
    if n in ("proj", "mix"):
      return n
  return None


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
  f = jax.jit(lambda x, w: mix(proj(x, w)).sum(axis=1))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
  compiled = f.lower(x, x).compile()
  jax.block_until_ready(f(x, x))
  log_dir = str(tmp_path_factory.mktemp("trace"))
  steps = 3
  with jax.profiler.trace(log_dir):
    for _ in range(steps):
      jax.block_until_ready(f(x, x))
  return pd.parse_hlo(compiled.as_text()), pd.find_trace(log_dir), steps


def test_cpu_trace_attribution(tiny_profile):
  module, path, steps = tiny_profile
  assert path.endswith(".trace.json.gz")
  events, info = pd.kernel_events(pd.load_events(path), module.name)
  assert events and info["source"] == "host threads"
  a = pd.attribute(events, module, steps, rules=tiny_rules)
  comps = {c["component"]: c for c in a["components"]}
  assert comps["proj"]["us"] > 0 and comps["mix"]["us"] > 0, comps
  assert a["unmapped"] == 0
  # Independent total straight from the JSON: ops of this module, no nesting in this function.
  with gzip.open(path, "rt") as fh:
    raw = json.load(fh)["traceEvents"]
  ours = [e for e in raw if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_module") == module.name
          and (e.get("args") or {}).get("hlo_op")]
  assert len(ours) == len(events)
  assert a["kernel_us"] == pytest.approx(sum(e["dur"] for e in ours) / steps, rel=1e-6)
  assert sum(c["us"] for c in a["components"]) == pytest.approx(a["kernel_us"], rel=1e-9)
  runs = collections.Counter(e["args"]["hlo_op"] for e in ours)
  assert all(n == steps for n in runs.values()), runs  # every op once per step
  assert a["busy_us"] <= a["kernel_us"] * (1 + 1e-9) + 1e-6
  assert a["split_ok"] and a["step_kernel_counts"] == [len(events) // steps] * steps


def test_xplane_reader_agrees_with_json(tiny_profile):
  module, path, _ = tiny_profile
  xplane = path.replace(".trace.json.gz", ".xplane.pb")
  assert os.path.exists(xplane)
  from_json, _ = pd.kernel_events(pd.load_events(path), module.name)
  from_pb, _ = pd.kernel_events(pd.load_events(xplane), module.name)
  assert collections.Counter(pd.event_hlo_op(e) for e in from_pb) == collections.Counter(
      pd.event_hlo_op(e) for e in from_json)
  assert sum(e.dur for e in from_pb) == pytest.approx(sum(e.dur for e in from_json), rel=1e-3, abs=1.0)


# ----- the GPU form, hand-written ---------------------------------------------------------------------------
def test_gpu_form_trace_sums_streams_only(tmp_path):
  m = pd.parse_hlo(HLO)
  meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/host:CPU")),
          dict(ph="M", pid=1, tid=5, name="thread_name", args=dict(name="tf_gpu_launch")),
          dict(ph="M", pid=7, name="process_name", args=dict(name="/device:GPU:0")),
          dict(ph="M", pid=7, tid=13, name="thread_name", args=dict(name="Stream #13(Compute)")),
          dict(ph="M", pid=7, tid=90, name="thread_name", args=dict(name="XLA Ops")),
          dict(ph="M", pid=7, tid=91, name="thread_name", args=dict(name="XLA Modules"))]
  ev = []
  for step in range(2):
    t0 = 1000.0 * step
    kernels = [("sm90_xmma_gemm_f32", "dot.3", 10.0), ("loop_fusion", "dot.9", 4.0),
               ("copy_kernel", "copy.4", 1.0), ("input_reduce_fusion", "reduce_fusion", 5.0)]
    t = t0
    for kname, op, dur in kernels:
      ev.append(dict(ph="X", pid=7, tid=13, ts=t, dur=dur, name=kname,
                     args=dict(hlo_op=op, hlo_module="jit_f(42)", correlation_id=len(ev))))
      ev.append(dict(ph="X", pid=7, tid=90, ts=t, dur=dur, name=op, args=dict(hlo_op=op, hlo_module="jit_f")))
      ev.append(dict(ph="X", pid=1, tid=5, ts=t - 5, dur=2.0, name="cuLaunchKernel",
                     args=dict(hlo_op=op, hlo_module="jit_f")))
      t += dur + 2.0
    ev.append(dict(ph="X", pid=7, tid=91, ts=t0, dur=t - t0, name="jit_f(42)", args={}))
    ev.append(dict(ph="X", pid=7, tid=13, ts=t, dur=3.0, name="other_kernel",  # another module: dropped
                   args=dict(hlo_op="fusion.1", hlo_module="jit_other(7)")))
    ev.append(dict(ph="X", pid=7, tid=13, ts=t + 5, dur=0.5, name="MemcpyD2H", args={}))  # no op: reported
  path = tmp_path / "gpu.trace.json.gz"
  with gzip.open(path, "wt") as fh:
    json.dump(dict(displayTimeUnit="ns", traceEvents=meta + ev), fh)
  events, info = pd.kernel_events(pd.load_events(str(path)), m.name)
  assert info["source"] == "device streams" and info["chosen"] == ["/device:GPU:0 | Stream #13(Compute)"]
  assert info["other_module_events_dropped"] == 2 and len(events) == 8
  assert info["stream_events_without_op_us"] == {"MemcpyD2H": 1.0}
  a = pd.attribute(events, m, 2, rules=rules)
  comps = {c["component"]: c["us"] for c in a["components"]}
  assert comps == pytest.approx({"projection": 14.0, "mixing": 5.0,
                                 "XLA copies (no source: loop carries, layout)": 1.0})
  assert a["kernel_us"] == pytest.approx(20.0) and a["busy_us"] == pytest.approx(20.0)
  assert a["span_us"] == pytest.approx(26.0) and a["split_ok"]
  assert a["top"][0]["op"] == "dot.3" and a["top"][0]["kernel"] == "sm90_xmma_gemm_f32"


def test_event_hlo_op_fallbacks():
  E = lambda **args: pd.Event("/device:GPU:0", "Stream #1", "k", 0.0, 1.0, args)
  assert pd.event_hlo_op(E(hlo_op="fusion.2")) == "fusion.2"
  assert pd.event_hlo_op(E(annotation="jit_f:#hlo_op=fusion.7,hlo_module=jit_f#")) == "fusion.7"
  assert pd.event_hlo_op(E(long_name="%fusion.9 = f32[2]{0} fusion(%p), kind=kLoop")) == "fusion.9"
  assert pd.event_hlo_op(E(correlation_id=3)) is None


def test_nested_events_count_self_time():
  E = lambda ts, dur: pd.Event("/host:CPU", "t", "op", ts, dur, {"hlo_op": "x"})
  outer, a, b, after = E(0, 10), E(1, 3), E(5, 2), E(12, 1)
  assert pd.set_self_times([outer, a, b, after]) == 2
  assert [outer.self_us, a.self_us, b.self_us, after.self_us] == [5, 3, 2, 1]


# ----- the model's component rules ----------------------------------------------------------------------
@pytest.mark.parametrize("chain, expected", [
    (["index_scores", "indexer_topk_reference.<locals>.chunk", "_index_step"], "indexer: scores"),
    (["indexer_topk_reference.<locals>.chunk", "indexer_topk", "_index_step"], "indexer: top-k"),
    (["_attend_chunk", "sparse_attention_reference", "Attention.attend", "attention_step"], "attention: core"),
    (["rms_normalize", "RMSNorm.__call__", "cached_forward"], "head: hc head"),
    (["rms_normalize", "RMSNorm.__call__", "block_step"], "norms"),
    (["RMSNorm.__call__", "Attention.queries", "attention_step"], "attention: q / kv / out"),
    (["rotate", "Compressor.project", "Compressor.extend", "_index_step"], "indexer: key compressor"),
    (["Compressor.pool", "Compressor.extend", "attention_step"], "compressor (KV entries)"),
    (["unpack_entries", "attention_step.<locals>.<lambda>", "attention_step"], "cache: dequant"),
    (["_locate", "write_entries", "_index_step"], "cache: page write"),
    (["clamped_swiglu", "RoutedExperts.ragged_matmuls", "MoE.__call__"], "MoE: routed experts"),
    (["clamped_swiglu", "SharedExpert.__call__", "MoE.__call__"], "MoE: shared expert"),
    (["sinkhorn.<locals>.body", "sinkhorn", "HyperConnection.pre"], "mHC"),
    (["stack_step.<locals>.body.<locals>.<lambda>", "stack_step.<locals>.body"], "cache: per-layer state"),
    (["allocate_pages", "_open_step", "cached_forward"], "step setup"),
    (["stack_step", "cached_forward"], "layer scan (loop-level ops)"),
])
def test_model_component_rules(chain, expected):
  frames = [pd.Frame(f, "", 1) for f in chain]
  assert pd.model_component(frames, pd.HloOp("x", "fusion", "c")).startswith(expected)


def test_model_component_unknown_stack_is_none():
  assert pd.model_component([pd.Frame("somewhere_else", "", 1)], pd.HloOp("x", "add", "c")) is None


# ----- end to end on the tiny model ---------------------------------------------------------------------
def test_script_end_to_end_small(tmp_path):
  rc = pd.main(["--small", "--steps", "2", "--warmup", "1", "--profile-steps", "2", "--out", str(tmp_path),
                "--trace-dir", str(tmp_path / "trace")])
  assert rc == 0
  r = json.loads((tmp_path / "decode_profile.json").read_text())
  a = r["attribution"]
  comps = {c["component"] for c in a["components"]}
  for want in ("attention: core (sparse attention)", "indexer: scores (q·k, relu, head weights)",
               "indexer: top-k", "compressor (KV entries)", "MoE: routed experts", "MoE: router",
               "mHC (pre / post / sinkhorn)", "head: logits matmul", "cache: page write (scatter)"):
    assert want in comps, (want, comps)
  assert a["unmapped"] == 0 and a["kernel_us"] > 0 and len(a["top"]) == 25
  assert not any(c.startswith("other:") for c in comps), comps
  text = (tmp_path / "decode_profile.md").read_text()
  assert "## Per component" in text and "Reproduce: `python experiments/profile_decode.py --small" in text
  assert "routed experts `exact (capacity at batch 4)`" in text  # the serving step's MoE path at this batch
