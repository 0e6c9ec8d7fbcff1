"""Safe norms of gradient pytrees: global, per leaf and per unit, for ord in {1, 2, inf}.

Three promises shape this module (DESIGN.md, "Numerics"):

* Norms accumulate in at least float32, whatever the gradient dtype: bf16/f16 squares overflow or round badly.
* Finite inputs give a finite, correct result even where the sum of powers overflows (float32 entries near 3e38)
  or underflows. The sum is recomputed with every entry divided by a power of two near the largest magnitude, but
  only on that rare path (one ``lax.cond`` per call), so the common path costs one reduction per array.
* No square root or division happens at exactly zero, so ``jax.grad`` through a norm of zeros stays finite.

Internally a norm is carried as ``NormParts(mantissa, exponent)`` with ``norm = mantissa * 2**exponent``, so that a
norm beyond float32's range (the 2-norm of two entries of 3e38) can still scale gradients exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optclip._validation import check_ord

Array = jax.Array
Axes = int | tuple[int, ...] | None

# A power sum below this may have lost entries to float32 underflow; recompute it rescaled.
_UNDERFLOW_GUARD = float(np.finfo(np.float32).tiny / np.finfo(np.float32).eps)


class NormParts(NamedTuple):
    """A norm as ``mantissa * 2**exponent``; ``exponent`` is int32 and zero on the common path."""

    mantissa: Array
    exponent: Array

    def value(self) -> Array:
        """The norm as one float (``inf`` where it exceeds the dtype's range)."""
        return times_pow2(self.mantissa, self.exponent)


def times_pow2(x: Array, exponent: Array) -> Array:
    """``x * 2**exponent`` exactly, in two factors so that neither is a denormal flushed to zero."""
    exponent = jnp.asarray(exponent, jnp.int32)
    half = exponent // 2
    one = jnp.ones((), x.dtype)
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, exponent - half)


def accumulation_dtype(dtype: Any) -> np.dtype:
    """The real dtype norms of ``dtype`` entries accumulate in: at least float32."""
    return jnp.promote_types(jnp.finfo(dtype).dtype, jnp.float32)


def _magnitude(x: Array) -> Array:
    return jnp.abs(x).astype(accumulation_dtype(x.dtype))


def _power_sum(x: Array, ord: float, axis: Axes, exponent: Array | None = None) -> Array:
    """``sum(|x / 2**exponent| ** ord)`` over ``axis`` (kept as size-1 dims); max for ``ord = inf``."""
    magnitude = _magnitude(x)
    if exponent is not None:
        magnitude = times_pow2(magnitude, -exponent)
    if ord == np.inf:
        return jnp.max(magnitude, axis=axis, keepdims=True, initial=0.0)
    powered = magnitude if ord == 1 else magnitude * magnitude
    return jnp.sum(powered, axis=axis, keepdims=True)


def _peak_exponent(peak: Array) -> Array:
    """The binary exponent of the largest magnitude; 0 where it is zero or non-finite (nothing to rescale)."""
    peak = jax.lax.stop_gradient(peak)
    usable = jnp.isfinite(peak) & (peak > 0)
    return jnp.where(usable, jnp.frexp(jnp.where(usable, peak, 1.0))[1], 0)


def _root(power_sum: Array, ord: float) -> Array:
    if ord != 2:
        return power_sum
    positive = power_sum > 0  # zero stays zero with a finite gradient; NaN stays NaN
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, power_sum, 1.0)), power_sum)


def _needs_rescale(power_sum: Array) -> Array:
    return jnp.any((power_sum == jnp.inf) | ((power_sum > 0) & (power_sum < _UNDERFLOW_GUARD)))


def _with_rescue(common: Sequence[Array], rescue, operands) -> list[Array]:
    """``common`` unless any power sum over- or underflowed; then ``rescue(operands)`` (one ``lax.cond``)."""
    trigger = jnp.any(jnp.stack([_needs_rescale(s) for s in common])) if common else jnp.bool_(False)
    return jax.lax.cond(
        trigger, rescue, lambda _: (list(common), [jnp.zeros_like(s, jnp.int32) for s in common]), operands
    )


