#!/usr/bin/env python
"""Chat-encoding goldens from DeepSeek's OFFICIAL `encoding/encoding_dsv4.py` (pure stdlib; any Python 3).

  python tools/make_chat_goldens.py /work/.mirror/Nicooo-Wang+DeepSeek-V4-Pro-code/repo --out tests/data/chat

SOURCE is the official repository: a bare git mirror (files read with `git show HEAD:...`) or a checkout. The
encoder is copied into --side (outside this repository, never vendored) and imported from there. Writes:

  official/test_input_N.json, official/test_output_N.txt   the official test cases, as published
  generated.json   {"source", "cases": [{"name", "fn": "encode"|"parse", "args", "expected" | "error"}]}

`args` are keyword arguments of the official function of that name; `error` is {"type", "message"} of what the
official code raised. The message lists below are designed to reach every branch of the official encoder/parser.
"""
import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys

ENCODER = "encoding/encoding_dsv4.py"
OFFICIAL_TESTS = "encoding/tests"

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DS = "｜DSML｜"


# ------------------------------------------------------------------ inputs

SYS = {"role": "system", "content": "You are a helpful assistant."}


def fn(name, description, properties, required=None):
  params = {"type": "object", "properties": properties}
  if required is not None:
    params["required"] = required
  return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


TOOLS = [
  fn("get_weather", "Weather for a city", {
    "city": {"type": "string", "description": "City name"},
    "days": {"type": "integer", "minimum": 1},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
  }, ["city"]),
  fn("calc", "Évaluer une expression — 计算器", {
    "x": {"type": "number"},
    "exact": {"type": "boolean"},
    "terms": {"type": "array", "items": {"type": "number"}},
    "opts": {"type": "object", "properties": {"precision": {"type": "integer"}}},
    "note": {"type": ["string", "null"]},
  }),
  fn("now", "Current time", {}),
]


def call(name, arguments, call_id=None):
  out = {"type": "function", "function": {"name": name, "arguments": arguments}}
  if call_id is not None:
    out["id"] = call_id
  return out


def tool(call_id, content):
  return {"role": "tool", "tool_call_id": call_id, "content": content}


def user(content, **extra):
  return {"role": "user", "content": content, **extra}


def asst(content=None, reasoning=None, calls=None, **extra):
  msg = {"role": "assistant"}
  if content is not None:
    msg["content"] = content
  if reasoning is not None:
    msg["reasoning_content"] = reasoning
  if calls is not None:
    msg["tool_calls"] = calls
  msg.update(extra)
  return msg


def with_tools(msg, tools=TOOLS, **extra):
  return {**msg, "tools": tools, **extra}


WEATHER_ARGS = '{"city": "Paris", "days": 3}'
CALC_ARGS = '{"x": 1.5, "exact": true, "terms": [1, 2.5, -3, 1e100], "opts": {"precision": 4}, "note": null}'
ODD_STRING_ARGS = json.dumps({"city": 'São "Paulo"\nline 2 <b>&</b> 東京 😀', "unit": ""})

