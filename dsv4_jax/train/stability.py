"""Loss-spike handling (spec §12 Stability): detect a spike, roll back to a good state, train with anticipatory
routing for a while, then revert. Host-side logic only; the routing itself lives in the model and train step.

DeepSeek does not disclose Δt, the detection rule, the rollback length or how long the mode stays on; the
defaults here are ours and every one is a config field.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import jax


@dataclasses.dataclass
class SpikeDetector:
  """Flags a loss that is non-finite or above the running mean by `k_sigma` running standard deviations and by
  at least `min_rel` of the mean. Statistics are exponential moving averages over accepted steps only."""
  k_sigma: float = 6.0
  min_rel: float = 0.2
  decay: float = 0.95
  min_history: int = 20
  mean: float = 0.0
  var: float = 0.0
  count: int = 0

  def is_spike(self, loss: float) -> bool:
    if not math.isfinite(loss):
      return True
    if self.count < self.min_history:
      return False
    excess = loss - self.mean
    return excess > self.k_sigma * math.sqrt(max(self.var, 0.0)) and excess > self.min_rel * abs(self.mean)

  def accept(self, loss: float) -> None:
    if self.count == 0:
      self.mean, self.var = loss, 0.0
    else:
      delta = loss - self.mean
      self.mean += (1 - self.decay) * delta
      self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
    self.count += 1

  def state_dict(self) -> dict[str, Any]:
    return dict(mean=self.mean, var=self.var, count=self.count)

  def load_state_dict(self, d: dict[str, Any]) -> None:
    self.mean, self.var, self.count = float(d["mean"]), float(d["var"]), int(d["count"])


def copy_state(state):
  """A device copy of a train state (the live one is donated to the next step)."""
  return jax.tree.map(lambda a: a.copy(), state)


class Snapshots:
  """In-memory copies of the train state taken every `every` steps; the newest `keep` are kept."""

  def __init__(self, every: int, keep: int = 2):
    self.every, self.keep = every, keep
    self._items: collections.OrderedDict[int, Any] = collections.OrderedDict()

  def maybe_take(self, step: int, state, extra: dict[str, Any]) -> bool:
    if self.every <= 0 or step % self.every or step in self._items:
      return False
    self._items[step] = (copy_state(state), dict(extra))
    while len(self._items) > self.keep:
      self._items.popitem(last=False)
    return True

  def before(self, step: int):
    """(step, state, extra) of the newest snapshot at or before `step`, or None."""
    good = [s for s in self._items if s <= step]
    if not good:
      return None
    s = max(good)
    state, extra = self._items[s]
    return s, copy_state(state), dict(extra)

  def drop_after(self, step: int) -> None:
    for s in [s for s in self._items if s > step]:
      del self._items[s]

  def steps(self) -> list[int]:
    return list(self._items)


@dataclasses.dataclass
class AnticipatoryMode:
  """Whether routing currently uses indices from Δt steps back, and for how many more steps."""
  delta: int = 1
  duration: int = 100
  remaining: int = 0

  @property
  def on(self) -> bool:
    return self.remaining > 0

  def switch_on(self) -> None:
    self.remaining = self.duration

  def tick(self) -> bool:
    """Counts one step in the mode; True when this step turned it off."""
    if self.remaining <= 0:
      return False
    self.remaining -= 1
    return self.remaining == 0

  def state_dict(self) -> dict[str, Any]:
    return dict(remaining=self.remaining)

  def load_state_dict(self, d: dict[str, Any]) -> None:
    self.remaining = int(d["remaining"])
