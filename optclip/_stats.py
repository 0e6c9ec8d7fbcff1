"""Clip statistics: each transform keeps its last ones in its state; ``stats`` collects them for a logger."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class ClipStats(NamedTuple):
    """The statistics of one transform, ``{name: {metric: float32 scalar}}``, kept in its state.

    The name is a dict key, so it is part of the tree structure (static under ``jax.jit``) while every value stays
    a plain array that checkpoints and shards like any other state.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> state = optclip.clip_by_leaf_norm(1.0, name="enc").init({"w": jnp.zeros(2)})
      >>> {name: sorted(metrics) for name, metrics in state.stats.by_name.items()}
      {'enc': ['clipped', 'norm', 'norm_after', 'scale', 'threshold']}
    """

    by_name: dict[str, dict[str, Array]]


def make_stats(name: str, metrics: dict[str, Any]) -> ClipStats:
    # jnp.array copies: a metric that is also a rule-state leaf must not share its buffer, or a jitted step that
    # donates the state fails with "donate the same buffer twice".
    return ClipStats({name: {key: jnp.array(value, jnp.float32) for key, value in metrics.items()}})


def _plain(value: Any) -> Any:
    # flax.nnx.Optimizer wraps every state array in a Variable; read its value without importing flax.
    return value.get_value() if hasattr(value, "get_value") else value


def stats(state: Any) -> dict[str, Array]:
    """Every optclip statistic found anywhere in an optimizer state, flat and ready for a logger.

    Looks through any nesting of containers: ``optax.chain``, ``named_chain``, ``inject_hyperparams``,
    ``MultiSteps``, ``masked``, ``partition``, and the state of a ``flax.nnx.Optimizer`` (pass the optimizer or its
    ``opt_state``). Keys are ``"<name>/<metric>"``; the name defaults to the transform's own and is set by its
    ``name=`` argument. The norm clips report:

    ``norm``
        the pre-clip norm (leaf and unit scopes: the largest of them);
    ``threshold``
        the threshold the norm was held to (leaf scope with a per-leaf rule: the smallest);
    ``scale``
        the factor applied, ``min(1, threshold / norm)`` (leaf and unit scopes: the smallest);
    ``norm_after``
        the post-clip norm, ``min(norm, threshold)`` (leaf and unit scopes: the largest);
    ``clipped``
        1.0 if the step was clipped, else 0.0 (leaf and unit scopes: the fraction of leaves or units clipped).

    Before the first update every value is that of an all-zero step.

    Args:
      state: an optimizer state (any pytree), or an object with an ``opt_state`` attribute.

    Returns:
      ``dict[str, jax.Array]`` of float32 scalars, in the order the transforms appear in the state.

    Raises:
      ValueError: if two transforms share a name; give one of them ``name=``.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optax.chain(optclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
      >>> {k: round(float(v), 4) for k, v in optclip.stats(state).items()}
      {'clip_by_global_norm/norm': 5.0, 'clip_by_global_norm/threshold': 1.0,
       'clip_by_global_norm/scale': 0.2, 'clip_by_global_norm/norm_after': 1.0,
       'clip_by_global_norm/clipped': 1.0}
    """
    state = getattr(state, "opt_state", state)
    records = jax.tree.leaves(state, is_leaf=lambda node: isinstance(node, ClipStats))
    flat: dict[str, Array] = {}
    for record in records:
        if not isinstance(record, ClipStats):
            continue
        for name, metrics in record.by_name.items():
            if any(key.startswith(f"{name}/") for key in flat):
                raise ValueError(
                    f"two optclip transforms in this state are both named {name!r}; pass name= to one of them"
                )
            flat.update({f"{name}/{metric}": _plain(value) for metric, value in metrics.items()})
    return flat
