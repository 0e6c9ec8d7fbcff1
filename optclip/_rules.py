"""Threshold rules: where a norm clip's threshold comes from.

A rule sees one norm per step and returns the threshold to clip it to. It knows nothing of scopes: a clip by
global norm feeds it one scalar, a clip by leaf norm runs it once per leaf (``jax.vmap`` over stacked norms, so the
state of a per-leaf rule is the single-norm state with a leading axis of length ``num_leaves``).

The protocol, for a rule object ``rule``:

* ``rule.init() -> state``: a pytree of fixed-shape arrays for one norm.
* ``rule.update(norm, state, count) -> (threshold, new_state)``: ``norm`` is a float32 scalar (it may be
  ``nan``/``inf``), ``count`` the int32 number of updates the clip has made before this one. The caller keeps the
  old state where ``norm`` is not finite, so a rule never has to guard against that itself.
* ``rule.stats(state) -> dict[str, Array]``: scalars the rule wants logged beside the clip's own statistics.

A rule is deliberately not callable: ``optax.inject_hyperparams`` treats callables as schedules.
The adaptive rules (``percentile``, ``zscore``, ``ema``, ``quantile``) live in ``optclip._adaptive``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from optclip._validation import check_non_negative

Array = jax.Array
Schedule = Callable[[Array], Any]


@runtime_checkable
class ThresholdRule(Protocol):
    """What a norm clip accepts as its threshold besides a number or a schedule; see the module docstring."""

    def init(self) -> Any: ...

    def update(self, norm: Array, state: Any, count: Array) -> tuple[Array, Any]: ...

    def stats(self, state: Any) -> dict[str, Array]: ...


@dataclasses.dataclass(frozen=True)
class Constant:
    """A fixed threshold (a Python number or a JAX scalar, possibly injected at run time)."""

    value: Any

    def init(self) -> tuple:
        return ()

    def update(self, norm: Array, state: tuple, count: Array) -> tuple[Array, tuple]:
        del norm, count
        return jnp.asarray(self.value, jnp.float32), state

    def stats(self, state: tuple) -> dict[str, Array]:
        return {}


@dataclasses.dataclass(frozen=True)
class FromSchedule:
    """A threshold that follows ``schedule(count)``, like an optax learning-rate schedule."""

    schedule: Schedule

    def init(self) -> tuple:
        return ()

    def update(self, norm: Array, state: tuple, count: Array) -> tuple[Array, tuple]:
        del norm
        return jnp.asarray(self.schedule(count), jnp.float32), state

    def stats(self, state: tuple) -> dict[str, Array]:
        return {}


def as_rule(threshold: Any, arg: str, *, stateful: bool = True) -> ThresholdRule:
    """Turn a threshold argument (number, JAX scalar, schedule or rule) into a rule, validating it.

    ``stateful=False`` is for transforms that have no norm to feed a rule (clip by value, AGC's ratio).
    """
    if isinstance(threshold, ThresholdRule) and not isinstance(threshold, type):
        if not stateful and not isinstance(threshold, (Constant, FromSchedule)):
            raise ValueError(f"{arg} must be a number or a schedule here, not the adaptive rule {threshold!r}")
        return threshold
    if callable(threshold):
        return FromSchedule(threshold)
    check_non_negative(threshold, arg)
    return Constant(threshold)


def non_negative(threshold: Array) -> Array:
    """Run-time thresholds cannot raise: a negative or NaN one acts as 0 (clip everything to zero)."""
    return jnp.where(threshold > 0, threshold, 0.0).astype(jnp.float32)


def guarded_update(rule: ThresholdRule, norm: Array, state: Any, count: Array) -> tuple[Array, Any]:
    """``rule.update``, but a non-finite norm leaves the rule's state exactly as it was.

    ``norm`` may be a vector (``optclip.quantile`` takes per-example norms): then any non-finite entry keeps the
    state, which stays the shape of one rule's state either way.
    """
    threshold, new_state = rule.update(norm, state, count)
    finite = jnp.all(jnp.isfinite(norm))
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return non_negative(threshold), kept
