"""The clipping transformations: by value, by leaf norm, by global norm, and unit-wise (AGC).

Every norm clip is the same four steps (DESIGN.md): a scope measures norms, a rule turns them into thresholds,
``scale = min(1, threshold / norm)``, and the gradients are multiplied by the scale. Only the scope differs between
``clip_by_global_norm``, ``clip_by_leaf_norm`` and ``adaptive_grad_clip``; the rule is whatever the user passed.

Non-finite gradients: a norm clip passes what it measures one norm over through unchanged when that holds a NaN or
Inf entry (its norm is not finite, so there is nothing sensible to scale by): the whole gradient for the global
norm, the leaf or the unit for the leaf and unit scopes, whose other leaves or units are clipped as usual. The
statistics show the non-finite norm and a rule's state is left as it was. ``clip_by_value`` maps +-Inf to the
bounds and passes NaN through, like ``torch.clamp`` and ``optax.clip``. Wrap the chain in ``optclip.skip_nonfinite``
to skip such steps instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip import _norms
from optclip._norms import NormParts
from optclip._rules import ThresholdRule, as_rule, guarded_update, non_negative
from optclip._stats import ClipStats, make_stats
from optclip._validation import ORDS, check_finite, check_name, check_non_negative, check_ord, concrete_float

Array = jax.Array
Threshold = float | Array | Callable[[Array], Any] | ThresholdRule
UnitAxes = int | Sequence[int] | Callable[[tuple[int, ...]], Any] | None

_CLIP_METRICS = ("norm", "threshold", "scale", "norm_after", "clipped")


class ClipState(NamedTuple):
    """State of every clip: the update count (for schedules), the threshold rule's state, the last statistics.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_global_norm(1.0)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> int(state.count), round(float(state.stats.by_name["clip_by_global_norm"]["scale"]), 4)
      (1, 0.2)
    """

    count: Array
    rule_state: Any
    stats: ClipStats


class _Scaling(NamedTuple):
    """``x -> (x * first) * second``: the clip scale in two factors, so that no factor is a flushed denormal."""

    first: Array
    second: Array
    norm: Array
    scale: Array
    norm_after: Array
    clipped: Array  # bool: the norm was finite and above the threshold


# The smallest e with 0.5 * 2**e a normal float32: the floor of ``first``'s exponent.
_LOWEST_NORMAL_EXPONENT = int(np.finfo(np.float32).minexp) + 1


def _unit_mantissa(x: Array) -> tuple[Array, Array]:
    """``x = m * 2**e`` with ``m`` in [0.5, 1) (0 for 0); ``e`` carries no gradient, ``m`` all of it."""
    exponent = jnp.frexp(jax.lax.stop_gradient(x))[1]
    return _norms.times_pow2(x, -exponent), exponent


def _scaling(parts: NormParts, threshold: Array) -> _Scaling:
    """The clip of a norm (any shape) to ``threshold`` (broadcastable), exact for norms beyond float32's range.

    With ``norm = r * 2**k`` and ``threshold = t * 2**j`` (``r, t`` in [0.5, 1)) the scale is ``(t / r) * 2**(j - k)``.
    It is applied as ``(x * first) * second``, ``first = (t / r) * 2**e`` with the largest ``e <= j - k`` that keeps
    ``first`` a normal float and ``second = 2**(j - k - e)``. So ``second`` is 1 unless the scale itself is below
    float32's range (a norm near 3e38 clipped to a small threshold), and ``x * first`` underflows only where
    ``x * scale`` does: splitting a representable scale in two would flush small entries of a large gradient.
    """
    norm = parts.value()
    finite = jnp.isfinite(parts.mantissa)
    clipped = finite & (norm > threshold)
    zero = finite & (threshold == 0)  # a zero threshold zeroes even an underflowed norm
    rescale = clipped & ~zero
    # Where a branch is not taken its inputs are 1, so that no inf or NaN reaches jax.grad through jnp.where.
    r, k = _unit_mantissa(jnp.where(rescale, parts.mantissa, 1.0))
    t, j = _unit_mantissa(jnp.where(rescale, threshold, 1.0).astype(jnp.float32))
    exponent = jnp.where(rescale, j - k - parts.exponent, 0)  # <= 1: the scale is below 1 where it applies
    first_exponent = jnp.clip(exponent, _LOWEST_NORMAL_EXPONENT, 1)
    # Each factor ends in a divide or a pow, ops XLA computes once: ending in selects, a factor was recomputed inside
    # the update fusion of every leaf (in leaf scope the whole vector of them, in each), and compile time grew with
    # it. (t * 2**e) / r is exactly (t / r) * 2**e: both are normal floats. Where not rescaled, exponent is 0: second 1.
    first = jnp.where(zero, 0.0, jnp.where(rescale, _norms.times_pow2(t, first_exponent), 1.0)) / jnp.where(
        rescale, r, 1.0
    )
    second = _norms.pow2(exponent - first_exponent)
    apply = clipped | zero
    return _Scaling(first, second, norm, first * second, jnp.where(apply, threshold, norm), clipped)


def _per_leaf(vector: Array, count: Array, shapes: Sequence[tuple[int, ...]] | None = None) -> list[Array]:
    """``vector`` cut into one block per leaf (shape ``shapes[i]``; default one scalar each), each a buffer of its own.

    XLA:CPU compiles one kernel for all the leaves of one shape whose update kernels are identical. A scale read
    straight out of a vector puts each leaf's slice indices into that leaf's update kernels, so every one of them
    is compiled on its own (clip_by_leaf_norm on 1000 leaves: 9x optax's compile time). Dividing by a 1 that XLA
    only learns at run time (``count`` never goes below 0) is exact and gives each leaf one small kernel of its
    own, which XLA does not copy into the update kernels (it computes a division once).
    """
    shapes = [()] * vector.shape[0] if shapes is None else shapes
    one = (count >= 0).astype(vector.dtype)
    blocks, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        blocks.append((vector[start : start + size] / one).reshape(shape))
        start += size
    return blocks


def _scaled(x: Array, first: Array, second: Array) -> Array:
    compute = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(compute) * first.astype(compute) * second.astype(compute)).astype(x.dtype)


def _scaled_per_leaf(
    leaves: Sequence[Array], first: Array, second: Array, count: Array, shapes: Sequence[tuple[int, ...]] | None = None
) -> list[Array]:
    """Each leaf scaled by its blocks of the factor vectors ``first`` and ``second`` (see ``_per_leaf``)."""
    blocks = zip(_per_leaf(first, count, shapes), _per_leaf(second, count, shapes))
    return [_scaled(x, f, s) for x, (f, s) in zip(leaves, blocks)]


def _check_float_leaves(tree: Any, name: str) -> None:
    """Clipping is for floating-point gradients; an integer or bool leaf is a bug upstream, so say where."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{name}: gradient leaf {jax.tree_util.keystr(path) or '<root>'} has dtype "
                f"{jnp.result_type(leaf)}; clipping needs floating-point gradients"
            )


