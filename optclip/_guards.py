"""Guards: wrappers that skip a bad step instead of taking it.

Clipping bounds a step; it cannot repair a step whose gradient holds a NaN, and a threshold that adapts to the
norms will follow a sudden spike. A guard wraps a whole optimizer (``inner``, usually an ``optax.chain`` of clips
and an optimizer) and decides per step whether ``inner`` runs at all:

* ``skip_nonfinite``: a NaN or Inf in the gradients (or in the ``loss``, when passed) skips the step.
* ``skip_on_spike``: a gradient norm or a loss far above its recent history skips the step.

A skipped step returns all-zero updates and the inner state exactly as it was, bit for bit, so a run with skipped
steps ends where the same run with those batches left out ends. Both guards are
``optax.GradientTransformationExtraArgs``: ``optax.chain`` hands them the ``loss=`` extra argument, and they hand
every extra argument on to ``inner``.

One measurement per step. A guard reads the gradients once, for their per-leaf 2-norms (``_norms.leaf_norms_of``,
which takes the record of an enclosing guard that measured these very arrays), decides from them (a leaf norm is
non-finite exactly when the leaf holds a NaN or Inf entry: finite entries always give a finite norm; the global
norm is the norm of the leaf norms), and hands the record to ``inner`` (``_norms.handing_over``), so that the clips,
adaptive rules and monitors inside reuse it instead of reading the gradients again. ``skip_on_spike(
skip_nonfinite(chain(clip_by_global_norm(...), adam)))`` reads the gradients for norms once per step.

The decision, per platform (``_xla.run_unless``): on CPU and TPU a ``lax.cond`` whose taken branch runs ``inner`` and
whose other branch hands back zeros and the old state. A select over the outputs of an ``inner`` that always runs
costs more there: the consumer of the updates (``optax.apply_updates``) recomputes them from the old state, so XLA
cannot update a donated state in place and copies it every step. On GPU a conditional reads its predicate back to
the host every step (a stream synchronisation that stops the host from running ahead), so there ``inner`` always
runs and its updates and state are selected. ``inner`` is traced once, as a nested jit that each form calls
(``_xla.traced_once``), so neither the forms nor nested guards multiply the tracing of the chain inside them.

The culprit: each guard records the leaf it blames for a skip as ``culprit``, a ``_stats.Culprit``: an int32 index
into the leaves in ``jax.tree_util`` order (``None`` and ``optax.MaskedNode`` slots included; -1: none), with the
parameters' paths (``_stats.slot_names``, taken at ``init``) as static metadata of the state, so that
``optclip.host_stats`` reports the parameter's path. ``policy="raise"`` names the leaf from the same index.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optclip import _norms, _xla
from optclip._clipping import next_count
from optclip._stats import ClipStats, Culprit, PerLeaf, absent, check_level, make_stats, slot_names
from optclip._validation import check_finite, check_name, concrete_float

Array = jax.Array

POLICIES = ("skip", "zero", "raise")
NO_CULPRIT = -1


class SkipState(NamedTuple):
    """State of ``skip_nonfinite``: the wrapped state, int32 counters, and the guard's statistics."""

    inner_state: Any
    count: Array  # type: ignore[assignment]  # updates seen, skipped ones included: the "step" a raised error names
    consecutive: Array  # skipped steps in a row, up to now
    total_skipped: Array
    total_nonfinite: Array  # steps with a non-finite value, whatever the policy did with them
    stats: ClipStats


class Window(NamedTuple):
    """The last ``size`` values entered from one watched series, as a ring buffer, and the spike held back."""

    values: Array  # float32[size]; value number ``i`` (counting those entered) sits at ``i % size``
    count: Array  # type: ignore[assignment]  # int32: values entered so far
    held: Array  # float32: the last spike, entered only if the next value is a spike too
    holding: Array  # bool: ``held`` waits to be entered
    spiked: Array  # bool: the last finite value was a spike


def _empty_window(size: int) -> Window:
    # One buffer per field: a state that shares one cannot be donated to a jitted step.
    return Window(
        jnp.zeros((size,), jnp.float32), _counter(0), jnp.zeros((), jnp.float32), jnp.bool_(False), jnp.bool_(False)
    )


class SpikeState(NamedTuple):
    """State of ``skip_on_spike``: the wrapped state, counters, one window per watched series, each leaf's level."""

    inner_state: Any
    count: Array  # type: ignore[assignment]  # a field named like tuple.count, as optax's own states have
    consecutive: Array
    total_skipped: Array
    norms: Window  # the global gradient norms
    losses: Window  # the losses (empty while no ``loss`` is passed)
    leaf_level: PerLeaf  # per leaf: the root mean square of its recent norms (names: the leaves' paths)
    stats: ClipStats