# Conversations encoded under every mode in ALL_MODES.
CONVERSATIONS = {
  "basic": [SYS, user("Hi")],
  "no_system": [user("What is 2+2?")],
  "multi_turn_ends_assistant": [
    SYS, user("Hello"), asst("Hi! How can I help?", "They greet me."),
    user("Capital of France?"), asst("Paris.", "Easy: Paris."),
  ],
  "multi_turn_ends_user": [
    SYS, user("Hello"), asst("Hi!", "Greeting."), user("Tell me a joke."), asst("Why...", "A joke."),
    user("Another one?"),
  ],
  "empty_fields": [{"role": "system"}, user(""), asst(reasoning="only reasoning")],
  "missing_user_content": [SYS, {"role": "user"}],
  "assistant_first": [asst("I start.", "No user yet.")],
  "assistants_in_a_row": [SYS, user("Q"), asst("part 1", "r1"), asst("part 2", "r2")],
  "system_twice_then_assistant": [SYS, {"role": "system", "content": "Be brief."}, asst("Hello.", "greet")],
  "unicode": [{"role": "system", "content": "该助手为DeepSeek。"}, user("東京の天気は？ 😀"), asst("晴れです。", "天気")],
  "tools_single_call": [
    with_tools(SYS), user("Weather in Paris?"),
    asst(reasoning="Use get_weather.", calls=[call("get_weather", WEATHER_ARGS, "c1")]),
    tool("c1", '{"temp": 21}'), asst("It is 21 degrees.", "Got it."),
  ],
  "tools_parallel_results_sorted": [
    with_tools(SYS), user("Weather in Paris and 1.5*2?"),
    asst("Checking both.", "Two calls.", [call("get_weather", WEATHER_ARGS, "c1"), call("calc", CALC_ARGS, "c2"),
                                          call("now", "{}", "c3")]),
    tool("c3", "12:00"), tool("c2", "3.0"), tool("c1", "sunny"), asst("Sunny, 3.0, noon.", "Done."),
  ],
  "tools_multi_user_turns_keep_reasoning": [
    with_tools(SYS), user("Hi"), asst("Hello!", "Greeting, no tool."), user("Weather in Rome?"),
    asst(reasoning="Call the tool.", calls=[call("get_weather", '{"city": "Rome"}', "a")]),
    tool("a", "rain"), asst("Rain in Rome.", "Report."), user("Thanks, and tomorrow?"),
  ],
  "tools_results_then_user_text": [
    with_tools(SYS), user("Time?"), asst(reasoning="r", calls=[call("now", "{}", "t1")]), tool("t1", "noon"),
    user("Also, say hi."),
  ],
  "tool_argument_kinds": [
    with_tools(SYS), user("Go"),
    asst(reasoning="many calls", calls=[
      call("calc", CALC_ARGS, "k1"),
      call("get_weather", ODD_STRING_ARGS, "k2"),
      call("now", "{}", "k3"),
      call("calc", "not json at all", "k4"),
      call("calc", {"x": 2}, "k5"),
      call("calc", None, "k6"),
      call("calc", '{"nested": [[1, {"a": null}], []], "flag": false, "n": -0.0, "big": 12345678901234567890}', "k7"),
      call("calc", '{"a": 1, "a": 2}', "k8"),
      call("calc", "", "k9"),
    ]),
    tool("k1", [{"type": "text", "text": "part one"}, {"type": "image", "url": "x"}, {"type": "text"}]),
    tool("k2", None), tool("k3", {"not": "a string"}), tool("k4", ""), {"role": "tool", "content": "no id"},
  ],
  "tool_ids_in_function": [
    with_tools(SYS), user("Go"),
    asst(calls=[{"type": "function", "function": {"name": "now", "arguments": "{}", "id": "f1"}},
                {"type": "function", "function": {"name": "now", "arguments": "{}", "id": "f2"}}]),
    tool("f2", "second"), tool("f1", "first"), tool("zz", "unknown id"),
  ],
  "tool_results_without_preceding_call": [SYS, user("Hi"), tool("x", "orphan b"), tool("y", "orphan a")],
  "tool_after_user_with_task": [SYS, user("Q", task="query"), tool("x", "r")],
  "response_format": [
    {**SYS, "response_format": {"type": "json_schema", "schema": {"type": "object", "title": "Réponse"}}},
    user("Answer in JSON."),
  ],
  "response_format_with_tools": [with_tools(SYS, response_format={"type": "json_object"}), user("Go")],
  "developer_with_tools": [
    {"role": "system", "content": "该助手为DeepSeek。"},
    {"role": "latest_reminder", "content": "2026-02-21,Saturday,Paris,App,English"},
    with_tools({"role": "developer", "content": "Search this.\n\nCITATION FORMAT: [n]"},
               response_format={"type": "json_object"}),
    asst(reasoning="search it", calls=[call("get_weather", '{"city": "Paris"}', "s1")]),
    tool("s1", "results"), asst("Answer [1].", "summarise"),
  ],
  "developer_before_last_user": [
    SYS, {"role": "developer", "content": "Internal search request."}, asst("found", "dev reasoning"),
    user("Thanks!"), asst("You're welcome.", "polite"),
  ],
  "developer_last": [SYS, user("Q"), asst("A", "r"), {"role": "developer", "content": "Search again."}],
  "latest_reminder_positions": [
    SYS, {"role": "latest_reminder", "content": "2024-11-15,Shanghai"}, user("Q1"), asst("A1", "r1"),
    {"role": "latest_reminder", "content": "2024-11-16,Shanghai"}, user("Q2"),
  ],
  "user_then_reminder_then_assistant": [
    user("Q"), {"role": "latest_reminder", "content": "reminder"}, asst("A", "r"),
  ],
  "reminder_last": [SYS, user("Q"), {"role": "latest_reminder", "content": None}],
  "consecutive_users_merge": [SYS, user("first"), user("second"), user("third")],
  "task_action": [SYS, user("Hi"), asst("Hello", "r0"), user("Latest news on X?", task="action")],
  "task_action_with_output": [SYS, user("Latest news on X?", task="action"), asst("Search", "ignored")],
  "task_query": [SYS, user("Who won the 2022 World Cup?", task="query")],
  "task_query_with_output": [SYS, user("Who won?", task="query"), asst("2022 World Cup winner", "x")],
  "task_authority": [SYS, user("Is aspirin safe with ibuprofen?", task="authority")],
  "task_domain": [SYS, user("Is aspirin safe with ibuprofen?", task="domain")],
  "task_read_url": [SYS, user("Summarise <｜extracted_url｜>https://example.com/a", task="read_url")],
  "task_title": [SYS, user("Explain RoPE."), asst("RoPE rotates...", "explain", task="title")],
  "task_title_with_output": [
    SYS, user("Explain RoPE."), asst("RoPE rotates...", "explain", task="title"), asst("Rotary embeddings", "t"),
  ],
  "task_not_last": [SYS, user("first", task="domain"), user("second")],
  "task_on_system": [{**SYS, "task": "query"}, asst("q", "r")],
  "task_on_reminder": [user("Q"), {"role": "latest_reminder", "content": "r", "task": "authority"}],
  "task_invalid_unreached": [SYS, user("a", task="bogus"), tool("x", "y"), user("b")],
  "wo_eos_prefill": [SYS, user("Write a poem."), asst("Roses are", "plan", wo_eos=True)],
  "wo_eos_on_user": [SYS, user("Q", wo_eos=True, mask=0), asst("A", "r")],
  "tools_on_user_ignored": [SYS, with_tools(user("Q1")), asst("A1", "r1"), user("Q2")],
  "tools_on_assistant_disable_drop": [SYS, user("Q1"), with_tools(asst("A1", "r1")), user("Q2")],
  "unknown_role_dropped_in_thinking": [SYS, {"role": "observer", "content": "x"}, user("Q")],
  "reasoning_non_string": [SYS, user("Q"), asst(42, ["r"])],
  "no_messages": [],
}

