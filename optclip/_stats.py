"""Statistics: each transform keeps its last ones in its state; ``stats`` collects them for a logger.

Levels (every transform's ``stats=`` argument): ``"none"`` records nothing; ``"basic"`` (the default) records what
people log, scalars computed from the norms the transform needs anyway; ``"full"`` adds one value per leaf (or what
costs an extra pass, such as ``clip_by_value``'s post-clip norm), each reported under the parameter's path.

Where the names live: a per-leaf statistic is a ``PerLeaf`` node, a float32 vector in the state whose leaf names
are static metadata of the tree (like a dict key), fixed at ``init`` from the parameters' paths. So the state holds
arrays only (jit, orbax and ``flax.nnx.Optimizer`` see a vector), and ``optclip.stats`` can still say
``clip_by_leaf_norm/norm/encoder/layers_0/kernel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
LEVELS = ("none", "basic", "full")


def check_level(level: Any) -> None:
    if level not in LEVELS:
        raise ValueError(f"stats must be one of {LEVELS}, got {level!r}")


@jax.tree_util.register_pytree_with_keys_class
class PerLeaf:
    """One float32 value per leaf (a vector), named by the leaves' paths (static, part of the tree structure)."""

    def __init__(self, values: Any, names: Sequence[str | None]):
        self.values = values
        self.names = tuple(names)

    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], tuple[str, ...]]:
        return [(jax.tree_util.GetAttrKey("values"), self.values)], self.names

    def tree_flatten(self) -> tuple[list[Any], tuple[str, ...]]:
        return [self.values], self.names

    @classmethod
    def tree_unflatten(cls, names: tuple[str, ...], children: Sequence[Any]) -> PerLeaf:
        return cls(children[0], names)

    def __repr__(self) -> str:
        return f"PerLeaf({self.values!r}, names={self.names!r})"


class ClipStats(NamedTuple):
    """The statistics of one transform, ``{name: {metric: float32 scalar or PerLeaf}}``, kept in its state.

    The name is a dict key, so it is part of the tree structure (static under ``jax.jit``) while every value stays
    a plain array that checkpoints and shards like any other state.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> state = optclip.clip_by_leaf_norm(1.0, name="enc").init({"w": jnp.zeros(2)})
      >>> {name: sorted(metrics) for name, metrics in state.stats.by_name.items()}
      {'enc': ['clipped', 'norm', 'norm_after', 'scale', 'threshold']}
    """

    by_name: dict[str, dict[str, Any]]


def make_stats(name: str, metrics: dict[str, Any], level: str = "basic") -> ClipStats:
    """The record of ``metrics`` under ``name``; empty at level ``"none"``. ``PerLeaf`` values stay vectors."""
    if level == "none":
        return ClipStats({})
    # jnp.array copies: a metric that is also a rule-state leaf must not share its buffer, or a jitted step that
    # donates the state fails with "donate the same buffer twice".
    return ClipStats({name: {key: _copied(value) for key, value in metrics.items()}})


def _copied(value: Any) -> Any:
    if isinstance(value, PerLeaf):
        return PerLeaf(jnp.array(value.values, jnp.float32), value.names)
    return jnp.array(value, jnp.float32)


def absent(x: Any) -> bool:
    """A tree slot without an array: a frozen (``None``) or masked-out (``optax.MaskedNode``) parameter."""
    return x is None or isinstance(x, optax.MaskedNode)


def slot_names(tree: Any) -> tuple[str | None, ...]:
    """The path of every slot of ``tree`` (a leaf, ``None`` or ``optax.MaskedNode``), ``/``-joined, ``None`` for a
    slot with no array: ``{"encoder": {"layers_0": {"kernel": ...}}}`` gives ``"encoder/layers_0/kernel"``. The names
    of a per-leaf statistic."""
    paths = jax.tree_util.tree_flatten_with_path(tree, is_leaf=absent)[0]
    return tuple(
        None if absent(x) else jax.tree_util.keystr(path, simple=True, separator="/") or "<root>" for path, x in paths
    )


def recorded_names(record: ClipStats, name: str, level: str) -> tuple[str | None, ...]:
    """The leaf names a ``"full"`` record was made with at ``init`` (static: they are part of the tree)."""
    if level != "full":
        return ()
    return next(v.names for v in record.by_name[name].values() if isinstance(v, PerLeaf))


def _plain(value: Any) -> Any:
    # flax.nnx.Optimizer wraps every state array in a Variable; read its value without importing flax.
    return value.get_value() if hasattr(value, "get_value") else value


def _records(state: Any) -> list[ClipStats]:
    state = getattr(state, "opt_state", state)
    nodes = jax.tree.leaves(state, is_leaf=lambda node: isinstance(node, ClipStats))
    return [node for node in nodes if isinstance(node, ClipStats)]


def stats(state: Any) -> dict[str, Array]:
    """Every optclip statistic found anywhere in an optimizer state, flat and ready for a logger.

    Looks through any nesting of containers: ``optax.chain``, ``named_chain``, ``inject_hyperparams``,
    ``MultiSteps``, ``masked``, ``partition``, and the state of a ``flax.nnx.Optimizer`` (pass the optimizer or its
    ``opt_state``). Keys are ``"<name>/<metric>"``, and ``"<name>/<metric>/<parameter path>"`` for per-leaf values
    (``stats="full"``); the name defaults to the transform's own and is set by its ``name=`` argument. The norm clips
    report:

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

    So in the leaf and unit scopes the summaries come from different leaves: ``norm > threshold`` there does not
    mean that the leaf with that norm was clipped; ``clipped`` says how many were, and ``stats="full"`` gives each
    leaf's own values. Before the first update every value is that of an all-zero step.

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
    flat: dict[str, Array] = {}
    for record in _records(state):
        for name, metrics in record.by_name.items():
            if any(key == name or key.startswith(f"{name}/") for key in flat):
                raise ValueError(
                    f"two optclip transforms in this state are both named {name!r}; pass name= to one of them"
                )
            for metric, value in metrics.items():
                if isinstance(value, PerLeaf):
                    values = _plain(value.values)
                    named = [(i, leaf) for i, leaf in enumerate(value.names) if leaf is not None]  # None: no parameter
                    flat.update({f"{name}/{metric}/{leaf}": values[i] for i, leaf in named})
                else:
                    flat[f"{name}/{metric}"] = _plain(value)
    return flat