def _zero_metrics(rule_metrics: dict[str, Array]) -> dict[str, Array]:
    return {**dict.fromkeys(_CLIP_METRICS, 0.0), "scale": 1.0, **rule_metrics}


def _leaf_rule_metrics(rule: ThresholdRule, rule_state: Any, num_leaves: int) -> dict[str, Array]:
    per_leaf = jax.vmap(rule.stats, axis_size=num_leaves)(rule_state)
    return {key: jnp.mean(value) for key, value in per_leaf.items()}


def _leafwise_rule_update(rule: ThresholdRule, norms: Array, rule_state: Any, count: Array):
    return jax.vmap(lambda norm, state: guarded_update(rule, norm, state, count))(norms, rule_state)


def _parts_for_ord(ord: Any, norm_parts: Callable[[float], Any]) -> Any:
    """``norm_parts(ord)``. ``optax.inject_hyperparams`` injects every number, ``ord`` too, so under ``jax.jit`` it
    can arrive as a tracer: then ``lax.switch`` picks the norm at run time (a value other than 1 or inf acts as 2).
    """
    static = concrete_float(ord)
    if static is not None:
        return norm_parts(static)
    index = jnp.where(ord == 1, 0, jnp.where(ord == jnp.inf, 2, 1))
    return jax.lax.switch(index, [lambda o=o: norm_parts(o) for o in ORDS])


