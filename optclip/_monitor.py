"""Watching training: ``monitor()`` records the norms of whatever flows through it, per leaf or per group and named
by parameter path; ``suggest_threshold()`` turns a run's norms into a fixed clip threshold.

The monitor measures with ``_norms.leaf_norms_of``, the call every norm clip makes: under a guard that measured the
same gradients it takes the guard's measurement, and beside a clip that measures the same arrays (``optax.chain(
monitor(), clip_by_global_norm(c), ...)``: the monitor hands the gradients on unchanged, as the same arrays) the two
measurements are the same operations on the same inputs, which XLA's common-subexpression elimination merges into
one (``tests/test_monitor.py`` counts the reductions in the optimized HLO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip import _norms
from optclip._clipping import Slots, check_float_leaves, spread
from optclip._norms import NormParts
from optclip._stats import Breakdown, ClipStats, PerLeaf, check_level, make_stats, slot_names
from optclip._validation import check_name

Array = jax.Array
Group = int | Callable[[str], str | None] | None


class MonitorState(NamedTuple):
    """State of ``monitor``: how many updates it has seen, and the statistics it kept."""

    count: Array  # type: ignore[assignment]  # a field named like tuple.count, as optax's own states have
    stats: ClipStats


class _Layout(NamedTuple):
    """Where each measured value goes: the names of the recorded values (leaf paths, or group names) and, with
    groups, an index matrix into the vector of present leaves' norms (one row per group, padded with the index of an
    appended zero norm)."""

    names: tuple[str | None, ...]
    rows: np.ndarray | None


def _group_name(path: str, group: Group) -> str | None:
    if isinstance(group, int):
        return "/".join(path.split("/")[:group])
    assert callable(group)
    name = group(path)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"group must return a non-empty string or None, got {name!r} for {path!r}")
    return name


def _layout(names: Sequence[str | None], group: Group) -> _Layout:
    """Per leaf: the slot names as they are. Per group: the groups in order of first appearance among the present
    slots, and for each the positions of its leaves among the present ones."""
    if group is None:
        return _Layout(tuple(names), None)
    present = [n for n in names if n is not None]
    members: dict[str, list[int]] = {}
    for position, path in enumerate(present):
        found = _group_name(path, group)
        if found is not None:
            members.setdefault(found, []).append(position)
    width = max((len(m) for m in members.values()), default=0)
    rows = np.full((len(members), width), len(present), np.int32)
    for row, positions in enumerate(members.values()):
        rows[row, : len(positions)] = positions
    return _Layout(tuple(members), rows)


def _place(parts: NormParts, layout: _Layout, slots: Slots) -> Array:
    """The recorded vector: each slot's norm (NaN for a slot without an array), or each group's norm, the norm of
    its leaves' norms (``_norms.combine``, overflow-safe)."""
    if layout.rows is None:
        return spread(parts.value(), len(slots.values), slots.present)
    if layout.rows.size == 0:
        return jnp.zeros((len(layout.names),), jnp.float32)
    zero = NormParts(jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32))
    padded = NormParts(
        jnp.concatenate([parts.mantissa, zero.mantissa]), jnp.concatenate([parts.exponent, zero.exponent])
    )
    return _norms.combine(padded.take(layout.rows), 2, axis=1).value()


def _ratio(top: Array, bottom: Array) -> Array:
    """``top / bottom``; 0 where both are 0, ``inf`` where only ``bottom`` is (no division by 0)."""
    positive = bottom > 0
    return jnp.where(positive, top / jnp.where(positive, bottom, 1.0), jnp.where(top > 0, jnp.inf, 0.0))


def _check_group(group: Any) -> None:
    if group is None or callable(group):
        return
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group must be None, an integer >= 1 (a path prefix depth) or a function, got {group!r}")


