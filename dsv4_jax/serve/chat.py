"""DeepSeek-V4 chat encoding: messages -> prompt string, and completion text -> assistant message (spec §13).

Reproduces the official `encoding/encoding_dsv4.py` output byte for byte (tests/test_chat.py checks it on the
official cases and on goldens generated from the official code). There is no Jinja template:

  thinking_mode, effort = resolve_mode("max")          # "chat" | "thinking" | "max"
  prompt = encode_messages(messages, thinking_mode, reasoning_effort=effort)
  message = parse_message_from_completion_text(completion, thinking_mode)

Messages are OpenAI-style dicts. Roles: system, user, assistant, tool (merged into the next user turn as
<tool_result> blocks), latest_reminder, developer (search-agent only). Extra keys: `tools` and `response_format`
(system/developer), `tool_calls` and `reasoning_content` (assistant), `task` (Quick Instruction token), `wo_eos`
(assistant prefill without EOS).
"""

import copy

from dsv4_jax.serve.dsml import (  # noqa: F401 - ChatFormatError re-exported
  TOOL_CALLS_START, ChatFormatError, encode_tool_calls, parse_tool_calls, render_tools, scan, to_json)
from dsv4_jax.serve.tokens import (  # noqa: F401 - re-exported
  ASSISTANT, BOS, CONTROL_TOKENS, DSML, EOS, EXTRACTED_URL, LATEST_REMINDER, TASK_ACTION, TASK_AUTHORITY,
  TASK_DOMAIN, TASK_QUERY, TASK_READ_URL, TASK_TITLE, TASK_TOKENS, THINK_END, THINK_START, USER)

# User-facing reasoning modes -> (thinking_mode, reasoning_effort) of encode_messages.
THINKING_MODES = {
  "chat": ("chat", None),  # Non-think: the prompt ends `<｜Assistant｜></think>`
  "thinking": ("thinking", "high"),  # Think High: ends `<｜Assistant｜><think>`
  "max": ("thinking", "max"),  # Think Max: Think High plus REASONING_EFFORT_MAX_PREFIX at the start
}
ENCODER_THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")