def _stack_init(rule: ThresholdRule, num: int) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (num, *jnp.shape(x))), rule.init())


def clip_by_global_norm(
    max_norm: Threshold, *, ord: float = 2, name: str = "clip_by_global_norm"
) -> optax.GradientTransformation:
    r"""Rescale all gradients together so that their global norm is at most ``max_norm``.

    .. math:: g \leftarrow g \cdot \min\Big(1, \frac{c_t}{\|g\|_p}\Big), \qquad
              \|g\|_p = \Big(\sum_\ell \|g_\ell\|_p^p\Big)^{1/p}

    with one norm over every parameter (Pascanu et al. 2013, "On the difficulty of training recurrent neural
    networks", arXiv:1211.5063). This is ``torch.nn.utils.clip_grad_norm_`` (without its 1e-6 in the denominator:
    the clipped norm here is exactly ``c_t``), Keras ``global_clipnorm`` and ``optax.clip_by_global_norm``.

    Numerics: the norm accumulates in float32 for bf16/f16 gradients; finite float32 gradients with entries up to
    3e38 are clipped exactly to ``c_t`` (never zeroed, never NaN); zero gradients give zero updates for every
    threshold, ``c_t = 0`` included, and ``jax.grad`` through the clip stays finite there. Gradients with a NaN or Inf
    entry pass through unchanged (see ``optclip.skip_nonfinite``).

    Args:
      max_norm: the threshold ``c_t >= 0``: a number, a JAX scalar, a schedule ``step -> threshold``, or an adaptive
        rule (``optclip.percentile()``, ``optclip.zscore()``, ...). A run-time value below 0 or NaN acts as 0.
      ord: the norm, 1, 2 or ``inf``. Under ``optax.inject_hyperparams`` it is injected like any number and
        chosen at run time (a run-time value other than 1 or ``inf`` acts as 2).
      name: the prefix of this clip's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation`` whose state keeps ``norm``, ``threshold``, ``scale``, ``norm_after``
      and ``clipped`` (0 or 1) of the last update.

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
    check_name(name)

    def init_fn(params):
        rule_state = rule.init()
        return ClipState(jnp.zeros((), jnp.int32), rule_state, make_stats(name, _zero_metrics(rule.stats(rule_state))))

    def update_fn(updates, state, params=None):
        del params
        _check_float_leaves(updates, name)
        leaves, treedef = jax.tree.flatten(updates)
        parts = _parts_for_ord(ord, lambda o: _norms.global_norm_parts(leaves, o))
        threshold, rule_state = guarded_update(rule, parts.value(), state.rule_state, state.count)
        scaling = _scaling(parts, threshold)
        clipped = [_scaled(x, scaling.first, scaling.second) for x in leaves]
        metrics = {
            "norm": scaling.norm,
            "threshold": threshold,
            "scale": scaling.scale,
            "norm_after": scaling.norm_after,
            "clipped": scaling.clipped,
            **rule.stats(rule_state),
        }
        new_state = ClipState(optax.safe_int32_increment(state.count), rule_state, make_stats(name, metrics))
        return jax.tree.unflatten(treedef, clipped), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_leaf_norm(
    max_norm: Threshold, *, ord: float = 2, name: str = "clip_by_leaf_norm"
) -> optax.GradientTransformation:
    r"""Rescale each gradient array on its own so that its norm is at most ``max_norm``.

    .. math:: g_\ell \leftarrow g_\ell \cdot \min\Big(1, \frac{c_{\ell,t}}{\|g_\ell\|_p}\Big)
              \quad\text{for every leaf } \ell

    This is Keras ``clipnorm`` and ``tf.clip_by_norm`` applied to each variable (Pascanu et al. 2013,
    arXiv:1211.5063, clip per parameter block). With an adaptive rule as ``max_norm`` each leaf keeps its own
    statistics (``clip_by_leaf_norm(optclip.ema())`` is AdaGC, arXiv:2502.11034).

    Numerics are those of ``clip_by_global_norm``, leaf by leaf.

    Args:
      max_norm: the threshold: a number, a JAX scalar, a schedule ``step -> threshold``, or an adaptive rule
        (run once per leaf). A run-time value below 0 or NaN acts as 0.
      ord: the norm, 1, 2 or ``inf``. Under ``optax.inject_hyperparams`` it is injected like any number and
        chosen at run time (a run-time value other than 1 or ``inf`` acts as 2).
      name: the prefix of this clip's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation``; its statistics are the largest leaf ``norm``, the smallest
      ``threshold`` and ``scale``, the largest ``norm_after`` and the fraction of leaves ``clipped``.

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
    rule = as_rule(max_norm, "max_norm")
    check_ord(ord)
    check_name(name)

    def init_fn(params):
        num_leaves = len(jax.tree.leaves(params))
        rule_state = _stack_init(rule, num_leaves)
        metrics = _zero_metrics(_leaf_rule_metrics(rule, rule_state, num_leaves))
        return ClipState(jnp.zeros((), jnp.int32), rule_state, make_stats(name, metrics))

    def update_fn(updates, state, params=None):
        del params
        _check_float_leaves(updates, name)
        leaves, treedef = jax.tree.flatten(updates)
        parts = _parts_for_ord(ord, lambda o: _norms.leaf_norm_parts(leaves, o))
        thresholds, rule_state = _leafwise_rule_update(rule, parts.value(), state.rule_state, state.count)
        scaling = _scaling(parts, thresholds)
        clipped = _scaled_per_leaf(leaves, scaling.first, scaling.second, state.count)
        metrics = {
            "norm": jnp.max(scaling.norm, initial=0.0),
            "threshold": jnp.min(thresholds, initial=jnp.inf),
            "scale": jnp.min(scaling.scale, initial=1.0),
            "norm_after": jnp.max(scaling.norm_after, initial=0.0),
            "clipped": jnp.mean(scaling.clipped) if leaves else 0.0,
            **_leaf_rule_metrics(rule, rule_state, len(leaves)),
        }
        new_state = ClipState(optax.safe_int32_increment(state.count), rule_state, make_stats(name, metrics))
        return jax.tree.unflatten(treedef, clipped), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _bound(value: Any, count: Array) -> Array:
    return jnp.asarray(value(count) if callable(value) else value)


