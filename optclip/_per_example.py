"""Per-example clipping for differentially private training (DP-SGD).

The gradients come in with a leading batch axis (``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)``);
each example's gradient is clipped on its own, the clipped gradients are summed, Gaussian noise is added to the sum,
and the result is divided by the batch size. The update that leaves has the parameters' shapes: the batch axis is
gone, so this transform comes first in a chain.

The clipped sum of a leaf is a contraction of the per-example scales with the leaf over the batch axis,
``sum_i s_i x_i`` (``_clipped_sums``): no clipped copy of the per-example gradients is ever written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip import _norms
from optclip._adaptive import Quantile
from optclip._clipping import Scale, Slots, Threshold, capped_ratio, check_float_leaves, next_count
from optclip._norms import NormParts
from optclip._rules import Constant, FromSchedule, as_rule, non_negative
from optclip._stats import ClipStats, absent, make_stats
from optclip._validation import check_name, check_non_negative, concrete_float

Array = jax.Array

MODES = ("flat", "per_leaf", "per_leaf_by_size")
_METRICS = ("norm", "norm_mean", "threshold", "clipped", "dropped", "noise_std")
# The rules whose threshold a DP-SGD step may use: data-independent ones, and quantile, whose one look at the data
# (the count of examples under the bound) is noised and accounted for.
_PRIVATE_RULES = (Constant, FromSchedule, Quantile)
# Andrew et al. 2021 recommend sigma_b = (expected batch size) / 20: the noisy fraction then has std 0.05.
COUNT_STDDEV_PER_EXAMPLE = 1 / 20


class PerExampleState(NamedTuple):
    """State of ``clip_per_example``: update count, threshold rule state, the noise PRNG key, the statistics."""

    count: Array  # type: ignore[assignment]  # a field named like tuple.count, as optax's own states have
    rule_state: Any
    key: Array  # a raw uint32[2] key (``jax.random.PRNGKey``): plain data for checkpoints and sharding
    stats: ClipStats


def sum_noise_multiplier(noise_multiplier: Any, count_stddev: Any) -> Array:
    r"""The noise multiplier of the gradient sum when the count of examples under the bound is released too.

    .. math:: \sigma_\Delta = \big(z^{-2} - (2\sigma_b)^{-2}\big)^{-1/2}

    (Andrew et al. 2021, arXiv:1905.03871; TensorFlow Federated's ``adaptive_clip_noise_params``). The
    sum (sensitivity :math:`C`, noise :math:`\sigma_\Delta C`) and the centred count (sensitivity 1/2, noise
    :math:`\sigma_b`) are then one Gaussian mechanism with noise multiplier :math:`z`, so a run costs the privacy of a
    fixed-threshold run with ``noise_multiplier`` :math:`z`. :math:`z` itself where no count is released
    (:math:`\sigma_b = 0`), 0 for :math:`z = 0`, and NaN where :math:`2\sigma_b \le z`: the count alone, a Gaussian
    mechanism with multiplier :math:`2\sigma_b`, then spends the whole budget or more (``clip_per_example`` refuses
    that at construction where it can, and an injected :math:`z` that does it makes the update NaN).

    Example:
      >>> from optclip._per_example import sum_noise_multiplier
      >>> round(float(sum_noise_multiplier(1.0, 3.2)), 4)  # batch 64: sigma_b = 64 / 20
      1.0124
    """
    z = jnp.asarray(noise_multiplier, jnp.float32)
    sigma_b = jnp.asarray(count_stddev, jnp.float32)
    positive = z > 0
    z_term = 1.0 / jnp.square(jnp.where(positive, z, 1.0))
    b_term = jnp.where(sigma_b > 0, 1.0 / jnp.square(2.0 * jnp.where(sigma_b > 0, sigma_b, 1.0)), 0.0)
    left = z_term - b_term
    return jnp.where(positive, jnp.where(left > 0, jax.lax.rsqrt(jnp.where(left > 0, left, 1.0)), jnp.nan), 0.0)


def _example_leaf_norms(leaves: Sequence[Array]) -> list[NormParts]:
    """Each leaf's per-example 2-norms, shape ``(batch,)`` each."""
    batch = leaves[0].shape[0]
    parts = _norms.unit_norms(leaves, 2, [tuple(range(1, x.ndim)) for x in leaves])
    return [NormParts(p.mantissa.reshape(batch), p.exponent.reshape(batch)) for p in parts]


def _example_norm_parts(leaves: Sequence[Array]) -> NormParts:
    """Each example's 2-norm over every leaf, shape ``(batch,)``, as safe as the global norm: ``combine`` over the
    leaves' per-example norms."""
    parts = _example_leaf_norms(leaves)
    stacked = NormParts(jnp.stack([p.mantissa for p in parts]), jnp.stack([p.exponent for p in parts]))
    return _norms.combine(stacked, 2, axis=0)


def _check_batched(slots: Slots, paths: Sequence[str], params: Any, updates: Any, name: str) -> int:
    """The batch size shared by every present gradient leaf; ``ValueError`` (at trace time) naming the leaf that
    does not fit. A ``None`` or ``optax.MaskedNode`` gradient (a frozen or masked-out parameter) has no batch axis
    and passes through."""
    present = slots.present
    leaves: list[Array] = [slots.values[i] for i in present]
    named = [paths[i] for i in present]
    for path, x in zip(named, leaves):
        if x.ndim == 0:
            raise ValueError(
                f"{name}: gradient leaf {path} is a scalar; per-example gradients need a leading batch axis"
            )
    if params is not None:
        if jax.tree.structure(params, is_leaf=absent) != slots.treedef:
            raise ValueError(
                f"{name}: the gradients and params are different trees: {jax.tree.structure(updates)} vs "
                f"{jax.tree.structure(params)}"
            )
        param_slots = jax.tree.leaves(params, is_leaf=absent)
        for path, x, p in zip(named, leaves, [param_slots[i] for i in present]):
            shape = None if absent(p) else tuple(jnp.shape(p))
            if tuple(x.shape) == shape:
                raise ValueError(
                    f"{name}: gradient leaf {path} has its parameter's own shape {x.shape}, with no batch axis: pass "
                    f"per-example gradients (jax.vmap(jax.grad(...))). Inside optax.MultiSteps, which hands its inner "
                    f"transform gradients of the parameters' shapes, clip_per_example cannot work: chain it first, "
                    f"optax.chain(clip_per_example(...), optax.MultiSteps(optimizer, k))"
                )
            if tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"{name}: gradient leaf {path} has shape {x.shape}, which is not (batch, *{shape}) for its "
                    f"parameter; pass per-example gradients with the batch axis first (jax.vmap(jax.grad(...)))"
                )
    batch = leaves[0].shape[0]
    for path, x in zip(named, leaves):
        if x.shape[0] != batch:
            raise ValueError(
                f"{name}: gradient leaf {path} has batch size {x.shape[0]} (shape {x.shape}) but leaf {named[0]} has "
                f"{batch}; every leaf needs the same leading batch axis"
            )
    if batch == 0:
        raise ValueError(f"{name}: the batch is empty (leaf {named[0]} has shape {leaves[0].shape})")
    return batch


