"""An OpenAI-compatible HTTP server over the engine (standard library only).

  server = Server(engine, tokenizer, model_name="tiny")   # 127.0.0.1:8000 by default; port 0 = any free port
  server.start()            # engine thread + HTTP thread; or server.serve_forever() in this thread
  server.url                # "http://127.0.0.1:PORT"
  server.shutdown()

Endpoints: POST /v1/chat/completions, POST /v1/completions (both stream with `"stream": true` as server-sent
events, `data: {json}` chunks then `data: [DONE]`), POST /v1/quick_instructions (not OpenAI: Quick Instruction
tasks forked from one prefill of the conversation, see _quick), GET /v1/models, GET /health. Each HTTP
connection has its own thread, which validates its request (4xx JSON errors, openai_api.ApiError), queues it with the engine and writes
the answer; a bad request never reaches the engine, so it cannot disturb requests in flight.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dsv4_jax.serve import openai_api as api
from dsv4_jax.serve.chat import ChatFormatError
from dsv4_jax.serve.conversation import ChatStreamSplitter, encode_chat
from dsv4_jax.serve.engine import Engine, EngineError
from dsv4_jax.serve.params import InvalidRequest

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 32 << 20


class Server:
  """The HTTP front of an Engine. `default_mode`: the chat reasoning mode when a request names none."""

  def __init__(self, engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000, *,
               default_mode: str = "chat", log_requests: bool = False):
    self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
    self.default_mode, self.log_requests = default_mode, log_requests
    self.created = int(time.time())
    self.httpd = ThreadingHTTPServer((host, port), _Handler)
    self.httpd.daemon_threads = True
    self.httpd.app = self
    self._thread: threading.Thread | None = None

  @property
  def host(self) -> str:
    return self.httpd.server_address[0]

  @property
  def port(self) -> int:
    return self.httpd.server_address[1]

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def serve_forever(self) -> None:
    """Serves in the calling thread until `shutdown` (from another thread) or KeyboardInterrupt."""
    self.engine.start()
    try:
      self.httpd.serve_forever()
    finally:
      self.httpd.server_close()
      self.engine.shutdown()

  def start(self) -> Server:
    """Serves from a background thread."""
    self.engine.start()
    self._thread = threading.Thread(target=self.httpd.serve_forever, name="dsv4-http", daemon=True)
    self._thread.start()
    return self

  def shutdown(self) -> None:
    self.httpd.shutdown()
    if self._thread is not None:
      self._thread.join()
      self.httpd.server_close()
    self.engine.shutdown()


class _Handler(BaseHTTPRequestHandler):
  server_version = "dsv4-jax"
  protocol_version = "HTTP/1.1"

  @property
  def app(self) -> Server:
    return self.server.app

  def log_message(self, format, *args):  # noqa: A002 - the base class's signature
    if self.app.log_requests:
      log.info("%s - %s", self.address_string(), format % args)

  # ----- routing -------------------------------------------------------------------------------------------------
  ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/quick_instructions": "POST",
            "/v1/models": "GET", "/health": "GET"}

  def do_GET(self):
    self._dispatch("GET")

  def do_POST(self):
    self._dispatch("POST")

  def _dispatch(self, method: str) -> None:
    path = self.path.split("?", 1)[0].rstrip("/") or "/"
    try:
      if path not in self.ROUTES or self.ROUTES[path] != method:
        self.close_connection = True  # any request body stays unread
        if path not in self.ROUTES:
          raise api.ApiError(404, f"no endpoint {path}; endpoints: {', '.join(self.ROUTES)}", type="not_found_error")
        raise api.ApiError(405, f"{path} takes {self.ROUTES[path]}, not {method}")
      if path == "/health":
        self._json(200, {"status": "ok", "model": self.app.model_name, "slots": self.app.engine.num_slots,
                         "max_len": self.app.engine.max_len})
      elif path == "/v1/models":
        self._json(200, api.models_list(self.app.model_name, self.app.created))
      elif path == "/v1/chat/completions":
        self._chat(self._body())
      elif path == "/v1/quick_instructions":
        self._quick(self._body())
      else:
        self._completion(self._body())
    except api.ApiError as e:
      if e.status >= 500:
        log.error("%s %s: %s", method, path, e.message)
      self._json(e.status, e.body())
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    except Exception as e:  # noqa: BLE001 - answer 500, keep serving
      log.exception("%s %s failed", method, path)
      self._json(500, api.ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body())

  def _body(self) -> dict:
    length = self.headers.get("Content-Length")
    if length is None:
      self.close_connection = True
      raise api.ApiError(411, "a JSON body with a Content-Length header is required")
    try:
      n = int(length)
    except ValueError:
      self.close_connection = True
      raise api.ApiError(400, f"bad Content-Length {length!r}") from None
    if n > MAX_BODY_BYTES:
      self.close_connection = True
      raise api.ApiError(413, f"request body of {n} bytes exceeds the limit of {MAX_BODY_BYTES}")
    raw = self.rfile.read(n)
    try:
      body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise api.bad(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
      raise api.bad("the JSON body must be an object")
    return body

  # ----- endpoints -----------------------------------------------------------------------------------------------
  def _chat(self, body: dict) -> None:
    app = self.app
    call = api.parse_chat_request(body, app.model_name, app.default_mode)
    try:
      prompt_ids, thinking_mode = encode_chat(app.tokenizer, call.messages, call.mode, call.tools)
    except (ChatFormatError, NotImplementedError) as e:
      raise api.bad(f"cannot encode the messages: {e}", "messages") from None
    handle = self._submit(prompt_ids, call.params, thinking_mode, "messages")
    rid, model = api.new_id("chatcmpl"), app.model_name
    if not call.stream:
      c = self._result(handle)
      msg = dict(c.message, tool_calls=api.with_ids(c.message["tool_calls"]))
      reason = "tool_calls" if msg["tool_calls"] else c.finish_reason
      self._json(200, api.chat_response(rid, model, msg, reason, c.usage))
      return
    splitter = ChatStreamSplitter(thinking_mode)

    def chunk(delta, reason=None):
      return api.chat_chunk(rid, model, delta, reason)

    with self._sse(handle) as send:
      send(chunk({"role": "assistant", "content": ""}))
      for text in handle.stream():
        for field, part in splitter.feed(text):
          send(chunk({field: part}))
      c = handle.result()
      calls = api.with_ids(c.message["tool_calls"])
      for field, part in splitter.finish(bool(calls)):
        send(chunk({field: part}))
      if calls:
        send(chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}))
      send(chunk({}, "tool_calls" if calls else c.finish_reason))
      if call.include_usage:
        send(api.usage_chunk(rid, model, "chat.completion.chunk", c.usage))

  def _completion(self, body: dict) -> None:
    app = self.app
    call = api.parse_completion_request(body, app.model_name)
    if isinstance(call.prompt, str):
      prompt_ids = [app.tokenizer.bos_id] + app.tokenizer.encode(call.prompt)
    else:
      prompt_ids = call.prompt
    handle = self._submit(prompt_ids, call.params, None, "prompt")
    rid, model = api.new_id("cmpl"), app.model_name
    if not call.stream:
      c = self._result(handle)
      self._json(200, api.completion_response(rid, model, c.text, c.finish_reason, c.usage))
      return
    with self._sse(handle) as send:
      for text in handle.stream():
        send(api.completion_chunk(rid, model, text))
      c = handle.result()
      send(api.completion_chunk(rid, model, "", c.finish_reason))
      if call.include_usage:
        send(api.usage_chunk(rid, model, "text_completion", c.usage))

  def _quick(self, body: dict) -> None:
    """{"model", "messages", "tasks": ["title", ...], "mode"?, "max_tokens"?} -> {"answers": {task: text}}:
    greedy answers (sampling fields other than max_tokens are ignored), see serve/quick_instruction.py."""
    from dsv4_jax.serve.quick_instruction import TASKS
    app = self.app
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
      raise api.bad(f"'tasks' must be a non-empty list of task names ({', '.join(TASKS)})", "tasks")
    call = api.parse_chat_request({k: v for k, v in body.items() if k != "tasks"}, app.model_name, app.default_mode)
    if call.stream:
      raise api.bad("'stream' is not supported for quick instructions", "stream")
    try:
      answers = app.engine.quick_instructions(call.messages, tasks, mode=call.mode, tools=call.tools,
                                              max_tokens=call.params.max_tokens or 32)
    except InvalidRequest as e:
      raise api.bad(str(e), e.param) from None
    except ChatFormatError as e:
      raise api.bad(f"cannot encode the messages: {e}", "messages") from None
    except NotImplementedError as e:
      raise api.ApiError(501, str(e), type="server_error") from None
    except EngineError as e:
      raise api.ApiError(503, str(e), type="server_error") from None
    self._json(200, {"id": api.new_id("qi"), "object": "quick_instructions", "model": app.model_name,
                     "answers": answers})

  def _submit(self, prompt_ids, params, thinking_mode, prompt_field: str):
    try:
      return self.app.engine.submit(prompt_ids, params, thinking_mode=thinking_mode)
    except InvalidRequest as e:
      param = prompt_field if e.param == "prompt" else e.param
      code = "context_length_exceeded" if e.param in ("prompt", "max_tokens") and "context" in str(e) else None
      raise api.bad(str(e), param, code) from None
    except EngineError as e:
      raise api.ApiError(503, str(e), type="server_error") from None

  def _result(self, handle):
    try:
      return handle.result()
    except EngineError as e:
      raise api.ApiError(500, str(e), type="server_error") from None

  # ----- writing -------------------------------------------------------------------------------------------------
  def _json(self, status: int, obj: dict) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    self.send_response(status)
    self.send_header("Content-Type", "application/json; charset=utf-8")
    self.send_header("Content-Length", str(len(data)))
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(data)

  def _sse(self, handle):
    return _EventStream(self, handle)


class _EventStream:
  """`with _EventStream(handler, handle) as send:` a chunked text/event-stream response; `send(obj)` writes one
  `data: {json}` event; the exit writes `data: [DONE]` (after an error event if the engine failed). A client that
  goes away cancels the request."""

  def __init__(self, handler: _Handler, handle):
    self.h, self.handle = handler, handle

  def __enter__(self):
    h = self.h
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream; charset=utf-8")
    h.send_header("Cache-Control", "no-cache")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    return self.send

  def send(self, obj) -> None:
    self._write(f"data: {json.dumps(obj, ensure_ascii=False)}\n\n")

  def _write(self, text: str) -> None:
    data = text.encode("utf-8")
    self.h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    self.h.wfile.flush()

  def __exit__(self, kind, error, tb):
    if kind in (BrokenPipeError, ConnectionResetError):
      self.handle.cancel()
      self.h.close_connection = True
      return True
    try:
      if isinstance(error, EngineError):
        self.send(api.ApiError(500, str(error), type="server_error").body())
      elif error is not None:
        log.error("stream failed: %s: %s", kind.__name__, error)
        self.send(api.ApiError(500, f"internal error: {kind.__name__}: {error}", type="server_error").body())
      self._write("data: [DONE]\n\n")
      self.h.wfile.write(b"0\r\n\r\n")
      self.h.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
      self.h.close_connection = True
    if error is not None:
      self.handle.cancel()
    return error is None or isinstance(error, Exception)
