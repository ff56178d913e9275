"""Tests for dsv4_jax.train.stability (spec §12 Stability): the spike detector's rule and EMA statistics,
in-memory snapshots (retention, lookup, independence from later donation), the anticipatory-routing mode."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.train import stability


def history(n, seed=0, mean=3.0, std=0.05):
  return list(mean + std * np.random.default_rng(seed).standard_normal(n))


def weighted_stats(xs, decay):
  """Closed form of the EMA the detector keeps: weight decay^(n-1) on the first loss (the initial mean),
  (1 - decay)·decay^(n-1-i) on loss i ≥ 1; the variance is the weighted mean square around the weighted mean."""
  n = len(xs)
  w = np.array([decay ** (n - 1)] + [(1 - decay) * decay ** (n - 1 - i) for i in range(1, n)])
  assert math.isclose(w.sum(), 1.0)
  mean = float(np.sum(w * xs))
  return mean, float(np.sum(w * (np.asarray(xs) - mean) ** 2))


def test_no_flag_during_min_history():
  det = stability.SpikeDetector(min_history=5)
  for x in [3.0, 3.0, 3.0, 3.0, 3.0]:
    assert not det.is_spike(1e6)  # any finite loss passes while the history is short
    det.accept(x)
  assert det.count == 5
  assert det.is_spike(1e6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_always_flags(bad):
  det = stability.SpikeDetector(min_history=10)
  assert det.is_spike(bad)  # even with no history
  for x in history(20):
    det.accept(x)
  assert det.is_spike(bad)


def test_spike_rule_needs_sigma_and_relative_jump():
  det = stability.SpikeDetector(k_sigma=6.0, min_rel=0.2, decay=0.9, min_history=10)
  for x in history(50):
    det.accept(x)
  mean, std = det.mean, math.sqrt(det.var)
  assert 0 < std < 0.1 and abs(mean - 3.0) < 0.1
  # Above both thresholds (k·σ ≈ 0.3, min_rel·mean ≈ 0.6): flagged.
  assert det.is_spike(mean + 1.1 * max(6 * std, 0.2 * mean))
  assert not det.is_spike(mean + 0.9 * max(6 * std, 0.2 * mean))
  # Far above k·σ but under min_rel·mean: not flagged; a drop is never a spike.
  assert 6 * std < 0.5 * 0.2 * mean
  assert not det.is_spike(mean + 0.15 * mean)
  assert not det.is_spike(mean - 10.0)
  # Over min_rel but under k·σ when the history is noisy.
  noisy = stability.SpikeDetector(k_sigma=6.0, min_rel=0.2, decay=0.9, min_history=10)
  for x in history(50, std=0.5):
    noisy.accept(x)
  jump = 0.5 * 6 * math.sqrt(noisy.var)
  assert jump > 0.2 * abs(noisy.mean)
  assert not noisy.is_spike(noisy.mean + jump)
  assert noisy.is_spike(noisy.mean + 1.1 * max(6 * math.sqrt(noisy.var), 0.2 * abs(noisy.mean)))


def test_is_spike_does_not_update_stats():
  det = stability.SpikeDetector(min_history=3)
  for x in history(10):
    det.accept(x)
  before = det.state_dict()
  det.is_spike(100.0)
  det.is_spike(float("nan"))
  assert det.state_dict() == before


@pytest.mark.parametrize("decay", [0.5, 0.95])
def test_accepted_stats_are_the_ema(decay):
  xs = history(40, seed=1, std=0.3)
  det = stability.SpikeDetector(decay=decay)
  for i, x in enumerate(xs):
    det.accept(x)
    mean, var = weighted_stats(xs[:i + 1], decay)
    assert math.isclose(det.mean, mean, rel_tol=1e-12)
    assert math.isclose(det.var, var, rel_tol=1e-9, abs_tol=1e-15)
  assert det.count == len(xs)


def test_detector_state_dict_round_trip():
  det = stability.SpikeDetector(k_sigma=3.0, min_rel=0.05, min_history=5)
  for x in history(30, seed=2):
    det.accept(x)
  fresh = stability.SpikeDetector(k_sigma=3.0, min_rel=0.05, min_history=5)
  fresh.load_state_dict(det.state_dict())
  assert (fresh.mean, fresh.var, fresh.count) == (det.mean, det.var, det.count)
  for x in [3.0, 3.1, 3.3, 3.5, 4.0, 10.0]:
    assert fresh.is_spike(x) == det.is_spike(x)
  fresh.accept(3.2)
  det.accept(3.2)
  assert fresh.state_dict() == det.state_dict()


# ----- snapshots -------------------------------------------------------------------------------------------------
def make_state(value):
  return {"params": {"w": jnp.full((3, 2), value, jnp.float32)}, "step": jnp.asarray(value, jnp.int32)}


def values(state):
  return float(state["params"]["w"][0, 0]), int(state["step"])


def test_snapshots_every_and_keep():
  snaps = stability.Snapshots(every=3, keep=2)
  taken = [s for s in range(11) if snaps.maybe_take(s, make_state(s), {"s": s})]
  assert taken == [0, 3, 6, 9]
  assert snaps.steps() == [6, 9]
  assert not snaps.maybe_take(9, make_state(99), {})  # already held: not replaced
  assert values(snaps.before(9)[1]) == (9.0, 9)
  never = stability.Snapshots(every=0)
  assert not any(never.maybe_take(s, make_state(s), {}) for s in range(5))
  assert never.before(10) is None


def test_snapshots_before_and_drop_after():
  snaps = stability.Snapshots(every=2, keep=3)
  for s in range(9):
    snaps.maybe_take(s, make_state(s), {"detector": {"count": s}})
  assert snaps.steps() == [4, 6, 8]
  step, state, extra = snaps.before(7)
  assert step == 6 and values(state) == (6.0, 6) and extra == {"detector": {"count": 6}}
  assert snaps.before(8)[0] == 8
  assert snaps.before(3) is None  # steps 0 and 2 were dropped by keep=3
  snaps.drop_after(5)
  assert snaps.steps() == [4]
  assert snaps.before(100)[0] == 4


def test_snapshot_copies_are_independent():
  snaps = stability.Snapshots(every=1, keep=2)
  live = make_state(1)
  extra = {"detector": {"count": 1}}
  snaps.maybe_take(1, live, extra)
  extra["detector"]["count"] = 7  # the caller's dict changes later
  extra["new"] = True

  bump = jax.jit(lambda s: jax.tree.map(lambda a: a + 1, s), donate_argnums=0)
  donated = live
  live = bump(live)  # the live state is donated to the next step
  assert donated["params"]["w"].is_deleted()
  live = bump(live)
  assert values(live) == (3.0, 3)

  _, first, got_extra = snaps.before(1)
  assert values(first) == (1.0, 1)
  assert "new" not in got_extra
  got_extra["detector"] = None
  bump(first)  # donating a restored copy leaves the stored snapshot intact
  assert first["params"]["w"].is_deleted()
  _, second, again = snaps.before(1)
  assert values(second) == (1.0, 1) and again["detector"] is not None
  assert second["params"]["w"] is not first["params"]["w"]


def test_copy_state_is_a_new_buffer():
  state = make_state(2)
  copy = stability.copy_state(state)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state, copy)
  jax.jit(lambda s: jax.tree.map(lambda a: a * 0, s), donate_argnums=0)(state)
  assert state["step"].is_deleted()
  assert values(copy) == (2.0, 2)


# ----- anticipatory mode -----------------------------------------------------------------------------------------
def test_anticipatory_mode_tick_and_switch():
  mode = stability.AnticipatoryMode(delta=2, duration=3)
  assert not mode.on
  assert not mode.tick() and mode.remaining == 0  # ticking while off does nothing
  mode.switch_on()
  assert mode.on and mode.remaining == 3
  assert [mode.tick(), mode.tick()] == [False, False] and mode.on
  assert mode.tick() and not mode.on  # the third step in the mode turns it off
  assert not mode.tick() and mode.remaining == 0
  mode.switch_on()
  mode.tick()
  mode.switch_on()  # a new spike restarts the full duration
  assert mode.remaining == 3


def test_anticipatory_mode_state_dict():
  mode = stability.AnticipatoryMode(delta=1, duration=5)
  mode.switch_on()
  mode.tick()
  fresh = stability.AnticipatoryMode(delta=1, duration=5)
  fresh.load_state_dict(mode.state_dict())
  assert fresh.on and fresh.remaining == 4
  assert [fresh.tick() for _ in range(4)] == [False, False, False, True]
