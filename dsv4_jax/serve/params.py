"""Per-request sampling parameters of the serving engine, checked once at submission.

Kept separate from the engine so the HTTP layer can validate a request (and answer 400) before queueing it.
"""

from __future__ import annotations

import dataclasses
import math
import secrets


class InvalidRequest(ValueError):
  """A request the engine refuses; `param` names the offending field (for the API's error body)."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample one request.

  max_tokens: tokens to generate at most (None: until the slot's context is full).
  temperature 0 = greedy; top_k 0 = off; top_p 1 = off.
  seed: the request's samples depend only on it and the token index (None: a random seed at submission).
  stop: strings that end the completion (not included in the text).
  stop_token_ids: token ids that end it (not included in the text); EOS is added unless ignore_eos.
  """
  max_tokens: int | None = 16
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    object.__setattr__(self, "stop", tuple(self.stop))
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    self.validate()

  def validate(self) -> None:
    if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
      raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
    if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
      raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature!r}", "temperature")
    if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
      raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
    if not _is_int(self.top_k) or self.top_k < 0:
      raise InvalidRequest(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", "top_k")
    if self.seed is not None and not _is_int(self.seed):
      raise InvalidRequest(f"seed must be an integer, got {self.seed!r}", "seed")
    for s in self.stop:
      if not isinstance(s, str) or not s:
        raise InvalidRequest(f"stop strings must be non-empty strings, got {s!r}", "stop")

  def with_seed(self) -> SamplingParams:
    """These params with a concrete seed (a random one when none was given)."""
    if self.seed is not None:
      return self
    return dataclasses.replace(self, seed=secrets.randbits(32))


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)
