"""Per-example clipping for differentially private training (DP-SGD).

The gradients come in with a leading batch axis (``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)``);
each example's gradient is clipped on its own, the clipped gradients are summed, Gaussian noise is added to the sum,
and the result is divided by the batch size. The update that leaves has the parameters' shapes: the batch axis is
gone, so this transform comes first in a chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip import _norms
from optclip._clipping import Scale, Threshold, apply, capped_ratio, check_float_leaves
from optclip._norms import NormParts
from optclip._rules import as_rule, non_negative
from optclip._stats import ClipStats, make_stats
from optclip._validation import check_name, check_non_negative, concrete_float

Array = jax.Array

MODES = ("flat", "per_leaf", "per_leaf_by_size")
_METRICS = ("norm", "norm_mean", "threshold", "clipped", "dropped", "noise_std")


class PerExampleState(NamedTuple):
    """State of ``clip_per_example``: update count, threshold rule state, the noise PRNG key, the statistics."""

    count: Array
    rule_state: Any
    key: Array  # a raw uint32[2] key (``jax.random.PRNGKey``): plain data for checkpoints and sharding
    stats: ClipStats


def _example_leaf_norms(leaves: Sequence[Array]) -> list[NormParts]:
    """Each leaf's per-example 2-norms, shape ``(batch,)`` each."""
    batch = leaves[0].shape[0]
    parts = _norms.unit_norms(leaves, 2, [tuple(range(1, x.ndim)) for x in leaves])
    return [NormParts(p.mantissa.reshape(batch), p.exponent.reshape(batch)) for p in parts]


def _example_norm_parts(leaves: Sequence[Array]) -> NormParts:
    """Each example's 2-norm over every leaf, shape ``(batch,)``, as safe as the global norm."""
    parts = _example_leaf_norms(leaves)
    stacked = NormParts(jnp.stack([p.mantissa for p in parts]), jnp.stack([p.exponent for p in parts]))
    return _norms.combine(stacked, 2, axis=0)


def _check_batched(leaves: Sequence[Array], paths: Sequence[str], params: Any, updates: Any, name: str) -> int:
    """The batch size shared by every leaf; ``ValueError`` (at trace time) naming the leaf that does not fit."""
    for path, x in zip(paths, leaves):
        if x.ndim == 0:
            raise ValueError(
                f"{name}: gradient leaf {path} is a scalar; per-example gradients need a leading batch axis"
            )
    batch = leaves[0].shape[0]
    for path, x in zip(paths, leaves):
        if x.shape[0] != batch:
            raise ValueError(
                f"{name}: gradient leaf {path} has batch size {x.shape[0]} (shape {x.shape}) but leaf {paths[0]} has "
                f"{batch}; every leaf needs the same leading batch axis"
            )
    if batch == 0:
        raise ValueError(f"{name}: the batch is empty (leaf {paths[0]} has shape {leaves[0].shape})")
    if params is not None:
        if jax.tree.structure(params) != jax.tree.structure(updates):
            raise ValueError(
                f"{name}: the gradients and params are different trees: {jax.tree.structure(updates)} vs "
                f"{jax.tree.structure(params)}"
            )
        for path, x, p in zip(paths, leaves, jax.tree.leaves(params)):
            if tuple(x.shape[1:]) != tuple(jnp.shape(p)):
                raise ValueError(
                    f"{name}: gradient leaf {path} has shape {x.shape}, which is not (batch, *{jnp.shape(p)}) for "
                    f"its parameter; pass per-example gradients with the batch axis first (jax.vmap(jax.grad(...)))"
                )
    return batch


def _leaf_weights(leaves: Sequence[Array], mode: str) -> list[float]:
    """Each leaf's share of the threshold: ``C_k = C * w_k`` with ``sum_k w_k**2 = 1``."""
    if mode == "per_leaf":
        return [1.0 / np.sqrt(len(leaves))] * len(leaves)
    sizes = [int(np.prod(x.shape[1:])) for x in leaves]
    return [float(np.sqrt(size / max(sum(sizes), 1))) for size in sizes]


class _Measured(NamedTuple):
    """Per-example norms, shape ``(batch,)``, and how to clip the examples once the threshold is known."""

    finite: Array  # bool: the example has no NaN or Inf
    norm: Array  # the example's 2-norm over all leaves (a statistic)
    rule_norm: Array  # what the rule judges: the example is under the bound iff ``rule_norm <= threshold``
    clip: Any  # threshold -> (clipped leaves, bool per example: clipped)


def _broadcast_examples(v: Array, x: Array) -> Array:
    return v.reshape(v.shape[:1] + (1,) * (x.ndim - 1))