# --------------------------------------------------------------------------------------------------------------------
# checks


def _check_inner(inner: Any) -> optax.GradientTransformationExtraArgs:
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise ValueError(f"inner must be an optax.GradientTransformation, got {inner!r}")
    # optax exports with_extra_args_support (and documents it as optax.with_extra_args_support) but leaves it out
    # of its __all__, so mypy's strict no-implicit-reexport does not see it.
    return optax.with_extra_args_support(inner)  # type: ignore[attr-defined]


def _check_count(value: Any, arg: str, *, minimum: int, allow_none: bool) -> None:
    """A Python integer: these fix a shape or a Python-side branch, so they cannot be traced arrays."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        hint = " (under optax.inject_hyperparams, name it in static_args)" if isinstance(value, jax.Array) else ""
        raise ValueError(f"{arg} must be {expected}{hint}, got {value!r}")


def _check_positive(value: Any, arg: str, *, allow_zero: bool) -> None:
    check_finite(value, arg)
    number = concrete_float(value)  # None for a traced (injected) value, which cannot be checked
    if number is not None and not (number >= 0 if allow_zero else number > 0):
        raise ValueError(f"{arg} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _counter(value: Any) -> Array:
    return jnp.asarray(value, jnp.int32)


def _loss(extra_args: dict[str, Any]) -> Array | None:
    loss = extra_args.get("loss")
    return None if loss is None else jnp.asarray(loss)


# --------------------------------------------------------------------------------------------------------------------
# the gradients' leaves, measured once


class _Leaves(NamedTuple):
    """The gradients' slots (``None`` and ``optax.MaskedNode`` included: the order of ``slot_names``), and the
    per-leaf norms of those that hold an array, measured here or taken from an enclosing guard."""

    size: int
    present: list[int]
    record: _norms.LeafNorms

    @classmethod
    def of(cls, updates: Any, extra_args: dict[str, Any], names: tuple[str | None, ...] | None, name: str) -> _Leaves:
        slots = jax.tree.leaves(updates, is_leaf=absent)
        if names is not None and len(slots) != len(names):
            raise ValueError(
                f"{name}: the gradients have {len(slots)} leaves (None and MaskedNode included) where the state was "
                f"made for {len(names)}; pass init and update trees of the same structure"
            )
        present = [i for i, x in enumerate(slots) if not absent(x)]
        # The very array objects a clip inside will measure: the record is found again by identity.
        record = _norms.leaf_norms_of([slots[i] for i in present], 2, extra_args)
        return cls(len(slots), present, record)

    def spread(self, values: Array, fill: float) -> Array:
        """A per-present-leaf vector as one entry per slot, ``fill`` at the empty slots."""
        if self.present == list(range(self.size)):
            return values
        return jnp.full((self.size,), fill, values.dtype).at[np.asarray(self.present, np.int32)].set(values)

    def gather(self, per_slot: Array) -> Array:
        """The entries of a per-slot vector at the present leaves."""
        if self.present == list(range(self.size)):
            return per_slot
        return per_slot[np.asarray(self.present, np.int32)]

    def first(self, flags: Array) -> Array:
        """The slot of the first present leaf whose flag is set, or ``NO_CULPRIT``."""
        if not self.present:
            return _counter(NO_CULPRIT)
        slot = jnp.asarray(self.present, jnp.int32)[jnp.argmax(flags)]  # argmax: the first True
        return jnp.where(jnp.any(flags), slot, NO_CULPRIT).astype(jnp.int32)

    def handed_over(self, extra_args: dict[str, Any]) -> dict[str, Any]:
        """``extra_args`` with this measurement for the transforms inside. A copy of the record: it caches what it
        measures on first use, and what the inner trace adds (a per-leaf form) must not outlive that trace."""
        return _norms.handing_over(extra_args, copy.copy(self.record))


# --------------------------------------------------------------------------------------------------------------------
# running or skipping inner


def _run_or_skip(
    skip: Array,
    inner: optax.GradientTransformationExtraArgs,
    updates: optax.Updates,
    inner_state: optax.OptState,
    params: optax.Params | None,
    extra_args: dict[str, Any],
) -> tuple[optax.Updates, optax.OptState]:
    """``inner``'s ``(updates, state)`` unless ``skip``; a skipped step gives zero updates and ``inner_state``, bit
    for bit (cast to the dtypes ``inner`` would give, so that both forms have one type)."""

    def run() -> tuple[optax.Updates, optax.OptState]:
        return inner.update(updates, inner_state, params, **extra_args)

    # shapes: run's output as trees of jax.ShapeDtypeStruct, which no optax alias describes.
    def held(shapes: tuple[Any, Any]) -> tuple[optax.Updates, optax.OptState]:
        update_shapes, state_shapes = shapes
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), update_shapes)
        return zeros, jax.tree.map(lambda x, s: jnp.asarray(x, s.dtype), inner_state, state_shapes)

    if not isinstance(skip, jax.core.Tracer):  # eager, or a policy that never skips: nothing to compile
        return held(jax.eval_shape(run)) if bool(skip) else run()
    # One trace of inner for its shapes and every form that runs it.
    traced_run = _xla.traced_once(run, ())
    shapes = jax.eval_shape(traced_run)
    return _xla.run_unless(skip, traced_run, lambda: held(shapes))


class _Counters(NamedTuple):
    consecutive: Array
    total_skipped: Array


def _may_skip(consecutive: Array, max_consecutive: int | None) -> Array:
    """False once ``max_consecutive`` steps in a row were skipped: the next one goes through."""
    return jnp.bool_(True) if max_consecutive is None else consecutive < max_consecutive


def _advance(skip: Array, consecutive: Array, total_skipped: Array) -> _Counters:
    skip = jnp.asarray(skip)
    return _Counters(jnp.where(skip, consecutive + 1, 0).astype(jnp.int32), total_skipped + skip.astype(jnp.int32))


# --------------------------------------------------------------------------------------------------------------------
# statistics and the culprit


def _culprit_name(names: tuple[str | None, ...], index: int) -> str | None:
    return names[index] if 0 <= index < len(names) else None


def _recorded_names(record: ClipStats, name: str) -> tuple[str | None, ...] | None:
    """The leaf names the record was made with at ``init`` (static, held by its ``Culprit``); ``None`` at level
    ``"none"``."""
    metrics = record.by_name.get(name)
    return None if metrics is None else metrics["culprit"].names


def _nonfinite_message(
    name: str, step: int, culprit: int, bad_leaves: int, loss_bad: bool, names: tuple[str | None, ...]
) -> str:
    parts = []
    if culprit >= 0:
        count = sum(n is not None for n in names)
        parts.append(f"first non-finite gradient leaf {_culprit_name(names, culprit)} ({bad_leaves} of {count} leaves)")
    if loss_bad:
        parts.append("the loss is non-finite")
    return f"{name}: non-finite values at step {step} (updates seen before this one): " + "; ".join(parts)


def _raise_nonfinite(
    name: str, step: Array, culprit: Array, bad_leaves: Array, loss_bad: Array, names: tuple[str | None, ...]
) -> None:
    """Raise eagerly when the values are concrete; under ``jax.jit`` raise from a host callback on bad steps only."""

    def fail(step_value: Array, culprit_value: Array, bad_value: Array, loss_value: Array) -> None:
        message = _nonfinite_message(name, int(step_value), int(culprit_value), int(bad_value), bool(loss_value), names)
        raise FloatingPointError(message)

    values = (step, culprit, bad_leaves, loss_bad)
    if not any(isinstance(v, jax.core.Tracer) for v in values):
        if int(bad_leaves) > 0 or bool(loss_bad):
            fail(*values)
        return
    jax.lax.cond((bad_leaves > 0) | loss_bad, lambda: jax.debug.callback(fail, *values), lambda: None)


# --------------------------------------------------------------------------------------------------------------------
# skip_nonfinite


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    policy: str = "skip",
    max_consecutive: int | None = None,
    stats: str = "basic",
    name: str = "skip_nonfinite",
) -> optax.GradientTransformationExtraArgs:
    r"""Guard ``inner`` against NaN and Inf: skip the step, zero the bad entries, or raise.

    With :math:`n_{\ell,t} = \|g_{\ell,t}\|_2` the norm of leaf :math:`\ell` (finite exactly when every entry of
    the leaf is: the norm is overflow-safe, ``optclip.global_norm``) and :math:`\mathcal{F}_t` the event that every
    :math:`n_{\ell,t}` (and the loss :math:`\ell_t`, when passed) is finite, policy ``"skip"`` is

    .. math:: (u_t, s_t) = \begin{cases} \mathrm{inner}(g_t, s_{t-1}) & \mathcal{F}_t \\
              (0, s_{t-1}) & \text{otherwise} \end{cases}

    the dynamic loss-scaling rule of mixed-precision training (Micikevicius et al. 2018, "Mixed Precision
    Training", arXiv:1710.03740), ``torch.amp.GradScaler``'s skipped step and ``optax.apply_if_finite``. The inner
    state comes back bit for bit, so a run that skips a step ends exactly where the run without that batch ends.

    The per-leaf norms are handed to ``inner`` (see the module docstring): a norm clip inside reuses them instead
    of reading the gradients again.

    Policies:

    ``"skip"``
      zero updates, inner state unchanged. With ``max_consecutive = m``, after :math:`m` skips in a row the next
      step goes through whatever it holds (so a run that only produces NaN fails visibly instead of stalling) and
      the count starts again.
    ``"zero"``
      non-finite gradient entries become 0 and ``inner`` runs on the rest (a non-finite loss alone changes
      nothing; it is still counted). The zeroed gradients are new arrays, so a clip inside measures them itself.
    ``"raise"``
      the step fails with a ``FloatingPointError`` naming the step (the number of updates before it) and the
      culprit leaf's path (and the loss, if it is non-finite). Eagerly it is raised directly; under ``jax.jit`` a
      ``jax.debug.callback`` raises it on the host and JAX re-raises it as a ``JaxRuntimeError`` carrying that
      message. Cost: a ``lax.cond`` on one boolean per step, with a host call on bad steps only; on GPU XLA reads
      that predicate back to the host every step (a stream synchronisation). ``jax.experimental.checkify`` is the
      alternative when the whole step can be wrapped in ``checkify.checkify``; use ``"skip"`` where throughput
      matters.

    The culprit is the first leaf (in ``jax.tree_util`` order) with a NaN or Inf entry: the same index names the
    leaf in ``"raise"``'s message and in the statistics.

    Args:
      inner: the transformation to guard (an ``optax.chain``, an optimizer, one with extra arguments); it receives
        every extra argument passed to this one.
      policy: ``"skip"``, ``"zero"`` or ``"raise"``.
      max_consecutive: with ``"skip"``, how many steps in a row may be skipped before one is let through;
        ``None`` (default) skips for ever.
      stats: ``"basic"`` (default): ``nonfinite`` (1 if this step held a NaN or Inf), ``skipped`` (1 if it was
        skipped), ``consecutive`` (skips in a row so far), ``total_skipped``, ``total_nonfinite`` and ``culprit``
        (a ``Culprit``: the int32 index of the first non-finite leaf, -1 if none; ``optclip.host_stats`` gives
        its path), all from the norms the check needs anyway. ``"full"`` adds ``leaf_norm``, each leaf's 2-norm
        under its path (what ``"basic"`` already computes, as one value per leaf). ``"none"``: nothing.
      name: the prefix of this guard's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass ``loss=`` to ``update`` to check the loss too.

    Raises:
      ValueError: for an unknown policy or stats level, ``max_consecutive`` not a positive integer (or given with a
        policy other than ``"skip"``), or an ``inner`` that is not a transformation.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optclip.skip_nonfinite(optax.adam(0.1))
      >>> params = {"b": jnp.zeros(2), "w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"b": jnp.ones(2), "w": jnp.array([1.0, jnp.nan])}, state, params)
      >>> stats = optclip.stats(state)
      >>> print(updates["w"], int(stats["skip_nonfinite/total_skipped"]), int(stats["skip_nonfinite/culprit"]))
      [0. 0.] 1 1
      >>> updates, state = tx.update({"b": jnp.ones(2), "w": jnp.ones(2)}, state, params, loss=jnp.inf)
      >>> print(updates["w"], int(optclip.stats(state)["skip_nonfinite/consecutive"]))
      [0. 0.] 2
    """
    inner = _check_inner(inner)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _check_count(max_consecutive, "max_consecutive", minimum=1, allow_none=True)
    if max_consecutive is not None and policy != "skip":
        raise ValueError(f"max_consecutive only applies to policy='skip', got policy={policy!r}")
    check_level(stats)
    check_name(name)

    def metrics(
        nonfinite: ArrayLike,
        skipped: ArrayLike,
        counters: _Counters,
        total_nonfinite: ArrayLike,
        culprit: Culprit,
        leaf_norm: PerLeaf,
    ) -> ClipStats:
        basic = {
            "nonfinite": nonfinite,
            "skipped": skipped,
            "consecutive": counters.consecutive,
            "total_skipped": counters.total_skipped,
            "total_nonfinite": total_nonfinite,
            "culprit": culprit,
        }
        return make_stats(name, {**basic, **({"leaf_norm": leaf_norm} if stats == "full" else {})}, stats)

    def init_fn(params: optax.Params) -> SkipState:
        names = slot_names(params)
        empty = jnp.where(jnp.asarray([n is None for n in names], bool), jnp.nan, 0.0).astype(jnp.float32)
        # One buffer per counter: a state that shares one cannot be donated to a jitted step.
        count, consecutive, total_skipped, total_nonfinite = [_counter(0) for _ in range(4)]
        zeros = _Counters(_counter(0), _counter(0))
        record = metrics(0, 0, zeros, 0, Culprit(NO_CULPRIT, names), PerLeaf(empty, names))
        return SkipState(inner.init(params), count, consecutive, total_skipped, total_nonfinite, record)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, optax.OptState]:
        # optax types every state as OptState; this update only ever receives the SkipState its init made.
        state = cast(SkipState, state)
        names = _recorded_names(state.stats, name)
        leaves = _Leaves.of(updates, extra_args, names, name)
        per_leaf = leaves.record.flat()
        leaf_bad = ~jnp.isfinite(per_leaf.mantissa)  # a NaN or Inf entry, and nothing else, makes a norm non-finite
        loss = _loss(extra_args)
        loss_bad = jnp.bool_(False) if loss is None else ~jnp.all(jnp.isfinite(loss))
        nonfinite = jnp.any(leaf_bad) | loss_bad
        culprit = leaves.first(leaf_bad)
        if policy == "raise":
            _raise_nonfinite(name, state.count, culprit, jnp.sum(leaf_bad), loss_bad, slot_names(updates))
        inner_args = leaves.handed_over(extra_args)
        if policy == "zero":
            updates = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)), updates)
        skip = (nonfinite & _may_skip(state.consecutive, max_consecutive)) if policy == "skip" else jnp.bool_(False)
        new_updates, inner_state = _run_or_skip(skip, inner, updates, state.inner_state, params, inner_args)
        counters = _advance(skip, state.consecutive, state.total_skipped)
        total_nonfinite = state.total_nonfinite + nonfinite.astype(jnp.int32)
        names = () if names is None else names
        leaf_norm = PerLeaf(leaves.spread(per_leaf.value(), jnp.nan), names)
        record = metrics(nonfinite, skip, counters, total_nonfinite, Culprit(culprit, names), leaf_norm)
        count = next_count(state.count)
        new_state = SkipState(inner_state, count, *counters, total_nonfinite, record)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------------------------
# skip_on_spike


class _Judged(NamedTuple):
    """One watched value against its window."""

    mean: Array
    std: Array  # the window's sample standard deviation (ddof 1), before the floor
    threshold: Array  # mean + k * max(std, std_floor * |mean|)
    armed: Array
    spike: Array  # armed and above the threshold (False for a value that is not finite)


def _unwatched() -> _Judged:
    """What a series that is not watched (no loss passed) reports: zeros, never armed."""
    mean, std, threshold, armed = (jnp.zeros((), jnp.float32) for _ in range(4))
    return _Judged(mean, std, threshold, armed, jnp.bool_(False))


def _window_moments(window: Window) -> tuple[Array, Array]:
    """Mean and sample standard deviation (ddof 1, as ``torch.std``) of the values in ``window``."""
    size = window.values.shape[0]
    filled = jnp.minimum(window.count, size)
    used = jnp.arange(size) < filled
    mean = jnp.sum(jnp.where(used, window.values, 0.0)) / jnp.maximum(filled, 1).astype(jnp.float32)
    squares = jnp.sum(jnp.where(used, jnp.square(window.values - mean), 0.0))
    return mean, jnp.sqrt(squares / jnp.maximum(filled - 1, 1).astype(jnp.float32))


def _judge(window: Window, value: Array, k: Array, std_floor: Array, warmup: int) -> _Judged:
    mean, std = _window_moments(window)
    sigma = jnp.maximum(std, std_floor * jnp.abs(mean))
    armed = window.count >= warmup
    return _Judged(mean, std, mean + k * sigma, armed, armed & (value - mean > k * sigma))


def _appended(values: Array, count: Array, value: Array, enter: Array) -> tuple[Array, Array]:
    """The ring buffer with ``value`` appended where ``enter`` (the oldest value drops out of a full one)."""
    at = count % values.shape[0]
    values = jnp.where(enter, values.at[at].set(value), values)
    return values, jnp.where(enter, optax.safe_int32_increment(count), count)


def _entered(window: Window, value: Array, spike: Array) -> Window:
    """``window`` after the finite ``value`` (a non-finite one changes nothing): a value that is not a spike
    enters; a spike after one that was not is held back; a spike after a spike enters, after the one held back.
    So an isolated spike never enters (it cannot raise the bar for the next one), and every value of a run of
    spikes does (a lasting shift becomes the new normal)."""
    finite = jnp.isfinite(value)
    values, count = _appended(window.values, window.count, window.held, finite & spike & window.holding)
    values, count = _appended(values, count, value, finite & (~spike | window.spiked))
    starts = finite & spike & ~window.spiked
    return Window(
        values,
        count,
        jnp.where(starts, value, window.held),
        jnp.where(finite, starts, window.holding),
        jnp.where(finite, spike, window.spiked),
    )


def _largest_rise(norms: Array, levels: Array) -> tuple[Array, Array]:
    """The position of the largest ``norms**2 - levels**2`` and whether it is a rise (> 0, or beyond float32's
    range), computed over the largest value so that the squares cannot overflow."""
    top = jnp.max(jnp.maximum(norms, levels))
    unit = jnp.where(top > 0, top, 1.0)
    a, b = norms / unit, levels / unit
    rise = (a - b) * (a + b)
    at = jnp.argmax(rise)
    return at, ~(rise[at] <= 0)


def _rms_step(level: Array, norm: Array, decay: float) -> Array:
    """``sqrt(decay * level**2 + (1 - decay) * norm**2)``, over the larger of the two so that no square overflows."""
    top = jnp.maximum(level, norm)
    unit = jnp.where(top > 0, top, 1.0)
    return unit * jnp.sqrt(decay * jnp.square(level / unit) + (1 - decay) * jnp.square(norm / unit))


def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    k: float = 6.0,
    window: int = 128,
    warmup: int | None = None,
    std_floor: float = 1e-3,
    max_consecutive: int | None = None,
    stats: str = "basic",
    name: str = "skip_on_spike",
) -> optax.GradientTransformationExtraArgs:
    r"""Skip the whole step when the gradient norm or the loss spikes above its recent history.

    Watched: :math:`x_t = \|g_t\|_2`, the global 2-norm of the gradients (always), and the loss :math:`\ell_t`
    (when ``loss=`` is passed to ``update``), each against its own window :math:`W` of the last ``window`` values
    entered (the current one excluded), with mean :math:`\mu_W`, sample standard deviation :math:`s_W` (ddof 1)
    and the floored :math:`\sigma_W = \max(s_W, \rho\,|\mu_W|)`, :math:`\rho` = ``std_floor``:

    .. math:: \text{spike}(x, W) \iff |W| \ge w_0 \ \text{and}\ x - \mu_W > k\,\sigma_W

    .. math:: \text{skip step } t \iff x_t \notin \mathbb{R} \ \text{or}\ \ell_t \notin \mathbb{R}
              \ \text{or}\ \text{spike}(x_t, W_x) \ \text{or}\ \text{spike}(\ell_t, W_\ell)

    where :math:`|W|` counts the values entered so far. A skipped step returns zero updates and the inner state
    bit for bit. The test is that of OLMo-core's ``SkipStepOptimizer.get_step_factor`` (one-sided ``x - mean <=
    sigma_factor * std`` on the loss and on the gradient norm, both required; ``torch.std``, ddof 1, over the last
    ``rolling_interval_length`` values) and MaxText's ``skip_step_on_spikes``, as a transformation that composes
    with any optimizer. No paper defines it; those two implementations are the reference. Where this one differs,
    and why:

    * Which values enter a window. Theirs: every value, skipped or not, so that a lasting level shift becomes the
      new baseline; but then every spike also stays in the window for ``window`` steps and raises the bar for the
      next one (with ``window = 128``, four spikes of one size in the window let a fifth through). Here a finite
      value enters unless it is a spike that follows a value that was not; such a spike is held back, and enters
      (before the current value) only if the next value is a spike too. So an isolated spike never enters, and
      every value of a run of two or more spikes does. After a lasting level shift up (a norm or loss that settles
      at twice its old level) the window holds only values of the new level after at most ``window`` steps, so
      training resumes by then without ``max_consecutive``; in practice within a few steps, as the first new values
      widen the window's spread. A shift down is never a spike, and its values enter at once.
    * A non-finite value is always skipped and never enters a window (theirs enter it: one NaN loss there makes
      every comparison false, and so skips every step, until it leaves the window). Gradients with a NaN and a
      finite loss are skipped; so is a gradient norm beyond float32's range.
    * The standard deviation has a floor of ``std_floor * |mean|`` (theirs: none). A window of identical values (a
      deterministic full-batch run, a loss that rounds to the same float) has :math:`s_W = 0`, and without the
      floor any larger value, by one rounding step, would be a spike. The default :math:`\rho = 10^{-3}` with
      :math:`k = 6` lets values up to 0.6% above a flat mean through: above float32 rounding (1.2e-7 relative) and
      one bf16 rounding step (3.9e-3 relative), far below the multiples a spike is. Relative, so that it works for
      a loss and a norm of any scale; a window of zeros has no scale, so the first non-zero value after it is a
      spike.
    * Arming: a window takes part once ``warmup`` values entered it, by default
      :math:`w_0 = \max(2, \lfloor \text{window} / 2 \rfloor - 1)`: the first step that can be skipped is number
      63 (counting from 0) for ``window = 128``, as in OLMo-core (``len(self._losses) < max(2, L // 2)`` counts the
      current loss) and MaxText (``(count + 1) < max(2, interval // 2)``). For ``window < 6`` this is 2 values where
      theirs arm with 1, whose standard deviation is NaN there, which skips the step. Theirs count every step;
      here a non-finite value does not count.
    * Without ``loss=`` the gradient norm alone is watched (MaxText then skips nothing; OLMo-core needs the loss).
      The norm is measured here, once, before ``inner`` (so before any clip inside it), and handed to ``inner``
      (see the module docstring); theirs take it from the caller, which computes it apart from the clip.

    The culprit of a step whose gradient norm spiked is the leaf whose squared norm rose most above its running
    level: :math:`\arg\max_\ell (n_{\ell,t}^2 - L_{\ell,t-1}^2)` with :math:`n_{\ell,t}` the leaf's norm and
    :math:`L_\ell` the root mean square of its recent norms, :math:`L_{\ell,t}^2 = \beta L_{\ell,t-1}^2 + (1 -
    \beta) n_{\ell,t}^2`, :math:`\beta = 1 - 2 / (\text{window} + 1)` (the centre of mass of a ``window``-long
    average), started at the first norm and fed by every step whose norm is finite and not a spike. Since
    :math:`\|g_t\|^2 = \sum_\ell n_{\ell,t}^2`, the terms split the rise of the squared global norm above its
    level between the leaves: the culprit contributed most of it. (A ratio :math:`n_\ell / L_\ell` would name a leaf
    too small to matter.) A non-finite norm's culprit is the first leaf whose norm is not finite; a step without a
    norm spike (a loss spike alone, or none) has culprit -1, as has a spike where no leaf rose.

    Args:
      inner: the transformation to guard; it receives every extra argument passed to this one.
      k: how many standard deviations above the mean a value must be to count as a spike (``k > 0``).
      window: how many values each window keeps (``>= 2``).
      warmup: how many values a window must hold before its spikes skip steps (``>= 2``); ``None`` picks
        ``max(2, window // 2 - 1)``.
      std_floor: :math:`\rho \ge 0`, the floor of the standard deviation relative to the window's mean.
      max_consecutive: the most steps skipped in a row before one is let through; ``None`` (default): no limit.
      stats: ``"basic"`` (default): ``skipped``, ``consecutive``, ``total_skipped``; the gradient norm's ``norm``
        (this step's), ``mean``, ``std`` (before the floor), ``threshold`` :math:`\mu_W + k\sigma_W`, ``armed``;
        the loss's ``loss``, ``loss_mean``, ``loss_std``, ``loss_threshold``, ``loss_armed`` (all 0 while no loss is
        passed); ``culprit`` (a ``Culprit``, see above; ``optclip.host_stats`` gives its path). All from the one norm.
        ``"full"`` adds, per leaf under its path, ``leaf_norm`` (this step's) and ``leaf_level`` (the level
        :math:`L_{\ell,t-1}` it was judged against). ``"none"``: nothing.
      name: the prefix of this guard's statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass ``loss=`` to ``update`` to watch the loss too.

    Raises:
      ValueError: for ``k <= 0`` or not finite, ``window < 2``, ``warmup < 2``, ``std_floor < 0`` or not finite,
        ``max_consecutive < 1``, an unknown stats level, or an ``inner`` that is not a transformation; when
        ``update`` is traced, for a ``loss`` that is not a scalar.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optclip.skip_on_spike(optax.sgd(0.1), window=8)
      >>> params = {"b": jnp.zeros(1), "w": jnp.zeros(1)}
      >>> state = tx.init(params)
      >>> for g in [1.0, 1.1, 0.9, 1.0, 1.05, 1e3]:
      ...     updates, state = tx.update({"b": jnp.ones(1), "w": jnp.array([g])}, state, params)
      >>> stats = optclip.stats(state)
      >>> print(updates["w"], int(stats["skip_on_spike/total_skipped"]), int(stats["skip_on_spike/culprit"]))
      [0.] 1 1
    """
    inner = _check_inner(inner)
    _check_positive(k, "k", allow_zero=False)
    _check_count(window, "window", minimum=2, allow_none=False)
    warmup = max(2, window // 2 - 1) if warmup is None else warmup
    _check_count(warmup, "warmup", minimum=2, allow_none=False)
    _check_positive(std_floor, "std_floor", allow_zero=True)
    _check_count(max_consecutive, "max_consecutive", minimum=1, allow_none=True)
    check_level(stats)
    check_name(name)
    k32 = jnp.asarray(k, jnp.float32)
    std_floor32 = jnp.asarray(std_floor, jnp.float32)
    decay = 1.0 - 2.0 / (window + 1)

    def metrics(
        skipped: ArrayLike,
        counters: _Counters,
        norm: ArrayLike,
        norm_judged: _Judged,
        loss: ArrayLike,
        loss_judged: _Judged,
        culprit: Culprit,
        leaf_norm: PerLeaf,
        leaf_level: PerLeaf,
    ) -> ClipStats:
        basic = {
            "skipped": skipped,
            "consecutive": counters.consecutive,
            "total_skipped": counters.total_skipped,
            "norm": norm,
            "mean": norm_judged.mean,
            "std": norm_judged.std,
            "threshold": norm_judged.threshold,
            "armed": norm_judged.armed,
            "loss": loss,
            "loss_mean": loss_judged.mean,
            "loss_std": loss_judged.std,
            "loss_threshold": loss_judged.threshold,
            "loss_armed": loss_judged.armed,
            "culprit": culprit,
        }
        full = {"leaf_norm": leaf_norm, "leaf_level": leaf_level} if stats == "full" else {}
        return make_stats(name, {**basic, **full}, stats)

    def init_fn(params: optax.Params) -> SpikeState:
        names = slot_names(params)
        empty = jnp.where(jnp.asarray([n is None for n in names], bool), jnp.nan, 0.0).astype(jnp.float32)
        nothing = _unwatched()
        leaf = PerLeaf(empty, names)
        zeros = _Counters(_counter(0), _counter(0))
        record = metrics(0, zeros, 0, nothing, 0, nothing, Culprit(NO_CULPRIT, names), leaf, leaf)
        # One buffer per counter: a state that shares one cannot be donated to a jitted step.
        norms, losses = _empty_window(window), _empty_window(window)
        count, consecutive, total_skipped = [_counter(0) for _ in range(3)]
        leaf_level = PerLeaf(empty, names)
        return SpikeState(inner.init(params), count, consecutive, total_skipped, norms, losses, leaf_level, record)

    def update_fn(
        updates: optax.Updates, state: SpikeState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, SpikeState]:
        names = state.leaf_level.names
        loss = _loss(extra_args)
        if loss is not None and loss.ndim != 0:
            raise ValueError(f"{name}: loss must be a scalar, got an array of shape {loss.shape}")
        leaves = _Leaves.of(updates, extra_args, names, name)
        per_leaf = leaves.record.flat().value()  # float32; inf beyond its range
        norm = leaves.record.total().value()
        norm_ok = jnp.isfinite(norm)
        norm_judged = _judge(state.norms, norm, k32, std_floor32, warmup)
        spike = ~norm_ok | norm_judged.spike
        if loss is None:
            loss_value, loss_judged = jnp.zeros((), jnp.float32), _unwatched()
        else:
            loss_value = loss.astype(jnp.float32)
            loss_judged = _judge(state.losses, loss_value, k32, std_floor32, warmup)
            spike = spike | ~jnp.isfinite(loss_value) | loss_judged.spike
        skip = spike & _may_skip(state.consecutive, max_consecutive)
        new_updates, inner_state = _run_or_skip(
            skip, inner, updates, state.inner_state, params, leaves.handed_over(extra_args)
        )
        counters = _advance(skip, state.consecutive, state.total_skipped)

        # Each finite value enters its window, skipped or not, unless it is an isolated spike (see _entered).
        norms = _entered(state.norms, norm, norm_judged.spike)
        losses = state.losses if loss is None else _entered(state.losses, loss_value, loss_judged.spike)

        # Each leaf's level, and the culprit against the levels before this step.
        levels = leaves.gather(state.leaf_level.values)
        if leaves.present:
            at, rose = _largest_rise(per_leaf, levels)
            risen = jnp.where(rose, jnp.asarray(leaves.present, jnp.int32)[at], NO_CULPRIT)
        else:
            risen = _counter(NO_CULPRIT)
        culprit = jnp.where(
            ~norm_ok, leaves.first(~jnp.isfinite(per_leaf)), jnp.where(norm_judged.spike, risen, NO_CULPRIT)
        )
        stepped = jnp.where(state.norms.count == 0, per_leaf, _rms_step(levels, per_leaf, decay))
        steady = norm_ok & ~norm_judged.spike
        new_levels = jnp.where(steady, leaves.spread(stepped, jnp.nan), state.leaf_level.values)
        leaf_level = PerLeaf(new_levels, names)

        record = metrics(
            skip,
            counters,
            norm,
            norm_judged,
            loss_value,
            loss_judged,
            Culprit(culprit, names),
            PerLeaf(leaves.spread(per_leaf, jnp.nan), names),
            PerLeaf(state.leaf_level.values, names),
        )
        count = next_count(state.count)
        new_state = SpikeState(inner_state, count, *counters, norms, losses, leaf_level, record)
        return new_updates, new_state

    # optax's OptState is chex.ArrayTree, which has no room for a registered pytree node such as the PerLeaf that
    # SpikeState holds: a valid optax state that its init and update protocols, typed with OptState, refuse.
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # type: ignore[arg-type]
