"""Statistics: each transform keeps its last ones in its state; ``stats`` collects them for a logger.

Levels (every transform's ``stats=`` argument): ``"none"`` records nothing; ``"basic"`` (the default) records what
people log, scalars computed from the norms the transform needs anyway; ``"full"`` adds one value per leaf (or what
costs an extra pass, such as ``clip_by_value``'s post-clip norm), each reported under the parameter's path.

Where the names live: a per-leaf statistic is a ``PerLeaf`` node, a float32 vector in the state whose leaf names
are static metadata of the tree (like a dict key), fixed at ``init`` from the parameters' paths. So the state holds
arrays only (jit, orbax and ``flax.nnx.Optimizer`` see a vector), and ``optclip.stats`` can still say
``clip_by_leaf_norm/norm/encoder/layers_0/kernel``.

Two more nodes keep names the same way. ``Breakdown`` is a total with its per-leaf (or per-group) parts, reported as
``<name>/<metric>`` and ``<name>/<metric>/<path>`` (``optclip.monitor``'s ``norm``). ``Culprit`` is an int32 index
into leaf names held as static metadata: the leaf a guard or a clip blames, which ``host_stats`` turns into the
parameter's path. A plain metric named ``culprit`` in a record that also holds a ``PerLeaf`` is read the same way,
with that ``PerLeaf``'s names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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

    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], tuple[str | None, ...]]:
        return [(jax.tree_util.GetAttrKey("values"), self.values)], self.names

    def tree_flatten(self) -> tuple[list[Any], tuple[str | None, ...]]:
        return [self.values], self.names

    @classmethod
    def tree_unflatten(cls, names: tuple[str | None, ...], children: Sequence[Any]) -> PerLeaf:
        return cls(children[0], names)

    def __repr__(self) -> str:
        return f"PerLeaf({self.values!r}, names={self.names!r})"


@jax.tree_util.register_pytree_with_keys_class
class Breakdown:
    """A total and its parts: ``total`` (a float32 scalar) and ``parts`` (a ``PerLeaf``, one value per leaf or per
    group). ``stats`` reports the total as ``<name>/<metric>`` and each part as ``<name>/<metric>/<part name>``."""

    def __init__(self, total: Any, parts: PerLeaf):
        self.total = total
        self.parts = parts

    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], None]:
        return [(jax.tree_util.GetAttrKey("total"), self.total), (jax.tree_util.GetAttrKey("parts"), self.parts)], None

    def tree_flatten(self) -> tuple[list[Any], None]:
        return [self.total, self.parts], None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Sequence[Any]) -> Breakdown:
        return cls(children[0], children[1])

    def __repr__(self) -> str:
        return f"Breakdown({self.total!r}, {self.parts!r})"


@jax.tree_util.register_pytree_with_keys_class
class Culprit:
    """The leaf a statistic blames: ``index`` (an int32 scalar; -1, or any index without a name, blames none) into
    ``names`` (static, part of the tree structure, like ``PerLeaf``'s). ``int()`` and ``float()`` give the index, so
    a logger that takes numbers takes it; ``path`` (on the host) gives the name.

    Example:
      >>> import numpy as np, optclip
      >>> culprit = optclip.Culprit(np.int32(1), ("encoder/kernel", "decoder/kernel"))
      >>> int(culprit), culprit.path
      (1, 'decoder/kernel')
    """

    def __init__(self, index: Any, names: Sequence[str | None]):
        self.index = index
        self.names = tuple(names)

    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], tuple[str | None, ...]]:
        return [(jax.tree_util.GetAttrKey("index"), self.index)], self.names

    def tree_flatten(self) -> tuple[list[Any], tuple[str | None, ...]]:
        return [self.index], self.names

    @classmethod
    def tree_unflatten(cls, names: tuple[str | None, ...], children: Sequence[Any]) -> Culprit:
        return cls(children[0], names)

    @property
    def path(self) -> str | None:
        """The blamed leaf's path, or ``None`` (no culprit, or a slot without a parameter). Needs a concrete index:
        call it on the host (``host_stats`` does)."""
        index = float(np.asarray(self.index))
        if not (np.isfinite(index) and 0 <= index < len(self.names)):
            return None
        return self.names[int(index)]

    def __int__(self) -> int:
        return int(np.asarray(self.index))

    def __float__(self) -> float:
        return float(np.asarray(self.index))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.index, dtype=dtype)

    def __repr__(self) -> str:
        return f"Culprit({self.index!r}, names={self.names!r})"


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
    if isinstance(value, Breakdown):
        return Breakdown(jnp.array(value.total, jnp.float32), _copied(value.parts))
    if isinstance(value, Culprit):
        return Culprit(jnp.array(value.index, jnp.int32), value.names)
    return jnp.array(value, jnp.float32)


def absent(x: Any) -> bool:
    """A tree slot without an array: a frozen (``None``) or masked-out (``optax.MaskedNode``) parameter."""
    return x is None or isinstance(x, optax.MaskedNode)


def slot_names(tree: Any) -> tuple[str | None, ...]:
    """The path of every slot of ``tree`` (a leaf, ``None`` or ``optax.MaskedNode``), ``/``-joined, ``None`` for a
    slot with no array: ``{"encoder": {"layers_0": {"kernel": ...}}}`` gives ``"encoder/layers_0/kernel"``. The names
    of a per-leaf statistic."""
    paths = jax.tree_util.tree_flatten_with_path(tree, is_leaf=absent)[0]
    return tuple(None if absent(x) else _readable(path) for path, x in paths)


def _readable(path: tuple[Any, ...]) -> str:
    # A flax.nnx.Variable flattens to its array under the attribute "value": the parameter's path is the Variable's
    # ("layers/0/kernel", not "layers/0/kernel/value"). A dict key "value" is a DictKey and stays.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


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
    (``stats="full"``, and ``optclip.monitor``'s per-leaf or per-group values); the name defaults to the
    transform's own and is set by its ``name=`` argument. A ``culprit`` (the leaf a guard or clip blames) comes as a
    ``Culprit``: its index as a number, its parameter path from ``optclip.host_stats``. The norm clips report:

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
      ``dict[str, jax.Array]`` of float32 scalars (a culprit: a ``Culprit`` around an int32 scalar), in the order
      the transforms appear in the state. It is a pytree: return it from a jitted step, then log it with
      ``optclip.host_stats``.

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
    return _flatten(_records(state))


def _named_culprit(metrics: Mapping[str, Any], value: Any) -> Any:
    """A plain ``culprit`` metric as a ``Culprit`` named by the record's ``PerLeaf`` (as is, if it has none)."""
    if isinstance(value, Culprit):
        return Culprit(_plain(value.index), value.names)
    parts = [v.parts if isinstance(v, Breakdown) else v for v in metrics.values()]
    names = next((v.names for v in parts if isinstance(v, PerLeaf)), None)
    return _plain(value) if names is None else Culprit(_plain(value), names)


def _flatten(records: Sequence[ClipStats]) -> dict[str, Any]:
    """``{"<name>/<metric>[/<path>]": value}`` of ``records`` (device arrays, or host arrays after a copy)."""
    flat: dict[str, Any] = {}
    for record in records:
        for name, metrics in record.by_name.items():
            if any(key == name or key.startswith(f"{name}/") for key in flat):
                raise ValueError(
                    f"two optclip transforms in this state are both named {name!r}; pass name= to one of them"
                )
            for metric, value in metrics.items():
                if isinstance(value, Breakdown):
                    flat[f"{name}/{metric}"] = _plain(value.total)
                    value = value.parts
                if isinstance(value, PerLeaf):
                    values = _plain(value.values)
                    named = [(i, leaf) for i, leaf in enumerate(value.names) if leaf is not None]  # None: no parameter
                    flat.update({f"{name}/{metric}/{leaf}": values[i] for i, leaf in named})
                elif metric == "culprit" or isinstance(value, Culprit):
                    flat[f"{name}/{metric}"] = _named_culprit(metrics, value)
                else:
                    flat[f"{name}/{metric}"] = _plain(value)
    return flat


def host_stats(state: Any) -> dict[str, float | str | None]:
    """Every optclip statistic as Python numbers, culprits as parameter paths: one device-to-host transfer.

    ``optclip.stats`` keeps device arrays (it runs inside ``jax.jit``); this is its host-side counterpart for a
    logger. The statistics records found in ``state`` (nothing else: not the optimizer's moments) are copied with
    one ``jax.device_get`` of the whole tree, then flattened on the host, where a per-leaf vector becomes one float
    per parameter at no device cost. A ``culprit`` becomes the path of the parameter it blames (``None``: none
    blamed); every other value becomes a ``float`` (``nan`` stays ``nan``).

    For a step that returns the output of ``optclip.stats`` (a dict, culprits kept with their names as ``Culprit``
    nodes), pass that dict: it is copied in one transfer the same way.

    Args:
      state: an optimizer state (any pytree), an object with an ``opt_state`` attribute (``flax.nnx.Optimizer``), or
        a dict returned by ``optclip.stats``.

    Returns:
      ``dict[str, float | str | None]`` with the keys of ``optclip.stats``, in the same order.

    Raises:
      ValueError: if two transforms share a name; give one of them ``name=``.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optax.chain(optclip.monitor(), optclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> _, state = tx.update({"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}, tx.init(params), params)
      >>> logged = optclip.host_stats(state)
      >>> logged["monitor/norm"], logged["monitor/norm/w"], logged["clip_by_global_norm/clipped"]
      (5.0, 3.0, 1.0)
    """
    if isinstance(state, Mapping) and all(isinstance(k, str) for k in state) and not _records(state):
        fetched = jax.device_get(dict(state))  # the output of stats(): already flat
        return {key: _host_value(value) for key, value in fetched.items()}
    records = jax.tree.map(_plain, _records(state), is_leaf=lambda x: hasattr(x, "get_value"))
    fetched = jax.device_get(records)
    return {key: _host_value(value) for key, value in _flatten(fetched).items()}


def _host_value(value: Any) -> float | str | None:
    if isinstance(value, Culprit):
        return value.path
    return float(np.asarray(value))