def _leaf_weights(leaves: Sequence[Array], mode: str) -> list[float]:
    """Each leaf's share of the threshold: ``C_k = C * w_k`` with ``sum_k w_k**2 = 1``."""
    if mode == "per_leaf":
        return [1.0 / np.sqrt(len(leaves))] * len(leaves)
    sizes = [int(np.prod(x.shape[1:])) for x in leaves]
    return [float(np.sqrt(size / max(sum(sizes), 1))) for size in sizes]


class _Measured(NamedTuple):
    """Per-example norms, shape ``(batch,)``, and how to scale the examples once the threshold is known."""

    finite: Array  # bool: the example has no NaN or Inf
    norm: Array  # the example's 2-norm over all leaves (a statistic)
    rule_norm: Array  # what the rule judges: the example is under the bound iff ``rule_norm <= threshold``
    # threshold -> (one Scale of (batch,) vectors per leaf, bool per example: clipped)
    scales: Callable[[Array], tuple[list[Scale], Array]]


def _measure_flat(leaves: Sequence[Array]) -> _Measured:
    parts = _example_norm_parts(leaves)

    def scales(threshold: Array) -> tuple[list[Scale], Array]:
        s = capped_ratio(parts, threshold)
        return [s] * len(leaves), s.clipped

    norm = parts.value()
    return _Measured(jnp.isfinite(parts.mantissa), norm, norm, scales)