def clip_by_value(
    max_value: float | Array | Callable[[Array], Any],
    *,
    min_value: float | Array | Callable[[Array], Any] | None = None,
    name: str = "clip_by_value",
) -> optax.GradientTransformation:
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
      name: the prefix of this clip's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation``; its statistics are the global 2-norm before (``norm``) and after
      (``norm_after``), their ratio ``scale``, ``threshold = max_value`` and the fraction of entries ``clipped``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_value(1.0)
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
    check_name(name)

    def init_fn(params):
        del params
        return ClipState(jnp.zeros((), jnp.int32), (), make_stats(name, _zero_metrics({})))

    def update_fn(updates, state, params=None):
        del params
        _check_float_leaves(updates, name)
        high = _bound(max_value, state.count)
        if min_value is None:
            high = non_negative(high)  # a run-time bound cannot raise: [-c, c] with c < 0 or NaN acts as [0, 0]
            low = -high
        else:
            low = _bound(min_value, state.count)
        leaves, treedef = jax.tree.flatten(updates)
        bounds = [(low.astype(x.dtype), high.astype(x.dtype)) for x in leaves]
        clipped = [jnp.clip(x, lo, hi) for x, (lo, hi) in zip(leaves, bounds)]
        # The statistics carry no gradient (jax.grad cannot go through a variadic reduction anyway).
        measured = [jax.lax.stop_gradient(x) for x in leaves]
        squares, squares_after, outside = _value_clip_sums(measured, bounds)
        size = max(sum(x.size for x in leaves), 1)

        exponents = [_norms.rescue_exponent(s, zero_suspect=True) for s in (squares, squares_after)]
        plain = (_norms._root(squares, 2), _norms._root(squares_after, 2))
        norm, norm_after = jax.lax.cond(
            jnp.any(jnp.stack(exponents) != 0),
            lambda _: _exact_value_clip_norms(measured, bounds, exponents),
            lambda _: plain,
            None,
        )
        scale = jnp.where(norm > 0, norm_after / jnp.where(norm > 0, norm, 1.0), 1.0)
        metrics = {"norm": norm, "threshold": high, "scale": scale, "norm_after": norm_after, "clipped": outside / size}
        new_state = ClipState(optax.safe_int32_increment(state.count), (), make_stats(name, metrics))
        return jax.tree.unflatten(treedef, clipped), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _sums(terms: Sequence[Array], combine: Callable[[Array, Array], Array] = jnp.add) -> list[Array]:
    """``combine``-reductions of same-shaped arrays over all their dims, in one variadic reduction (one read)."""
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    dims = tuple(range(terms[0].ndim))
    return list(jax.lax.reduce(tuple(terms), zeros, lambda a, b: tuple(map(combine, a, b)), dims))