def unit_norm_parts(arrays: Sequence[Array], ord: float, axes: Sequence[Axes]) -> list[NormParts]:
    """Norms of each array over its ``axes`` (``None``: all), as ``NormParts`` with the reduced dims kept.

    One norm per leaf is ``axes = [None] * len(arrays)``; AGC's one norm per output unit reduces over the
    unit's input dims.
    """
    check_ord(ord)
    sums = [_power_sum(x, ord, axis) for x, axis in zip(arrays, axes)]
    if ord == np.inf or not arrays:
        return [NormParts(s, jnp.zeros_like(s, jnp.int32)) for s in sums]

    def rescue(xs):
        exponents = [_peak_exponent(_power_sum(x, np.inf, axis)) for x, axis in zip(xs, axes)]
        return [_power_sum(x, ord, axis, e) for x, axis, e in zip(xs, axes, exponents)], exponents

    sums, exponents = _with_rescue(sums, rescue, list(arrays))
    return [NormParts(_root(s, ord), e) for s, e in zip(sums, exponents)]


def leaf_norm_parts(leaves: Sequence[Array], ord: float) -> NormParts:
    """One norm per leaf, stacked into vectors of length ``len(leaves)``."""
    parts = unit_norm_parts(leaves, ord, [None] * len(leaves))
    if not parts:
        empty = jnp.zeros((0,), jnp.float32)
        return NormParts(empty, empty.astype(jnp.int32))
    return NormParts(
        jnp.stack([p.mantissa.reshape(()).astype(jnp.float32) for p in parts]),
        jnp.stack([p.exponent.reshape(()) for p in parts]),
    )


def global_norm_parts(leaves: Sequence[Array], ord: float) -> NormParts:
    """One norm over every entry of every leaf (torch ``clip_grad_norm_``'s ``total_norm``)."""
    check_ord(ord)
    if not leaves:
        return NormParts(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    sums = [_power_sum(x, ord, None).reshape(()).astype(jnp.float32) for x in leaves]
    if ord == np.inf:
        return NormParts(jnp.max(jnp.stack(sums)), jnp.zeros((), jnp.int32))
    total = sum(sums[1:], sums[0])

    def rescue(xs):
        peak = jnp.max(jnp.stack([_power_sum(x, np.inf, None).reshape(()).astype(jnp.float32) for x in xs]))
        exponent = _peak_exponent(peak)
        rescaled = [_power_sum(x, ord, None, exponent).reshape(()).astype(jnp.float32) for x in xs]
        return [sum(rescaled[1:], rescaled[0])], [exponent]

    (total,), (exponent,) = _with_rescue([total], rescue, list(leaves))
    return NormParts(_root(total, ord), exponent)


def global_norm(tree: Any, ord: float = 2) -> Array:
    r"""The norm of all entries of a pytree, overflow- and underflow-safe, in at least float32.

    .. math:: \|g\|_p = \Big(\sum_{\ell}\sum_{j} |g_{\ell j}|^p\Big)^{1/p}, \qquad
              \|g\|_\infty = \max_{\ell, j} |g_{\ell j}|

    Unlike a plain ``sqrt(sum(x**2))``, float32 entries near 3e38 give the right finite norm (the sum is rescaled
    by a power of two on that rare path only), bf16/f16 entries are accumulated in float32, and the gradient of
    the norm at zero is finite.

    Args:
      tree: a pytree of floating-point arrays (``None`` leaves are ignored).
      ord: 1, 2 or ``inf``.

    Returns:
      A scalar (``inf`` only if an entry is infinite or the norm exceeds the dtype's range; ``nan`` if an entry is).

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> print(optclip.global_norm({"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}))
      5.0
      >>> print(f'{optclip.global_norm({"w": jnp.array([3e38, 1e38])}):.4e}')  # the plain formula gives inf
      3.1623e+38
    """
    return global_norm_parts(jax.tree.leaves(tree), ord).value()