def _measure_per_leaf(leaves: Sequence[Array], weights: Sequence[float]) -> _Measured:
    batch = leaves[0].shape[0]
    parts = _example_leaf_norms(leaves)
    leaf_norms = jnp.stack([p.value() for p in parts])  # (leaves, batch)
    finite = jnp.all(jnp.stack([jnp.isfinite(p.mantissa.reshape(batch)) for p in parts]), axis=0)
    # An example is under the bound iff every leaf is under its share C * w_k, i.e. max_k norm_k / w_k <= C.
    relative = jnp.max(leaf_norms / jnp.asarray(weights, jnp.float32)[:, None], axis=0)

    def scales(threshold: Array) -> tuple[list[Scale], Array]:
        per_leaf = [capped_ratio(p, threshold * w) for p, w in zip(parts, weights)]
        return per_leaf, jnp.any(jnp.stack([s.clipped.reshape(batch) for s in per_leaf]), axis=0)

    return _Measured(finite, jnp.sqrt(jnp.sum(jnp.square(leaf_norms), axis=0)), relative, scales)


def _clipped_sums(leaves: Sequence[Array], scales: Sequence[Scale], finite: Array) -> list[Array]:
    """For each leaf, ``sum_i [finite_i] x_i min(1, C / ||x_i||)`` over the leading axis, in at least float32,
    without writing the scaled examples.

    Each example's scale is ``factor_i * 2**exponent_i`` (``capped_ratio``). Where every example is finite and every
    exponent 0 (the scale is a normal float), a leaf's sum is one contraction of the ``factor`` vector with the leaf
    over the batch axis, which reads the leaf once and writes only the result. Otherwise the contraction cannot
    serve: ``0 * inf`` is NaN, so a weight of 0 cannot drop a non-finite example, and a scale below float32's normal
    range (a norm near 3e38 clipped to 1) would round to zero where ``(x_i * factor_i) * 2**exponent_i`` is still
    representable. Then every sum is taken again example by example, each example scaled as ``apply`` does, in one
    loop over the batch that holds one example at a time and has no iteration on the common path.
    """
    computes = [jnp.promote_types(x.dtype, jnp.float32) for x in leaves]
    plain = [finite & (s.exponent == 0) for s in scales]
    sums = []
    for x, s, ok, compute in zip(leaves, scales, plain, computes):
        weights = jnp.where(ok, s.factor, 0.0).astype(compute)
        # Precision HIGHEST: on TPU a float32 dot runs by default as one bf16 pass and on recent GPUs in TF32, which
        # round the scales and the entries to 8 or 10 mantissa bits; HIGHEST keeps them float32.
        sums.append(
            jnp.einsum("b,b...->...", weights, x, precision=jax.lax.Precision.HIGHEST, preferred_element_type=compute)
        )
    special = ~jnp.all(jnp.stack(plain))

    def add_example(i: Array, totals: list[Array]) -> list[Array]:
        out = []
        for x, s, compute, total in zip(leaves, scales, computes, totals):
            example = jax.lax.dynamic_index_in_dim(x, i, keepdims=False).astype(compute)
            scaled = _norms.times_pow2(example * s.factor[i].astype(compute), s.exponent[i])
            # The loop starts from the contractions' results, so that it writes into their buffers; the first
            # example drops them.
            out.append(jnp.where(i == 0, 0.0, total) + jnp.where(finite[i], scaled, 0.0))
        return out

    # fori_loop is unannotated: its result has the type of its initial value.
    summed: list[Array] = jax.lax.fori_loop(0, leaves[0].shape[0] * special.astype(jnp.int32), add_example, sums)
    return summed


