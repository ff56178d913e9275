"""The serving engine: continuous batching of concurrent requests over a backend's fixed slots.

  engine = Engine(make_backend(model, num_slots=4, max_len=2048), tokenizer)
  h = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1))
  h = engine.submit_chat(messages, SamplingParams(max_tokens=256), mode="thinking")
  engine.run_until_idle()            # or engine.start(): a background thread steps while there is work
  for delta in h.stream(): ...       # text deltas (whole characters, stop strings never shown)
  c = h.result()                     # Completion: text, token_ids, finish_reason, usage, message (chat)
  engine.quick_instructions(messages, ["title", "domain"])   # {task: text}, forks of one prefill (quick_instruction.py)

Requests wait in a FIFO queue and take a free slot as one frees up. Each step decodes every active slot together
(one backend call), prefills the newly admitted ones, and samples one token per request with the request's own
parameters: the key of token i is fold_in(key(seed), i), and the backend's logits for a slot depend only on that
slot's sequence, so a request's output is the same alone or batched.

Dispatch-ahead: with a backend that draws tokens on the device (CachedBackend.decode_sample / prefill_sample), a
step dispatches its decode before reading the previous step's tokens, so the host's work (stop strings, streaming,
the next step's dispatch) overlaps the device's. A request's tokens are the same as with a step that waits (same
keys, same logits); a request that hits a stop token or string has had one more token computed, discarded
(its slot is released a step later). Engine(..., dispatch_ahead=False) waits for every step.

Speed: give the backend a model built with scan_layers=False (`dsv4 generate` / `dsv4 serve` load so; in process,
load_pretrained(..., scan_layers=False) or `dsv4_jax.unstack_layers(model)`, which copies the main layers): a
scanned layer stack copies each layer's expert weights out of the stack every decode step (H200, Flash-shaped
bench model, 128K context, batch 64: 16.0 ms a step unstacked vs 20.2 ms scanned).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import uuid
from typing import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from dsv4_jax.serve.conversation import encode_chat, parse_completion
from dsv4_jax.serve.detok import TextStream
from dsv4_jax.serve.params import InvalidRequest, SamplingParams
from dsv4_jax.serve.sampling import SamplingRows, sample_rows

log = logging.getLogger(__name__)
FINISH_REASONS = ("stop", "length", "cancelled")


class EngineError(RuntimeError):
  """A request failed inside the engine (the backend raised, or the engine shut down before it finished)."""


@dataclasses.dataclass
class Completion:
  """A finished request. finish_reason: "stop" (stop string or token, EOS included), "length" (max_tokens or the
  slot's context), "cancelled". stop_reason: the stop string or token id that ended it."""
  request_id: str
  text: str
  token_ids: list[int]
  finish_reason: str
  stop_reason: str | int | None
  prompt_tokens: int
  thinking_mode: str | None = None  # chat requests: "chat" | "thinking"
  message: dict | None = None  # chat requests: {"content", "reasoning_content", "tool_calls"}

  @property
  def completion_tokens(self) -> int:
    return len(self.token_ids)

  @property
  def usage(self) -> dict:
    return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens}


class Handle:
  """A submitted request: stream its text, wait for its Completion, or cancel it (from any thread)."""

  def __init__(self, request_id, prompt_ids, params, thinking_mode, on_delta):
    self.id, self.prompt_ids, self.params = request_id, list(prompt_ids), params
    self.thinking_mode = thinking_mode
    self._on_delta = on_delta
    self._events: queue.Queue = queue.Queue()
    self._done = threading.Event()
    self._completion: Completion | None = None
    self._error: BaseException | None = None
    self.cancelled = False

  def stream(self, timeout: float | None = None) -> Iterator[str]:
    """Text deltas as they are generated; returns when the request ends (then `result()` is ready)."""
    while True:
      try:
        kind, value = self._events.get(timeout=timeout)
      except queue.Empty:
        raise TimeoutError(f"request {self.id}: no output for {timeout} s") from None
      if kind == "delta":
        yield value
      else:
        self._events.put((kind, value))  # keep the end marker for result() and further stream() calls
        if kind == "error":
          raise value
        return

  def result(self, timeout: float | None = None) -> Completion:
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
    if self._error is not None:
      raise self._error
    return self._completion

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def cancel(self) -> None:
    """Ends the request at the engine's next step (finish_reason "cancelled"); its slot goes to the next one."""
    self.cancelled = True

  # engine side
  def _delta(self, text: str) -> None:
    if text:
      self._events.put(("delta", text))
      if self._on_delta is not None:
        self._on_delta(text)

  def _finish(self, completion: Completion) -> None:
    self._completion = completion
    self._events.put(("done", completion))
    self._done.set()

  def _fail(self, error: BaseException) -> None:
    self._error = error
    self._events.put(("error", error))
    self._done.set()