def monitor(
    *,
    group: Group = None,
    param_norms: bool = False,
    every: int = 1,
    stats: str = "full",
    name: str = "monitor",
) -> optax.GradientTransformationExtraArgs:
    r"""Record the norms of what flows through, per leaf or per group, without changing it.

    For the arrays :math:`u_\ell` that reach it (gradients before a clip, updates after an optimizer) it records the
    global norm and each leaf's or each group's norm,

    .. math:: \|u\|_2 = \Big(\sum_\ell \|u_\ell\|_2^2\Big)^{1/2}, \qquad
              \|u_G\|_2 = \Big(\sum_{\ell \in G} \|u_\ell\|_2^2\Big)^{1/2},

    and with ``param_norms=True`` the parameters' norms :math:`\|w\|_2, \|w_\ell\|_2` and the ratio
    :math:`\|u\|_2 / \|w\|_2` (per leaf or group too). After the optimizer that ratio is the relative size of a step,
    the per-layer quantity LARS adapts the learning rate by (You et al. 2017, "Large Batch Training of Convolutional
    Networks", arXiv:1708.03888); before a clip, per-layer gradient norms show which layer's gradient explodes
    (Pascanu et al. 2013, arXiv:1211.5063). The updates pass through unchanged: the same arrays.

    The norms are those of ``optclip.global_norm``: float32 for bf16/f16 inputs, finite for finite inputs of any
    size, exact on sharded arrays. They are the measurement a norm clip makes: under ``optclip.skip_nonfinite`` or
    ``optclip.skip_on_spike`` the monitor takes the guard's measurement of the same gradients, and beside a clip on
    the same gradients XLA merges the two measurements into one, so monitoring costs a few scalar operations per leaf
    and a vector of one float per leaf in the state.

    ``optclip.stats`` reports ``<name>/norm`` and (``stats="full"``) ``<name>/norm/<path>`` per leaf, e.g.
    ``monitor/norm/encoder/layers_0/attn/kernel``, or ``<name>/norm/<group>`` per group; likewise
    ``param_norm`` and ``ratio``. The paths are static metadata of the state's tree (like dict keys), so the state
    holds arrays only: it jits, checkpoints (orbax) and sits in a ``flax.nnx.Optimizer`` unchanged. A leaf without
    an array (``None``, or masked out by ``optax.masked``) has no entry.

    The step counter: the monitor counts the updates it sees. Inside ``optax.MultiSteps`` that is one per
    accumulated update (every k-th micro-step, measuring the accumulated gradient); outside it, every micro-step.
    ``every=k`` keeps the values of updates 0, k, 2k, ... of that count; in between the state keeps the last kept
    values. The norms are still measured every step (they are shared with the clip's, and skipping them would take a
    conditional, which on GPU waits for its predicate on the host): ``every`` decides what is kept, for a logger
    that reads the state at its own pace.

    Args:
      group: ``None`` (default): one value per leaf. An integer ``d``: one per path prefix of ``d`` components
        (``2``: ``encoder/layers_0``). A function ``path -> group name`` (``None``: leave the leaf out of the
        groups): ``lambda path: path.split("/")[1]``. Groups appear in the order of their first leaf; a group's
        norm is the norm of all its leaves together. The global ``norm`` always covers every leaf.
      param_norms: also record the parameters' norms and the ratio of the norms (needs ``params`` in ``update``).
      every: keep the values of every ``every``-th update (``>= 1``).
      stats: ``"full"`` (default): the global values and one value per leaf or group; ``"basic"``: the global
        values only; ``"none"``: nothing (a pass-through).
      name: the prefix of this monitor's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that returns its input unchanged.

    Raises:
      ValueError: for a ``group`` that is not ``None``, a positive integer or a function (at construction; a
        function that returns something other than a non-empty string or ``None``: at ``init``), ``every < 1``,
        an unknown ``stats`` level or a bad ``name``.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optax.chain(optclip.monitor(group=1), optclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"encoder": {"w": jnp.zeros(2), "b": jnp.zeros(1)}, "head": {"w": jnp.zeros(1)}}
      >>> grads = {"encoder": {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}, "head": {"w": jnp.array([12.0])}}
      >>> _, state = tx.update(grads, tx.init(params), params)
      >>> {k: float(v) for k, v in optclip.stats(state).items() if k.startswith("monitor")}
      {'monitor/norm': 13.0, 'monitor/norm/encoder': 5.0, 'monitor/norm/head': 12.0}
    """
    _check_group(group)
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    check_level(stats)
    check_name(name)

    def record(layout: _Layout, norm: Array, per: Array, param: tuple[Array, Array] | None) -> ClipStats:
        values: dict[str, Any] = {"norm": (norm, per)}
        if param is not None:
            param_total, param_per = param
            values["param_norm"] = (param_total, param_per)
            values["ratio"] = (_ratio(norm, param_total), _ratio(per, param_per))
        if stats == "full":
            metrics = {k: Breakdown(total, PerLeaf(each, layout.names)) for k, (total, each) in values.items()}
        else:
            metrics = {k: total for k, (total, _) in values.items()}
        return make_stats(name, metrics, stats)

    def init_fn(params: Any) -> MonitorState:
        names = slot_names(params)
        layout = _layout(names, group)
        if layout.rows is None:
            empty = jnp.where(jnp.asarray([n is None for n in names], bool), jnp.nan, 0.0)
        else:
            empty = jnp.zeros((len(layout.names),), jnp.float32)
        zeros = (jnp.float32(0), empty)
        return MonitorState(jnp.zeros((), jnp.int32), record(layout, *zeros, zeros if param_norms else None))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        count = jnp.asarray(optax.safe_int32_increment(state.count))
        if stats == "none":
            return updates, MonitorState(count, state.stats)
        if param_norms and params is None:
            raise ValueError(f"{name}: monitor(param_norms=True) needs params; call tx.update(grads, state, params)")
        check_float_leaves(updates, name)
        slots = Slots.of(updates)
        layout = _layout(slot_names(updates), group)
        leaves = [slots.values[i] for i in slots.present]
        # The call and the ops of every norm clip (clip_by_global_norm's measure), so that XLA can merge them.
        per_leaf = _norms.leaf_norms_of(leaves, 2.0, extra_args).flat()
        norm = _norms.combine(per_leaf, 2.0).value()
        param = None
        if param_norms:
            param_slots = slots.treedef.flatten_up_to(params)
            param_parts = _norms.LeafNorms([param_slots[i] for i in slots.present], 2.0).flat()
            param = (_norms.combine(param_parts, 2.0).value(), _place(param_parts, layout, slots))
        new = record(layout, norm, _place(per_leaf, layout, slots), param)
        # jax annotates tree.structure as returning tree_util.PyTreeDef, a name mypy cannot resolve, so == on it fails.
        same_structure = jax.tree.structure(new) == jax.tree.structure(state.stats)  # type: ignore[operator]
        if not same_structure:
            raise ValueError(
                f"{name}: the updates' leaves or groups {layout.names} differ from those of the parameters given to "
                "init; init and update trees must have the same structure and paths"
            )
        if every > 1:
            keep = state.count % every == 0
            new = jax.tree.map(lambda fresh, old: jnp.where(keep, fresh, old), new, state.stats)
        return updates, MonitorState(count, new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def suggest_threshold(norms: Any, clip_rate: float = 0.1, *, last: int | None = None) -> float:
    r"""A fixed clip threshold that the given fraction of a run's norms exceed: the AutoClip percentile rule.

    With :math:`x_{(0)} \le \dots \le x_{(n-1)}` the finite norms sorted and :math:`q = 1 - r` for the clip rate
    :math:`r`, the threshold is the :math:`q`-quantile, linearly interpolated (NumPy's default ``"linear"``):

    .. math:: h = (n - 1)\,q, \qquad c = x_{(\lfloor h \rfloor)} + (h - \lfloor h \rfloor)\,
              \big(x_{(\lfloor h \rfloor + 1)} - x_{(\lfloor h \rfloor)}\big)

    so that a fraction :math:`r` of the recorded steps had a norm above :math:`c`. AutoClip (Seetharaman et al.
    2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks", arXiv:2007.14469) clips each step
    at the :math:`p`-th percentile of the norms seen so far, :math:`p = 10` in the paper: ``clip_rate=0.9`` is its
    rule applied once to a finished run, and ``optclip.autoclip`` is the adaptive version. A fixed threshold from
    one run is a prediction for the next: clipping changes the trajectory and so the norms, and the rate in a rerun
    comes out near :math:`r`, not exactly at it (measure it: ``python -m optclip.report`` on the rerun's log).

    Args:
      norms: the recorded norms, any array-like of numbers (NaN and Inf, steps that cannot be clipped, are left
        out).
      clip_rate: the target fraction :math:`r` of steps to clip, in ``[0, 1]``.
      last: use only the last ``last`` norms (a run whose norms drift: the end of the run speaks for what follows);
        ``None``: all of them.

    Returns:
      The threshold, a Python float (computed in float64).

    Raises:
      ValueError: for ``clip_rate`` outside ``[0, 1]``, ``last < 1``, or no finite norm.

    Example:
      >>> import optclip
      >>> norms = [float(n) for n in range(1, 101)]
      >>> threshold = optclip.suggest_threshold(norms, clip_rate=0.1)
      >>> round(threshold, 6), sum(n > threshold for n in norms)  # 10 of the 100 steps above it
      (90.1, 10)
    """
    numeric = isinstance(clip_rate, (int, float, np.floating, np.integer)) and not isinstance(clip_rate, bool)
    if not (numeric and 0.0 <= float(clip_rate) <= 1.0):
        raise ValueError(f"clip_rate must be a number in [0, 1], got {clip_rate!r}")
    if last is not None and (isinstance(last, bool) or not isinstance(last, (int, np.integer)) or last < 1):
        raise ValueError(f"last must be an integer >= 1 or None, got {last!r}")
    values = np.asarray(norms, dtype=np.float64).ravel()
    if last is not None:
        values = values[-last:]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError(f"norms holds no finite value ({np.size(norms)} values)")
    return float(np.quantile(values, 1.0 - float(clip_rate)))