REASONING_EFFORT_MAX_PREFIX = (
  "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
  "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
  "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
  "scenarios.\n"
  "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
  "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
RESPONSE_FORMAT_PROMPT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

# Roles that survive reasoning-dropping wherever they are (the official list; "tool" is merged away earlier).
_ALWAYS_KEPT = frozenset({"user", "system", "tool", "latest_reminder", "direct_search_results"})


def resolve_mode(mode: str):
  """(thinking_mode, reasoning_effort) for a user-facing mode "chat" | "thinking" | "max"."""
  if mode not in THINKING_MODES:
    raise ValueError(f"unknown reasoning mode {mode!r}; expected one of {sorted(THINKING_MODES)}")
  return THINKING_MODES[mode]


# ------------------------------------------------------------------ preprocessing


def merge_tool_messages(messages):
  """Copies of `messages` with "tool" turns folded into user turns as tool_result content blocks.

  V4 has no tool turn. Every user turn becomes {"role", "content", "content_blocks"} (only `task`, `wo_eos`, `mask`
  are kept); a user turn right after merged tool results (or another task-less user turn) joins it.
  """
  out = []
  for msg in messages:
    msg = copy.deepcopy(msg)
    role = msg.get("role")
    prev = out[-1] if out else None
    prev_open = prev is not None and prev.get("role") == "user" and "content_blocks" in prev
    if role == "tool":
      block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""), "content": msg.get("content", "")}
      if prev_open:
        prev["content_blocks"].append(block)
      else:
        out.append({"role": "user", "content_blocks": [block]})
    elif role == "user":
      block = {"type": "text", "text": msg.get("content", "")}
      if prev_open and prev.get("task") is None:
        prev["content_blocks"].append(block)
      else:
        user = {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
        user.update({k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg})
        out.append(user)
    else:
      out.append(msg)
  return out


def _sort_tool_results(messages):
  """In place: order each user turn's tool_result blocks as the latest assistant tool_calls (by call id)."""
  order = {}
  for msg in messages:
    role = msg.get("role")
    if role == "assistant" and msg.get("tool_calls"):
      order = {}
      for i, call in enumerate(msg["tool_calls"]):
        call_id = call.get("id") or call.get("function", {}).get("id", "")
        if call_id:
          order[call_id] = i
    elif role == "user" and msg.get("content_blocks"):
      blocks = msg["content_blocks"]
      results = [b for b in blocks if b.get("type") == "tool_result"]
      if len(results) > 1 and order:
        ranked = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
        msg["content_blocks"] = [next(ranked) if b.get("type") == "tool_result" else b for b in blocks]


def _last_user_index(messages) -> int:
  """Index of the last user or developer turn, -1 if none."""
  for i in range(len(messages) - 1, -1, -1):
    if messages[i].get("role") in ("user", "developer"):
      return i
  return -1


def _drop_reasoning(messages):
  """Before the last user turn: assistants lose reasoning_content, developer and unknown roles are dropped."""
  last_user = _last_user_index(messages)
  out = []
  for i, msg in enumerate(messages):
    role = msg.get("role")
    if role in _ALWAYS_KEPT or i >= last_user:
      out.append(msg)
    elif role == "assistant":
      out.append({k: v for k, v in msg.items() if k != "reasoning_content"})
  return out


# ------------------------------------------------------------------ rendering


def _with_tools(text, tools, response_format):
  """System/developer text followed by the tools section and the response-format schema, when given."""
  if tools:
    text += "\n\n" + render_tools(tools)
  if response_format:
    text += "\n\n" + RESPONSE_FORMAT_PROMPT + to_json(response_format)
  return text


def _tool_result_text(content):
  """A tool result's text; list content joins its text parts and marks other parts as unsupported."""
  if isinstance(content, list):
    content = "\n\n".join(
      part.get("text", "") if part.get("type") == "text" else f"[Unsupported {part.get('type')}]" for part in content)
  return f"<tool_result>{content}</tool_result>"


def _user_text(msg):
  """A user turn's body: its content blocks (text, tool results) joined by blank lines."""
  blocks = msg.get("content_blocks")
  if not blocks:
    return msg.get("content") or ""
  parts = []
  for block in blocks:
    kind = block.get("type")
    if kind == "text":
      parts.append(block.get("text", ""))
    elif kind == "tool_result":
      parts.append(_tool_result_text(block.get("content", "")))
    else:
      parts.append(f"[Unsupported {kind}]")
  return "\n\n".join(parts)


def _render(i, messages, thinking_mode, drop_thinking, reasoning_effort) -> str:
  """Turn `i` of `messages` plus what follows it when the next turn is the model's (assistant prefix or task)."""
  if thinking_mode not in ENCODER_THINKING_MODES:
    raise ChatFormatError(f"thinking_mode must be one of {ENCODER_THINKING_MODES}, got {thinking_mode!r}")
  msg = messages[i]
  role, content = msg.get("role"), msg.get("content")
  tools = [tool["function"] for tool in msg["tools"]] if msg.get("tools") else None
  calls = msg.get("tool_calls")
  calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls] if calls else None
  if reasoning_effort not in REASONING_EFFORTS:
    raise ChatFormatError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
  thinking = thinking_mode == "thinking"

  out = REASONING_EFFORT_MAX_PREFIX if i == 0 and thinking and reasoning_effort == "max" else ""
  if role == "system":
    out += _with_tools(f"{content or ''}", tools, msg.get("response_format"))
  elif role == "developer":
    if not content:
      raise ChatFormatError(f"a developer message needs content: {msg}")
    out += _with_tools(USER + content, tools, msg.get("response_format"))
  elif role == "user":
    out += USER + _user_text(msg)
  elif role == "latest_reminder":
    out += f"{LATEST_REMINDER}{content}"
  elif role == "tool":
    raise NotImplementedError("tool messages must be merged into user turns first (merge_tool_messages)")
  elif role == "assistant":
    after_task = i >= 1 and messages[i - 1].get("task") is not None  # a task's output carries no reasoning
    reasoning = ""
    if thinking and not after_task and (not drop_thinking or i > _last_user_index(messages)):
      reasoning = f"{msg.get('reasoning_content') or ''}{THINK_END}"
    out += reasoning + f"{content or ''}" + (encode_tool_calls(calls) if calls else "")
    if not msg.get("wo_eos", False):
      out += EOS
  else:
    raise NotImplementedError(f"unknown role {role!r}")

  # Nothing more unless the model speaks next: after the last turn, or before an assistant/latest_reminder turn.
  if i + 1 < len(messages) and messages[i + 1].get("role") not in ("assistant", "latest_reminder"):
    return out
  task = msg.get("task")
  if task is not None:
    if task not in TASK_TOKENS:
      raise ChatFormatError(f"unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}")
    if task == "action":
      out += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_ACTION
    else:
      out += TASK_TOKENS[task]
  elif role in ("user", "developer"):
    opens = thinking and (not drop_thinking or i >= _last_user_index(messages))
    out += ASSISTANT + (THINK_START if opens else THINK_END)
  return out


