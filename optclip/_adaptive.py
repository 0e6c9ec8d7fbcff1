"""Adaptive threshold rules (AutoClip, ZClip, AdaGC, quantile) and the shorthands built on them.

Each rule follows the protocol of ``optclip._rules``: a frozen dataclass (not callable, so
``optax.inject_hyperparams`` passes it through untouched) with ``init``, ``update`` and ``stats``, whose state is a
NamedTuple of fixed-shape arrays for one norm. Any norm clip takes one as its threshold; ``clip_by_leaf_norm`` runs it
once per leaf, each leaf with its own statistics.

Shared conventions, so that the rules behave alike:

* A warm-up counts the finite norms the rule has seen, not steps, so a NaN step neither enters the statistics nor
  shortens a warm-up (``adagc``'s global warm-up is the exception: the paper counts steps).
* A non-finite norm leaves the state exactly as it was (each rule guards itself, so calling ``update`` directly is
  safe too) and the threshold is the one the old state gives.
* ``inf`` as a threshold means "no limit": it is what a rule reports while it has nothing to go on (an empty history,
  a warm-up without a cap).
* Statistics are float32 and every update is written so that constant norms give exactly constant statistics (zero
  variance stays exactly zero), which is what makes "constant norms are never clipped" hold in floating point.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip._clipping import clip_by_global_norm
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
            lower, weight = _interpolation_table(p, self.history)
            return jnp.asarray(lower)[top], jnp.asarray(weight)[top]
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
    arXiv:2007.14469; the paper keeps every norm, this keeps a ring buffer). The first step never clips (its
    threshold is its own norm); ``p = 10`` is the paper's recommendation. A non-finite norm is not recorded.

    Cost: the state keeps the window twice, in arrival order and sorted, so a step moves ``history`` float32
    values (per leaf under ``clip_by_leaf_norm``) instead of sorting them; nothing grows with the model.
    ``history`` fixes the state's shape, so under ``optax.inject_hyperparams`` pass it in ``static_args``; ``p`` may
    be injected.

    Args:
      p: the percentile, in [0, 100].
      history: how many of the most recent norms to keep, >= 1.

    Returns:
      A threshold rule for any norm clip; it adds ``history_fill`` (the number of norms held) to ``optclip.stats``.

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

    z_thresh: Any = 2.5
    decay: Any = 0.97
    warmup: Any = 25
    mode: str = "reciprocal"
    max_norm: Any = None

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
            optax.safe_int32_increment(state.seen),
        )
        return threshold, _keep_if(finite, new_state, state)

    def stats(self, state: ZScoreState) -> dict[str, Array]:
        return {"mean": state.mean, "std": state.std, "z": state.z}


def zscore(
    z_thresh: float = 2.5,
    decay: float = 0.97,
    warmup: int = 25,
    mode: str = "reciprocal",
    max_norm: float | None = None,
) -> ZScore:
    r"""ZClip: clip a norm that is a z-score outlier against EMA statistics of the norms before it.

    Warm-up (the first ``warmup`` finite norms): nothing is clipped but to ``max_norm`` if given; at its end
    :math:`\mu` and :math:`\sigma^2` are the mean and population variance of those norms. Then, each step,

    .. math:: z_t = \frac{g_t - \mu}{\sigma + 10^{-6}}, \qquad
              c_t = \begin{cases}
                \mu + \frac{z_{thr}^2}{z_t}\,\sigma & \text{reciprocal, if } z_t > z_{thr} \\
                \mu & \text{mean, if } z_t > z_{thr} \\
                \mu + z_{thr}\,\sigma & \text{fixed, if } g_t > \mu + z_{thr}\sigma \\
                \text{no clipping} & \text{otherwise}
              \end{cases}

    capped at ``max_norm``, and the statistics take the norm clipped to the adaptive threshold (not to
    ``max_norm``), :math:`\tilde g_t = \min(g_t, c_t)`, with :math:`\alpha` = ``decay``:

    .. math:: \mu \leftarrow \alpha\mu + (1 - \alpha)\tilde g_t, \qquad
              \sigma^2 \leftarrow \alpha\sigma^2 + (1 - \alpha)(\tilde g_t - \mu)^2

    (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv:2504.02507; "fixed" is the
    reference code's "percentile" mode; its ``clip_factor`` is left at 1). Unlike the reference code, a NaN norm
    leaves the statistics alone instead of poisoning them for ever; ``warmup=0`` acts as 1, as there.

    When a step is not a spike the reported threshold is the norm above which it would have been one,
    :math:`\mu + z_{thr}(\sigma + 10^{-6})` (fixed: :math:`\mu + z_{thr}\sigma`); during warm-up it is ``max_norm``
    or ``inf``. Constant norms keep :math:`\sigma = 0` exactly and are never clipped.

    Args:
      z_thresh: the z-score above which a norm is a spike, >= 0.
      decay: the EMA factor :math:`\alpha`, in (0, 1).
      warmup: the number of finite norms that seed the statistics, >= 0.
      mode: "reciprocal" (the paper's default), "mean" or "fixed".
      max_norm: an optional fixed cap on the threshold, >= 0, applied during warm-up too.

    Returns:
      A threshold rule for any norm clip; it adds ``mean``, ``std`` and the last ``z`` to ``optclip.stats``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_global_norm(optclip.zscore(warmup=4))
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for g in [1.0, 1.2, 0.8, 1.0, 50.0]:
      ...     updates, state = tx.update({"w": jnp.array([g])}, state)
      >>> stats = optclip.stats(state)
      >>> print(round(float(stats["clip_by_global_norm/z"]), 1), round(float(updates["w"][0]), 3))
      346.5 1.003
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

    def _warming(self, state: EMAState) -> Array:
        """Whether the next norm is still a warm-up one: too few seen, or no positive norm yet to start from."""
        return (state.seen < jnp.asarray(self.warmup)) | (state.gamma == jnp.inf)

    def update(self, norm: Array, state: EMAState, count: Array) -> tuple[Array, EMAState]:
        del count
        g, finite = _scalar_norm(norm)
        factor = jnp.asarray(self.factor, jnp.float32)
        decay = jnp.asarray(self.decay, jnp.float32)
        gamma = state.gamma
        warming = self._warming(state)
        adaptive = factor * jnp.where(warming, 0.0, gamma)
        threshold = jnp.where(warming, _optional_cap(self.warmup_max_norm), adaptive)
        # A zero norm carries no scale: letting it set gamma = 0 would zero that tensor's gradient for ever.
        warm_gamma = jnp.where(g > 0, jnp.minimum(gamma, g), gamma)
        ema_gamma = gamma + (1.0 - decay) * (jnp.minimum(g, adaptive) - gamma)
        new_state = EMAState(jnp.where(warming, warm_gamma, ema_gamma), optax.safe_int32_increment(state.seen))
        return threshold, _keep_if(finite, new_state, state)

    def stats(self, state: EMAState) -> dict[str, Array]:
        return {"gamma": state.gamma}


def ema(factor: float = 1.05, decay: float = 0.98, warmup: int = 100, warmup_max_norm: float | None = 1.0) -> EMA:
    r"""AdaGC's rule: clip to a multiple of an EMA of the (clipped) norms, kept per tensor under clip_by_leaf_norm.

    After warm-up, with :math:`\lambda` = ``factor`` and :math:`\beta` = ``decay``:

    .. math:: c_t = \lambda\gamma_{t-1}, \qquad
              \gamma_t = \beta\gamma_{t-1} + (1 - \beta)\min(\|g_t\|, c_t)

    During warm-up (the first ``warmup`` finite norms) the threshold is ``warmup_max_norm`` (``None``: no clipping)
    and :math:`\gamma_t = \min(\gamma_{t-1}, \|g_t\|)` over the raw, unclipped norms, from
    :math:`\gamma_0 = \infty`: the paper's text says the minimum of :math:`\|g_{t,i}\|`, the gradient before its
    clip, and :math:`\infty` is the only start for which that minimum is the smallest norm seen. (Wang et al. 2025,
    "AdaGC: Improving Training Stability for Large Language Model Pretraining", arXiv:2502.11034.)

    One guard the paper does not spell out: a zero norm does not lower :math:`\gamma` during warm-up, and the
    warm-up of a tensor lasts until it has seen a positive norm, since a tensor whose gradient happens to be zero
    at the start (behind a zero-initialised layer) would otherwise get :math:`\gamma = 0` and be zeroed for ever.

    Where it runs decides the warm-up: under ``clip_by_global_norm`` the whole model is one tensor and this is the
    paper exactly. Under ``clip_by_leaf_norm`` each leaf keeps its own :math:`\gamma` (the paper's per-tensor rule)
    but is also clipped on its own to ``warmup_max_norm`` during warm-up, where the paper clips the global norm;
    ``optclip.adagc`` does the paper's global warm-up.

    Args:
      factor: :math:`\lambda \ge 0`, the allowed ratio to the EMA.
      decay: :math:`\beta`, in (0, 1).
      warmup: the number of warm-up norms, >= 0.
      warmup_max_norm: the threshold during warm-up, >= 0, or ``None`` for none.

    Returns:
      A threshold rule for any norm clip; it adds ``gamma`` (``inf`` until the first positive norm; the mean over
      leaves under ``clip_by_leaf_norm``) to ``optclip.stats``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_global_norm(optclip.ema(warmup=2))
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for g in [4.0, 0.5, 0.5, 3.0]:  # warm-up clips 4.0 to 1.0; gamma = min(4, 0.5) = 0.5
      ...     updates, state = tx.update({"w": jnp.array([g])}, state)
      >>> print(round(float(updates["w"][0]), 4))  # 3.0 is cut to 1.05 * gamma
      0.525
    """
    return EMA(factor, decay, warmup, warmup_max_norm)


# --------------------------------------------------------------------------------------------------------------------
# Quantile (Andrew et al.)


class QuantileState(NamedTuple):
    """The current clip norm C and the fraction of norms at or below it at the last update."""

    clip: Array
    fraction_below: Array


@dataclasses.dataclass(frozen=True)
class Quantile:
    """The quantile-tracking rule; build it with ``optclip.quantile``, which documents it."""

    target: Any = 0.5
    learning_rate: Any = 0.2
    initial: Any = 1.0

    def __post_init__(self) -> None:
        _check_interval(self.target, "target", 0.0, 1.0, open_low=False, open_high=False)
        _check_interval(self.learning_rate, "learning_rate", 0.0, math.inf, open_low=False, open_high=True)
        _check_interval(self.initial, "initial", 0.0, math.inf, open_low=True, open_high=True)

    def init(self) -> QuantileState:
        return QuantileState(jnp.array(self.initial, jnp.float32), jnp.float32(0))  # a copy, never the caller's

    def update(self, norm: Array, state: QuantileState, count: Array) -> tuple[Array, QuantileState]:
        del count
        norms = jnp.asarray(norm, jnp.float32)
        finite = jnp.isfinite(norms)
        seen = jnp.sum(finite, dtype=jnp.float32)
        below = jnp.sum(finite & (norms <= state.clip), dtype=jnp.float32) / jnp.maximum(seen, 1.0)
        step = -jnp.asarray(self.learning_rate, jnp.float32) * (below - jnp.asarray(self.target, jnp.float32))
        # Floored at the smallest normal float: C = 0 would be absorbing (0 * exp(.) = 0) after a run of zeros.
        clip = jnp.maximum(state.clip * jnp.exp(step), jnp.finfo(jnp.float32).tiny)
        return state.clip, _keep_if(seen > 0, QuantileState(clip, below), state)

    def stats(self, state: QuantileState) -> dict[str, Array]:
        return {"fraction_below": state.fraction_below}


def quantile(target: float = 0.5, learning_rate: float = 0.2, initial: float = 1.0) -> Quantile:
    r"""Quantile tracking: move the threshold geometrically towards the ``target`` quantile of the norms.

    .. math:: c_{t+1} = c_t \exp\big(-\eta\,(b_t - \gamma)\big), \qquad
              b_t = \frac{1}{n}\sum_{i=1}^{n} [\|g_{t,i}\| \le c_t]

    with :math:`\gamma` = ``target`` and :math:`\eta` = ``learning_rate`` (Andrew et al. 2021, "Differentially
    Private Learning with Adaptive Clipping", arXiv:1905.03871; the non-private form, without noise on
    :math:`b_t`). Step :math:`t` is clipped to :math:`c_t`, then :math:`c` moves.

    ``update`` takes a scalar norm (what the norm clips pass; :math:`b_t \in \{0, 1\}`, so :math:`c` settles
    around the norms and clips about a fraction :math:`1 - \gamma` of the steps) or a vector of norms, e.g. the
    per-example norms of a DP-SGD batch: ``threshold, state = rule.update(norms, state, count)`` returns the clip
    norm :math:`c_t` for every example and the state for the next batch. Non-finite entries are left out of
    :math:`b_t`; if none is finite the state stays as it was. :math:`c` never goes below the smallest normal
    float32, so it can recover after a run of zero norms.

    Args:
      target: the quantile :math:`\gamma` to track, in [0, 1].
      learning_rate: :math:`\eta \ge 0`.
      initial: :math:`c_0 > 0`.

    Returns:
      A threshold rule for any norm clip; it adds ``fraction_below`` (:math:`b_t` of the last update) to
      ``optclip.stats``.

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
    max_norm: float | None = None,
    *,
    ord: float = 2,
    name: str = "zclip",
) -> optax.GradientTransformation:
    r"""ZClip as a ready transform: ``clip_by_global_norm(zscore(...))``.

    .. math:: g \leftarrow g \cdot \min\big(1, c_t / \|g\|\big), \qquad
              c_t = \mu + \frac{z_{thr}^2}{z_t}\sigma \text{ when } z_t = \frac{\|g\| - \mu}{\sigma + 10^{-6}} > z_{thr}

    (Kumar et al. 2025, arXiv:2504.02507); see ``optclip.zscore`` for the modes, warm-up and statistics.

    Args:
      z_thresh: the spike z-score, >= 0.
      decay: the EMA factor, in (0, 1).
      warmup: the number of norms that seed the statistics, >= 0.
      mode: "reciprocal", "mean" or "fixed".
      max_norm: an optional fixed cap on the threshold.
      ord: the norm, 1, 2 or ``inf``.
      name: the prefix of its statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformation`` (the state of ``clip_by_global_norm``).

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optax.chain(optclip.zclip(warmup=10, max_norm=5.0), optax.adam(1e-3))
      >>> params = {"w": jnp.zeros(2)}
      >>> _, state = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
      >>> print(float(optclip.stats(state)["zclip/norm_after"]))  # warm-up: only max_norm applies
      5.0
    """
    return clip_by_global_norm(zscore(z_thresh, decay, warmup, mode, max_norm), ord=ord, name=name)


__all__ = ["autoclip", "ema", "percentile", "quantile", "zclip", "zscore"]
