"""Floors: the fewest operations that compute each clip, to show how low a step target can go on the machine at hand.

Each floor is the clip's formula in plain ``jnp``: one reduction per leaf (per unit for AGC), the scale fused into
the step, and none of what optclip adds (no rescue of norms that overflow or underflow float32, no statistics but
the pre-clip norm that ``clip_by_value``'s default records, no checks). Not a clip to train with: a gradient whose
squares overflow gives NaN here.

``barrier=True`` makes every leaf's scale depend on every leaf's norms (adds their sum times 0), as optclip's one
rescue decision for all leaves and its formula over the vector of every leaf's norms do: no leaf's update can start
before the last reduction has finished, where without it XLA runs one leaf's update beside the next leaf's
reductions.

The safety stack's floor guards the clip and Adam with one ``lax.cond``, as optclip's guards do on CPU (where a
select over both outcomes costs more: ``optclip._xla.run_unless``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _sum_of_squares(x: jax.Array, axis: int | None = None) -> jax.Array:
    return jnp.sum(jnp.square(x), axis=axis, keepdims=axis is not None)


def _global_norm(updates: Any) -> jax.Array:
    return jnp.sqrt(sum(_sum_of_squares(g) for g in jax.tree.leaves(updates)))


def _scaled_to(threshold: float, norm: jax.Array, updates: Any) -> Any:
    """``g * min(1, c / ||g||)`` for every leaf, given the norm."""
    return jax.tree.map(lambda g: g * jnp.minimum(1.0, threshold / norm), updates)


def _tied(values: list[jax.Array], barrier: bool) -> jax.Array | float:
    """0, made to depend on every one of ``values`` where ``barrier``."""
    return sum(jnp.sum(v) for v in values) * 0 if barrier else 0.0


def value_with_norm(bound: float) -> optax.GradientTransformation:
    """``clip(g, -bound, bound)``, keeping ``||g||`` in its state (what ``optclip.clip_by_value`` records)."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del state, params
        return jax.tree.map(lambda g: jnp.clip(g, -bound, bound), updates), _global_norm(updates)

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.float32), update)


def global_norm(threshold: float) -> optax.GradientTransformation:
    """``g * min(1, c / ||g||)`` over the whole tree."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return _scaled_to(threshold, _global_norm(updates), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def leaf_norm(threshold: float, barrier: bool = False) -> optax.GradientTransformation:
    """``g * min(1, c / ||g||)`` for each leaf ``g``."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        leaves, treedef = jax.tree.flatten(updates)
        norms = [jnp.sqrt(_sum_of_squares(g)) for g in leaves]
        zero = _tied(norms, barrier)
        clipped = [g * jnp.minimum(1.0, (threshold + zero) / n) for g, n in zip(leaves, norms)]
        return treedef.unflatten(clipped), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def unit_wise(ratio: float, eps: float = 1e-3, barrier: bool = False) -> optax.GradientTransformation:
    """AGC: each unit's ``G_i * min(1, ratio * max(||W_i||, eps) / ||G_i||)``, units reduced over axis 0 (a vector
    is one unit), as ``optclip.adaptive_grad_clip`` takes them on rank 1-3."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        leaves, treedef = jax.tree.flatten(updates)
        weights = treedef.flatten_up_to(params)
        grad_norms = [jnp.sqrt(_sum_of_squares(g, axis=0)) for g in leaves]
        weight_norms = [jnp.sqrt(_sum_of_squares(w, axis=0)) for w in weights]
        zero = _tied(grad_norms + weight_norms, barrier)
        clipped = []
        for g, gn, wn in zip(leaves, grad_norms, weight_norms):
            limit = ratio * jnp.maximum(wn, eps) + zero
            clipped.append(g * jnp.where(gn > limit, limit / gn, 1.0))
        return treedef.unflatten(clipped), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def guarded_global_norm(threshold: float, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """The safety stack's fewest operations: one global norm; a step whose norm is not finite is skipped (zero
    updates, ``inner``'s state kept) by a ``lax.cond``, else clipped by the norm and handed to ``inner``."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        norm = _global_norm(updates)

        def run() -> tuple[Any, Any]:
            return inner.update(_scaled_to(threshold, norm, updates), state, params)

        def hold() -> tuple[Any, Any]:
            return jax.tree.map(jnp.zeros_like, updates), state

        return jax.lax.cond(jnp.isfinite(norm), run, hold)

    return optax.GradientTransformation(inner.init, update)