def _measure_flat(leaves: Sequence[Array]) -> _Measured:
    parts = _example_norm_parts(leaves)

    def clip(threshold):
        s = capped_ratio(parts, threshold)
        return [apply(x, Scale(*(_broadcast_examples(f, x) for f in s))) for x in leaves], s.clipped

    norm = parts.value()
    return _Measured(jnp.isfinite(parts.mantissa), norm, norm, clip)


def _measure_per_leaf(leaves: Sequence[Array], weights: Sequence[float]) -> _Measured:
    batch = leaves[0].shape[0]
    parts = _example_leaf_norms(leaves)
    leaf_norms = jnp.stack([p.value() for p in parts])  # (leaves, batch)
    finite = jnp.all(jnp.stack([jnp.isfinite(p.mantissa.reshape(batch)) for p in parts]), axis=0)
    # An example is under the bound iff every leaf is under its share C * w_k, i.e. max_k norm_k / w_k <= C.
    relative = jnp.max(leaf_norms / jnp.asarray(weights, jnp.float32)[:, None], axis=0)

    def clip(threshold):
        scalings = [capped_ratio(p, threshold * w) for p, w in zip(parts, weights)]
        clipped = [apply(x, Scale(*(_broadcast_examples(f, x) for f in s))) for x, s in zip(leaves, scalings)]
        return clipped, jnp.any(jnp.stack([s.clipped.reshape(batch) for s in scalings]), axis=0)

    return _Measured(finite, jnp.sqrt(jnp.sum(jnp.square(leaf_norms), axis=0)), relative, clip)