def encode_messages(messages, thinking_mode, *, context=None, drop_thinking=True, add_default_bos_token=True,
                    reasoning_effort=None) -> str:
  """The prompt for `messages` ("chat" = Non-think, "thinking" = Think High/Max by `reasoning_effort`).

  context: earlier turns already in the prompt (not rendered, no BOS; they still steer reasoning dropping and
    tool-result order). drop_thinking: render reasoning only after the last user turn; ignored (off) when any
    turn declares tools. reasoning_effort: None | "high" | "max" ("max" adds the Think-Max prefix in thinking mode).
  Keyword-only after thinking_mode: same names and defaults as the official function, whose positional order
  (context third) differs from spec §13's signature.
  """
  ctx = merge_tool_messages(context or [])
  full = ctx + merge_tool_messages(messages)
  _sort_tool_results(full)
  drop = drop_thinking and not any(m.get("tools") for m in full)
  start = len(ctx)
  if thinking_mode == "thinking" and drop:
    full, start = _drop_reasoning(full), len(_drop_reasoning(ctx))
  prompt = BOS if add_default_bos_token and not ctx else ""
  for i in range(start, len(full)):
    prompt += _render(i, full, thinking_mode, drop, reasoning_effort)
  return prompt


# ------------------------------------------------------------------ parsing


def parse_message_from_completion_text(text: str, thinking_mode: str) -> dict:
  """The assistant message in one completion (the text after the prompt, EOS included).

  Returns {"role": "assistant", "content", "reasoning_content", "tool_calls": OpenAI format}. Any thinking_mode
  other than "thinking" parses as Non-think. Raises ChatFormatError on malformed text (missing </think> or EOS,
  text after EOS, bad DSML, special tokens inside content).
  """
  reasoning, pos = "", 0
  if thinking_mode == "thinking":
    reasoning, pos, stop = scan(text, pos, (THINK_END, TOOL_CALLS_START))
    if stop != THINK_END:
      raise ChatFormatError(f"completion has no {THINK_END} before its answer")
  content, pos, stop = scan(text, pos, (EOS, TOOL_CALLS_START))
  calls = []
  if stop == TOOL_CALLS_START:
    pos, stop, calls = parse_tool_calls(text, pos)
    tail, pos, stop = scan(text, pos, (EOS,))
    if tail:
      raise ChatFormatError(f"unexpected text after the tool calls: {tail!r}")
  elif stop != EOS:
    raise ChatFormatError("completion has no end-of-sentence token")
  if pos != len(text):
    raise ChatFormatError(f"unexpected text after the end of the message: {text[pos:]!r}")
  for token in CONTROL_TOKENS:
    if token in content or token in reasoning:
      raise ChatFormatError(f"special token {token!r} inside the message")
  return {
    "role": "assistant",
    "content": content,
    "reasoning_content": reasoning,
    "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls],
  }
