"""Chat plumbing between OpenAI-style messages and the engine: the prompt (official V4 encoding, per reasoning
mode) and the completion split into content / reasoning_content / tool_calls, whole or as a stream.

  ids, thinking_mode = encode_chat(tokenizer, messages, mode="thinking", tools=tools)
  message = parse_completion(text, thinking_mode)       # {"content", "reasoning_content", "tool_calls"}
  splitter = ChatStreamSplitter(thinking_mode); splitter.feed(delta) -> [("reasoning_content", "..."), ...]
"""

from __future__ import annotations

import copy

from dsv4_jax.serve.chat import (
  EOS, THINK_END, ChatFormatError, encode_messages, parse_message_from_completion_text, resolve_mode)
from dsv4_jax.serve.detok import _overlap
from dsv4_jax.serve.dsml import TOOL_CALLS_START

MODES = ("chat", "thinking", "max")


def chat_prompt(messages, mode: str = "chat", tools=None) -> tuple[str, str]:
  """(prompt text, thinking_mode) for `messages` in reasoning mode chat | thinking | max.

  `tools` (OpenAI format) are declared in the first system message (one is added at the start when there is
  none), where the V4 encoding expects them.
  """
  thinking_mode, effort = resolve_mode(mode)
  messages = copy.deepcopy(list(messages))
  if tools:
    system = next((m for m in messages if m.get("role") == "system"), None)
    if system is None:
      system = {"role": "system", "content": ""}
      messages.insert(0, system)
    system["tools"] = list(system.get("tools") or []) + list(tools)
  return encode_messages(messages, thinking_mode, reasoning_effort=effort), thinking_mode


def encode_chat(tokenizer, messages, mode: str = "chat", tools=None) -> tuple[list[int], str]:
  """(prompt token ids, thinking_mode); special-token strings in the prompt become their ids."""
  prompt, thinking_mode = chat_prompt(messages, mode, tools)
  return tokenizer.encode(prompt), thinking_mode


def parse_completion(text: str, thinking_mode: str) -> dict:
  """The assistant message in a finished completion (text without the final EOS).

  The official parser first; a completion it rejects (cut off by max_tokens, a stop string, a malformed tool
  call) is split plainly: reasoning up to `</think>` in thinking mode, the rest as content, no tool calls.
  Returns {"content", "reasoning_content", "tool_calls"} (OpenAI tool-call dicts without ids).
  """
  try:
    msg = parse_message_from_completion_text(text + EOS, thinking_mode)
    return {"content": msg["content"], "reasoning_content": msg["reasoning_content"], "tool_calls": msg["tool_calls"]}
  except ChatFormatError:
    pass
  reasoning, content = "", text
  if thinking_mode == "thinking":
    reasoning, _, content = text.partition(THINK_END)
  return {"content": content, "reasoning_content": reasoning, "tool_calls": []}


class ChatStreamSplitter:
  """Routes streamed completion text to `reasoning_content` (before `</think>` in thinking mode) or `content`;
  text from the start of a tool-call block on is held back (`held`) for the final parse."""

  def __init__(self, thinking_mode: str):
    self.in_reasoning = thinking_mode == "thinking"
    self.in_tools = False
    self.held = ""

  def feed(self, delta: str) -> list[tuple[str, str]]:
    self.held += delta
    out: list[tuple[str, str]] = []
    while not self.in_tools:
      marker = THINK_END if self.in_reasoning else TOOL_CALLS_START
      field = "reasoning_content" if self.in_reasoning else "content"
      at = self.held.find(marker)
      if at == -1:
        keep = _overlap(self.held, marker)
        _add(out, field, self.held[:len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]
        break
      _add(out, field, self.held[:at])
      if self.in_reasoning:
        self.in_reasoning, self.held = False, self.held[at + len(marker):]
      else:
        self.in_tools, self.held = True, self.held[at:]
    return out

  def finish(self, tool_calls_parsed: bool) -> list[tuple[str, str]]:
    """What is left at the end; held tool-call text goes out as content unless it parsed as tool calls."""
    out: list[tuple[str, str]] = []
    if not (self.in_tools and tool_calls_parsed):
      _add(out, "reasoning_content" if self.in_reasoning else "content", self.held)
    self.held = ""
    return out


def _add(out, field, text):
  if text:
    out.append((field, text))