def _value_clip_sums(leaves: Sequence[Array], bounds: Sequence[tuple[Array, Array]]) -> tuple[Array, Array, Array]:
    """Over all leaves: the sums of squares before and after the clamp and the number of entries outside the bounds.

    One variadic reduction per leaf reads it once for all three. Three reductions would read it three times, and
    XLA:CPU writes out a clamped copy of the leaf for each reduction whose bounds it shares with a same-shaped leaf.
    """
    totals = [jnp.float32(0)] * 3
    for x, (lo, hi) in zip(leaves, bounds):
        before, after = _norms._magnitude(x), _norms._magnitude(jnp.clip(x, lo, hi))
        outside = ((x < lo) | (x > hi)).astype(jnp.float32)
        sums = _sums([before * before, after * after, outside])
        totals = [t + v.astype(jnp.float32) for t, v in zip(totals, sums)]
    return totals[0], totals[1], totals[2]


def _exact_value_clip_norms(
    leaves: Sequence[Array], bounds: Sequence[tuple[Array, Array]], exponents: Sequence[Array]
) -> tuple[Array, Array]:
    """The 2-norms before and after the clamp where a sum of squares over- or underflowed (the rare path): each
    sum is taken again with the entries divided by ``2**exponent`` (``_norms.rescue_exponent``), in one variadic
    read of each leaf.
    """
    totals = [jnp.float32(0)] * 2
    for x, (lo, hi) in zip(leaves, bounds):
        pair = (_norms._magnitude(x), _norms._magnitude(jnp.clip(x, lo, hi)))
        scaled = [_norms.times_pow2(v, -e) for v, e in zip(pair, exponents)]
        totals = [t + s.astype(jnp.float32) for t, s in zip(totals, _sums([v * v for v in scaled]))]
    norms = [_norms.NormParts(_norms._root(t, 2), e).value() for t, e in zip(totals, exponents)]
    return norms[0], norms[1]


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
    name: str = "adaptive_grad_clip",
) -> optax.GradientTransformation:
    r"""Unit-wise adaptive gradient clipping (AGC): clip each unit's gradient relative to its weights' norm.

    For every output unit :math:`i` of every parameter, with :math:`W_i` its weights and :math:`G_i` their gradient,

    .. math:: G_i \leftarrow G_i \cdot \min\Big(1, \frac{\lambda \max(\|W_i\|_2, \epsilon)}{\|G_i\|_2}\Big)

    (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization", arXiv:2102.06171;
    ``optax.adaptive_grad_clip``). Units by default: a scalar or vector is one unit; rank 2-3 reduces over axis 0
    (JAX's (in, out) kernels); rank 4-5 over every axis but the last (HWIO / DHWIO convolutions). The NFNets recipe
    leaves the final classifier unclipped: use ``optax.masked`` for that. Units follow the shape as it is: a
    ``(1, C)`` kernel has C units of one weight each, where ``optax.adaptive_grad_clip`` squeezes size-1 dims first
    and treats it as one unit.

    Args:
      clipping: the ratio :math:`\lambda \ge 0` (0.01 in the paper for batch 4096): a number, a JAX scalar or a
        schedule. A run-time value below 0 or NaN acts as 0.
      eps: the floor :math:`\epsilon \ge 0` on the weight norm, so that zero-initialised parameters can move. A
        run-time value below 0 or NaN acts as 0.
      axis: the dims each unit reduces over, for every leaf: an int or tuple, or a function ``shape -> axes``
        (under ``optax.inject_hyperparams`` pass a tuple or ``static_args=("axis",)``: a plain int is injected);
        ``None`` uses the defaults above (and raises for rank 6 and up).
      name: the prefix of this clip's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation`` that needs ``params`` in ``update``. Its statistics: ``norm`` is the
      largest ratio :math:`\|G_i\| / \max(\|W_i\|, \epsilon)`, ``threshold`` is :math:`\lambda`, ``scale`` the
      smallest unit scale, ``norm_after`` the largest ratio after clipping, ``clipped`` the fraction of units.

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
    rule = as_rule(clipping, "clipping", stateful=False)
    check_non_negative(eps, "eps")
    check_name(name)

    def init_fn(params):
        del params
        return ClipState(jnp.zeros((), jnp.int32), (), make_stats(name, _zero_metrics({})))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name}: adaptive_grad_clip needs params; call tx.update(grads, state, params)")
        _check_float_leaves(updates, name)
        ratio, _ = rule.update(jnp.float32(0), (), state.count)
        ratio = non_negative(ratio)
        # None/MaskedNode gradients (frozen parameters) have a parameter beside them: pair them up, then skip them.
        slots, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
        present = [i for i, g in enumerate(slots) if g is not None]
        grad_leaves = [slots[i] for i in present]
        param_slots = treedef.flatten_up_to(params)
        param_leaves = [param_slots[i] for i in present]
        axes = [_unit_axes(axis, jnp.shape(p)) for p in param_leaves]
        grad_parts = _norms.flat_unit_norm_parts(grad_leaves, 2, axes)
        param_norms = _norms.flat_unit_norm_parts(param_leaves, 2, axes).value()
        floors = jnp.maximum(param_norms, non_negative(eps))  # a run-time eps < 0 or NaN acts as 0
        scaling = _scaling(grad_parts, ratio * floors)
        shapes = [_norms.unit_shape(jnp.shape(p), a) for p, a in zip(param_leaves, axes)]
        for i, x in zip(present, _scaled_per_leaf(grad_leaves, scaling.first, scaling.second, state.count, shapes)):
            slots[i] = x
        metrics = {
            "norm": jnp.max(scaling.norm / floors, initial=0.0),
            "threshold": ratio,
            "scale": jnp.min(scaling.scale, initial=1.0),
            "norm_after": jnp.max(scaling.norm_after / floors, initial=0.0),
            "clipped": jnp.sum(scaling.clipped, dtype=jnp.float32) / max(scaling.clipped.size, 1),
        }
        new_state = ClipState(optax.safe_int32_increment(state.count), (), make_stats(name, metrics))
        return jax.tree.unflatten(treedef, slots), new_state

    return optax.GradientTransformation(init_fn, update_fn)