@dataclasses.dataclass
class _Running:
  handle: Handle
  slot: int
  stream: TextStream
  stop_ids: frozenset
  max_tokens: int
  token_ids: list = dataclasses.field(default_factory=list)
  last: int | None = None  # the sampled token not yet fed to the backend
  issued: int = 0  # dispatch-ahead: tokens drawn or being drawn on the device (the next one's index)


@dataclasses.dataclass
class _Job:
  fn: Callable
  min_slots: int
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: object = None
  error: BaseException | None = None


class Engine:
  """Continuous batching over `backend` (see backend.py). Not thread-safe except `submit*`, `cancel` (on the
  handle), `start` and `shutdown`: `step` runs in one thread at a time (the background thread once started)."""

  def __init__(self, backend, tokenizer, *, eos_id: int | None = None, dispatch_ahead: bool | None = None):
    """dispatch_ahead: None = when the backend can (draws tokens on the device, not speculative); True requires
    it; False waits for each step's tokens before the next step."""
    able = hasattr(backend, "decode_sample") and not getattr(backend, "speculative", False)
    if dispatch_ahead and not able:
      raise ValueError(f"dispatch_ahead needs a backend that draws tokens on the device (decode_sample / "
                       f"prefill_sample, not speculative); {type(backend).__name__} does not")
    self.dispatch_ahead = able if dispatch_ahead is None else dispatch_ahead
    self._inflight: list = []  # dispatch-ahead: (DrawnTokens, runs) of the last step, read during the next
    self.backend, self.tokenizer = backend, tokenizer
    self.eos_id = tokenizer.eos_id if eos_id is None else eos_id
    self._queue: collections.deque[Handle] = collections.deque()
    self._free = list(range(backend.num_slots))
    self._running: dict[int, _Running] = {}  # slot -> request
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._ids = itertools.count()
    self._jobs: collections.deque[_Job] = collections.deque()  # run_exclusive work, run between steps

  @property
  def num_slots(self) -> int:
    return self.backend.num_slots

  @property
  def max_len(self) -> int:
    return self.backend.max_len

  # ----- submitting ------------------------------------------------------------------------------------------
  def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
             on_delta: Callable[[str], None] | None = None, thinking_mode: str | None = None) -> Handle:
    """Queues a request for `prompt_ids` (BOS included if wanted). Raises InvalidRequest for a prompt that leaves
    no room in the context, or max_tokens beyond it. `on_delta(text)` is called from the engine's thread."""
    prompt_ids = [int(t) for t in prompt_ids]
    params = SamplingParams() if params is None else params
    if not prompt_ids:
      raise InvalidRequest("the prompt is empty: give at least one token", "prompt")
    room = self.max_len - len(prompt_ids)
    if room < 1:
      raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; the context is {self.max_len} tokens, so no "
                           f"token could be generated", "prompt")
    if params.max_tokens is not None and params.max_tokens > room:
      raise InvalidRequest(f"max_tokens = {params.max_tokens} exceeds the room left in the context: "
                           f"{self.max_len} - {len(prompt_ids)} prompt tokens = {room}", "max_tokens")
    vocab = getattr(self.backend, "vocab_size", None)
    if vocab is not None and not all(0 <= t < vocab for t in prompt_ids):
      raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
    handle = Handle(f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}", prompt_ids, params.with_seed(), thinking_mode,
                    on_delta)
    with self._cond:
      if self._stopping:
        raise EngineError("the engine is shut down")
      self._queue.append(handle)
      self._cond.notify_all()
    return handle

  def submit_chat(self, messages, params: SamplingParams | None = None, *, mode: str = "chat", tools=None,
                  on_delta: Callable[[str], None] | None = None) -> Handle:
    """A chat request: `messages` encoded in reasoning mode chat | thinking | max; the Completion's `message`
    holds the parsed content / reasoning_content / tool_calls."""
    prompt_ids, thinking_mode = encode_chat(self.tokenizer, messages, mode, tools)
    return self.submit(prompt_ids, params, on_delta=on_delta, thinking_mode=thinking_mode)

  # ----- running ---------------------------------------------------------------------------------------------
  @property
  def has_work(self) -> bool:
    with self._cond:
      return bool(self._queue or self._running or self._jobs or self._inflight)

  def run_until_idle(self) -> None:
    """Steps in the calling thread until no request is queued or running (not with the background thread)."""
    if self._thread is not None:
      raise RuntimeError("the engine's background thread is running; wait on the handles instead")
    while self.has_work:
      self.step()

  def step(self) -> None:
    """Admits queued requests into free slots, decodes every running slot, samples one token per request."""
    self._run_jobs()
    with self._cond:
      admitted = []
      while self._queue and self._free and not self._jobs:  # a waiting job has the next free slots
        handle = self._queue.popleft()
        if handle.cancelled:
          handle._finish(self._empty_completion(handle, "cancelled"))
          continue
        admitted.append((handle, self._free.pop(0)))
    for run in [r for r in self._running.values() if r.handle.cancelled]:
      self._end(run, "cancelled", None)
    if self.dispatch_ahead:
      self._step_ahead(admitted)
      return

    rows, owners = [], []
    decoding = [r for r in self._running.values() if r.last is not None]
    if decoding and getattr(self.backend, "speculative", False):
      self._speculate(decoding)  # MTP speculation: tokens sampled inside the backend's step (speculative.py)
      decoding = []
    if decoding:
      logits = self._or_fail("decode", decoding,
                             lambda: self.backend.decode([r.slot for r in decoding], [r.last for r in decoding]))
      if logits is not None:
        rows.append(logits)
        owners += decoding
    for handle, slot in admitted:
      run = self._start(handle, slot)
      logits = self._or_fail("prefill", [run], lambda: self.backend.prefill(slot, handle.prompt_ids))
      if logits is not None:
        rows.append(logits[None])
        owners.append(run)
    if owners:
      for run, tok in zip(owners, self._sample(jnp.concatenate(rows, axis=0), owners)):
        self._accept(run, int(tok))

  def _step_ahead(self, admitted) -> None:
    """Dispatches this step (decode of the running slots, prefills of the admitted ones, tokens drawn on the
    device), then reads the previous step's tokens while this one runs."""
    drawn = []
    decoding = [r for r in self._running.values() if 0 < r.issued < r.max_tokens]
    if decoding:
      rows = SamplingRows.build(self.num_slots, {r.slot: (r.handle.params, r.issued) for r in decoding})
      tokens = self._or_fail("decode", decoding,
                             lambda: self.backend.decode_sample([r.slot for r in decoding], rows))
      if tokens is not None:
        drawn.append((tokens, decoding))
        for run in decoding:
          run.issued += 1
    for handle, slot in admitted:
      run = self._start(handle, slot)
      first = SamplingRows.build(1, {0: (handle.params, 0)})
      tokens = self._or_fail("prefill", [run], lambda: self.backend.prefill_sample(slot, handle.prompt_ids, first))
      if tokens is not None:
        drawn.append((tokens, [run]))
        run.issued = 1
    previous, self._inflight = self._inflight, drawn
    self._collect(previous)
    if not self._running:  # nothing left to dispatch next step: read this one now
      previous, self._inflight = self._inflight, []
      self._collect(previous)

  def _or_fail(self, what: str, runs, fn):
    """fn()'s result; if it raises, `runs` fail with it (the engine keeps serving the others) and None."""
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
      log.exception("%s failed", what)
      for run in runs:
        self._abort(run, e)
      return None

  def _collect(self, drawn) -> None:
    """Reads dispatched steps' tokens and accepts them for the requests still running in those slots."""
    for tokens, runs in drawn:
      live = [r for r in runs if self._running.get(r.slot) is r]  # not ended (stop, cancel) since dispatch
      if not live:
        continue
      try:
        tokens_B = tokens.read()
      except Exception as e:  # noqa: BLE001 - the step failed on the device (or the cache overflowed)
        log.exception("a dispatched step failed")
        for run in live:
          self._abort(run, e)
        continue
      for run in live:  # accepting ends at most that run: the others stay live
        self._accept(run, int(tokens_B[run.slot]))

  def _speculate(self, runs) -> None:
    """One speculative backend step: each request gets 1 or 2 tokens, drawn as plain decoding would."""
    try:
      tokens_N2, kept_N = self.backend.speculate(
          [r.slot for r in runs], [r.last for r in runs], [r.handle.params for r in runs],
          [len(r.token_ids) for r in runs], [r.max_tokens - len(r.token_ids) for r in runs])
    except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
      log.exception("speculative decode failed")
      for run in runs:
        self._abort(run, e)
      return
    for run, toks, n in zip(runs, tokens_N2, kept_N):
      for tok in toks[:n]:
        if self._running.get(run.slot) is not run:
          break  # ended on the previous token: the rest is dropped
        self._accept(run, int(tok))

  @property
  def stats(self):
    """The backend's statistics (speculative backend: SpecStats with acceptance_rate), else None."""
    return getattr(self.backend, "stats", None)

  def _sample(self, logits_NV, runs) -> np.ndarray:
    B = self.num_slots  # a fixed batch: the sampler compiles once
    logits_BV = jnp.pad(logits_NV, ((0, B - len(runs)), (0, 0)))
    rows = SamplingRows.build(B, {i: (r.handle.params, len(r.token_ids)) for i, r in enumerate(runs)})
    tokens = sample_rows(logits_BV, *rows.arrays)
    return np.asarray(tokens)[:len(runs)]

  def _start(self, handle: Handle, slot: int) -> _Running:
    p = handle.params
    stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else {self.eos_id})
    room = self.max_len - len(handle.prompt_ids)
    run = _Running(handle, slot, TextStream(self.tokenizer, p.stop), frozenset(stop_ids),
                   room if p.max_tokens is None else min(p.max_tokens, room))
    self._running[slot] = run
    return run

  def _accept(self, run: _Running, tok: int) -> None:
    run.token_ids.append(tok)
    if tok in run.stop_ids:
      run.handle._delta(run.stream.finish())
      self._end(run, "stop", tok)
      return
    run.handle._delta(run.stream.push(tok))
    if run.stream.stop_hit is not None:
      self._end(run, "stop", run.stream.stop_hit)
    elif len(run.token_ids) >= run.max_tokens:
      run.handle._delta(run.stream.finish())
      self._end(run, "length", None)
    else:
      run.last = tok

  def _release(self, run: _Running) -> None:
    del self._running[run.slot]
    try:
      self.backend.release(run.slot)
    finally:
      with self._cond:
        self._free.append(run.slot)
        self._free.sort()

  def _end(self, run: _Running, reason: str, stop_reason) -> None:
    self._release(run)
    h = run.handle
    c = Completion(h.id, run.stream.text, list(run.token_ids), reason, stop_reason, len(h.prompt_ids),
                   h.thinking_mode)
    if h.thinking_mode is not None:
      c.message = parse_completion(c.text, h.thinking_mode)
    h._finish(c)

  def _abort(self, run: _Running, error: BaseException) -> None:
    self._release(run)
    run.handle._fail(EngineError(f"request {run.handle.id} failed: {type(error).__name__}: {error}"))

  def _empty_completion(self, h: Handle, reason: str) -> Completion:
    return Completion(h.id, "", [], reason, None, len(h.prompt_ids), h.thinking_mode,
                      None if h.thinking_mode is None else parse_completion("", h.thinking_mode))

  # ----- exclusive work between steps (Quick Instruction) -----------------------------------------------------
  def quick_instructions(self, conversation, tasks, **kw) -> dict[str, str]:
    """{task: answer text}: see dsv4_jax.serve.quick_instruction.run_quick_instructions."""
    from dsv4_jax.serve.quick_instruction import run_quick_instructions
    return run_quick_instructions(self, conversation, tasks, **kw)

  def run_exclusive(self, fn: Callable[[list[int]], object], min_slots: int = 1, timeout: float | None = None):
    """fn(free slots) with the backend to itself, between two steps (in the engine's thread once started, else
    in this one, stepping running requests until `min_slots` slots are free; new requests wait meanwhile).
    fn must leave those slots free again. Returns fn's result or raises its exception."""
    if not 1 <= min_slots <= self.num_slots:
      raise ValueError(f"min_slots = {min_slots} must be in [1, {self.num_slots}] (the engine's slots)")
    job = _Job(fn, min_slots)
    with self._cond:
      if self._stopping:
        raise EngineError("the engine is shut down")
      self._jobs.append(job)
      self._cond.notify_all()
    if self._thread is None:
      while not job.done.is_set():
        self.step()
    elif not job.done.wait(timeout):
      raise TimeoutError(f"exclusive engine work did not finish within {timeout} s")
    if job.error is not None:
      raise job.error
    return job.result

  def _run_jobs(self) -> None:
    while True:
      with self._cond:
        if not self._jobs or len(self._free) < self._jobs[0].min_slots:
          return
        job, free = self._jobs.popleft(), list(self._free)
      try:
        job.result = job.fn(free)
      except BaseException as e:  # noqa: BLE001 - handed to the caller
        job.error = e
      job.done.set()

  # ----- background thread -----------------------------------------------------------------------------------
  def start(self) -> Engine:
    """Steps in a background thread whenever there is work (for the server)."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
      self._thread.start()
    return self

  def _loop(self) -> None:
    while True:
      with self._cond:
        while not self._stopping and not self._queue and not self._running and not self._jobs:
          self._cond.wait()
        if self._stopping:
          return
      try:
        self.step()
      except Exception as e:  # noqa: BLE001 - an engine bug: fail what is running, keep the thread alive
        log.exception("engine step failed")
        for run in list(self._running.values()):
          self._abort(run, e)

  def shutdown(self, timeout: float | None = 30) -> None:
    """Stops the background thread; requests still queued or running fail with EngineError."""
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
    with self._cond:
      waiting, self._queue = list(self._queue), collections.deque()
    for h in waiting:
      h._fail(EngineError(f"request {h.id}: the engine shut down"))
    with self._cond:
      jobs, self._jobs = list(self._jobs), collections.deque()
    for job in jobs:
      job.error = EngineError("the engine shut down")
      job.done.set()
    for run in list(self._running.values()):
      self._abort(run, RuntimeError("the engine shut down"))