def clip_per_example(
    l2_norm_clip: Threshold,
    *,
    mode: str = "flat",
    noise_multiplier: float | Array = 0.0,
    clipped_count_stddev: float | Array | None = None,
    seed: int = 0,
    name: str = "clip_per_example",
) -> optax.GradientTransformation:
    r"""Clip each example's gradient to norm ``l2_norm_clip``, sum, add Gaussian noise, divide by the batch (DP-SGD).

    For a batch of :math:`B` per-example gradients :math:`g_1, \dots, g_B` (a leading batch axis on every leaf) and
    threshold :math:`C`, mode ``"flat"`` is the DP-SGD step of Abadi et al. 2016 ("Deep Learning with Differential
    Privacy", arXiv:1607.00133):

    .. math:: \bar g = \frac{1}{B}\Big(\sum_{i=1}^{B} g_i \min\Big(1, \frac{C}{\|g_i\|_2}\Big)
              + \mathcal{N}(0, \sigma^2 C^2 I)\Big)

    with :math:`\|g_i\|_2` over every leaf of example :math:`i` and :math:`\sigma` = ``noise_multiplier``. The
    per-layer modes (McMahan et al. 2018, "A General Approach to Adding Differential Privacy to Iterative Training
    Procedures", arXiv:1812.06210) clip each of the :math:`K` leaves of an example on its own, to
    :math:`C_k = C/\sqrt{K}` (``"per_leaf"``) or :math:`C_k = C\sqrt{D_k/D}` with :math:`D_k` the leaf's size
    (``"per_leaf_by_size"``); either way :math:`\sum_k C_k^2 = C^2`, so each clipped example still has norm at most
    :math:`C` and the same noise applies. :math:`B` is the leading axis, a constant of the compiled step: the mean
    never divides by a count that depends on the data.

    Adaptive threshold, private (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping",
    arXiv:1905.03871, Algorithm 1): with ``optclip.quantile()`` as the threshold and :math:`z` =
    ``noise_multiplier`` :math:`> 0`, the count of examples at or below :math:`C` is released with noise of its own
    and :math:`C` moves by that noisy fraction,

    .. math:: \tilde b = \frac{1}{2} + \frac{1}{B}\Big(\sum_{i=1}^{B}\big([\|g_i\| \le C] - \tfrac{1}{2}\big)
              + \mathcal{N}(0, \sigma_b^2)\Big), \qquad C \leftarrow C\,e^{-\eta(\tilde b - \gamma)}

    (:math:`\tilde b` clipped to [0, 1]; for a fixed :math:`B` it is :math:`(\sum_i [\|g_i\| \le C] +
    \mathcal{N}(0, \sigma_b^2)) / B`), and the sum gets noise :math:`\sigma_\Delta C` instead of :math:`z C`, with

    .. math:: \sigma_\Delta = \big(z^{-2} - (2\sigma_b)^{-2}\big)^{-1/2}

    so that the two releases together cost exactly the privacy of a fixed-threshold run with multiplier :math:`z`
    (the centred count has sensitivity 1/2, so it is a Gaussian mechanism with multiplier :math:`2\sigma_b`, and
    Gaussian mechanisms compose as :math:`z^{-2} = \sigma_\Delta^{-2} + (2\sigma_b)^{-2}`). This needs
    :math:`2\sigma_b > z`. With :math:`z = 0` the rule sees the exact fraction of the finite examples (its
    non-private form, ``optclip.quantile``). Only data-independent thresholds (numbers, schedules) and
    ``quantile`` can be made private: any other rule with ``noise_multiplier > 0`` is refused at construction.

    Non-finite examples: an example whose gradient holds a NaN or Inf contributes zero to the sum, counts as not
    under the bound in the private count, and is counted in the ``dropped`` statistic; the divisor stays :math:`B`.
    A rule's non-private update sees only the finite examples (if none is finite, its state stays as it was). With
    noise a dropped example is still a bug to fix upstream: what the accounting covers is the clipped gradient,
    and a NaN is not one.

    The noise is drawn with a PRNG key carried in the state (split once per step), so a run restored from a
    checkpoint draws the same noise. The clipped sum of each leaf is a contraction of the per-example scales with
    the leaf over the batch axis (float32 at least, precision ``HIGHEST``): no clipped copy of the per-example
    gradients is written.

    Args:
      l2_norm_clip: the threshold :math:`C \ge 0`: a number, a JAX scalar, a schedule ``step -> C`` or a rule that
        takes a vector of norms (``optclip.quantile()``); other rules are refused.
      mode: ``"flat"`` (one norm per example), ``"per_leaf"`` or ``"per_leaf_by_size"``.
      noise_multiplier: :math:`z \ge 0`; the sum's noise has standard deviation :math:`z C` (:math:`\sigma_\Delta C`
        with a private ``quantile``). 0 (default) draws no noise.
      clipped_count_stddev: :math:`\sigma_b \ge 0`, the standard deviation of the noise on the count of examples at
        or below :math:`C` (TF Privacy's ``clipped_count_stddev``); ``quantile`` only. ``None`` (default): 0 when
        ``noise_multiplier`` is 0, else :math:`B / 20` as Andrew et al. recommend (the noisy fraction then has
        standard deviation 0.05), which needs :math:`B > 10 z`.
      seed: the seed of the noise PRNG key.
      name: the prefix of this transform's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation`` mapping per-example gradients to one update with the parameters' shapes.
      Statistics: ``norm`` (the largest finite per-example norm), ``norm_mean`` (over the finite examples),
      ``threshold`` (:math:`C`), ``clipped`` (the fraction of finite examples clipped), ``dropped`` (the number of
      non-finite examples) and ``noise_std`` (the sum's noise standard deviation divided by :math:`B`, i.e. in the
      update), plus the rule's own (``quantile``: ``fraction_below``, noised when private). Only the update and, with
      a private ``quantile``, ``threshold`` and ``fraction_below`` are private; the other statistics are not.

    Raises:
      ValueError: at construction, for an unknown mode, a negative threshold, noise multiplier or count noise, a
        rule that ``per_example`` scope cannot take, a rule that cannot be made private with a noise multiplier
        that is not 0, ``clipped_count_stddev`` with a rule other than ``quantile``, or ``2 * clipped_count_stddev
        <= noise_multiplier``; at trace time, for gradients without a common leading batch axis, (when ``params`` is
        passed) gradients that are not ``params`` with a batch axis in front, or a batch of at most
        ``10 * noise_multiplier`` examples with the default ``clipped_count_stddev``.

    Example:
      >>> import jax, jax.numpy as jnp, optclip
      >>> tx = optclip.clip_per_example(1.0)
      >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [jnp.nan, 0.0]])}  # 3 examples
      >>> update, state = tx.update(per_example, tx.init({"w": jnp.zeros(2)}))
      >>> print([round(float(v), 4) for v in update["w"]])  # ([0.6, 0.8] + [0.3, 0.4] + 0) / 3
      [0.3, 0.4]
      >>> s = optclip.stats(state)
      >>> print(float(s["clip_per_example/clipped"]), int(s["clip_per_example/dropped"]))
      0.5 1
      >>> private = optclip.clip_per_example(optclip.quantile(), noise_multiplier=1.0)  # sigma_b = B / 20
      >>> batch = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 2))}
      >>> _, state = private.update(batch, private.init({"w": jnp.zeros(2)}))
      >>> print(round(float(optclip.stats(state)["clip_per_example/noise_std"]) * 64, 4))  # sigma_Delta * C
      1.0124
    """
    rule = as_rule(l2_norm_clip, "l2_norm_clip", "per_example")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_non_negative(noise_multiplier, "noise_multiplier")
    if callable(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a number, got {noise_multiplier!r}")
    integer_array = isinstance(seed, jax.Array) and seed.ndim == 0 and jnp.issubdtype(seed.dtype, jnp.integer)
    if isinstance(seed, bool) or not (isinstance(seed, (int, np.integer)) or integer_array):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    check_name(name)
    z = concrete_float(noise_multiplier)  # None: injected at run time, so it may be > 0
    draws_noise = z != 0.0
    adaptive = isinstance(rule, Quantile)
    if draws_noise and not isinstance(rule, _PRIVATE_RULES):
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} cannot make the rule {rule!r} of type {type(rule).__name__} "
            "private: its threshold depends on the per-example gradients without noise. With noise, l2_norm_clip "
            "must be a number, a schedule or optclip.quantile() (whose count is noised as in Andrew et al. 2021)"
        )
    if clipped_count_stddev is not None:
        check_non_negative(clipped_count_stddev, "clipped_count_stddev")
        if callable(clipped_count_stddev):
            raise ValueError(f"clipped_count_stddev must be a number, got {clipped_count_stddev!r}")
        if not adaptive:
            raise ValueError(
                f"clipped_count_stddev={clipped_count_stddev!r} is the noise on quantile's count of examples under "
                f"the bound; l2_norm_clip={l2_norm_clip!r} counts nothing. Pass optclip.quantile() or leave it None"
            )
        sigma_b = concrete_float(clipped_count_stddev)
        if adaptive and z is not None and z > 0 and sigma_b is not None and not 2 * sigma_b > z:
            raise ValueError(
                f"clipped_count_stddev={clipped_count_stddev!r} is too small for noise_multiplier="
                f"{noise_multiplier!r}: the sum's multiplier (z^-2 - (2 sigma_b)^-2)^(-1/2) needs "
                f"2 * clipped_count_stddev > noise_multiplier"
            )

    def count_stddev(batch: int) -> Any:
        """sigma_b for a batch of ``batch`` examples (0: the rule's non-private update)."""
        if not adaptive:
            return 0.0
        if clipped_count_stddev is not None:
            return clipped_count_stddev
        if not draws_noise:
            return 0.0
        default = COUNT_STDDEV_PER_EXAMPLE * batch
        if z is not None and not 2 * default > z:
            raise ValueError(
                f"{name}: noise_multiplier={noise_multiplier!r} with the default clipped_count_stddev = batch / 20 "
                f"= {default:g} for a batch of {batch} needs a batch of more than {10 * z:g} examples (2 sigma_b > "
                f"noise_multiplier); pass clipped_count_stddev > {z / 2:g} or use a larger batch"
            )
        return default

    def init_fn(params: optax.Params) -> PerExampleState:
        del params
        rule_state = rule.init()
        metrics = {**dict.fromkeys(_METRICS, 0.0), **rule.stats(rule_state)}
        return PerExampleState(
            jnp.zeros((), jnp.int32), rule_state, jax.random.PRNGKey(seed), make_stats(name, metrics)
        )

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        # optax types every state as OptState; this update only ever receives the PerExampleState its init made.
        state = cast(PerExampleState, state)
        check_float_leaves(updates, name)
        slots = Slots.of(updates)
        leaves = [slots.values[i] for i in slots.present]
        if not leaves:
            return updates, state
        with_paths = jax.tree_util.tree_flatten_with_path(updates, is_leaf=absent)[0]
        paths = [jax.tree_util.keystr(p) or "<root>" for p, _ in with_paths]
        batch = _check_batched(slots, paths, params, updates, name)
        flat = mode == "flat"
        measured = _measure_flat(leaves) if flat else _measure_per_leaf(leaves, _leaf_weights(leaves, mode))
        finite = measured.finite
        sigma_b = count_stddev(batch)
        private = adaptive and concrete_float(sigma_b) != 0.0  # the count is released with noise
        key = state.key
        if private:
            key, step_key, count_key = jax.random.split(key, 3)
            assert isinstance(rule, Quantile)  # private implies adaptive, which mypy cannot follow through the flag
            threshold, rule_state = rule.private_update(measured.rule_norm, state.rule_state, count_key, sigma_b)
            multiplier = sum_noise_multiplier(noise_multiplier, sigma_b)
        else:
            if draws_noise:
                key, step_key = jax.random.split(key)
            # The rule sees the finite examples only; a non-finite norm is passed as NaN, which rules must ignore.
            rule_norms = jnp.where(finite, measured.rule_norm, jnp.nan)
            threshold, rule_state = rule.update(rule_norms, state.rule_state, state.count)
            any_finite = jnp.any(finite)
            rule_state = jax.tree.map(lambda new, old: jnp.where(any_finite, new, old), rule_state, state.rule_state)
            multiplier = jnp.asarray(noise_multiplier, jnp.float32)
        threshold = non_negative(threshold)
        scales, clipped_examples = measured.scales(threshold)
        sums = _clipped_sums(leaves, scales, finite)

        noise_std = multiplier * threshold
        if draws_noise:
            keys = jax.random.split(step_key, len(sums))
            sums = [s + noise_std.astype(s.dtype) * jax.random.normal(k, s.shape, s.dtype) for s, k in zip(sums, keys)]
        means = [(s / batch).astype(x.dtype) for s, x in zip(sums, leaves)]

        kept = jnp.sum(finite, dtype=jnp.int32)
        seen = jnp.maximum(kept, 1).astype(jnp.float32)
        finite_norms = jnp.where(finite, measured.norm, 0.0)
        metrics = {
            "norm": jnp.max(finite_norms),
            "norm_mean": jnp.sum(finite_norms) / seen,
            "threshold": threshold,
            "clipped": jnp.sum(clipped_examples & finite, dtype=jnp.float32) / seen,
            "dropped": batch - kept,
            "noise_std": noise_std / batch if draws_noise else 0.0,
            **rule.stats(rule_state),
        }
        new_state = PerExampleState(next_count(state.count), rule_state, key, make_stats(name, metrics))
        return slots.rebuilt(means), new_state

    return optax.GradientTransformation(init_fn, update_fn)
