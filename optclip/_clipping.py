"""The clipping transformations: by global norm, by leaf norm, unit-wise (AGC), and by value.

Every norm clip is the same four steps (DESIGN.md): a scope measures norms, a rule turns them into thresholds, and

    g <- g * min(1, c / ||g||)

which is ``capped_ratio`` and ``apply`` below. Only the scope differs between ``clip_by_global_norm`` (one norm over
every leaf), ``clip_by_leaf_norm`` (one per leaf) and ``adaptive_grad_clip`` (one per output unit, against the
weights); the rule is whatever the user passed.

Non-finite gradients: a norm clip passes what it measures one norm over through unchanged when that holds a NaN or
Inf entry (its norm is not finite, so there is nothing sensible to scale by): the whole gradient for the global
norm, the leaf or the unit for the leaf and unit scopes, whose other leaves or units are clipped as usual. The
statistics show the non-finite norm and a rule's state is left as it was. ``clip_by_value`` maps +-Inf to the
bounds and passes NaN through, like ``torch.clamp`` and ``optax.clip``. Wrap the chain in ``optclip.skip_nonfinite``
to skip such steps instead.

Norms come from ``_norms.leaf_norms_of``: when a guard around the chain already measured these very gradients, the
clip reuses its measurement instead of reading them again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip import _norms, _xla
from optclip._norms import NormParts
from optclip._rules import ThresholdRule, as_rule, guarded_update, non_negative
from optclip._stats import ClipStats, Culprit, PerLeaf, absent, check_level, make_stats, recorded_names, slot_names
from optclip._validation import ORDS, check_finite, check_name, check_non_negative, check_ord, concrete_float

Array = jax.Array
Threshold = float | Array | Callable[[Array], Any] | ThresholdRule
UnitAxes = int | Sequence[int] | Callable[[tuple[int, ...]], Any] | None

CLIP_METRICS = ("norm", "threshold", "scale", "norm_after", "clipped")


Updates = optax.Updates
OptState = optax.OptState


def next_count(count: Array) -> Array:
    """``count + 1``, saturating at the largest int32 (``optax.safe_int32_increment``)."""
    return jnp.asarray(optax.safe_int32_increment(count))


class ClipState(NamedTuple):
    """State of every clip: the update count (for schedules), the threshold rule's state, the last statistics.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_global_norm(1.0)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> int(state.count), round(float(state.stats.by_name["clip_by_global_norm"]["scale"]), 4)
      (1, 0.2)
    """

    count: Array  # type: ignore[assignment]  # a field named like tuple.count, as optax's own states have
    rule_state: Any
    stats: ClipStats


# --------------------------------------------------------------------------------------------------------------------
# the formula: g * min(1, c / ||g||)


class Scale(NamedTuple):
    """``min(1, threshold / norm)`` as ``factor * 2**exponent`` (see ``capped_ratio``), and whether it clipped."""

    factor: Array
    exponent: Array  # <= 0, and 0 unless the ratio itself is below float32's range
    clipped: Array  # bool: the norm was finite and above the threshold

    @property
    def value(self) -> Array:
        return _norms.times_pow2(self.factor, self.exponent)

    def multipliers(self) -> Array:
        """The scale as three floats whose product it is, on a new first axis (so that each is contiguous, as a
        vector of scales is): ``factor`` and ``2**exponent`` in two normal halves (``2**exponent`` alone may be
        below float32's range)."""
        return jnp.stack([self.factor, *_norms.pow2_halves(self.exponent, self.factor.dtype)])


def capped_ratio(norm: NormParts, threshold: Array) -> Scale:
    """``min(1, threshold / norm)``: 1 where the norm is not finite (nothing sensible to scale by), 0 for a zero
    threshold (a zero gradient stays zero), exact for norms beyond float32's range and ratios below it.

    With ``norm = r * 2**k`` (``r`` in [1, 2), ``k`` from the mantissa's bits plus the rescue's exponent) the ratio is
    ``(threshold / r) * 2**-k``: as much of the power of two as keeps it a normal float goes into ``factor``, the rest
    into ``exponent``, which is 0 unless the ratio itself is below float32's range (a norm near 3e38 clipped to 2),
    where scaled entries may still be representable: ``apply`` multiplies by ``factor`` first.
    """
    m = norm.mantissa
    finite = jnp.isfinite(m)
    clipped = finite & (m > _norms.times_pow2(threshold, -norm.exponent))  # norm > threshold, in range
    own = jnp.where(clipped, _norms.binary_exponent(m), 0)
    quotient = threshold / jnp.where(clipped, _norms.times_pow2(m, -own), 1.0)  # no division by 0: grad-safe
    power = jnp.where(clipped, -(own + norm.exponent), 0)
    into_factor = jnp.maximum(power, _norms.LOWEST_NORMAL_EXPONENT - _norms.binary_exponent(quotient))
    factor = jnp.where(clipped, _norms.times_pow2(quotient, into_factor), 1.0)
    zero = finite & (threshold == 0)  # zeroes even a norm that read as 0 (a leaf whose squares underflowed)
    return Scale(jnp.where(zero, 0.0, factor), jnp.where(clipped, power - into_factor, 0), clipped)


def apply(x: Array, multipliers: Array) -> Array:
    """``x * min(1, threshold / norm)``, given the scale as ``Scale.multipliers``, in at least float32, returned in
    ``x``'s dtype: three multiplications, so that the kernels that scale ``x`` do no more. In ``lax`` terms, with
    no conversion to the dtype an array already has: this runs once per leaf, and tracing cost counts at 1000."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    m = multipliers if multipliers.dtype == compute else multipliers.astype(compute)
    scaled = x if x.dtype == compute else x.astype(compute)
    for i in range(3):
        scaled = scaled * jax.lax.index_in_dim(m, i, keepdims=False)
    return scaled if scaled.dtype == x.dtype else scaled.astype(x.dtype)


def multipliers_per_leaf(multipliers: Array, count: Array, shapes: Sequence[tuple[int, ...]]) -> list[Array]:
    """``Scale.multipliers`` of a vector of units cut into each leaf's units, shaped ``(3, *shape)`` to broadcast
    against the leaf (``shapes``: each leaf's units, ``()`` for one scale per leaf), each a buffer of its own computed
    once (``_xla.computed_once``, ``_xla.segments``); ``count`` is the transform's step counter."""
    rows = _xla.segments(multipliers, [math.prod(s) for s in shapes], _xla.runtime_one(count))
    return [row.reshape(3, *shape) for row, shape in zip(rows, shapes)]


# --------------------------------------------------------------------------------------------------------------------
# leaves


class Slots(NamedTuple):
    """A tree flattened with ``None`` / ``optax.MaskedNode`` kept as slots (frozen or masked-out parameters)."""

    values: list[Any]
    treedef: Any

    @classmethod
    def of(cls, tree: Any) -> Slots:
        values, treedef = jax.tree.flatten(tree, is_leaf=absent)
        return cls(values, treedef)

    @property
    def present(self) -> list[int]:
        return [i for i, x in enumerate(self.values) if not absent(x)]

    def rebuilt(self, new: Sequence[Array]) -> Any:
        """The tree with the present slots replaced by ``new``, in order."""
        values = list(self.values)
        for i, x in zip(self.present, new):
            values[i] = x
        return jax.tree.unflatten(self.treedef, values)


def check_float_leaves(tree: Any, name: str) -> None:
    """Clipping is for floating-point gradients; an integer or bool leaf is a bug upstream, so say where."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{name}: gradient leaf {jax.tree_util.keystr(path) or '<root>'} has dtype "
                f"{jnp.result_type(leaf)}; clipping needs floating-point gradients"
            )


def norms_for_ord(ord: Any, measure: Callable[[float], Any]) -> Any:
    """``measure(ord)``. ``optax.inject_hyperparams`` injects every number, ``ord`` too, so under ``jax.jit`` it can
    arrive as a tracer: then ``lax.switch`` picks the norm at run time (a value other than 1 or inf acts as 2).
    """
    static = concrete_float(ord)
    if static is not None:
        return measure(static)
    index = jnp.where(ord == 1, 0, jnp.where(ord == jnp.inf, 2, 1))
    return jax.lax.switch(index, [lambda o=o: measure(o) for o in ORDS])


def stacked_init(rule: ThresholdRule, num: int) -> Any:
    """``num`` copies of ``rule``'s initial state stacked on a leading axis: a per-leaf rule's state."""
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (num, *jnp.shape(x))), rule.init())


def leafwise_rule_update(rule: ThresholdRule, norms: Array, rule_state: Any, count: Array) -> tuple[Array, Any]:
    """``rule`` run once per leaf on the vector ``norms`` (``guarded_update``: a NaN norm keeps that leaf's state)."""
    return jax.vmap(lambda norm, state: guarded_update(rule, norm, state, count))(norms, rule_state)


def leafwise_rule_metrics(rule: ThresholdRule, rule_state: Any, num: int) -> dict[str, Array]:
    """A per-leaf rule's statistics, each the mean over the leaves."""
    per_leaf = jax.vmap(rule.stats, axis_size=num)(rule_state)
    return {key: jnp.mean(value) if num else jnp.float32(0) for key, value in per_leaf.items()}


def _zero_metrics(extra: dict[str, Any]) -> dict[str, Any]:
    return {**dict.fromkeys(CLIP_METRICS, 0.0), "scale": 1.0, **extra}


def spread(values: Array, size: int, positions: Sequence[int]) -> Array:
    """A vector of ``size`` (one entry per slot) with ``values`` at ``positions`` and NaN elsewhere (no gradient)."""
    if list(positions) == list(range(size)):
        return values
    return jnp.full((size,), jnp.nan, values.dtype).at[np.asarray(positions, np.int32)].set(values)


def spread_parts(parts: NormParts, size: int, positions: Sequence[int]) -> NormParts:
    """``spread`` for both halves of a norm: an absent slot has a NaN norm."""
    exponent = spread(parts.exponent.astype(jnp.float32), size, positions)
    return NormParts(spread(parts.mantissa, size, positions), jnp.nan_to_num(exponent).astype(jnp.int32))


# --------------------------------------------------------------------------------------------------------------------
# the transforms


def _largest(norms: NormParts, positions: Sequence[int]) -> Array:
    """The slot of the largest of ``norms`` (one per present leaf, in slot order ``positions``), a non-finite one
    first; -1 when there is none. Compared as ``log2(mantissa) + exponent``, which orders norms beyond float32's
    range too."""
    if not positions:
        return jnp.asarray(-1, jnp.int32)
    key = jnp.log2(norms.mantissa) + norms.exponent.astype(norms.mantissa.dtype)
    key = jnp.where(jnp.isfinite(norms.mantissa), key, jnp.inf)  # NaN and Inf: the leaf to blame
    slot: Array = jnp.asarray(positions, jnp.int32)[jnp.argmax(key)]
    return slot


def clip_by_global_norm(
    max_norm: Threshold, *, ord: float = 2, stats: str = "basic", name: str = "clip_by_global_norm"
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale all gradients together so that their global norm is at most ``max_norm``.

    .. math:: g \leftarrow g \cdot \min\Big(1, \frac{c_t}{\|g\|_p}\Big), \qquad
              \|g\|_p = \Big(\sum_\ell \|g_\ell\|_p^p\Big)^{1/p}

    with one norm over every parameter (Pascanu et al. 2013, "On the difficulty of training recurrent neural
    networks", arXiv:1211.5063). This is ``torch.nn.utils.clip_grad_norm_`` (without its 1e-6 in the denominator:
    the clipped norm here is exactly ``c_t``), Keras ``global_clipnorm`` and ``optax.clip_by_global_norm``.

    Numerics: the norm accumulates in float32 for bf16/f16 gradients; finite float32 gradients with entries up to
    3e38 are clipped exactly to ``c_t`` (never zeroed, never NaN); zero gradients give zero updates for every
    threshold, ``c_t = 0`` included, and ``jax.grad`` through the clip stays finite there. Gradients with a NaN or Inf
    entry pass through unchanged (see ``optclip.skip_nonfinite``). When a guard around it (``optclip.skip_nonfinite``,
    ``optclip.skip_on_spike``) has measured the same gradients, the clip reuses that measurement.

    Args:
      max_norm: the threshold ``c_t >= 0``: a number, a JAX scalar, a schedule ``step -> threshold``, or an adaptive
        rule (``optclip.percentile()``, ``optclip.zscore()``, ...). A run-time value below 0 or NaN acts as 0.
      ord: the norm, 1, 2 or ``inf``. Under ``optax.inject_hyperparams`` it is injected like any number and
        chosen at run time (a run-time value other than 1 or ``inf`` acts as 2).
      stats: ``"basic"`` (default): ``norm``, ``threshold``, ``scale``, ``norm_after``, ``clipped`` and the rule's
        own, all from the one norm; ``"full"`` adds each leaf's norm (``leaf_norm/<path>``) and ``culprit``, the
        leaf with the largest norm (a non-finite one first; its path in ``optclip.host_stats``); ``"none"``: nothing.
      name: the prefix of this clip's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state keeps the statistics of the last update.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optclip.clip_by_global_norm(1.0)
      >>> grads = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> print(updates["w"], updates["b"])
      [0.6 0. ] [0.8]
      >>> print(optclip.stats(state)["clip_by_global_norm/norm"])
      5.0
    """
    rule = as_rule(max_norm, "max_norm")
    check_ord(ord)
    check_level(stats)
    check_name(name)

    def metrics(
        norm: Any,
        threshold: Any,
        scale: Any,
        norm_after: Any,
        clipped: Any,
        rule_state: Any,
        leaf_norm: Any,
        culprit: Any,
    ) -> ClipStats:
        basic = {"norm": norm, "threshold": threshold, "scale": scale, "norm_after": norm_after, "clipped": clipped}
        full = {"leaf_norm": leaf_norm, "culprit": culprit} if stats == "full" else {}
        return make_stats(name, {**basic, **rule.stats(rule_state), **full}, stats)

    def init_fn(params: optax.Params) -> ClipState:
        rule_state = rule.init()
        names = slot_names(params)
        empty = PerLeaf(jnp.where(jnp.asarray([n is None for n in names], bool), jnp.nan, 0.0), names)
        nobody = Culprit(jnp.int32(-1), names)
        initial = metrics(0.0, 0.0, 1.0, 0.0, 0.0, rule_state, empty, nobody)
        return ClipState(jnp.zeros((), jnp.int32), rule_state, initial)

    def update_fn(
        updates: Updates, state: OptState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        state = cast(ClipState, state)
        del params
        check_float_leaves(updates, name)
        slots = Slots.of(updates)
        leaves = [slots.values[i] for i in slots.present]

        def measure(o: float) -> tuple[NormParts, NormParts]:
            measured = _norms.leaf_norms_of(leaves, o, extra_args)
            per_leaf = measured.flat()
            return per_leaf, _norms.combine(per_leaf, o)

        per_leaf, norm = norms_for_ord(ord, measure)
        threshold, rule_state = guarded_update(rule, norm.value(), state.rule_state, state.count)
        scale = capped_ratio(norm, threshold)
        applied = _xla.computed_once(scale.multipliers(), _xla.runtime_one(state.count))
        clipped = [apply(x, applied) for x in leaves]
        value = norm.value()
        leaf_values = spread(per_leaf.value(), len(slots.values), slots.present)
        names = recorded_names(state.stats, name, stats)
        new_stats = metrics(
            value,
            threshold,
            scale.value,
            jnp.where(scale.clipped, threshold, value),
            scale.clipped,
            rule_state,
            PerLeaf(leaf_values, names),
            Culprit(_largest(per_leaf, slots.present), names),
        )
        new_state = ClipState(next_count(state.count), rule_state, new_stats)
        return slots.rebuilt(clipped), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _per_leaf_stats(name: str, stats: str, basic: dict[str, Any], per_leaf: dict[str, Array], names: Any) -> ClipStats:
    if stats == "full":
        basic = {**basic, **{key: PerLeaf(value, names) for key, value in per_leaf.items()}}
    return make_stats(name, basic, stats)


def clip_by_leaf_norm(
    max_norm: Threshold, *, ord: float = 2, stats: str = "basic", name: str = "clip_by_leaf_norm"
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale each gradient array on its own so that its norm is at most ``max_norm``.

    .. math:: g_\ell \leftarrow g_\ell \cdot \min\Big(1, \frac{c_{\ell,t}}{\|g_\ell\|_p}\Big)
              \quad\text{for every leaf } \ell

    This is Keras ``clipnorm`` and ``tf.clip_by_norm`` applied to each variable (Pascanu et al. 2013,
    arXiv:1211.5063, clip per parameter block). With an adaptive rule as ``max_norm`` each leaf keeps its own
    statistics (``clip_by_leaf_norm(optclip.ema())`` is AdaGC's per-tensor rule, arXiv:2502.11034). A ``None`` or
    ``optax.MaskedNode`` gradient (a frozen or masked-out parameter) passes through and leaves its rule state alone.

    Numerics are those of ``clip_by_global_norm``, leaf by leaf.

    Args:
      max_norm: the threshold: a number, a JAX scalar, a schedule ``step -> threshold``, or an adaptive rule
        (run once per leaf). A run-time value below 0 or NaN acts as 0.
      ord: the norm, 1, 2 or ``inf``. Under ``optax.inject_hyperparams`` it is injected like any number and
        chosen at run time (a run-time value other than 1 or ``inf`` acts as 2).
      stats: ``"basic"`` (default): summaries over the leaves, each possibly from a different leaf: the largest
        ``norm``, the smallest ``threshold`` and ``scale``, the largest ``norm_after``, the fraction of leaves
        ``clipped``, and a per-leaf rule's statistics averaged over the leaves. ``"full"`` adds each leaf's own
        ``norm``, ``threshold`` and ``clipped`` under ``<metric>/<path>``; ``"none"`` records nothing.
      name: the prefix of this clip's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_leaf_norm(1.0)
      >>> grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> print(updates["w"], updates["b"])
      [0.6 0.8] [0.5]
      >>> print(optclip.stats(state)["clip_by_leaf_norm/clipped"])
      0.5
    """
    rule = as_rule(max_norm, "max_norm", "leaf")
    check_ord(ord)
    check_level(stats)
    check_name(name)

    def init_fn(params: optax.Params) -> ClipState:
        names = slot_names(params)
        rule_state = stacked_init(rule, len(names))
        absent = jnp.asarray([n is None for n in names], bool)
        zeros = jnp.where(absent, jnp.nan, 0.0).astype(jnp.float32)
        basic = _zero_metrics(leafwise_rule_metrics(rule, rule_state, len(names)))
        per_leaf = {"norm": zeros, "threshold": zeros, "clipped": zeros}
        return ClipState(jnp.zeros((), jnp.int32), rule_state, _per_leaf_stats(name, stats, basic, per_leaf, names))

    def update_fn(
        updates: Updates, state: OptState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        state = cast(ClipState, state)
        del params
        check_float_leaves(updates, name)
        slots = Slots.of(updates)
        size = len(slots.values)
        expected = jax.tree.leaves(state.rule_state)[0].shape[0] if jax.tree.leaves(state.rule_state) else size
        if size != expected:
            raise ValueError(
                f"{name}: the gradients have {size} leaves (None and MaskedNode included) where the state was made "
                f"for {expected}; pass init and update trees of the same structure"
            )
        present = slots.present
        leaves = [slots.values[i] for i in present]

        def measure(o: float) -> NormParts:
            return _norms.leaf_norms_of(leaves, o, extra_args).flat()

        measured = spread_parts(norms_for_ord(ord, measure), size, present)
        norms = measured.value()  # NaN where a slot has no gradient: the rule keeps that state
        thresholds, rule_state = leafwise_rule_update(rule, norms, state.rule_state, state.count)
        # The formula once, over the vector of leaves; each leaf reads its row.
        scale = capped_ratio(measured, thresholds)
        rows = multipliers_per_leaf(scale.multipliers(), state.count, [()] * size)
        clipped = [apply(x, rows[i]) for x, i in zip(leaves, present)]

        seen = ~jnp.isnan(norms)
        basic = {
            "norm": jnp.max(jnp.where(seen, norms, 0.0), initial=0.0),
            "threshold": jnp.min(jnp.where(seen, thresholds, jnp.inf), initial=jnp.inf),
            "scale": jnp.min(scale.value, initial=1.0),
            "norm_after": jnp.max(jnp.where(seen, jnp.where(scale.clipped, thresholds, norms), 0.0), initial=0.0),
            "clipped": jnp.sum(scale.clipped) / max(len(present), 1),
            **leafwise_rule_metrics(rule, rule_state, size),
        }
        per_leaf = {
            "norm": norms,
            "threshold": jnp.where(seen, thresholds, jnp.nan),
            "clipped": jnp.where(seen, scale.clipped, jnp.nan),
        }
        names = recorded_names(state.stats, name, stats)
        new_stats = _per_leaf_stats(name, stats, basic, per_leaf, names)
        return slots.rebuilt(clipped), ClipState(next_count(state.count), rule_state, new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _bound(value: Any, count: Array) -> Array:
    return jnp.asarray(value(count) if callable(value) else value)


def clip_by_value(
    max_value: float | Array | Callable[[Array], Any],
    *,
    min_value: float | Array | Callable[[Array], Any] | None = None,
    stats: str = "basic",
    name: str = "clip_by_value",
) -> optax.GradientTransformationExtraArgs:
    r"""Clamp every gradient entry to ``[-max_value, max_value]``, or to ``[min_value, max_value]``.

    .. math:: g_{\ell j} \leftarrow \min(\max(g_{\ell j}, a), b), \qquad (a, b) = (-c, c) \text{ or } (c_{min}, c)

    This is Keras ``clipvalue``, ``torch.nn.utils.clip_grad_value_``, ``tf.clip_by_value`` and ``optax.clip``
    (Mikolov 2012, "Statistical language models based on neural networks", the first use in RNN training). It
    changes the direction of the gradient; the norm clips do not. +-Inf entries become the bounds, NaN stays NaN.

    Args:
      max_value: the upper bound ``c`` (and ``-c`` the lower one when ``min_value`` is not given): a number, a JAX
        scalar or a schedule ``step -> bound``. Symmetric bounds need ``c >= 0``; a run-time ``c`` below 0 or NaN
        acts as 0 (every entry becomes 0).
      min_value: the lower bound, at most ``max_value``; a number, a JAX scalar or a schedule. Run-time bounds with
        ``min_value > max_value`` follow ``jnp.clip``: every entry becomes ``max_value``.
      stats: ``"basic"`` (default): the global 2-norm before the clamp (``norm``, the one read a clamp needs on
        top of the optimizer, shared with a guard around it) and ``threshold = max_value``; ``"full"`` adds the norm
        after the clamp (``norm_after``), their ratio ``scale`` and the fraction of entries ``clipped``, which cost
        one more read of the gradients; ``"none"`` records nothing and leaves the clamp to fuse into the optimizer.
      name: the prefix of this clip's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_value(1.0, stats="full")
      >>> updates, state = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(jnp.zeros(3)))
      >>> print(updates)
      [-1.   0.5  1. ]
      >>> print(optclip.stats(state)["clip_by_value/clipped"])  # two of the three entries
      0.6666667
    """
    if min_value is None:
        if not callable(max_value):
            check_non_negative(max_value, "max_value")
    else:
        for value, arg in ((max_value, "max_value"), (min_value, "min_value")):
            if not callable(value):
                check_finite(value, arg)
        if not callable(max_value) and not callable(min_value):
            low, high = concrete_float(min_value), concrete_float(max_value)
            if low is not None and high is not None and low > high:
                raise ValueError(
                    f"min_value must be at most max_value, got min_value={min_value!r} > max_value={max_value!r}"
                )
    check_level(stats)
    check_name(name)
    metrics = ("norm", "threshold") if stats == "basic" else CLIP_METRICS

    def init_fn(params: optax.Params) -> ClipState:
        del params
        zeros = _zero_metrics({})
        return ClipState(jnp.zeros((), jnp.int32), (), make_stats(name, {k: zeros[k] for k in metrics}, stats))

    def update_fn(
        updates: Updates, state: OptState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        state = cast(ClipState, state)
        del params
        check_float_leaves(updates, name)
        high = _bound(max_value, state.count)
        if min_value is None:
            high = non_negative(high)  # a run-time bound cannot raise: [-c, c] with c < 0 or NaN acts as [0, 0]
            low = -high
        else:
            low = _bound(min_value, state.count)
        leaves, treedef = jax.tree.flatten(updates)
        clipped = [jnp.clip(x, low.astype(x.dtype), high.astype(x.dtype)) for x in leaves]
        if stats == "none":
            return jax.tree.unflatten(treedef, clipped), ClipState(next_count(state.count), (), state.stats)
        # The statistics carry no gradient. The norm is the one a guard around this clip may have measured already.
        norm = jax.lax.stop_gradient(_norms.leaf_norms_of(leaves, 2, extra_args).total().value())
        found = {"norm": norm, "threshold": high}
        if stats == "full":
            after = jax.lax.stop_gradient(_norms.global_norm_parts(clipped, 2, computed=True).value())
            outside = sum(jnp.sum((x < lo) | (x > hi), dtype=jnp.float32) for x, lo, hi in _bounds(leaves, low, high))
            found["scale"] = jnp.where(found["norm"] > 0, after / jnp.where(found["norm"] > 0, found["norm"], 1.0), 1.0)
            found["norm_after"] = after
            found["clipped"] = outside / max(sum(x.size for x in leaves), 1)
        new_stats = make_stats(name, {k: found[k] for k in metrics}, stats)
        return jax.tree.unflatten(treedef, clipped), ClipState(next_count(state.count), (), new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _bounds(leaves: Sequence[Array], low: Array, high: Array) -> list[tuple[Array, Array, Array]]:
    return [(x, low.astype(x.dtype), high.astype(x.dtype)) for x in leaves]


def _default_unit_axes(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The input dims of each output unit for JAX layouts: (in, out) kernels, HWIO and DHWIO convolutions."""
    rank = len(shape)
    if rank <= 1:
        return None
    if rank in (2, 3):
        return (0,)
    if rank in (4, 5):
        return tuple(range(rank - 1))
    raise ValueError(
        f"adaptive_grad_clip: no default units for a rank-{rank} parameter of shape {shape}; "
        "pass axis= (the dims to reduce over for each unit)"
    )


def _unit_axes(axis: UnitAxes, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if isinstance(axis, jax.core.Tracer):
        raise ValueError(
            "adaptive_grad_clip: axis arrived as a traced value, as optax.inject_hyperparams makes of a plain int; "
            "pass it as a tuple (axis=(0,)) or name it in static_args=('axis',)"
        )
    if axis is None:
        return _default_unit_axes(shape)
    chosen = axis(shape) if callable(axis) else axis
    return None if chosen is None else tuple(np.atleast_1d(chosen).tolist())


def adaptive_grad_clip(
    clipping: float | Array | Callable[[Array], Any],
    *,
    eps: float = 1e-3,
    axis: UnitAxes = None,
    stats: str = "basic",
    name: str = "adaptive_grad_clip",
) -> optax.GradientTransformationExtraArgs:
    r"""Unit-wise adaptive gradient clipping (AGC): clip each unit's gradient relative to its weights' norm.

    For every output unit :math:`i` of every parameter, with :math:`W_i` its weights and :math:`G_i` their gradient,

    .. math:: G_i \leftarrow G_i \cdot \min\Big(1, \frac{\lambda \max(\|W_i\|_2, \epsilon)}{\|G_i\|_2}\Big)

    (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization", arXiv:2102.06171;
    ``optax.adaptive_grad_clip``). Units by default: a scalar or vector is one unit; rank 2-3 reduces over axis 0
    (JAX's (in, out) kernels); rank 4-5 over every axis but the last (HWIO / DHWIO convolutions). The NFNets recipe
    leaves the final classifier unclipped: use ``optax.masked`` for that. Units follow the shape as it is: a
    ``(1, C)`` kernel has C units of one weight each, where ``optax.adaptive_grad_clip`` squeezes size-1 dims first
    and treats it as one unit.

    The floor: :math:`\epsilon` bounds the weight norm from below, as in the paper's reference code
    (``deepmind-research/nfnets``: ``max(param_norm, eps)``, eps 1e-3) and ``optax.adaptive_grad_clip``, so that a
    zero-initialised parameter (a bias, a zero-init residual branch) can still move: without it its threshold would
    be 0 and its gradient would be zeroed for ever. timm's ``adaptive_clip_grad`` uses the same ``max(., eps)`` form.

    Args:
      clipping: the ratio :math:`\lambda \ge 0` (0.01 in the paper for batch 4096): a number, a JAX scalar or a
        schedule. A run-time value below 0 or NaN acts as 0.
      eps: the floor :math:`\epsilon \ge 0` on the weight norm. A run-time value below 0 or NaN acts as 0.
      axis: the dims each unit reduces over, for every leaf: an int or tuple, or a function ``shape -> axes``
        (under ``optax.inject_hyperparams`` pass a tuple or ``static_args=("axis",)``: a plain int is injected);
        ``None`` uses the defaults above (and raises for rank 6 and up).
      stats: ``"basic"`` (default): ``norm`` is the largest ratio :math:`\|G_i\| / \max(\|W_i\|, \epsilon)`,
        ``threshold`` is :math:`\lambda`, ``scale`` the smallest unit scale, ``norm_after`` the largest ratio after
        clipping, ``clipped`` the fraction of units; ``"full"`` adds per leaf its largest ratio (``norm/<path>``)
        and its fraction of units clipped (``clipped/<path>``); ``"none"`` records nothing.
      name: the prefix of this clip's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that needs ``params`` in ``update``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.adaptive_grad_clip(0.1)
      >>> params = {"kernel": jnp.ones((2, 2))}  # two units (columns), each of weight norm sqrt(2)
      >>> grads = {"kernel": jnp.array([[1.0, 0.01], [1.0, 0.01]])}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(3))  # the first column's norm sqrt(2) is cut to 0.1 * sqrt(2)
      [[0.1  0.01]
       [0.1  0.01]]
    """
    rule = as_rule(clipping, "clipping", "unit")
    check_non_negative(eps, "eps")
    check_level(stats)
    check_name(name)

    def init_fn(params: optax.Params) -> ClipState:
        names = slot_names(params)
        zeros = jnp.where(jnp.asarray([n is None for n in names], bool), jnp.nan, 0.0).astype(jnp.float32)
        new_stats = _per_leaf_stats(name, stats, _zero_metrics({}), {"norm": zeros, "clipped": zeros}, names)
        return ClipState(jnp.zeros((), jnp.int32), (), new_stats)

    def update_fn(
        updates: Updates, state: OptState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        state = cast(ClipState, state)
        del extra_args  # AGC measures units, not leaves: nothing upstream measures those
        if params is None:
            raise ValueError(f"{name}: adaptive_grad_clip needs params; call tx.update(grads, state, params)")
        check_float_leaves(updates, name)
        ratio, _ = rule.update(jnp.float32(0), (), state.count)
        ratio = non_negative(ratio)
        # None/MaskedNode gradients (frozen parameters) have a parameter beside them: pair them up, then skip them.
        slots = Slots.of(updates)
        param_slots = slots.treedef.flatten_up_to(params)
        grad_leaves = [slots.values[i] for i in slots.present]
        param_leaves = [param_slots[i] for i in slots.present]
        axes = [_unit_axes(axis, jnp.shape(p)) for p in param_leaves]
        # Gradients and weights in one measurement (one rescue loop for both), each as one vector of units whose
        # entries pair up: the leaves come in ``order``.
        units, weights, order = _norms.paired_unit_norms(grad_leaves, param_leaves, 2, axes)
        shapes = [_norms.unit_shape(jnp.shape(grad_leaves[i]), axes[i]) for i in order]
        floor = jnp.maximum(weights.value(), non_negative(jnp.asarray(eps)))
        # The formula once, over the vector of units; each leaf reads its rows, shaped to broadcast against it.
        scale = capped_ratio(units, ratio * floor)
        rows = dict(zip(order, multipliers_per_leaf(scale.multipliers(), state.count, shapes)))
        clipped = [apply(x, rows[i]) for i, x in enumerate(grad_leaves)]

        ratios = units.value() / floor
        basic = {
            "norm": jnp.max(ratios, initial=0.0),
            "threshold": ratio,
            "scale": jnp.min(scale.value, initial=1.0),
            "norm_after": jnp.max(jnp.where(scale.clipped, ratio, ratios), initial=0.0),
            "clipped": jnp.sum(scale.clipped, dtype=jnp.float32) / max(ratios.size, 1),
        }
        per_leaf = {}
        if stats == "full":  # each leaf's largest ratio and fraction of units clipped
            size = len(slots.values)
            leaf_of_unit = np.repeat(np.asarray(order, np.int32), [math.prod(shape) for shape in shapes])
            largest = jax.ops.segment_max(ratios, leaf_of_unit, len(order))
            clipped_units = jax.ops.segment_sum(scale.clipped.astype(jnp.float32), leaf_of_unit, len(order))
            fractions = clipped_units / np.maximum(np.bincount(leaf_of_unit, minlength=len(order)), 1)
            per_leaf = {
                "norm": spread(jnp.maximum(largest, 0.0), size, slots.present),
                "clipped": spread(fractions, size, slots.present),
            }
        new_stats = _per_leaf_stats(name, stats, basic, per_leaf, recorded_names(state.stats, name, stats))
        return slots.rebuilt(clipped), ClipState(next_count(state.count), (), new_stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
