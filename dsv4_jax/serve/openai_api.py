"""The OpenAI-compatible request/response formats: validation of request bodies (ApiError names the field) and
the JSON of responses and stream chunks. No I/O here; server.py does the HTTP.

Extensions beyond OpenAI's fields: `top_k`, `stop_token_ids`, `ignore_eos`, and the reasoning mode, given by
`mode` ("chat" | "thinking" | "max"), or `reasoning_effort` ("none" -> chat; "low" | "medium" | "high" -> thinking;
"max" -> max), or `thinking` (true/false or {"type": "enabled" | "disabled"}), in that order of precedence (an
explicit `thinking` off wins over `reasoning_effort`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from dsv4_jax.serve.chat import TASK_TOKENS
from dsv4_jax.serve.conversation import MODES
from dsv4_jax.serve.params import InvalidRequest, SamplingParams

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
EFFORT_TO_MODE = {"none": "chat", "minimal": "chat", "low": "thinking", "medium": "thinking", "high": "thinking",
                  "max": "max", "xhigh": "max"}
MAX_STOP_STRINGS = 16
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


class ApiError(Exception):
  """An error answered as {"error": {"message", "type", "param", "code"}} with HTTP `status`."""

  def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
  return ApiError(400, message, param, code=code)


@dataclasses.dataclass
class ChatCall:
  messages: list[dict]
  mode: str
  tools: list[dict] | None
  params: SamplingParams
  stream: bool
  include_usage: bool


@dataclasses.dataclass
class CompletionCall:
  prompt: str | list[int]
  params: SamplingParams
  stream: bool
  include_usage: bool


# ----- requests -------------------------------------------------------------------------------------------------
def parse_chat_request(body: dict, model_name: str, default_mode: str = "chat") -> ChatCall:
  _check_common(body, model_name)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise bad("'messages' must be a non-empty list of messages", "messages")
  tools = _tools(body)
  stream, include_usage = _stream(body)
  return ChatCall([_message(m, i) for i, m in enumerate(messages)], _mode(body, default_mode), tools,
                  sampling_params(body), stream, include_usage)


def parse_completion_request(body: dict, model_name: str) -> CompletionCall:
  _check_common(body, model_name)
  for field, allowed in (("echo", (None, False)), ("suffix", (None, "")), ("best_of", (None, 1))):
    if body.get(field) not in allowed:
      raise bad(f"'{field}' is not supported (use {allowed[-1]!r} or leave it out)", field)
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of one
  if isinstance(prompt, list):
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
      raise bad("'prompt' must be a string, a non-empty list of token ids, or a list holding one of those "
                "(batches of several prompts are not supported)", "prompt")
  elif not isinstance(prompt, str):
    raise bad("'prompt' must be a string or a list of token ids", "prompt")
  stream, include_usage = _stream(body)
  return CompletionCall(prompt, sampling_params(body), stream, include_usage)


def sampling_params(body: dict) -> SamplingParams:
  """SamplingParams from OpenAI fields (+ top_k, stop_token_ids, ignore_eos); invalid values -> 400."""
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  stop = body.get("stop")
  if stop is None:
    stop = ()
  elif isinstance(stop, str):
    stop = (stop,)
  elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
    raise bad(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
  stop_ids = body.get("stop_token_ids") or []
  if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
    raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
  top_k = body.get("top_k")
  ignore_eos = body.get("ignore_eos") or False
  if not isinstance(ignore_eos, bool):
    raise bad("'ignore_eos' must be a boolean", "ignore_eos")
  fields = dict(
    max_tokens=max_tokens,
    temperature=_default(body.get("temperature"), DEFAULT_TEMPERATURE),
    top_p=_default(body.get("top_p"), 1.0),
    top_k=0 if top_k in (None, -1) else top_k,  # -1: off, as in vLLM
    seed=body.get("seed"),
    stop=tuple(stop), stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos)
  if fields["temperature"] is not None and _is_number(fields["temperature"]) and fields["temperature"] > 2:
    raise bad(f"temperature must be in [0, 2], got {fields['temperature']}", "temperature")
  try:
    return SamplingParams(**fields)
  except InvalidRequest as e:
    raise bad(str(e), e.param) from None


def _default(value, default):
  return default if value is None else value


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_common(body: dict, model_name: str) -> None:
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise bad("'model' is required (a string; GET /v1/models lists the one served)", "model")
  if model != model_name:
    raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                   code="model_not_found")
  if body.get("n") not in (None, 1):
    raise bad("only n = 1 is supported", "n")
  for field in ("presence_penalty", "frequency_penalty"):
    if body.get(field) not in (None, 0, 0.0):
      raise bad(f"'{field}' is not supported (leave it out or 0)", field)
  if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
    raise bad("logprobs are not supported", "logprobs")
  if body.get("logit_bias") not in (None, {}):
    raise bad("'logit_bias' is not supported", "logit_bias")


def _stream(body: dict) -> tuple[bool, bool]:
  stream = body.get("stream") or False
  if not isinstance(stream, bool):
    raise bad("'stream' must be a boolean", "stream")
  options = body.get("stream_options")
  if options is None:
    return stream, False
  if not stream:
    raise bad("'stream_options' is only allowed with stream = true", "stream_options")
  if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
    raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
  return stream, options.get("include_usage", False)


def _mode(body: dict, default: str) -> str:
  mode = body.get("mode")
  if mode is not None:
    if mode not in MODES:
      raise bad(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    return mode
  thinking = body.get("thinking")
  if isinstance(thinking, dict):
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled"):
      raise bad("'thinking' must be true, false or {\"type\": \"enabled\" | \"disabled\"}", "thinking")
    thinking = kind == "enabled"
  elif thinking is not None and not isinstance(thinking, bool):
    raise bad("'thinking' must be true, false or {\"type\": \"enabled\" | \"disabled\"}", "thinking")
  effort = body.get("reasoning_effort")
  if thinking is False:
    return "chat"
  if effort is not None:
    if effort not in EFFORT_TO_MODE:
      raise bad(f"'reasoning_effort' must be one of {', '.join(EFFORT_TO_MODE)}, got {effort!r}", "reasoning_effort")
    return EFFORT_TO_MODE[effort]
  return "thinking" if thinking else default


def _text(content, where: str) -> str:
  """Message content as text: a string, or a list of {"type": "text", "text"} parts (joined by newlines)."""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    parts = []
    for part in content:
      if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise bad(f"{where}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported", where)
      parts.append(part["text"])
    return "\n".join(parts)
  raise bad(f"{where}: content must be a string or a list of text parts", where)


def _message(m, i: int) -> dict:
  where = f"messages[{i}]"
  if not isinstance(m, dict):
    raise bad(f"{where} must be an object with 'role' and 'content'", where)
  role = m.get("role")
  if role not in ROLES:
    raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
  out = {"role": role}
  content = m.get("content")
  if content is None:
    if role != "assistant":
      raise bad(f"{where}.content is required for role {role!r}", f"{where}.content")
    out["content"] = ""
  else:
    out["content"] = _text(content, f"{where}.content")
  if role == "assistant":
    if m.get("reasoning_content") is not None:
      if not isinstance(m["reasoning_content"], str):
        raise bad(f"{where}.reasoning_content must be a string", f"{where}.reasoning_content")
      out["reasoning_content"] = m["reasoning_content"]
    if m.get("tool_calls"):
      out["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
  if role == "tool":
    out["tool_call_id"] = str(m.get("tool_call_id") or "")
  if m.get("task") is not None:
    if m["task"] not in TASK_TOKENS:
      raise bad(f"{where}.task must be one of {', '.join(TASK_TOKENS)}, got {m['task']!r}", f"{where}.task")
    out["task"] = m["task"]
  return out


def _tool_calls(calls, where: str) -> list[dict]:
  if not isinstance(calls, list):
    raise bad(f"{where} must be a list", where)
  out = []
  for j, c in enumerate(calls):
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
      raise bad(f"{where}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": str, \"arguments\": "
                f"JSON str}}}}", f"{where}[{j}]")
    out.append({"type": "function", "function": {"name": fn["name"], "arguments": fn["arguments"]}})
  return out


def _tools(body: dict) -> list[dict] | None:
  tools, choice = body.get("tools"), body.get("tool_choice")
  if choice not in (None, "auto", "none"):
    raise bad("'tool_choice' supports only \"auto\" and \"none\"", "tool_choice")
  if tools is None:
    return None
  if not isinstance(tools, list):
    raise bad("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
  for j, t in enumerate(tools):
    if (not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict)
        or not isinstance(t["function"].get("name"), str)):
      raise bad(f"tools[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": str, ...}}}}", f"tools[{j}]")
  return None if choice == "none" or not tools else tools


# ----- responses --------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def with_ids(tool_calls: list[dict]) -> list[dict]:
  """OpenAI tool calls with an id each (the parser gives none)."""
  return [{"id": f"call_{uuid.uuid4().hex[:24]}", **c} for c in tool_calls]


def chat_response(rid: str, model: str, message: dict, finish_reason: str, usage: dict) -> dict:
  msg = {"role": "assistant", "content": message["content"], "reasoning_content": message["reasoning_content"]}
  if message["tool_calls"]:
    msg["tool_calls"] = message["tool_calls"]
  return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "message": msg, "finish_reason": finish_reason, "logprobs": None}],
          "usage": usage}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
  return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_response(rid: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}], "usage": usage}


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None = None) -> dict:
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(rid: str, model: str, obj: str, usage: dict) -> dict:
  return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage}


def models_list(model: str, created: int) -> dict:
  return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "dsv4-jax"}]}
