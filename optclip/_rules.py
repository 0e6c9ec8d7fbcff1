"""Threshold rules: where a norm clip's threshold comes from.

A rule sees the norms of a step and returns the threshold to clip them to. It knows nothing of scopes: a clip by
global norm feeds it one scalar, per-example clipping a vector of per-example norms (only to the rules that declare
they take one, below), a clip by leaf norm runs it once per leaf (``jax.vmap`` over stacked norms, so the
state of a per-leaf rule is the single-norm state with a leading axis of length ``num_leaves``).

The protocol, for a rule object ``rule``:

* ``rule.init() -> state``: a pytree of fixed-shape arrays for one norm.
* ``rule.update(norm, state, count) -> (threshold, new_state)``: ``norm`` is a float32 scalar (it may be
  ``nan``/``inf``), ``count`` the int32 number of updates the clip has made before this one. The caller keeps the
  old state where ``norm`` is not finite, so a rule never has to guard against that itself.
* ``rule.stats(state) -> dict[str, Array]``: scalars the rule wants logged beside the clip's own statistics.
* ``rule.accepts_norm_vector``, a class attribute: ``True`` if ``update`` may also be given a 1-D vector of norms
  (one per example, say) and then returns one scalar threshold for all of them with a state of the same shapes as
  for one norm; ``False`` if it takes scalar norms only.

What a scope hands its rule decides which rules it can take, and ``as_rule`` checks that once, at construction:

========================  ===============================================  ===========================================
scope                     what the rule is given                           rules it takes
========================  ===============================================  ===========================================
``"global"``              one scalar norm per step                         every rule
``"leaf"``                one scalar norm per leaf (``jax.vmap``)          every rule
``"unit"``                nothing: AGC's threshold is a ratio              numbers and schedules
``"per_example"``         a vector of per-example norms                    rules with ``accepts_norm_vector = True``
========================  ===============================================  ===========================================

A rule is deliberately not callable: ``optax.inject_hyperparams`` treats callables as schedules.
The adaptive rules (``percentile``, ``zscore``, ``ema``, ``quantile``) live in ``optclip._adaptive``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from optclip._validation import check_non_negative

Array = jax.Array
Schedule = Callable[[Array], Any]


@runtime_checkable
class ThresholdRule(Protocol):
    """What a norm clip accepts as its threshold besides a number or a schedule; see the module docstring."""

    accepts_norm_vector: ClassVar[bool]

    def init(self) -> Any: ...

    def update(self, norm: Array, state: Any, count: Array) -> tuple[Array, Any]: ...

    def stats(self, state: Any) -> dict[str, Array]: ...


@dataclasses.dataclass(frozen=True)
class Constant:
    """A fixed threshold (a Python number or a JAX scalar, possibly injected at run time)."""

    accepts_norm_vector: ClassVar[bool] = True  # the threshold does not depend on the norms at all

    value: Any

    def init(self) -> tuple[()]:
        return ()

    def update(self, norm: Array, state: tuple[()], count: Array) -> tuple[Array, tuple[()]]:
        del norm, count
        return jnp.asarray(self.value, jnp.float32), state

    def stats(self, state: tuple[()]) -> dict[str, Array]:
        return {}


@dataclasses.dataclass(frozen=True)
class FromSchedule:
    """A threshold that follows ``schedule(count)``, like an optax learning-rate schedule."""

    accepts_norm_vector: ClassVar[bool] = True  # the threshold depends on the step only

    schedule: Schedule

    def init(self) -> tuple[()]:
        return ()

    def update(self, norm: Array, state: tuple[()], count: Array) -> tuple[Array, tuple[()]]:
        del norm
        return jnp.asarray(self.schedule(count), jnp.float32), state

    def stats(self, state: tuple[()]) -> dict[str, Array]:
        return {}


SCOPES = ("global", "leaf", "unit", "per_example")
_TAKES = {  # what a refusing scope takes, and why it cannot take more
    "unit": (
        "a number or a schedule",
        "AGC's threshold is a ratio to the parameter's norm, not a norm a rule could keep statistics of",
    ),
    "per_example": (
        "a number, a schedule or a rule whose accepts_norm_vector is True (such as optclip.quantile())",
        "it is given the vector of per-example norms and must return one threshold for all of them",
    ),
}


def _is_rule(threshold: Any) -> bool:
    """A rule object: ``init``, ``update`` and ``stats`` methods (a class itself is not a rule)."""
    return not isinstance(threshold, type) and all(
        callable(getattr(threshold, method, None)) for method in ("init", "update", "stats")
    )


def as_rule(threshold: Any, arg: str, scope: str = "global", *, stateful: bool | None = None) -> ThresholdRule:
    """Turn a threshold argument (number, JAX scalar, schedule or rule) into a rule, refusing what ``scope`` cannot
    take (see the module docstring's table).

    Every transform calls this at construction with its scope, so a rule that cannot digest the norms the scope
    would hand it fails here with a ``ValueError`` that names the argument, the rule, the scope and what the scope
    takes, instead of inside ``jax.jit`` or, worse, silently. A rule without an ``accepts_norm_vector`` attribute
    (written before it existed) is taken as scalar-only.

    Args:
      threshold: a number >= 0, a JAX scalar, a schedule ``count -> threshold`` or a rule object.
      arg: the argument's name, for the error message.
      scope: ``"global"``, ``"leaf"``, ``"unit"`` or ``"per_example"``.
      stateful: deprecated spelling kept for existing callers: ``stateful=False`` is ``scope="unit"``.

    Returns:
      The rule: ``threshold`` itself if it is one, else ``Constant`` or ``FromSchedule``.

    Example:
      >>> import optclip
      >>> from optclip._rules import as_rule
      >>> as_rule(1.0, "max_norm", "per_example")
      Constant(value=1.0)
      >>> as_rule(optclip.zscore(), "l2_norm_clip", "per_example")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: l2_norm_clip must be a number, a schedule or a rule whose accepts_norm_vector is True (such as ...
    """
    if stateful is False:
        scope = "unit"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if _is_rule(threshold):
        if scope == "unit":
            takes = isinstance(threshold, (Constant, FromSchedule))
        elif scope == "per_example":
            takes = bool(getattr(threshold, "accepts_norm_vector", False))
        else:
            takes = True
        if not takes:
            what, why = _TAKES[scope]
            raise ValueError(
                f"{arg} must be {what} here: the {scope} scope cannot take the rule {threshold!r} of type "
                f"{type(threshold).__name__} ({why}; global and leaf clips take every rule)"
            )
        rule: ThresholdRule = threshold
        return rule
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
