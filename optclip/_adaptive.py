"""Adaptive threshold rules (AutoClip, ZClip, AdaGC, quantile) and the shorthands built on them.

Each rule follows the protocol of ``optclip._rules``: a frozen dataclass (not callable, so
``optax.inject_hyperparams`` passes it through untouched) with ``init``, ``update`` and ``stats``, whose state is a
NamedTuple of fixed-shape arrays for one norm. Any norm clip takes one as its threshold; ``clip_by_leaf_norm`` runs it
once per leaf, each leaf with its own statistics.

Shared conventions, so that the rules behave alike:

* A warm-up counts the finite norms the rule has seen, not steps, so a NaN step neither enters the statistics nor
  shortens a warm-up (``optclip.ema`` states what a transform with a global warm-up, ``adagc``, must do to keep
  its own count in step with its rules').
* A non-finite norm leaves the state exactly as it was (each rule guards itself, so calling ``update`` directly is
  safe too) and the threshold is the one the old state gives.
* ``inf`` as a threshold means "no limit": it is what a rule reports while it has nothing to go on (an empty history,
  a warm-up without a cap, an AdaGC tensor that has not had a positive norm).
* Statistics are float32 and every update is written so that constant norms give exactly constant statistics (zero
  variance stays exactly zero), which is what makes "constant norms are never clipped" hold in floating point.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip._clipping import clip_by_global_norm, next_count
from optclip._validation import check_non_negative, concrete_float

Array = jax.Array

_ZSCORE_EPS = 1e-6  # ZClip's eps in z = (g - mu) / (sigma + eps), as in the reference code
_MODES = ("reciprocal", "mean", "fixed")


# --------------------------------------------------------------------------------------------------------------------
# argument checks (concrete values only: an injected hyperparameter is a tracer and cannot be checked)


def _check_interval(value: Any, arg: str, low: float, high: float, *, open_low: bool, open_high: bool) -> None:
    try:
        number = concrete_float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{arg} must be a number, got {value!r}") from err
    if number is None:
        return
    above = number > low if open_low else number >= low
    below = number < high if open_high else number <= high
    if not (above and below):  # also rejects NaN
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{arg} must be in {interval}, got {value!r}")


def _check_count(value: Any, arg: str, minimum: int, *, static: bool = False) -> None:
    """An integer >= minimum; ``static`` ones fix a shape, so they must be Python ints, never injected arrays."""
    if isinstance(value, jax.core.Tracer) and not static:
        return
    kinds = (int, np.integer) if static else (int, np.integer, np.ndarray, jax.Array)
    integral = (
        isinstance(value, kinds)
        and not isinstance(value, bool)
        and np.ndim(value) == 0
        and np.issubdtype(np.asarray(value).dtype, np.integer)
    )
    if not integral or int(value) < minimum:
        hint = " (it fixes the state's shape: under inject_hyperparams pass it in static_args)" if static else ""
        raise ValueError(f"{arg} must be an integer >= {minimum}{hint}, got {value!r}")


def _optional_cap(value: Any) -> Array:
    return jnp.float32(jnp.inf) if value is None else jnp.asarray(value, jnp.float32)


def _keep_if(ok: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _scalar_norm(norm: Array) -> tuple[Array, Array]:
    """The norm as float32 and whether it is finite; a non-finite norm is replaced by 0 so no branch makes NaN."""
    norm = jnp.asarray(norm, jnp.float32)
    finite = jnp.isfinite(norm)
    return jnp.where(finite, norm, 0.0), finite


# --------------------------------------------------------------------------------------------------------------------
# AutoClip


class PercentileState(NamedTuple):
    """The last ``history`` finite norms twice: in arrival order (a ring buffer, the next goes to ``position``) and
    sorted (``inf`` past the ``fill`` valid ones), so that a step moves O(history) numbers instead of sorting them."""

    norms: Array
    ordered: Array
    position: Array
    fill: Array


@functools.lru_cache(maxsize=64)
def _interpolation_table(p: float, history: int) -> tuple[np.ndarray, np.ndarray]:
    """For each count ``n`` in 1..history: numpy.percentile's lower index and weight, computed in float64.

    In float32 the virtual index ``(n - 1) * p / 100`` of a 1000-long history is off by up to 3e-5, which would
    move the threshold visibly between two far-apart sorted norms; a table of 2 x history numbers avoids it.
    """
    virtual = (np.arange(history, dtype=np.float64)) * (p / 100.0)
    lower = np.floor(virtual)
    weight = virtual - lower
    last = np.arange(history, dtype=np.float64)
    at_top = virtual >= last  # numpy takes the largest value there
    lower = np.where(at_top, last, lower)
    weight = np.where(at_top, 0.0, weight)
    return lower.astype(np.int32), weight.astype(np.float32)


def _lerp(low: Array, high: Array, weight: Array) -> Array:
    # numpy's form: interpolating from the nearer end keeps the result exact at weight 0 and 1 and monotone.
    diff = high - low
    return jnp.where(weight >= 0.5, high - diff * (1.0 - weight), low + diff * weight)


@dataclasses.dataclass(frozen=True)
class Percentile:
    """The AutoClip rule; build it with ``optclip.percentile``, which documents it."""

    accepts_norm_vector: ClassVar[bool] = False  # its statistics are those of one norm per step

    p: Any = 10.0
    history: int = 1000

    def __post_init__(self) -> None:
        _check_interval(self.p, "p", 0.0, 100.0, open_low=False, open_high=False)
        _check_count(self.history, "history", 1, static=True)

    def init(self) -> PercentileState:
        # One buffer per field: a state that shares one cannot be donated to a jitted step.
        norms, ordered = (jnp.full((self.history,), jnp.inf, jnp.float32) for _ in range(2))
        return PercentileState(norms, ordered, jnp.int32(0), jnp.int32(0))

    def _rank(self, fill: Array) -> tuple[Array, Array]:
        top = jnp.maximum(fill - 1, 0)
        p = concrete_float(self.p)
        if p is not None:
            lower_table, weight_table = _interpolation_table(p, self.history)
            return jnp.asarray(lower_table)[top], jnp.asarray(weight_table)[top]
        virtual = top.astype(jnp.float32) * (jnp.asarray(self.p, jnp.float32) / 100.0)  # an injected p
        lower = jnp.minimum(jnp.floor(virtual), top.astype(jnp.float32))
        return lower.astype(jnp.int32), virtual - lower

    def update(self, norm: Array, state: PercentileState, count: Array) -> tuple[Array, PercentileState]:
        del count
        norm, finite = _scalar_norm(norm)
        slots = jnp.arange(self.history)
        inf = jnp.full((1,), jnp.inf, jnp.float32)
        # When the window is full, the oldest norm leaves the sorted copy: everything after its first occurrence
        # moves down one slot. Then the new norm goes in after the values <= it, and everything after moves up.
        leaving = state.norms[state.position]
        out_at = jnp.where(state.fill == self.history, jnp.sum(state.ordered < leaving), self.history)
        removed = jnp.where(slots < out_at, state.ordered, jnp.concatenate([state.ordered[1:], inf]))
        in_at = jnp.sum(removed <= norm)
        inserted = jnp.where(slots == in_at, norm, jnp.concatenate([inf, removed[:-1]]))
        ordered = jnp.where(finite, jnp.where(slots < in_at, removed, inserted), state.ordered)
        norms = jnp.where(finite & (slots == state.position), norm, state.norms)
        fill = jnp.minimum(state.fill + finite.astype(jnp.int32), self.history)
        lower, weight = self._rank(fill)
        upper = jnp.minimum(lower + 1, jnp.maximum(fill - 1, 0))
        threshold = jnp.where(fill > 0, _lerp(ordered[lower], ordered[upper], weight), jnp.inf)
        position = jnp.where(finite, (state.position + 1) % self.history, state.position)
        return threshold, PercentileState(norms, ordered, position, fill)

    def stats(self, state: PercentileState) -> dict[str, Array]:
        return {"history_fill": state.fill.astype(jnp.float32)}


def percentile(p: float = 10.0, history: int = 1000) -> Percentile:
    r"""AutoClip: the threshold is the ``p``-th percentile of the norms seen so far, the current one included.

    .. math:: c_t = v_{(k)} + (r - k)\,\big(v_{(k+1)} - v_{(k)}\big), \qquad
              r = \frac{p}{100}(n - 1), \quad k = \lfloor r \rfloor

    where :math:`v_{(0)} \le \dots \le v_{(n-1)}` are the last :math:`n \le h` = ``history`` finite norms sorted,
    :math:`\|g_t\|` included: linear interpolation exactly as ``numpy.percentile``
    (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks",
    arXiv:2007.14469). The first step never clips (its threshold is its own norm); ``p = 10`` is the paper's
    recommendation. This is the reference code (github.com/pseeth/autoclip, ``autoclip.py``: append the global
    norm to the history, ``np.percentile`` of it, ``torch.nn.utils.clip_grad_norm_`` to that) except:

    * the reference keeps every norm of the run in a Python list; this keeps the last ``history`` in a ring buffer
      of fixed shape (it jits and checkpoints), so the thresholds are the same while the run has at most
      ``history`` steps (its TensorFlow version keeps the last 10000);
    * a non-finite norm is not recorded (in the reference it makes every later threshold NaN);
    * the clip is exact, :math:`c_t / \|g_t\|`, where torch scales by :math:`c_t / (\|g_t\| + 10^{-6})`.

    Cost: the state keeps the window twice, in arrival order and sorted, so a step moves ``history`` float32
    values (per leaf under ``clip_by_leaf_norm``) instead of sorting them; nothing grows with the model.
    ``history`` fixes the state's shape, so under ``optax.inject_hyperparams`` pass it in ``static_args``; ``p`` may
    be injected.

    Args:
      p: the percentile, in [0, 100].
      history: how many of the most recent norms to keep, >= 1.

    Returns:
      A threshold rule for a global or leaf clip (it takes scalar norms only); it adds ``history_fill`` (the number
      of norms held) to ``optclip.stats``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_global_norm(optclip.percentile(p=50.0, history=4))
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for g in [1.0, 3.0, 2.0, 10.0]:
      ...     updates, state = tx.update({"w": jnp.array([g])}, state)
      >>> print(float(updates["w"][0]))  # the spike 10 is cut to the median of [1, 3, 2, 10]
      2.5
    """
    return Percentile(p, history)


# --------------------------------------------------------------------------------------------------------------------
# ZClip


class ZScoreState(NamedTuple):
    """Mean and standard deviation of the norms (running during warm-up, EMA after), the last z, the norms seen."""

    mean: Array
    std: Array
    z: Array
    seen: Array


@dataclasses.dataclass(frozen=True)
class ZScore:
    """The ZClip rule; build it with ``optclip.zscore``, which documents it."""

    accepts_norm_vector: ClassVar[bool] = False  # its statistics are those of one norm per step

    z_thresh: Any = 2.5
    decay: Any = 0.97
    warmup: Any = 25
    mode: str = "reciprocal"
    max_norm: Any = 1.0

    def __post_init__(self) -> None:
        _check_interval(self.z_thresh, "z_thresh", 0.0, math.inf, open_low=False, open_high=True)
        _check_interval(self.decay, "decay", 0.0, 1.0, open_low=True, open_high=True)
        _check_count(self.warmup, "warmup", 0)
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.max_norm is not None:
            check_non_negative(self.max_norm, "max_norm")

    def init(self) -> ZScoreState:
        # One buffer per field: a state that shares one cannot be donated to a jitted step.
        return ZScoreState(jnp.float32(0), jnp.float32(0), jnp.float32(0), jnp.int32(0))

    def update(self, norm: Array, state: ZScoreState, count: Array) -> tuple[Array, ZScoreState]:
        del count
        g, finite = _scalar_norm(norm)
        z_thresh = jnp.asarray(self.z_thresh, jnp.float32)
        decay = jnp.asarray(self.decay, jnp.float32)
        cap = _optional_cap(self.max_norm)
        mean, std = state.mean, state.std
        # The reference's warmup=0 still seeds the statistics with the first norm; z against mean 0, std 0 would cut
        # the first gradient to zero.
        warming = state.seen < jnp.maximum(jnp.asarray(self.warmup), 1)

        # Warm-up: Welford's running mean and population std, the latter as a hypot so it cannot overflow.
        k = (state.seen + 1).astype(jnp.float32)
        delta = g - mean
        warm_mean = mean + delta / k
        warm_std = jnp.hypot(jnp.sqrt((k - 1.0) / k) * std, jnp.sqrt(k - 1.0) / k * delta)

        z = (g - mean) / (std + _ZSCORE_EPS)
        if self.mode == "fixed":
            bound = mean + z_thresh * std
            spike = finite & (g > bound)
            adaptive = bound
        else:
            bound = mean + z_thresh * (std + _ZSCORE_EPS)  # z > z_thresh exactly when g > bound
            spike = finite & (z > z_thresh)
            if self.mode == "reciprocal":
                adaptive = mean + z_thresh * z_thresh / jnp.where(spike, z, 1.0) * std
            else:
                adaptive = mean
        # Without a spike nothing is clipped: the threshold is the bound, raised to g where rounding put g above it.
        calm = jnp.where(finite, jnp.maximum(g, bound), bound)
        threshold = jnp.where(warming, cap, jnp.minimum(jnp.where(spike, adaptive, calm), cap))

        # After warm-up: EMA of the norm clipped to the adaptive threshold (not to max_norm), as in the paper. The
        # ``m + (1 - a) (x - m)`` form leaves m exactly unchanged when x == m.
        effective = jnp.where(spike, adaptive, g)
        ema_mean = mean + (1.0 - decay) * (effective - mean)
        ema_std = jnp.hypot(jnp.sqrt(decay) * std, jnp.sqrt(1.0 - decay) * (effective - ema_mean))

        new_state = ZScoreState(
            jnp.where(warming, warm_mean, ema_mean),
            jnp.where(warming, warm_std, ema_std),
            jnp.where(warming, 0.0, z),
            next_count(state.seen),
        )
        return threshold, _keep_if(finite, new_state, state)

    def stats(self, state: ZScoreState) -> dict[str, Array]:
        return {"mean": state.mean, "std": state.std, "z": state.z}


def zscore(
    z_thresh: float = 2.5,
    decay: float = 0.97,
    warmup: int = 25,
    mode: str = "reciprocal",
    max_norm: float | None = 1.0,
) -> ZScore:
    r"""ZClip: clip a norm that is a z-score outlier against EMA statistics of the norms before it.

    Warm-up (the first ``warmup`` finite norms, the last of them included): clipped to ``max_norm`` only; at its
    end :math:`\mu` and :math:`\sigma^2` are the mean and population variance of those norms. Then, each step,

    .. math:: z_t = \frac{g_t - \mu}{\sigma + 10^{-6}}, \qquad
              a_t = \begin{cases}
                \mu + \frac{z_{thr}^2}{z_t}\,\sigma & \text{reciprocal, if } z_t > z_{thr} \\
                \mu & \text{mean, if } z_t > z_{thr} \\
                \mu + z_{thr}\,\sigma & \text{fixed, if } g_t > \mu + z_{thr}\sigma \\
                g_t \text{ (no clipping)} & \text{otherwise}
              \end{cases}, \qquad c_t = \min(a_t, \text{max\_norm})

    and the statistics take :math:`a_t`, the norm clipped to the adaptive threshold but not to ``max_norm``, with
    :math:`\alpha` = ``decay`` (the mean first, the variance against the new mean):

    .. math:: \mu \leftarrow \alpha\mu + (1 - \alpha)a_t, \qquad
              \sigma^2 \leftarrow \alpha\sigma^2 + (1 - \alpha)(a_t - \mu)^2

    (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv:2504.02507.) This is the
    reference code's ``ZClip`` (github.com/bluorion-com/ZClip, ``zclip/zclip.py``) with its defaults:
    ``alpha=0.97``, ``z_thresh=2.5``, ``warmup_steps=25``, ``mode="zscore"`` with
    ``clip_option="adaptive_scaling"`` (here "reciprocal"; ``clip_option="mean"`` is "mean", ``mode="percentile"``
    is "fixed") and ``max_grad_norm=1.0``, a fixed cap on the global norm during warm-up and after it. The cap makes
    the rule scale-dependent: every norm above 1 is clipped like ``clip_by_global_norm(1.0)``, and it is what keeps
    a run whose norms explode during the 25 warm-up steps finite. ``max_norm=None`` is the z-score rule alone, which
    follows the norms at any scale but clips nothing during its warm-up. ``warmup=0`` acts as 1, as in the
    reference (it seeds the statistics from the first norm). Where it differs from the reference code:

    * A non-finite norm leaves the statistics and the warm-up as they were; there it enters the warm-up buffer or
      the EMA and makes :math:`\mu` and :math:`\sigma` NaN for the rest of the run.
    * The clip is exact, :math:`c_t / g_t`; the reference scales by :math:`c_t / (g_t + 10^{-6})` (and through
      ``torch.nn.utils.clip_grad_norm_`` during warm-up).
    * ``clip_factor`` (1 by default there; it multiplies the whole reciprocal threshold) and
      ``skip_update_on_spike`` (off by default there) are not offered: they are fixed at their defaults.

    When a step is not a spike the reported threshold is the norm above which it would have been one,
    :math:`\mu + z_{thr}(\sigma + 10^{-6})` (fixed: :math:`\mu + z_{thr}\sigma`), capped at ``max_norm``; during
    warm-up it is ``max_norm`` (``inf`` if ``None``). Constant norms keep :math:`\sigma = 0` exactly and are never
    clipped but by ``max_norm``.

    Args:
      z_thresh: the z-score above which a norm is a spike, >= 0.
      decay: the EMA factor :math:`\alpha`, in (0, 1).
      warmup: the number of finite norms that seed the statistics, >= 0.
      mode: "reciprocal" (the reference code's default), "mean" or "fixed".
      max_norm: a fixed cap on the threshold, >= 0, applied during warm-up too (the reference's default, 1.0), or
        ``None`` for none.

    Returns:
      A threshold rule for a global or leaf clip (it takes scalar norms only); it adds ``mean``, ``std`` and the
      last ``z`` to ``optclip.stats``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_global_norm(optclip.zscore(warmup=4))
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for g in [0.1, 0.12, 0.08, 0.1, 5.0]:  # warm-up: mean 0.1, std 0.0141; then a spike
      ...     updates, state = tx.update({"w": jnp.array([g])}, state)
      >>> stats = optclip.stats(state)
      >>> print(round(float(stats["clip_by_global_norm/z"]), 1), round(float(updates["w"][0]), 4))
      346.5 0.1003
    """
    return ZScore(z_thresh, decay, warmup, mode, max_norm)


# --------------------------------------------------------------------------------------------------------------------
# AdaGC


class EMAState(NamedTuple):
    """The reference norm gamma (``inf`` until the first positive norm) and the number of finite norms seen."""

    gamma: Array
    seen: Array


@dataclasses.dataclass(frozen=True)
class EMA:
    """The AdaGC rule; build it with ``optclip.ema``, which documents it."""

    accepts_norm_vector: ClassVar[bool] = False  # its statistics are those of one norm per step

    factor: Any = 1.05
    decay: Any = 0.98
    warmup: Any = 100
    warmup_max_norm: Any = 1.0

    def __post_init__(self) -> None:
        _check_interval(self.factor, "factor", 0.0, math.inf, open_low=False, open_high=True)
        _check_interval(self.decay, "decay", 0.0, 1.0, open_low=True, open_high=True)
        _check_count(self.warmup, "warmup", 0)
        if self.warmup_max_norm is not None:
            check_non_negative(self.warmup_max_norm, "warmup_max_norm")

    def init(self) -> EMAState:
        return EMAState(jnp.float32(jnp.inf), jnp.int32(0))

    def in_warmup(self, state: EMAState) -> Array:
        """Whether the next norm is a warm-up one: fewer than ``warmup`` finite norms seen (part of the contract
        that ``optclip.ema`` documents for a transform with a global warm-up)."""
        return state.seen < jnp.asarray(self.warmup)

    def update(self, norm: Array, state: EMAState, count: Array) -> tuple[Array, EMAState]:
        del count
        g, finite = _scalar_norm(norm)
        factor = jnp.asarray(self.factor, jnp.float32)
        decay = jnp.asarray(self.decay, jnp.float32)
        warming = self.in_warmup(state)
        # After warm-up, a tensor that has not had a positive norm yet starts gamma from this norm, as the authors'
        # code does for a tensor it meets after warm-up; a zero norm does not start it (gamma = 0 would zero the
        # tensor for ever), so gamma stays inf and nothing is clipped.
        base = jnp.where(~warming & (state.gamma == jnp.inf) & (g > 0), g, state.gamma)
        unset = base == jnp.inf
        finite_base = jnp.where(unset, 0.0, base)  # no inf * 0 or inf - inf on the branch that is not taken
        after = jnp.where(unset, jnp.inf, factor * finite_base)
        threshold = jnp.where(warming, _optional_cap(self.warmup_max_norm), after)
        clipped = jnp.minimum(g, threshold)  # the norm after this step's clip
        # Warm-up: the smallest positive clipped norm. After it: the EMA of the clipped norms, in the form
        # ``m + (1 - b) (x - m)`` that leaves m exactly unchanged when x == m.
        warm_gamma = jnp.where(clipped > 0, jnp.minimum(state.gamma, clipped), state.gamma)
        ema_gamma = jnp.where(unset, state.gamma, finite_base + (1.0 - decay) * (clipped - finite_base))
        new_state = EMAState(jnp.where(warming, warm_gamma, ema_gamma), next_count(state.seen))
        return threshold, _keep_if(finite, new_state, state)

    def stats(self, state: EMAState) -> dict[str, Array]:
        return {"gamma": state.gamma}


def ema(factor: float = 1.05, decay: float = 0.98, warmup: int = 100, warmup_max_norm: float | None = 1.0) -> EMA:
    r"""AdaGC's rule: clip to a multiple of an EMA of the clipped norms, kept per tensor under clip_by_leaf_norm.

    With :math:`\lambda` = ``factor``, :math:`\beta` = ``decay``, :math:`c_{abs}` = ``warmup_max_norm`` and
    :math:`\tilde g_t = \min(\|g_t\|, c_t)` the norm after this step's clip:

    .. math:: c_t = \begin{cases} c_{abs} & \text{warm-up} \\ \lambda\gamma_{t-1} & \text{after} \end{cases},
              \qquad
              \gamma_t = \begin{cases} \min(\gamma_{t-1}, \tilde g_t) & \text{warm-up, from } \gamma = \infty \\
                                       \beta\gamma_{t-1} + (1 - \beta)\,\tilde g_t & \text{after} \end{cases}

    The warm-up is the first ``warmup`` finite norms (``warmup_max_norm=None``: nothing is clipped in it). So
    :math:`\gamma` starts at the smallest norm seen *after* the warm-up clip, as the AdaGC authors' code
    (github.com/lishuai-97/AdaGC, ``megatron/optimizer/clip_grads.py``: the per-tensor norms are taken after the
    global clip) and pytorch-optimizer's ``AdaGC`` (``min(gamma, ||g_hat||)``, ``g_hat`` the clipped gradient) do;
    both also feed the EMA the clipped norm. (Wang et al. 2025, "AdaGC: Improving Training Stability for Large
    Language Model Pretraining", arXiv:2502.11034.) The defaults :math:`\lambda = 1.05`, :math:`\beta = 0.98`,
    ``warmup=100`` and :math:`c_{abs} = 1` are pytorch-optimizer's (whose ``step < warmup_steps``, counting from 1,
    warms up one step fewer than ``warmup`` here and in the authors' code); the authors' Megatron patch defaults to
    1.04 and 0.99. Where it differs from the authors' code, and why:

    * A zero norm does not lower :math:`\gamma` (theirs would set :math:`\gamma = 0` and zero that tensor for
      ever: a tensor behind a zero-initialised layer has zero gradients at the start). A tensor that ends the
      warm-up without a positive norm starts :math:`\gamma` from its first positive norm after it, unclipped, as
      their code does for a tensor it first meets after warm-up (and for every tensor when ``warmup=0``).
    * A non-finite norm leaves the state as it was and does not count towards the warm-up. Theirs counts every
      step; a NaN norm at the first step or after warm-up makes that tensor's :math:`\gamma` NaN for ever, and a
      NaN in a warm-up step skips the global clip, so the other tensors' raw norms enter their minimum.
    * The clip is exact, :math:`c_t / \|g_t\|`; theirs scales by :math:`c_t / (\|g_t\| + 10^{-6})`.

    Where it runs decides the warm-up. Under ``clip_by_global_norm`` the whole model is one tensor. Under
    ``clip_by_leaf_norm`` each leaf keeps its own :math:`\gamma` (the paper's per-tensor rule) but is clipped on
    its own to :math:`c_{abs}` during warm-up, so :math:`\tilde g_t = \min(\|g_{t,i}\|, c_{abs})`, where the paper
    clips the global norm; ``optclip.adagc`` does the paper's global warm-up. Contract for a transform with a
    global warm-up (what ``optclip.adagc`` must do to be the authors' algorithm):

    1. The warm-up is the first ``warmup`` finite steps; a step is finite when every leaf norm is.
    2. During warm-up it scales the whole gradient by :math:`s = \min(1, c_{abs} / \|g\|)` and gives the rule,
       leaf by leaf, the norm after that clip, :math:`s\|g_i\|` (never above :math:`c_{abs}`, so the rule's own
       warm-up threshold changes nothing); it ignores the thresholds the rule returns.
    3. On a non-finite step during warm-up it gives every leaf ``nan``: no leaf's :math:`\gamma` or count moves,
       the step passes through unchanged and the warm-up is not shortened. Every leaf's count of finite norms
       then stays equal to the number of finite warm-up steps, so ``jnp.any(jax.vmap(rule.in_warmup)(states))``
       is rule 1's test (never the clip's update count, which counts every step).
    4. After warm-up it gives each leaf its raw norm and clips it to the rule's threshold; a non-finite leaf passes
       through and keeps its state.

    Args:
      factor: :math:`\lambda \ge 0`, the allowed ratio to the EMA (the paper's :math:`\lambda_{rel}`).
      decay: :math:`\beta`, in (0, 1).
      warmup: the number of warm-up norms, >= 0.
      warmup_max_norm: :math:`c_{abs}`, the threshold during warm-up, >= 0, or ``None`` for none.

    Returns:
      A threshold rule for a global or leaf clip (it takes scalar norms only); it adds ``gamma`` (``inf`` until
      the first positive norm; the mean over leaves under ``clip_by_leaf_norm``) to ``optclip.stats``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_global_norm(optclip.ema(warmup=2))
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for g in [4.0, 2.0, 3.0]:  # warm-up clips 4 and 2 to 1.0, so gamma = min(1, 1) = 1
      ...     updates, state = tx.update({"w": jnp.array([g])}, state)
      >>> print(round(float(updates["w"][0]), 4))  # 3.0 is cut to 1.05 * gamma
      1.05
    """
    return EMA(factor, decay, warmup, warmup_max_norm)


# --------------------------------------------------------------------------------------------------------------------
# Quantile (Andrew et al.)


class QuantileState(NamedTuple):
    """The current clip norm C and the fraction of norms at or below it at the last update (noised when private)."""

    clip: Array
    fraction_below: Array


@dataclasses.dataclass(frozen=True)
class Quantile:
    """The quantile-tracking rule; build it with ``optclip.quantile``, which documents it."""

    accepts_norm_vector: ClassVar[bool] = True  # b_t is the fraction of the given norms at or below C

    target: Any = 0.5
    learning_rate: Any = 0.2
    initial: Any = 1.0

    def __post_init__(self) -> None:
        _check_interval(self.target, "target", 0.0, 1.0, open_low=False, open_high=False)
        _check_interval(self.learning_rate, "learning_rate", 0.0, math.inf, open_low=False, open_high=True)
        _check_interval(self.initial, "initial", 0.0, math.inf, open_low=True, open_high=True)

    def init(self) -> QuantileState:
        return QuantileState(jnp.array(self.initial, jnp.float32), jnp.float32(0))  # a copy, never the caller's

    def _moved(self, clip: Array, fraction: Array) -> Array:
        """``C exp(-eta (b - gamma))``, floored at the smallest normal float: C = 0 would be absorbing
        (0 * exp(.) = 0) after a run of zeros."""
        step = -jnp.asarray(self.learning_rate, jnp.float32) * (fraction - jnp.asarray(self.target, jnp.float32))
        tiny = jnp.finfo(jnp.float32).tiny  # type: ignore[no-untyped-call]  # ml_dtypes' finfo.__new__ is unannotated
        return jnp.maximum(clip * jnp.exp(step), tiny)

    def update(self, norm: Array, state: QuantileState, count: Array) -> tuple[Array, QuantileState]:
        del count
        norms = jnp.asarray(norm, jnp.float32)
        finite = jnp.isfinite(norms)
        seen = jnp.sum(finite, dtype=jnp.float32)
        below = jnp.sum(finite & (norms <= state.clip), dtype=jnp.float32) / jnp.maximum(seen, 1.0)
        return state.clip, _keep_if(seen > 0, QuantileState(self._moved(state.clip, below), below), state)

    def private_update(
        self, norms: Array, state: QuantileState, key: Array, count_stddev: Array | float
    ) -> tuple[Array, QuantileState]:
        r"""The update of Andrew et al.'s Algorithm 1: the count of norms at or below :math:`C` is noised.

        .. math:: \tilde b = \frac{1}{2} + \frac{1}{B}\Big(\sum_{i=1}^{B}\big([\|g_i\| \le C] - \tfrac{1}{2}\big)
                  + \mathcal{N}(0, \sigma_b^2)\Big), \qquad C \leftarrow C \exp\big(-\eta(\operatorname{clip}(
                  \tilde b, 0, 1) - \gamma)\big)

        ``norms`` is the vector of the :math:`B` per-example norms (``B`` its length, a public constant: the
        batch size), ``key`` a PRNG key for the noise and ``count_stddev`` :math:`\sigma_b`. With the batch size
        fixed, :math:`\tilde b = (\sum_i [\|g_i\| \le C] + \mathcal{N}(0, \sigma_b^2)) / B`; the centred count is
        the form whose sensitivity is 1/2 when an example is added or removed, as in TF Privacy's
        ``QuantileEstimatorQuery``, so the count is a Gaussian mechanism with noise multiplier
        :math:`2\sigma_b`. A non-finite norm counts as not below :math:`C`, and the state always moves (whether
        it moves must not depend on the data). The noisy fraction is clipped to [0, 1] (post-processing, as in
        TF Privacy) and recorded as ``fraction_below``.

        Returns:
          ``(C, new_state)``: the threshold for this batch and the state for the next one.

        Example:
          >>> import jax, jax.numpy as jnp, optclip
          >>> rule = optclip.quantile(target=0.5, learning_rate=0.2, initial=1.0)
          >>> norms = jnp.array([0.5, 0.8, 2.0, jnp.nan])  # 2 of 4 at or below C = 1; NaN is not
          >>> threshold, state = rule.private_update(norms, rule.init(), jax.random.PRNGKey(0), 0.2)
          >>> print(float(threshold), round(float(state.fraction_below), 4))  # (2 + N(0, 0.2^2)) / 4
          1.0 0.5811
        """
        norms = jnp.asarray(norms, jnp.float32).reshape(-1)
        batch = norms.shape[0]
        centred = jnp.sum(jnp.where(norms <= state.clip, 0.5, -0.5), dtype=jnp.float32)  # NaN <= C is False
        noise = jnp.asarray(count_stddev, jnp.float32) * jax.random.normal(key, (), jnp.float32)
        fraction = jnp.clip(0.5 + (centred + noise) / batch, 0.0, 1.0)
        return state.clip, QuantileState(self._moved(state.clip, fraction), fraction)

    def stats(self, state: QuantileState) -> dict[str, Array]:
        return {"fraction_below": state.fraction_below}


def quantile(target: float = 0.5, learning_rate: float = 0.2, initial: float = 1.0) -> Quantile:
    r"""Quantile tracking: move the threshold geometrically towards the ``target`` quantile of the norms.

    .. math:: c_{t+1} = c_t \exp\big(-\eta\,(b_t - \gamma)\big), \qquad
              b_t = \frac{1}{n}\sum_{i=1}^{n} [\|g_{t,i}\| \le c_t]

    with :math:`\gamma` = ``target`` and :math:`\eta` = ``learning_rate`` (Andrew et al. 2021, "Differentially
    Private Learning with Adaptive Clipping", arXiv:1905.03871). Step :math:`t` is clipped to :math:`c_t`, then
    :math:`c` moves.

    ``update`` takes a scalar norm (what the norm clips pass; :math:`b_t \in \{0, 1\}`, so :math:`c` settles
    around the norms and clips about a fraction :math:`1 - \gamma` of the steps) or a vector of norms, e.g. the
    per-example norms of a DP-SGD batch: ``threshold, state = rule.update(norms, state, count)`` returns the clip
    norm :math:`c_t` for every example and the state for the next batch. Non-finite entries are left out of
    :math:`b_t`; if none is finite the state stays as it was. :math:`c` never goes below the smallest normal
    float32, so it can recover after a run of zero norms.

    That exact :math:`b_t` is the non-private form. ``optclip.clip_per_example(quantile(), noise_multiplier=z)``
    with :math:`z > 0` uses the private one instead (``Quantile.private_update``, the paper's Algorithm 1): the count
    of examples at or below :math:`c_t` gets Gaussian noise of its own, :math:`b_t` divides by the batch size, and
    the noise on the gradient sum is raised so that both together cost the privacy of a fixed threshold with
    multiplier :math:`z` (see ``clip_per_example``).

    Args:
      target: the quantile :math:`\gamma` to track, in [0, 1].
      learning_rate: :math:`\eta \ge 0`.
      initial: :math:`c_0 > 0`.

    Returns:
      A threshold rule for any norm clip; it adds ``fraction_below`` (:math:`b_t` of the last update, noised in the
      private form) to ``optclip.stats``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> rule = optclip.quantile(target=0.5, learning_rate=0.2, initial=1.0)
      >>> norms = jnp.array([0.5, 0.8, 2.0, 3.0, 4.0])  # per-example norms: 2 of 5 below c = 1
      >>> threshold, state = rule.update(norms, rule.init(), jnp.int32(0))
      >>> print(float(threshold), round(float(state.clip), 4))  # 1 * exp(-0.2 * (0.4 - 0.5))
      1.0 1.0202
    """
    return Quantile(target, learning_rate, initial)


# --------------------------------------------------------------------------------------------------------------------
# shorthands


def autoclip(
    p: float = 10.0, history: int = 1000, *, ord: float = 2, name: str = "autoclip"
) -> optax.GradientTransformation:
    r"""AutoClip as a ready transform: ``clip_by_global_norm(percentile(p, history))``.

    .. math:: g \leftarrow g \cdot \min\big(1, c_t / \|g\|\big), \qquad
              c_t = \operatorname{percentile}_p(\text{the last } h \text{ norms, } \|g\| \text{ included})

    (Seetharaman et al. 2020, arXiv:2007.14469); see ``optclip.percentile``.

    Args:
      p: the percentile, in [0, 100] (the paper recommends 10).
      history: the number of recent norms kept, >= 1.
      ord: the norm, 1, 2 or ``inf``.
      name: the prefix of its statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation`` (the state of ``clip_by_global_norm``).

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optax.chain(optclip.autoclip(p=10.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
      >>> print(float(optclip.stats(state)["autoclip/clipped"]))  # the first step never clips
      0.0
    """
    return clip_by_global_norm(percentile(p, history), ord=ord, name=name)


def zclip(
    z_thresh: float = 2.5,
    decay: float = 0.97,
    warmup: int = 25,
    mode: str = "reciprocal",
    max_norm: float | None = 1.0,
    *,
    ord: float = 2,
    name: str = "zclip",
) -> optax.GradientTransformation:
    r"""ZClip as a ready transform: ``clip_by_global_norm(zscore(...))``, with the reference code's defaults.

    .. math:: g \leftarrow g \cdot \min\big(1, c_t / \|g\|\big), \qquad
              c_t = \min\Big(\mu + \frac{z_{thr}^2}{z_t}\sigma, \text{max\_norm}\Big)
              \text{ when } z_t = \frac{\|g\| - \mu}{\sigma + 10^{-6}} > z_{thr},
              \text{ else } \min(\|g\|, \text{max\_norm})

    (Kumar et al. 2025, arXiv:2504.02507.) ``optclip.zclip()`` is the reference ``ZClip()``
    (github.com/bluorion-com/ZClip): z-score 2.5, EMA factor 0.97, 25 warm-up steps, reciprocal mode and
    ``max_norm=1.0``, the reference's ``max_grad_norm`` default, which clips the global norm to 1 during warm-up
    and caps the threshold after it. Pass ``max_norm=None`` for the z-score rule alone (nothing is clipped during
    the warm-up then). See ``optclip.zscore`` for the modes, the warm-up, the statistics and where it differs from
    the reference code (non-finite norms, the exact clip).

    Args:
      z_thresh: the spike z-score, >= 0.
      decay: the EMA factor, in (0, 1).
      warmup: the number of norms that seed the statistics, >= 0.
      mode: "reciprocal", "mean" or "fixed".
      max_norm: a fixed cap on the threshold (1.0, as the reference), or ``None`` for none.
      ord: the norm, 1, 2 or ``inf``.
      name: the prefix of its statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation`` (the state of ``clip_by_global_norm``).

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optax.chain(optclip.zclip(warmup=10), optax.adam(1e-3))
      >>> params = {"w": jnp.zeros(2)}
      >>> _, state = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
      >>> print(float(optclip.stats(state)["zclip/norm_after"]))  # warm-up: only max_norm = 1 applies
      1.0
    """
    return clip_by_global_norm(zscore(z_thresh, decay, warmup, mode, max_norm), ord=ord, name=name)


__all__ = ["autoclip", "ema", "percentile", "quantile", "zclip", "zscore"]