ALL_MODES = {
  "chat": dict(thinking_mode="chat"),
  "think": dict(thinking_mode="thinking"),
  "think_high": dict(thinking_mode="thinking", reasoning_effort="high"),
  "max": dict(thinking_mode="thinking", reasoning_effort="max"),
  "think_keep": dict(thinking_mode="thinking", drop_thinking=False),
  "max_keep": dict(thinking_mode="thinking", drop_thinking=False, reasoning_effort="max"),
  "chat_max": dict(thinking_mode="chat", reasoning_effort="max"),
  "chat_keep": dict(thinking_mode="chat", drop_thinking=False),
}

# With tools drop_thinking is off, so "keep" variants would repeat the plain ones.
TOOL_MODES = {k: ALL_MODES[k] for k in ("chat", "think", "max")}

# (name, messages, kwargs): context, BOS and error cases.
_CTX = [SYS, user("Hello"), asst("Hi!", "greet"), user("Weather?"),
        asst(reasoning="call", calls=[call("get_weather", WEATHER_ARGS, "w1"), call("now", "{}", "w2")])]
EXTRA_ENCODE = [
  ("context_plain", [tool("w2", "noon"), tool("w1", "sunny")], dict(thinking_mode="thinking", context=_CTX)),
  ("context_chat", [user("And now?")], dict(thinking_mode="chat", context=_CTX[:3])),
  ("context_drop", [user("Q2"), asst("A2", "r2")], dict(thinking_mode="thinking", context=_CTX[:3])),
  ("context_keep", [user("Q2")], dict(thinking_mode="thinking", context=_CTX[:3], drop_thinking=False)),
  ("context_max_no_prefix", [user("Q2")], dict(thinking_mode="thinking", context=_CTX[:3], reasoning_effort="max")),
  ("context_tools", [tool("w1", "a"), asst("done", "r")],
   dict(thinking_mode="thinking", context=[with_tools(SYS)] + _CTX[1:])),
  ("context_with_developer", [user("Q3")],
   dict(thinking_mode="thinking", context=[SYS, {"role": "developer", "content": "d"}, asst("x", "y"), user("u")])),
  ("context_ends_with_tool", [tool("w2", "late"), asst("ok", "r")],
   dict(thinking_mode="thinking", context=_CTX + [tool("w1", "early")])),
  ("context_empty_list", [user("Q")], dict(thinking_mode="chat", context=[])),
  ("no_bos", [SYS, user("Q")], dict(thinking_mode="thinking", add_default_bos_token=False)),
  ("no_bos_max", [user("Q")], dict(thinking_mode="thinking", add_default_bos_token=False, reasoning_effort="max")),
  ("no_messages_bad_mode", [], dict(thinking_mode="bogus", reasoning_effort="bogus")),
  ("unknown_role_dropped_keep", [SYS, {"role": "observer", "content": "x"}, user("Q")],
   dict(thinking_mode="thinking", drop_thinking=False)),
  ("direct_search_results_role", [SYS, {"role": "direct_search_results", "content": "x"}, user("Q")],
   dict(thinking_mode="thinking")),
  # Errors.
  ("err_thinking_mode", [SYS, user("Q")], dict(thinking_mode="max")),
  ("err_thinking_mode_none", [user("Q")], dict(thinking_mode=None)),
  ("err_reasoning_effort", [SYS, user("Q")], dict(thinking_mode="thinking", reasoning_effort="low")),
  ("err_reasoning_effort_chat", [user("Q")], dict(thinking_mode="chat", reasoning_effort="medium")),
  ("err_developer_empty", [SYS, {"role": "developer", "content": ""}], dict(thinking_mode="chat")),
  ("err_developer_missing", [{"role": "developer"}], dict(thinking_mode="thinking")),
  ("err_task_invalid", [SYS, user("Q", task="summarize")], dict(thinking_mode="chat")),
  ("err_task_invalid_on_assistant", [user("Q"), asst("A", task="bogus")], dict(thinking_mode="thinking")),
  ("err_unknown_role", [SYS, {"role": "observer", "content": "x"}, user("Q")], dict(thinking_mode="chat")),
  ("err_unknown_role_last", [SYS, user("Q"), {"role": "observer", "content": "x"}], dict(thinking_mode="thinking")),
  ("err_tools_not_openai", [{**SYS, "tools": [{"name": "f"}]}, user("Q")], dict(thinking_mode="chat")),
  ("err_tool_calls_not_openai", [user("Q"), asst(calls=[{"name": "f", "arguments": "{}"}])],
   dict(thinking_mode="chat")),
  ("err_arguments_list", [user("Q"), asst(calls=[call("f", "[1, 2]")])], dict(thinking_mode="chat")),
  ("err_arguments_scalar", [user("Q"), asst(calls=[call("f", "5")])], dict(thinking_mode="thinking")),
  ("err_user_content_none", [user(None)], dict(thinking_mode="chat")),
]

