"""Chat encoding (dsv4_jax/serve/chat.py) against DeepSeek's official encoder.

tests/data/chat/official/ holds the official test cases as published; generated.json holds outputs (or the
exceptions) of the official `encoding_dsv4.py` on designed inputs (tools/make_chat_goldens.py). Every one must be
reproduced exactly; every official failure must fail here too.
"""

import copy
import json
import pathlib

import pytest

from dsv4_jax.serve import chat
from dsv4_jax.serve.chat import ASSISTANT, EOS, THINK_END, THINK_START, encode_messages, \
  parse_message_from_completion_text
from dsv4_jax.serve.dsml import ChatFormatError

DATA = pathlib.Path(__file__).parent / "data" / "chat"
GENERATED = json.loads((DATA / "generated.json").read_text(encoding="utf-8"))["cases"]
# Official test number -> thinking_mode it is encoded with (as in the official test file).
OFFICIAL_MODES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}
# Official failures that the official code signals with these types; ours must be instances of them.
TYPED_ERRORS = {"AssertionError": AssertionError, "ValueError": ValueError, "NotImplementedError": NotImplementedError}


def _official_messages(n):
  data = json.loads((DATA / "official" / f"test_input_{n}.json").read_text(encoding="utf-8"))
  if isinstance(data, dict):  # case 1: tools stored beside the messages, attached to the system message
    data["messages"][0]["tools"] = data["tools"]
    data = data["messages"]
  return data


def _after(prompt, marker, last=False):
  start = (prompt.rfind if last else prompt.find)(marker) + len(marker)
  return prompt[start:]


@pytest.mark.parametrize("n", sorted(OFFICIAL_MODES))
def test_official_case(n):
  gold = (DATA / "official" / f"test_output_{n}.txt").read_text(encoding="utf-8")
  assert encode_messages(_official_messages(n), OFFICIAL_MODES[n]) == gold


def test_official_parse_checks():
  marker = ASSISTANT + THINK_START
  prompt = encode_messages(_official_messages(1), "thinking")
  first = _after(prompt, marker)
  first = first[:first.find(chat.USER)]
  msg = parse_message_from_completion_text(first, "thinking")
  assert msg["reasoning_content"] == "The user wants to know the weather in Beijing. I should use the get_weather tool."
  assert msg["content"] == ""
  [tc] = msg["tool_calls"]
  assert tc["function"]["name"] == "get_weather"
  assert json.loads(tc["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}
  final = parse_message_from_completion_text(_after(prompt, marker, last=True), "thinking")
  assert final["reasoning_content"] == "Got the weather data. Let me format a nice response."
  assert "22°C" in final["content"] and final["tool_calls"] == []

  prompt = encode_messages(_official_messages(2), "thinking")
  assert parse_message_from_completion_text(_after(prompt, marker, last=True), "thinking") == {
    "role": "assistant", "content": "The capital of France is Paris.",
    "reasoning_content": "The user asks about the capital of France. It is Paris.", "tool_calls": []}
  assert "The user said hello" not in prompt  # earlier reasoning dropped


@pytest.mark.parametrize("case", GENERATED, ids=[c["name"] for c in GENERATED])
def test_generated_golden(case):
  func = encode_messages if case["fn"] == "encode" else parse_message_from_completion_text
  args = copy.deepcopy(case["args"])
  if "error" not in case:
    assert func(**args) == case["expected"]
    return
  with pytest.raises(Exception) as info:
    func(**args)
  expected = TYPED_ERRORS.get(case["error"]["type"])
  if expected is not None:
    assert isinstance(info.value, expected), (case["error"], info.value)


def test_goldens_cover_every_branch_family():
  names = {c["name"].split("/")[0] for c in GENERATED}
  for needed in ("task_action", "task_query", "task_authority", "task_domain", "task_read_url", "task_title",
                 "developer_with_tools", "tool_argument_kinds", "context_plain", "wo_eos_prefill", "parse"):
    assert needed in names
  assert sum("error" in c for c in GENERATED) >= 30


CALL = {"type": "function", "function": {"name": "calc", "arguments": json.dumps(
  {"x": 1.5, "ok": True, "terms": [1, 2], "opts": {"p": None}, "s": "multi\nline \"q\" <b> 東京"})}}
ROUND_TRIP = [
  {"role": "assistant", "content": "Plain answer.", "reasoning_content": "Short thought."},
  {"role": "assistant", "content": "", "reasoning_content": "Call it.", "tool_calls": [CALL]},
  {"role": "assistant", "content": "Checking.", "reasoning_content": "Two.", "tool_calls": [
    CALL, {"type": "function", "function": {"name": "now", "arguments": "{}"}}]},
]


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("message", ROUND_TRIP, ids=["plain", "one_call", "two_calls"])
def test_round_trip(message, mode):
  question = [{"role": "user", "content": "Q"}]
  prefix = encode_messages(question, mode)
  prompt = encode_messages(question + [message], mode)
  assert prompt.startswith(prefix) and prompt.endswith(EOS)
  parsed = parse_message_from_completion_text(prompt[len(prefix):], mode)
  assert parsed["content"] == message["content"]
  assert parsed["reasoning_content"] == (message["reasoning_content"] if mode == "thinking" else "")
  got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed["tool_calls"]]
  want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
  assert got == want
  # Re-encoding the parsed message gives the same prompt.
  assert encode_messages(question + [parsed], mode) == prompt


def test_modes():
  assert chat.resolve_mode("chat") == ("chat", None)
  assert chat.resolve_mode("thinking") == ("thinking", "high")
  assert chat.resolve_mode("max") == ("thinking", "max")
  with pytest.raises(ValueError, match="unknown reasoning mode"):
    chat.resolve_mode("high")
  msgs = [{"role": "user", "content": "Q"}]
  ends = {"chat": THINK_END, "thinking": THINK_START, "max": THINK_START}
  for mode, end in ends.items():
    thinking_mode, effort = chat.resolve_mode(mode)
    prompt = encode_messages(msgs, thinking_mode, reasoning_effort=effort)
    assert prompt.endswith(ASSISTANT + end)
    assert (chat.REASONING_EFFORT_MAX_PREFIX in prompt) == (mode == "max")


def test_tokens_and_errors():
  assert chat.BOS == "<｜begin▁of▁sentence｜>" and chat.EOS == "<｜end▁of▁sentence｜>"
  assert chat.TASK_TOKENS["read_url"] == "<｜read_url｜>" and chat.EXTRACTED_URL == "<｜extracted_url｜>"
  assert issubclass(ChatFormatError, ValueError) and issubclass(ChatFormatError, AssertionError)
  with pytest.raises(TypeError):  # keyword-only: the official positional order differs from spec §13's
    encode_messages([], "chat", None)


def test_inputs_not_mutated():
  case = next(c for c in GENERATED if c["name"] == "context_plain")
  args = copy.deepcopy(case["args"])
  encode_messages(**args)
  assert args == case["args"]