def clip_per_example(
    l2_norm_clip: Threshold,
    *,
    mode: str = "flat",
    noise_multiplier: float | Array = 0.0,
    seed: int = 0,
    name: str = "clip_per_example",
) -> optax.GradientTransformation:
    r"""Clip each example's gradient to norm ``l2_norm_clip``, average, and optionally add Gaussian noise (DP-SGD).

    For a batch of per-example gradients :math:`g_1, \dots, g_B` (a leading batch axis on every leaf) and threshold
    :math:`C`, mode ``"flat"`` is the DP-SGD step of Abadi et al. 2016 ("Deep Learning with Differential Privacy",
    arXiv:1607.00133):

    .. math:: \bar g = \frac{1}{B}\Big(\sum_{i=1}^{B} g_i \min\Big(1, \frac{C}{\|g_i\|_2}\Big)
              + \mathcal{N}(0, \sigma^2 C^2 I)\Big)

    with :math:`\|g_i\|_2` over every leaf of example :math:`i`. The per-layer modes (McMahan et al. 2018,
    "A General Approach to Adding Differential Privacy to Iterative Training Procedures", arXiv:1812.06210) clip each
    of the :math:`K` leaves of an example on its own, to :math:`C_k = C/\sqrt{K}` (``"per_leaf"``) or
    :math:`C_k = C\sqrt{D_k/D}` with :math:`D_k` the leaf's size (``"per_leaf_by_size"``); either way
    :math:`\sum_k C_k^2 = C^2`, so each clipped example still has norm at most :math:`C` and the same noise applies.

    The threshold may be a rule: ``optclip.quantile()`` (Andrew et al. 2021, arXiv:1905.03871) gets the vector of
    per-example norms (per-leaf modes: :math:`\max_k \|g_{ik}\| / (C_k / C)`, so an example counts as under the bound
    when none of its leaves is clipped) and moves :math:`C` toward the target quantile. The noise is drawn with a
    PRNG key carried in the state (split once per step), so a run restored from a checkpoint draws the same noise.

    Non-finite examples: an example whose gradient holds a NaN or Inf is dropped (it contributes nothing), counted
    in the ``dropped`` statistic, and :math:`B` above becomes the number of finite examples, so one bad example
    neither poisons nor shrinks the update; a rule only sees the finite examples' norms (if every example is
    non-finite, the rule state stays as it was and the update is the noise alone, zero without noise). Privacy
    accounting assumes the batch size is public: with noise, a dropped example is a bug to fix, not a routine event.

    Args:
      l2_norm_clip: the threshold :math:`C \ge 0`: a number, a JAX scalar, a schedule ``step -> C`` or a rule such
        as ``optclip.quantile()``.
      mode: ``"flat"`` (one norm per example), ``"per_leaf"`` or ``"per_leaf_by_size"``.
      noise_multiplier: :math:`\sigma \ge 0`; the noise added to the sum has standard deviation :math:`\sigma C`.
        0 (default) draws no noise.
      seed: the seed of the noise PRNG key.
      name: the prefix of this transform's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation`` mapping per-example gradients to one update with the parameters' shapes.
      Statistics: ``norm`` (the largest per-example norm), ``norm_mean``, ``threshold`` (:math:`C`), ``clipped``
      (the fraction of finite examples clipped), ``dropped`` (the number of non-finite examples) and ``noise_std``
      (:math:`\sigma C / B`, the noise's standard deviation in the update), plus the rule's own.

    Raises:
      ValueError: at construction, for an unknown mode or a negative threshold or noise multiplier; at trace time,
        for gradients without a common leading batch axis, or (when ``params`` is passed) gradients that are not
        ``params`` with a batch axis in front.

    Example:
      >>> import jax, jax.numpy as jnp, optclip
      >>> tx = optclip.clip_per_example(1.0)
      >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [jnp.nan, 0.0]])}  # 3 examples
      >>> update, state = tx.update(per_example, tx.init({"w": jnp.zeros(2)}))
      >>> print([round(float(v), 4) for v in update["w"]])  # ([0.6, 0.8] + [0.3, 0.4]) / 2: NaN example dropped
      [0.45, 0.6]
      >>> s = optclip.stats(state)
      >>> print(float(s["clip_per_example/clipped"]), int(s["clip_per_example/dropped"]))
      0.5 1
    """
    rule = as_rule(l2_norm_clip, "l2_norm_clip")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_non_negative(noise_multiplier, "noise_multiplier")
    if callable(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a number, got {noise_multiplier!r}")
    integer_array = isinstance(seed, jax.Array) and seed.ndim == 0 and jnp.issubdtype(seed.dtype, jnp.integer)
    if isinstance(seed, bool) or not (isinstance(seed, (int, np.integer)) or integer_array):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    check_name(name)
    draws_noise = concrete_float(noise_multiplier) != 0.0  # a traced (injected) multiplier always draws

    def init_fn(params):
        del params
        rule_state = rule.init()
        metrics = {**dict.fromkeys(_METRICS, 0.0), **rule.stats(rule_state)}
        return PerExampleState(
            jnp.zeros((), jnp.int32), rule_state, jax.random.PRNGKey(seed), make_stats(name, metrics)
        )

    def update_fn(updates, state, params=None):
        check_float_leaves(updates, name)
        leaves, treedef = jax.tree.flatten(updates)
        if not leaves:
            return updates, state
        paths = [jax.tree_util.keystr(p) or "<root>" for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
        batch = _check_batched(leaves, paths, params, updates, name)
        flat = mode == "flat"
        measured = _measure_flat(leaves) if flat else _measure_per_leaf(leaves, _leaf_weights(leaves, mode))
        finite = measured.finite

        # The rule sees the finite examples only; a non-finite norm is passed as NaN, which rules must ignore.
        rule_norms = jnp.where(finite, measured.rule_norm, jnp.nan)
        threshold, rule_state = rule.update(rule_norms, state.rule_state, state.count)
        any_finite = jnp.any(finite)
        rule_state = jax.tree.map(lambda new, old: jnp.where(any_finite, new, old), rule_state, state.rule_state)
        threshold = non_negative(threshold)
        clipped, clipped_examples = measured.clip(threshold)

        kept = jnp.sum(finite, dtype=jnp.int32)
        denominator = jnp.maximum(kept, 1).astype(jnp.float32)
        sums = []
        for x in clipped:
            compute = jnp.promote_types(x.dtype, jnp.float32)
            mask = _broadcast_examples(finite, x)
            sums.append(jnp.sum(jnp.where(mask, x.astype(compute), 0), axis=0))
        noise_std = jnp.asarray(noise_multiplier, jnp.float32) * threshold
        key = state.key
        if draws_noise:
            key, step_key = jax.random.split(key)
            keys = jax.random.split(step_key, len(sums))
            sums = [s + noise_std.astype(s.dtype) * jax.random.normal(k, s.shape, s.dtype) for s, k in zip(sums, keys)]
        means = [(s / denominator.astype(s.dtype)).astype(x.dtype) for s, x in zip(sums, leaves)]

        finite_norms = jnp.where(finite, measured.norm, 0.0)
        metrics = {
            "norm": jnp.max(finite_norms),
            "norm_mean": jnp.sum(finite_norms) / denominator,
            "threshold": threshold,
            "clipped": jnp.sum(clipped_examples & finite, dtype=jnp.float32) / denominator,
            "dropped": batch - kept,
            "noise_std": noise_std / denominator if draws_noise else 0.0,
            **rule.stats(rule_state),
        }
        new_state = PerExampleState(optax.safe_int32_increment(state.count), rule_state, key, make_stats(name, metrics))
        return jax.tree.unflatten(treedef, means), new_state

    return optax.GradientTransformation(init_fn, update_fn)