def param(name, flag, value, close=f"</{DS}parameter>\n"):
  return f'<{DS}parameter name="{name}" string="{flag}">{value}{close}'


def invoke(name, *params, header="\n"):
  return f'<{DS}invoke name="{name}">{header}' + "".join(params) + f"</{DS}invoke>\n"


def block(*invokes, open_gap=">\n", close=f"</{DS}tool_calls>"):
  return f"\n\n<{DS}tool_calls{open_gap}" + "".join(invokes) + close


_TC = block(invoke("get_weather", param("city", "true", "Paris"), param("days", "false", "3")))
_TWO = block(
  invoke("calc", param("x", "false", "1.5"), param("terms", "false", "[1, 2.5]"),
         param("opts", "false", '{"precision": 4}'), param("note", "false", "null"),
         param("text", "true", 'a "quoted"\nmulti-line <value> 東京')),
  invoke("now"))
_F1 = invoke("f", param("a", "true", "1"))
PARSE = [
  ("chat_plain_eos", f"Hello there.{EOS}", "chat"),
  ("chat_empty", EOS, "chat"),
  ("think_plain", f"Because.</think>Answer.{EOS}", "thinking"),
  ("think_empty_reasoning", f"</think>Answer.{EOS}", "thinking"),
  ("think_multiline", f"line 1\nline 2\n</think>\n\nAnswer\n{EOS}", "thinking"),
  ("chat_tool_call", f"Let me check.{_TC}{EOS}", "chat"),
  ("think_tool_call", f"Need weather.</think>{_TC}{EOS}", "thinking"),
  ("think_two_invokes", f"r</think>Working.{_TWO}{EOS}", "thinking"),
  ("tool_call_no_eos", f"r</think>{_TC}", "thinking"),
  ("empty_tool_block", f"x{block()}{EOS}", "chat"),
  ("truncated_after_block_start", f"x{block(open_gap='', close='')}", "chat"),
  ("truncated_after_parameter", "x" + block(close="") + f'<{DS}invoke name="f">\n' + param("a", "true", "v"), "chat"),
  ("param_trailing_newline_quirk",
   block(invoke("f", param("a", "true", "v", close=f"<\n/{DS}parameter>\n"))) + EOS, "chat"),
  ("invoke_header_extra_newline", block(invoke("f", param("a", "false", "1"), header="\n\n")) + EOS, "chat"),
  ("raw_non_json_value", block(invoke("f", param("a", "false", "abc"))) + EOS, "chat"),
  ("mode_max_parses_as_chat", f"no reasoning here{EOS}", "max"),
  ("mode_other_parses_as_chat", f"plain{EOS}", "whatever"),
  # Errors.
  ("err_missing_eos", "No end token", "chat"),
  ("err_missing_think_end", f"never closed{EOS}", "thinking"),
  ("err_tool_call_inside_thinking", f"thinking{_TC}</think>{EOS}", "thinking"),
  ("err_text_after_eos", f"Answer.{EOS}extra", "chat"),
  ("err_two_eos", f"a{EOS}{EOS}", "chat"),
  ("err_text_after_tool_calls", f"r</think>{_TC}trailing{EOS}", "thinking"),
  ("err_think_token_in_chat_content", f"r</think>a{EOS}", "chat"),
  ("err_think_start_in_reasoning", f"<think>r</think>a{EOS}", "thinking"),
  ("err_bos_in_content", f"{BOS}a{EOS}", "chat"),
  ("err_dsml_in_content", f"a {DS} b{EOS}", "chat"),
  ("err_duplicate_parameter", block(invoke("f", param("a", "true", "1"), param("a", "true", "2"))) + EOS, "chat"),
  ("err_bad_string_flag", block(invoke("f", param("a", "maybe", "1"))) + EOS, "chat"),
  ("err_bad_invoke_header", block(invoke("f").replace("name=", "nam=")) + EOS, "chat"),
  ("err_block_missing_newline", block(invoke("f"), open_gap=">") + EOS, "chat"),
  ("err_param_missing_newline", block(invoke("f", param("a", "true", "1", close=f"</{DS}parameter>"))) + EOS, "chat"),
  ("err_block_unclosed", block(invoke("f"), close=""), "chat"),
  ("err_block_only_gap", block(close=""), "chat"),
]


