"""The OpenAI-compatible server (dsv4_jax.serve.server) end to end on 127.0.0.1: a tiny random model saved with
save_pretrained plus a trained BPE, loaded back as `dsv4 serve` does; every endpoint, SSE streaming, every 4xx
case, concurrency (a bad request or a vanished client next to a stream in flight), shutdown. A second server over
a scripted backend checks reasoning / tool-call parsing and the reasoning-mode fields.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from dsv4_jax import save_pretrained
from dsv4_jax.config import ModelConfig
from dsv4_jax.serve.backend import FullForwardBackend
from dsv4_jax.serve.chat import EOS, REASONING_EFFORT_MAX_PREFIX, THINK_END, THINK_START, encode_messages
from dsv4_jax.serve.dsml import encode_tool_calls
from dsv4_jax.serve.engine import Engine
from dsv4_jax.serve.server import Server
from dsv4_jax.tokenizer import Tokenizer
from dsv4_jax.weights import load_pretrained
from scripted_backend import Script
from serve_fixtures import serve_tokenizer

NAME = "tiny-test"
MAX_LEN = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model_factory):
  tok = serve_tokenizer()
  cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
  path = tmp_path_factory.mktemp("serve") / "ckpt"
  save_pretrained(model_factory(cfg), cfg, path, progress=False)
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def server(ckpt):
  model, _ = load_pretrained(ckpt, dtype="float32", progress=False)
  tok = Tokenizer.load(ckpt)
  srv = Server(Engine(FullForwardBackend(model, num_slots=2, max_len=MAX_LEN), tok), tok, NAME, port=0).start()
  yield srv
  srv.shutdown()


# ----- a small client -------------------------------------------------------------------------------------------
def call(srv, method, path, body=None, raw: bytes | None = None, headers=None):
  conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
  resp = conn.getresponse()
  text = resp.read().decode()
  conn.close()
  return resp.status, resp.getheader("Content-Type"), text


def post(srv, path, body):
  status, ctype, text = call(srv, "POST", path, body)
  assert ctype.startswith("application/json"), text
  return status, json.loads(text)


def events(text: str) -> list:
  """SSE body -> JSON events, checking the framing and the final [DONE]."""
  blocks = text.split("\n\n")
  assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", text[-200:]
  assert all(b.startswith("data: ") for b in blocks[:-1])
  return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


def stream(srv, path, body):
  status, ctype, text = call(srv, "POST", path, dict(body, stream=True))
  assert status == 200 and ctype.startswith("text/event-stream"), text
  return events(text)


def joined(chunks, field):
  return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c["choices"])


def check_error(status, body, want_status, param=None):
  assert status == want_status, body
  err = body["error"]
  assert set(err) >= {"message", "type", "param"} and isinstance(err["message"], str) and err["message"]
  if param is not None:
    assert err["param"] == param, err


# ----- endpoints --------------------------------------------------------------------------------------------------
def test_health_and_models(server):
  status, ctype, text = call(server, "GET", "/health")
  assert status == 200 and json.loads(text)["status"] == "ok" and json.loads(text)["max_len"] == MAX_LEN
  status, _, text = call(server, "GET", "/v1/models")
  assert status == 200 and [m["id"] for m in json.loads(text)["data"]] == [NAME]
  assert server.host == "127.0.0.1"


COMPLETION = {"model": NAME, "prompt": "hello world", "max_tokens": 12, "temperature": 0.9, "seed": 5,
              "ignore_eos": True}


def test_completions_plain_and_streamed(server):
  status, r = post(server, "/v1/completions", COMPLETION)
  assert status == 200 and r["object"] == "text_completion" and r["model"] == NAME
  choice = r["choices"][0]
  tok = server.tokenizer
  assert choice["finish_reason"] == "length"
  assert r["usage"] == {"prompt_tokens": 1 + len(tok.encode("hello world")), "completion_tokens": 12,
                        "total_tokens": 13 + len(tok.encode("hello world"))}
  again = post(server, "/v1/completions", COMPLETION)[1]["choices"][0]["text"]
  assert again == choice["text"]  # seeded
  chunks = stream(server, "/v1/completions", dict(COMPLETION, stream_options={"include_usage": True}))
  assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
  assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == r["usage"]
  # token-id prompts, stop strings
  ids = [tok.bos_id] + tok.encode("hello world")
  assert post(server, "/v1/completions", dict(COMPLETION, prompt=ids))[1]["choices"][0]["text"] == choice["text"]
  cut = choice["text"][len(choice["text"]) // 2:][:3]
  assert len(cut) == 3
  r = post(server, "/v1/completions", dict(COMPLETION, stop=["\x00never", cut]))[1]["choices"][0]
  assert r["finish_reason"] == "stop" and r["text"] == choice["text"][:choice["text"].index(cut)]


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0,
        "ignore_eos": True}


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_chat_completions_plain_and_streamed(server, mode):
  status, r = post(server, "/v1/chat/completions", dict(CHAT, mode=mode))
  assert status == 200 and r["object"] == "chat.completion"
  msg = r["choices"][0]["message"]
  assert msg["role"] == "assistant" and isinstance(msg["content"], str) and isinstance(msg["reasoning_content"], str)
  assert r["usage"]["completion_tokens"] == 10 and r["choices"][0]["finish_reason"] == "length"
  chunks = stream(server, "/v1/chat/completions", dict(CHAT, mode=mode))
  assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
  assert joined(chunks, "content") == msg["content"] and joined(chunks, "reasoning_content") == msg["reasoning_content"]
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"
  assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
  if mode == "chat":
    assert msg["reasoning_content"] == ""


# ----- bad requests -----------------------------------------------------------------------------------------------
LONG = "hello world " * 40  # far more than MAX_LEN tokens
BAD = [  # (path, body, status, param)
  ("/v1/chat/completions", dict(CHAT, messages=[]), 400, "messages"),
  ("/v1/chat/completions", {k: v for k, v in CHAT.items() if k != "messages"}, 400, "messages"),
  ("/v1/chat/completions", dict(CHAT, messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
  ("/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": 3}]), 400, "messages[0].content"),
  ("/v1/chat/completions", dict(CHAT, messages=[{"role": "user"}]), 400, "messages[0].content"),
  ("/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
   "messages[0].content"),
  ("/v1/chat/completions", {k: v for k, v in CHAT.items() if k != "model"}, 400, "model"),
  ("/v1/chat/completions", dict(CHAT, model="gpt-4"), 404, "model"),
  ("/v1/chat/completions", dict(CHAT, temperature=-0.5), 400, "temperature"),
  ("/v1/chat/completions", dict(CHAT, temperature=2.5), 400, "temperature"),
  ("/v1/chat/completions", dict(CHAT, temperature="hot"), 400, "temperature"),
  ("/v1/chat/completions", dict(CHAT, top_p=0), 400, "top_p"),
  ("/v1/chat/completions", dict(CHAT, top_p=1.01), 400, "top_p"),
  ("/v1/chat/completions", dict(CHAT, top_k=-3), 400, "top_k"),
  ("/v1/chat/completions", dict(CHAT, top_k=2.5), 400, "top_k"),
  ("/v1/chat/completions", dict(CHAT, max_tokens=0), 400, "max_tokens"),
  ("/v1/chat/completions", dict(CHAT, max_tokens=MAX_LEN), 400, "max_tokens"),
  ("/v1/chat/completions", dict(CHAT, seed="abc"), 400, "seed"),
  ("/v1/chat/completions", dict(CHAT, stop=7), 400, "stop"),
  ("/v1/chat/completions", dict(CHAT, stop=[""]), 400, "stop"),
  ("/v1/chat/completions", dict(CHAT, n=3), 400, "n"),
  ("/v1/chat/completions", dict(CHAT, stream="yes"), 400, "stream"),
  ("/v1/chat/completions", dict(CHAT, stream_options={"include_usage": True}), 400, "stream_options"),
  ("/v1/chat/completions", dict(CHAT, logprobs=True), 400, "logprobs"),
  ("/v1/chat/completions", dict(CHAT, presence_penalty=0.5), 400, "presence_penalty"),
  ("/v1/chat/completions", dict(CHAT, mode="turbo"), 400, "mode"),
  ("/v1/chat/completions", dict(CHAT, reasoning_effort="extreme"), 400, "reasoning_effort"),
  ("/v1/chat/completions", dict(CHAT, thinking="maybe"), 400, "thinking"),
  ("/v1/chat/completions", dict(CHAT, tools=[{"type": "function"}]), 400, "tools[0]"),
  ("/v1/chat/completions", dict(CHAT, tool_choice="required"), 400, "tool_choice"),
  ("/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": LONG}]), 400, "messages"),
  ("/v1/completions", dict(COMPLETION, prompt=LONG), 400, "prompt"),
  ("/v1/completions", {k: v for k, v in COMPLETION.items() if k != "prompt"}, 400, "prompt"),
  ("/v1/completions", dict(COMPLETION, prompt=["a", "b"]), 400, "prompt"),
  ("/v1/completions", dict(COMPLETION, prompt=[1, 100000]), 400, "prompt"),
  ("/v1/completions", dict(COMPLETION, echo=True), 400, "echo"),
  ("/v1/completions", dict(COMPLETION, max_tokens=-1), 400, "max_tokens"),
  ("/v1/completions", dict(COMPLETION, model="other"), 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_4xx_json_errors(server, path, body, status, param):
  check_error(*post(server, path, body), status, param)


def test_bad_http_requests(server):
  for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
    status, ctype, text = call(server, "POST", "/v1/chat/completions", raw=raw)
    assert ctype.startswith("application/json")
    check_error(status, json.loads(text), 400)
  status, _, text = call(server, "POST", "/v1/nothing", CHAT)
  check_error(status, json.loads(text), 404)
  status, _, text = call(server, "GET", "/v1/chat/completions")
  check_error(status, json.loads(text), 405)
  conn = http.client.HTTPConnection(server.host, server.port, timeout=30)  # no Content-Length
  conn.putrequest("POST", "/v1/completions")
  conn.endheaders()
  resp = conn.getresponse()
  check_error(resp.status, json.loads(resp.read()), 411)
  conn.close()
  assert post(server, "/v1/completions", dict(COMPLETION, max_tokens=2))[0] == 200  # still serving


def test_one_connection_carries_several_requests(server):
  conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
  for method, path, body, want in [("GET", "/health", None, 200), ("POST", "/v1/completions", b"{bad", 400),
                                   ("POST", "/v1/completions", json.dumps(dict(COMPLETION, max_tokens=2)), 200),
                                   ("POST", "/v1/completions", json.dumps(dict(COMPLETION, stream=True,
                                                                               max_tokens=2)), 200),
                                   ("GET", "/v1/models", None, 200)]:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.status == want, text
    if "stream" in str(body):
      assert events(text)[-1]["choices"][0]["finish_reason"] == "length"
  conn.close()


def test_context_error_code(server):
  status, body = post(server, "/v1/completions", dict(COMPLETION, prompt=LONG))
  assert body["error"]["code"] == "context_length_exceeded" and str(MAX_LEN) in body["error"]["message"]


# ----- concurrency ------------------------------------------------------------------------------------------------
def open_stream(srv, path, body):
  """A raw-socket POST; returns the socket once the response headers are in (status 200 checked)."""
  sock = socket.create_connection((srv.host, srv.port), timeout=120)
  data = json.dumps(dict(body, stream=True)).encode()
  sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (path.encode(), len(data), data))
  head = b""
  while b"\r\n\r\n" not in head:
    head += sock.recv(1)
  assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head, head
  return sock


def dechunk(data: bytes) -> str:
  out, pos = [], 0
  while True:
    end = data.index(b"\r\n", pos)
    n = int(data[pos:end], 16)
    if n == 0:
      return b"".join(out).decode()
    out.append(data[end + 2:end + 2 + n])
    pos = end + 2 + n + 2


def test_bad_requests_do_not_disturb_a_stream_in_flight(server):
  body = dict(COMPLETION, max_tokens=40, temperature=1.0, seed=11)
  want = post(server, "/v1/completions", body)[1]["choices"][0]["text"]
  sock = open_stream(server, "/v1/completions", body)
  data = sock.recv(1)  # the stream is running
  bad = []

  def send_bad(path, body=None, raw=None):
    status, _, text = call(server, "POST", path, body, raw=raw)
    bad.append((status, json.loads(text)))

  threads = [threading.Thread(target=send_bad, args=args) for args in [
    ("/v1/completions", dict(COMPLETION, prompt=LONG)), ("/v1/chat/completions", dict(CHAT, top_p=7)),
    ("/v1/completions", dict(COMPLETION, model="nope")), ("/v1/completions", None, b"{oops")]]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(status for status, _ in bad) == [400, 400, 400, 404] and all("error" in b for _, b in bad)
  while not data.endswith(b"0\r\n\r\n"):
    data += sock.recv(65536)
  sock.close()
  chunks = events(dechunk(data))
  assert "".join(c["choices"][0]["text"] for c in chunks) == want
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_client_that_goes_away_is_cancelled(server, monkeypatch):
  handles = []
  submit = server.engine.submit
  monkeypatch.setattr(server.engine, "submit", lambda *a, **k: handles.append(submit(*a, **k)) or handles[-1])
  sock = open_stream(server, "/v1/completions", dict(COMPLETION, max_tokens=MAX_LEN - 10))
  sock.recv(1)
  sock.close()
  c = handles[0].result(timeout=60)
  assert c.finish_reason == "cancelled" and c.completion_tokens < MAX_LEN - 10
  deadline = time.time() + 10
  while server.engine._running and time.time() < deadline:
    time.sleep(0.02)
  assert not server.engine._running and server.engine._free == [0, 1]
  assert post(server, "/v1/completions", dict(COMPLETION, max_tokens=2))[0] == 200


# ----- reasoning modes, reasoning_content and tool calls (scripted model) -------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALLS = [{"name": "add", "arguments": '{"a": 2, "b": 2}'}]


@pytest.fixture(scope="module")
def scripted(ckpt):
  tok = Tokenizer.load(ckpt)

  def script(prompt_ids):
    prompt = tok.decode(prompt_ids)
    reasoning = ("Add them." + THINK_END) if prompt.endswith(THINK_START) else ""
    tools = encode_tool_calls(CALLS) if "## Tools" in prompt else ""
    return tok.encode(reasoning + "Four." + tools + EOS)

  backend = Script(tok.vocab_size, script, tok.eos_id)
  srv = Server(Engine(backend, tok), tok, NAME, port=0).start()
  yield srv, backend, tok
  srv.shutdown()


SCRIPTED = {"model": NAME, "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 1000}


@pytest.mark.parametrize("fields,mode", [
  ({}, "chat"), ({"mode": "thinking"}, "thinking"), ({"mode": "max"}, "max"), ({"reasoning_effort": "high"}, "thinking"),
  ({"reasoning_effort": "max"}, "max"), ({"reasoning_effort": "none"}, "chat"), ({"thinking": True}, "thinking"),
  ({"thinking": {"type": "enabled"}, "reasoning_effort": "max"}, "max"),
  ({"thinking": {"type": "disabled"}, "reasoning_effort": "max"}, "chat")])
def test_reasoning_mode_fields_reach_the_prompt(scripted, fields, mode):
  srv, backend, tok = scripted
  status, r = post(srv, "/v1/chat/completions", dict(SCRIPTED, **fields))
  assert status == 200
  thinking_mode = "chat" if mode == "chat" else "thinking"
  effort = {"chat": None, "thinking": "high", "max": "max"}[mode]
  assert backend.prefills[-1] == tok.encode(encode_messages(SCRIPTED["messages"], thinking_mode,
                                                            reasoning_effort=effort))
  assert (REASONING_EFFORT_MAX_PREFIX in tok.decode(backend.prefills[-1])) == (mode == "max")
  msg = r["choices"][0]["message"]
  assert msg["content"] == "Four." and msg["reasoning_content"] == ("" if mode == "chat" else "Add them.")
  assert r["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in msg


def test_tool_calls_parsed_plain_and_streamed(scripted):
  srv, backend, tok = scripted
  body = dict(SCRIPTED, mode="thinking", tools=TOOLS)
  status, r = post(srv, "/v1/chat/completions", body)
  assert status == 200 and "## Tools" in tok.decode(backend.prefills[-1])
  choice = r["choices"][0]
  msg = choice["message"]
  assert choice["finish_reason"] == "tool_calls"
  assert (msg["content"], msg["reasoning_content"]) == ("Four.", "Add them.")
  assert [(c["type"], c["function"]) for c in msg["tool_calls"]] == [("function", CALLS[0])]
  assert msg["tool_calls"][0]["id"].startswith("call_")
  chunks = stream(srv, "/v1/chat/completions", body)
  assert joined(chunks, "reasoning_content") == "Add them." and joined(chunks, "content") == "Four."
  calls = [c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls", [])]
  assert [(c["index"], c["function"]) for c in calls] == [(0, CALLS[0])]
  assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
  # tool_choice "none" drops the tools from the prompt
  post(srv, "/v1/chat/completions", dict(body, tool_choice="none"))
  assert "## Tools" not in tok.decode(backend.prefills[-1])


def test_history_with_tool_calls_and_results_is_encoded(scripted):
  srv, backend, tok = scripted
  messages = [{"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": CALLS[0]}]},
              {"role": "tool", "tool_call_id": "c1", "content": "4"}]
  status, r = post(srv, "/v1/chat/completions", dict(SCRIPTED, messages=messages, tools=TOOLS))
  assert status == 200
  prompt = tok.decode(backend.prefills[-1])
  assert "<tool_result>4</tool_result>" in prompt and 'invoke name="add"' in prompt


def test_shutdown_closes_the_port(ckpt):
  tok = Tokenizer.load(ckpt)
  srv = Server(Engine(Script(tok.vocab_size, lambda p: [], tok.eos_id), tok), tok, NAME, port=0).start()
  assert call(srv, "GET", "/health")[0] == 200
  srv.shutdown()
  with pytest.raises(OSError):
    socket.create_connection((srv.host, srv.port), timeout=5).close()
  assert not srv.engine._thread.is_alive()
