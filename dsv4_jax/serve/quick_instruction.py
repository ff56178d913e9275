"""Quick Instruction (spec §13): auxiliary tasks answered from the already-cached conversation, no re-prefill.

  answers = engine.quick_instructions(messages, ["title", "domain", "query"], mode="chat")   # {task: text}
  answers = run_quick_instructions(engine, messages, tasks)                                 # the same
  run = quick_instruction_ids(backend, prefix_ids, {"title": [id], ...}, slots=[0, 1, 2], eos_id=1)

The conversation is prefilled once into a parent slot. Each task forks it (`backend.fork`: the state rows copied,
the finished cache pages shared copy-on-write, see serve/cache.py), appends its task suffix to the fork, and
decodes a short greedy answer; all forks step together (one batched extend, then one batched decode per token),
in waves when there are fewer free slots than tasks. The parent is never written, so its own continuation is
unchanged. `conversation` is a list of chat messages (encoded in `mode` with the official V4 rules) or the
prompt token ids of an already-encoded conversation.

The task suffix (official `render_message`): after the conversation's last message, `<｜action｜>` tasks append
`<｜Assistant｜>` + (`<think>` in thinking mode, else `</think>`) + `<｜action｜>`; the others append their token
(`<｜title｜>` after an assistant turn's EOS, `<｜query｜>` etc. after a user turn). The prefix is checked against
the encoder: encode_messages(messages with `"task": t` on the last one) == prefix + suffix(t) for every task.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np

from dsv4_jax.serve.chat import ASSISTANT, THINK_END, THINK_START, resolve_mode
from dsv4_jax.serve.conversation import chat_prompt
from dsv4_jax.serve.params import InvalidRequest
from dsv4_jax.serve.tokens import TASK_ACTION, TASK_TOKENS

TASKS = tuple(TASK_TOKENS)


def task_suffix(task: str, thinking_mode: str) -> str:
  """The text a task appends to the encoded conversation."""
  if task not in TASK_TOKENS:
    raise InvalidRequest(f"unknown task {task!r}; expected one of {', '.join(TASKS)}", "tasks")
  if task == "action":
    return ASSISTANT + (THINK_START if thinking_mode == "thinking" else THINK_END) + TASK_ACTION
  return TASK_TOKENS[task]


def task_prompts(messages, tasks, mode: str = "chat", tools=None) -> tuple[str, dict[str, str], str]:
  """(shared prefix text, {task: suffix text}, thinking_mode): encoding `messages` with `"task": t` on the last
  message gives prefix + suffix[t] for every t (checked)."""
  if not messages:
    raise InvalidRequest("the conversation is empty", "messages")
  thinking_mode, _ = resolve_mode(mode)
  prefix, suffixes = None, {}
  for task in tasks:
    suffix = task_suffix(task, thinking_mode)
    marked = copy.deepcopy(list(messages))
    marked[-1]["task"] = task
    text, _ = chat_prompt(marked, mode, tools)
    here = text[:-len(suffix)]
    if not text.endswith(suffix) or (prefix is not None and here != prefix):
      raise AssertionError(f"task {task!r}: the encoder's prompt does not end in the task suffix {suffix!r} after "
                           f"the shared prefix")
    prefix, suffixes[task] = here, suffix
  return prefix, suffixes, thinking_mode


@dataclasses.dataclass
class QuickRun:
  """Answers of one quick_instruction_ids call. token_ids: {task: greedy tokens, EOS left out}. Timings in
  seconds: prefix_s (prefilling the conversation, 0 when the caller's slot held it), first_token_s (forks + the
  suffixes' extend + argmax of the first wave: the time to first token of a task on the cached prefix),
  total_s (everything)."""
  token_ids: dict[str, list[int]]
  finish_reason: dict[str, str]  # "stop" (EOS) | "length"
  prefix_s: float
  first_token_s: float
  total_s: float


def quick_instruction_ids(backend, prefix_ids, suffix_ids: dict[str, list[int]], *, slots, eos_id: int,
                          max_tokens: int = 32, parent: int | None = None) -> QuickRun:
  """Greedy answers of every task from one cached prefix (see the module docstring).

  backend: has prefill / fork / extend / decode / release (serve/backend.py). slots: free slots to use; the
  first is the parent (prefilled with `prefix_ids`) unless `parent` names a slot that already holds the
  conversation (it is then left as it was). Every slot used is released before returning.
  """
  if not suffix_ids:
    raise InvalidRequest("no tasks given", "tasks")
  if not all(hasattr(backend, op) for op in ("fork", "extend")):
    raise NotImplementedError(f"{type(backend).__name__} cannot fork slots (needs fork and extend)")
  slots = list(slots)
  t0 = time.perf_counter()
  own_parent = parent is None
  if own_parent:
    if len(slots) < 2:
      raise ValueError(f"need at least 2 free slots (parent + one task), got {slots}")
    parent, slots = slots[0], slots[1:]
  elif not slots or parent in slots:
    raise ValueError(f"need at least one free slot for the tasks besides the parent {parent}, got {slots}")
  tasks = list(suffix_ids)
  out: dict[str, list[int]] = {}
  reason: dict[str, str] = {}
  first_token_s = None
  try:
    if own_parent:
      np.asarray(backend.prefill(parent, list(prefix_ids)))
    prefix_s = time.perf_counter() - t0 if own_parent else 0.0
    waves = -(-len(tasks) // len(slots))
    size = -(-len(tasks) // waves)  # waves of equal size (fewer shapes to compile)
    for w in range(0, len(tasks), size):
      wave = tasks[w:w + size]
      t1 = time.perf_counter()
      live = {}  # slot -> task, while it decodes
      try:
        for slot, task in zip(slots, wave):
          backend.fork(parent, slot)
          live[slot], out[task] = task, []
        logits = np.asarray(backend.extend(list(live), [list(suffix_ids[t]) for t in wave]))
        if first_token_s is None:
          first_token_s = time.perf_counter() - t1
        while live:  # every round each live task gains a token or stops: at most max_tokens rounds
          done = []
          for slot, tok in zip(list(live), np.argmax(logits, axis=-1).tolist()):
            task = live[slot]
            if tok != eos_id:
              out[task].append(tok)
            if tok == eos_id or len(out[task]) >= max_tokens:
              reason[task] = "stop" if tok == eos_id else "length"
              done.append(slot)
          for slot in done:
            del live[slot]
            backend.release(slot)
          if live:
            logits = np.asarray(backend.decode(list(live), [out[t][-1] for t in live.values()]))
      finally:
        for slot in live:
          backend.release(slot)
  finally:
    if own_parent:
      backend.release(parent)
  return QuickRun({t: out.get(t, []) for t in tasks}, {t: reason.get(t, "length") for t in tasks}, prefix_s,
                  first_token_s, time.perf_counter() - t0)


def encode_tasks(tokenizer, conversation, tasks, mode: str = "chat", tools=None):
  """(prefix ids, {task: suffix ids}) for a message list, or for prompt ids of an encoded conversation."""
  tasks = list(dict.fromkeys(tasks))
  if not tasks:
    raise InvalidRequest("no tasks given", "tasks")
  if conversation and all(isinstance(t, (int, np.integer)) for t in conversation):
    thinking_mode, _ = resolve_mode(mode)
    return [int(t) for t in conversation], {t: tokenizer.encode(task_suffix(t, thinking_mode)) for t in tasks}
  prefix, suffixes, _ = task_prompts(conversation, tasks, mode, tools)
  prefix_ids = tokenizer.encode(prefix)
  suffix_ids = {t: tokenizer.encode(s) for t, s in suffixes.items()}
  for t, s in suffixes.items():  # special tokens are split out first, so the halves tokenize apart
    if tokenizer.encode(prefix + s) != prefix_ids + suffix_ids[t]:
      raise AssertionError(f"task {t!r}: the prompt does not tokenize as prefix + task suffix")
  return prefix_ids, suffix_ids


def run_quick_instructions(engine, conversation, tasks, *, mode: str = "chat", tools=None,
                           max_tokens: int = 32) -> dict[str, str]:
  """{task: greedy answer text} for `tasks` on `conversation` (messages or prompt ids), from one prefill.

  Runs between the engine's steps with the free slots it has (at least 2; requests already running keep
  going, queued ones wait until it is done); several tasks fork the prefix in parallel.
  """
  if max_tokens < 1:
    raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
  if engine.num_slots < 2:
    raise NotImplementedError(f"quick instructions need an engine of >= 2 slots (a parent + a fork), this one has "
                              f"{engine.num_slots}")
  prefix_ids, suffix_ids = encode_tasks(engine.tokenizer, conversation, tasks, mode, tools)
  need = len(prefix_ids) + max(len(s) for s in suffix_ids.values()) + max_tokens
  if need > engine.max_len:
    raise InvalidRequest(f"conversation ({len(prefix_ids)} tokens) + task suffix + max_tokens = {need} exceeds the "
                         f"context of {engine.max_len} tokens", "messages")
  run = engine.run_exclusive(
      lambda free: quick_instruction_ids(engine.backend, prefix_ids, suffix_ids, slots=free[:1 + len(suffix_ids)],
                                         eos_id=engine.eos_id, max_tokens=max_tokens), min_slots=2)
  return {t: engine.tokenizer.decode(ids) for t, ids in run.token_ids.items()}