# ------------------------------------------------------------------ running the official code


def read_official(source, path):
  """Bytes of `path` in the official repository `source` (bare git mirror or checkout)."""
  if os.path.isfile(os.path.join(source, path)):
    with open(os.path.join(source, path), "rb") as f:
      return f.read()
  return subprocess.run(["git", "--git-dir", source, "show", f"HEAD:{path}"], check=True, capture_output=True).stdout


def official_files(source, folder):
  """Names of the files in `folder` of the official repository."""
  if os.path.isdir(os.path.join(source, folder)):
    return sorted(os.listdir(os.path.join(source, folder)))
  out = subprocess.run(["git", "--git-dir", source, "ls-tree", "--name-only", f"HEAD:{folder}"], check=True,
                       capture_output=True, text=True).stdout
  return sorted(out.split())


def load_encoder(source, side):
  """Import the official encoder from a copy in the side directory."""
  os.makedirs(side, exist_ok=True)
  path = os.path.join(side, "encoding_dsv4.py")
  with open(path, "wb") as f:
    f.write(read_official(source, ENCODER))
  spec = importlib.util.spec_from_file_location("official_encoding_dsv4", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_case(name, func, kind, args):
  record = {"name": name, "fn": kind, "args": copy.deepcopy(args)}
  try:
    record["expected"] = func(**copy.deepcopy(args))
  except Exception as err:  # noqa: BLE001 - every official failure is a golden
    record["error"] = {"type": type(err).__name__, "message": str(err)}
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("source", help="official DeepSeek-V4 repository (bare git mirror or checkout)")
  parser.add_argument("--out", default="tests/data/chat")
  parser.add_argument("--side", default="/work/side/chat", help="where the official encoder is copied and run")
  a = parser.parse_args()
  if os.environ.get("PYTHONHASHSEED") != "0":  # official error messages list a set: fix its order
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})
  enc = load_encoder(a.source, a.side)

  official_dir = os.path.join(a.out, "official")
  os.makedirs(official_dir, exist_ok=True)
  for name in official_files(a.source, OFFICIAL_TESTS):
    with open(os.path.join(official_dir, name), "wb") as f:
      f.write(read_official(a.source, f"{OFFICIAL_TESTS}/{name}"))

  cases = []
  for conv, messages in CONVERSATIONS.items():
    modes = TOOL_MODES if any(m.get("tools") for m in messages) else ALL_MODES
    for mode, kwargs in modes.items():
      cases.append(run_case(f"{conv}/{mode}", enc.encode_messages, "encode", dict(messages=messages, **kwargs)))
  for name, messages, kwargs in EXTRA_ENCODE:
    cases.append(run_case(name, enc.encode_messages, "encode", dict(messages=messages, **kwargs)))
  for name, text, mode in PARSE:
    cases.append(run_case(f"parse/{name}", enc.parse_message_from_completion_text, "parse",
                          dict(text=text, thinking_mode=mode)))

  blob = subprocess.run(["git", "--git-dir", a.source, "rev-parse", f"HEAD:{ENCODER}"], capture_output=True,
                        text=True).stdout.strip()
  with open(os.path.join(a.out, "generated.json"), "w", encoding="utf-8") as f:
    head = {"source": f"{ENCODER} blob {blob or 'unknown'}", "python": sys.version.split()[0]}
    f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n')  # one case per line
    f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]}\n")
  errors = sum("error" in c for c in cases)
  print(f"{len(cases)} cases ({errors} errors) -> {a.out}/generated.json")


if __name__ == "__main__":
  main()
