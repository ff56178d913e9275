"""DSML: how DeepSeek-V4 declares tools in the prompt and writes tool calls (spec §13).

A call is `<｜DSML｜invoke name="f">` holding one `<｜DSML｜parameter name="p" string="true|false">v</｜DSML｜parameter>`
line per argument: string values are written raw (`string="true"`), everything else as JSON. The parser accepts
exactly what the official encoder writes, quirks included, and raises ChatFormatError on anything else.
"""

import json
import re

from dsv4_jax.serve.tokens import DSML, THINK_END, THINK_START

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
# What marks the start of tool calls inside a completion (the encoder puts a blank line before the block).
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"
_INVOKE_OPEN = f"<{DSML}invoke"
_INVOKE_CLOSE = f"</{DSML}invoke"
_PARAM_OPEN = f"<{DSML}parameter"
_PARAM_CLOSE = f"/{DSML}parameter"  # the "<" before it ends the value

# Like the official `^...$` patterns: `.*?` spans newlines, and one trailing newline after the match is tolerated.
_INVOKE_HEADER = re.compile(r'\s*name="(.*?)">\n\n?\Z', re.DOTALL)
_PARAM_BODY = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?\Z', re.DOTALL)

TOOLS_PROMPT = f"""## Tools

You have access to a set of tools to help answer the user's question. \
You can invoke tools by writing a "{TOOL_CALLS_OPEN}" block like the following:

{TOOL_CALLS_OPEN}
{_INVOKE_OPEN} name="$TOOL_NAME">
{_PARAM_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE<{_PARAM_CLOSE}>
...
{_INVOKE_CLOSE}>
{_INVOKE_OPEN} name="$TOOL_NAME2">
...
{_INVOKE_CLOSE}>
{TOOL_CALLS_CLOSE}

String parameters should be specified as is and set `string="true"`. \
For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside \
{THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


class ChatFormatError(ValueError, AssertionError):
  """Invalid chat input or malformed completion.

  Also an AssertionError because the official encoder signals these cases with `assert` (and some with
  ValueError), so code written against it keeps catching ours.
  """


def to_json(value) -> str:
  """JSON as the official encoder writes it: `", "` / `": "` separators, non-ASCII kept."""
  return json.dumps(value, ensure_ascii=False)


def render_tools(functions) -> str:
  """The tools section of a system/developer prompt; `functions` are the OpenAI `tool["function"]` dicts."""
  return TOOLS_PROMPT.replace("{schemas}", "\n".join(to_json(f) for f in functions))


def _parameter_lines(arguments) -> str:
  """One DSML parameter line per argument; arguments that are not valid JSON travel as one raw "arguments" string."""
  try:
    args = json.loads(arguments)
  except Exception:  # noqa: BLE001 - the official encoder falls back on any failure (bad JSON, non-string)
    args = {"arguments": arguments}
  if not isinstance(args, dict):
    raise ChatFormatError(f"tool call arguments must be a JSON object, got {arguments!r}")
  lines = []
  for key, value in args.items():
    is_str = "true" if isinstance(value, str) else "false"
    text = value if is_str == "true" else to_json(value)
    lines.append(f'{_PARAM_OPEN} name="{key}" string="{is_str}">{text}<{_PARAM_CLOSE}>')
  return "\n".join(lines)


def encode_tool_calls(calls) -> str:
  """`calls` ({"name", "arguments": JSON string}) as the block that follows an assistant's content, blank line first."""
  invokes = [
    f'{_INVOKE_OPEN} name="{call.get("name")}">\n{_parameter_lines(call["arguments"])}\n{_INVOKE_CLOSE}>'
    for call in calls
  ]
  return f"\n\n{TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_CLOSE}"


def scan(text: str, start: int, stops):
  """Read from `start` to the earliest of `stops` (ties: the first listed): (text before it, index after it, stop).

  Without a stop: (rest of text, len(text), None).
  """
  best_at, best = len(text), None
  for stop in stops:
    at = text.find(stop, start)
    if at != -1 and at < best_at:
      best_at, best = at, stop
  if best is None:
    return text[start:], len(text), None
  return text[start:best_at], best_at + len(best), best


def _arguments_json(params) -> str:
  """The JSON object string of parsed parameters; string="false" values are pasted in as written."""
  items = [f"{to_json(k)}: {to_json(v) if is_str == 'true' else v}" for k, (v, is_str) in params.items()]
  return "{" + ", ".join(items) + "}"


def parse_tool_calls(text: str, pos: int):
  """Parse invokes from `pos`, just after `\\n\\n<｜DSML｜tool_calls`: (index after the block, last stop, calls).

  Calls are {"name", "arguments": JSON string}. A completion cut off right after a parameter line or after the
  block opening parses as far as it goes (official behaviour); the caller checks what follows.
  """
  calls, stop = [], None
  while pos < len(text):
    gap, pos, stop = scan(text, pos, (_INVOKE_OPEN, TOOL_CALLS_CLOSE))
    if gap != ">\n":
      raise ChatFormatError(f"tool calls: expected '>\\n' before the next tag, got {gap!r}")
    if stop == TOOL_CALLS_CLOSE:
      break
    if stop is None:
      raise ChatFormatError("tool calls: block ends without its closing tag")
    header, pos, stop = scan(text, pos, (_PARAM_OPEN, _INVOKE_CLOSE))
    match = _INVOKE_HEADER.match(header)
    if match is None:
      raise ChatFormatError(f"tool calls: bad invoke header {header!r}")
    params = {}
    while stop == _PARAM_OPEN:
      body, pos, stop = scan(text, pos, (_PARAM_CLOSE,))
      param = _PARAM_BODY.match(body)
      if param is None:
        raise ChatFormatError(f"tool calls: bad parameter {body!r}")
      key, is_str, value = param.groups()
      if key in params:
        raise ChatFormatError(f"tool calls: duplicate parameter {key!r}")
      params[key] = (value, is_str)
      gap, pos, stop = scan(text, pos, (_PARAM_OPEN, _INVOKE_CLOSE))
      if gap != ">\n":
        raise ChatFormatError(f"tool calls: expected '>\\n' after a parameter, got {gap!r}")
    calls.append({"name": match.group(1), "arguments": _arguments_json(params)})
  return pos, stop, calls
