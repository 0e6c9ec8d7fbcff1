"""Safe norms of gradient pytrees: global, per leaf and per unit, for ord in {1, 2, inf}.

Three promises shape this module (DESIGN.md, "Numerics"):

* Norms accumulate in at least float32, whatever the gradient dtype: bf16/f16 squares overflow or round badly.
* Finite inputs give a finite, correct result even where the sum of powers overflows (float32 entries near 3e38)
  or underflows. The sum is recomputed with every entry divided by 2**80 (overflow) or multiplied by 2**80
  (underflow), but only on that rare path (one ``lax.cond`` per call), so the common path costs one reduction per
  array and the rescue one more.
  A sum that underflowed completely is exactly 0, like the sum of an all-zero array, and only a second read can
  tell them apart. The global norm pays that read when the whole gradient sums to 0 (a rare step); the per-leaf
  and per-unit norms do not, because an all-zero leaf or unit (a dead ReLU unit, an unused parameter) is common and
  would pay it on every step. So a leaf or unit whose entries are all below about ``2**-63 ~ 1e-19`` (ord 2; for
  ord 1 and inf only float32 denormals) reads as norm 0: it is left unchanged by any threshold above its true norm
  and zeroed by a threshold of 0, but a threshold strictly between 0 and that tiny norm is not honoured.
* No square root or division happens at exactly zero, so ``jax.grad`` through a norm of zeros stays finite.

Internally a norm is carried as ``NormParts(mantissa, exponent)`` with ``norm = mantissa * 2**exponent``, so that a
norm beyond float32's range (the 2-norm of two entries of 3e38) can still scale gradients exactly.
"""

from __future__ import annotations

import math
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
    half = exponent >> 1  # floor(exponent / 2) in one op
    return x * pow2(half, x.dtype) * pow2(exponent - half, x.dtype)


def pow2(exponent: Array, dtype: Any = jnp.float32) -> Array:
    """``2.0**exponent`` in ``dtype``, bit for bit ``jnp.ldexp(1, exponent)``, as a single ``pow``.

    XLA copies cheap scalar ops into every fusion that reads their result, and ``jnp.ldexp`` is about fifteen of
    them: a clip scale built from it was recomputed inside the update of every leaf, which made compile time grow
    several-fold on trees of hundreds of leaves. A ``pow`` is computed once and read.
    """
    return jnp.asarray(2, dtype) ** jnp.asarray(exponent).astype(dtype)


def accumulation_dtype(dtype: Any) -> np.dtype:
    """The real dtype norms of ``dtype`` entries accumulate in: at least float32."""
    return jnp.promote_types(jnp.finfo(dtype).dtype, jnp.float32)


def _magnitude(x: Array) -> Array:
    return jnp.abs(x).astype(accumulation_dtype(x.dtype))


def _power_sum(x: Array, ord: float, axis: Axes, exponent: Array | None = None) -> Array:
    """``sum(|x / 2**exponent| ** ord)`` over ``axis`` (kept as size-1 dims); max for ``ord = inf``."""
    real = not jnp.issubdtype(x.dtype, jnp.complexfloating)
    value = x.astype(accumulation_dtype(x.dtype)) if real else _magnitude(x)
    if exponent is not None:  # 0 or +-80 (rescue_exponent): 2**-exponent is one normal float
        value = value * pow2(-exponent, value.dtype)
    if ord == np.inf:
        return jnp.max(jnp.abs(value), axis=axis, keepdims=True, initial=0.0)
    powered = jnp.abs(value) if ord == 1 else value * value
    return jnp.sum(powered, axis=axis, keepdims=True)


# The rescue divides every entry by 2**80 where a sum overflowed and multiplies it by 2**80 where it underflowed.
# Down: float32's largest entry becomes 2.8e14, whose square summed over 2**31 entries stays finite, and an entry
# whose scaled square underflows (below 1.3e5) is under 1e-28 of a sum that overflowed. Up: a sum that underflowed
# has entries below 3e-16, which become at most 4e8, and every normal float32 entry gets a normal square. A fixed
# power needs no pass to find the peak and no exponent arithmetic per array, which made the rescue branch compile
# about as slowly as all the rest of a step.
_RESCUE_EXPONENT = 80


def rescue_exponent(power_sum: Array, zero_suspect: bool = False) -> Array:
    """Per entry of ``power_sum``: 80 where it overflowed, -80 where it may have underflowed, 0 elsewhere."""
    power_sum = jax.lax.stop_gradient(power_sum)
    low = power_sum >= 0 if zero_suspect else power_sum > 0
    underflow = low & (power_sum < _UNDERFLOW_GUARD)
    return jnp.where(power_sum == jnp.inf, _RESCUE_EXPONENT, jnp.where(underflow, -_RESCUE_EXPONENT, 0))


def _root(power_sum: Array, ord: float) -> Array:
    if ord != 2:
        return power_sum
    positive = power_sum > 0  # zero stays zero with a finite gradient; NaN stays NaN
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, power_sum, 1.0)), power_sum)


def _needs_rescale(power_sum: Array, zero_suspect: bool) -> Array:
    return jnp.any(rescue_exponent(power_sum, zero_suspect) != 0)


def _with_rescue(common: Sequence[Array], rescue, operands, zero_suspect: bool = False) -> list[Array]:
    """``common`` unless any power sum over- or underflowed; then ``rescue(operands, exponents)`` (one ``lax.cond``),
    ``exponents`` being ``rescue_exponent`` of each common sum.

    ``zero_suspect``: a sum of exactly 0 may be a complete underflow too (see the module docstring).
    """
    if not common:
        return [], []
    trigger = jnp.any(jnp.stack([_needs_rescale(s, zero_suspect) for s in common]))

    # The exponents are computed inside the branch from the sums it is handed: computed outside, each one is an
    # array both the trigger and the branch read, which XLA writes out, one more kernel per array on every step.
    def rescued(xs, sums):
        return rescue(xs, [rescue_exponent(s, zero_suspect) for s in sums])

    def kept(xs, sums):
        return list(sums), [jnp.zeros_like(s, jnp.int32) for s in sums]

    return jax.lax.cond(trigger, rescued, kept, operands, list(common))


def unit_shape(shape: Sequence[int], axis: Axes) -> tuple[int, ...]:
    """The shape of the norms of an array of ``shape`` over ``axis``: the reduced dims kept, of size 1."""
    reduced = range(len(shape)) if axis is None else [a % len(shape) for a in np.atleast_1d(axis)]
    return tuple(1 if d in reduced else n for d, n in enumerate(shape))


def flat_unit_norm_parts(arrays: Sequence[Array], ord: float, axes: Sequence[Axes]) -> NormParts:
    """The norms of ``unit_norm_parts``, every array's flattened and concatenated into one float32 vector.

    Past the reduction of each array everything is vector arithmetic: the rescue branch hands back two vectors,
    not two arrays per leaf, and it derives each array's exponents from that array's own sums, so the rescaled
    reductions are the same kernel for every array of one shape (XLA:CPU compiles identical kernels once).
    """
    check_ord(ord)
    if not arrays:
        empty = jnp.zeros((0,), jnp.float32)
        return NormParts(empty, empty.astype(jnp.int32))
    sums = [_power_sum(x, ord, axis) for x, axis in zip(arrays, axes)]

    def flat(values):
        return jnp.concatenate([jnp.ravel(v) for v in values])

    if ord == np.inf:
        values = flat(sums).astype(jnp.float32)
        return NormParts(values, jnp.zeros(values.shape, jnp.int32))

    def rescued(xs, sums):
        exponents = [rescue_exponent(s) for s in sums]
        return flat([_power_sum(x, ord, axis, e) for x, axis, e in zip(xs, axes, exponents)]), flat(exponents)

    def kept(xs, sums):
        total = flat(sums)
        return total, jnp.zeros(total.shape, jnp.int32)

    total, exponents = jax.lax.cond(_needs_rescale(flat(sums), False), rescued, kept, list(arrays), sums)
    return NormParts(_root(total, ord).astype(jnp.float32), exponents)


def unit_norm_parts(arrays: Sequence[Array], ord: float, axes: Sequence[Axes]) -> list[NormParts]:
    """Norms of each array over its ``axes`` (``None``: all), as float32 ``NormParts`` with the reduced dims kept:
    ``flat_unit_norm_parts`` cut back into one block per array.

    One norm per leaf is ``axes = [None] * len(arrays)``; AGC's one norm per output unit reduces over the
    unit's input dims.
    """
    flat = flat_unit_norm_parts(arrays, ord, axes)
    parts, start = [], 0
    for x, axis in zip(arrays, axes):
        shape = unit_shape(jnp.shape(x), axis)
        size = math.prod(shape)
        block = slice(start, start + size)
        parts.append(NormParts(flat.mantissa[block].reshape(shape), flat.exponent[block].reshape(shape)))
        start += size
    return parts


def leaf_norm_parts(leaves: Sequence[Array], ord: float) -> NormParts:
    """One norm per leaf, as vectors of length ``len(leaves)``."""
    return flat_unit_norm_parts(leaves, ord, [None] * len(leaves))


def global_norm_parts(leaves: Sequence[Array], ord: float) -> NormParts:
    """One norm over every entry of every leaf (torch ``clip_grad_norm_``'s ``total_norm``)."""
    check_ord(ord)
    if not leaves:
        return NormParts(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    sums = [_power_sum(x, ord, None).reshape(()).astype(jnp.float32) for x in leaves]
    if ord == np.inf:
        return NormParts(jnp.max(jnp.stack(sums)), jnp.zeros((), jnp.int32))
    total = sum(sums[1:], sums[0])

    def rescue(xs, exponents):
        (exponent,) = exponents
        # Each leaf's factor is tied to its own sum (a NaN sum makes the total NaN whatever its factor): one factor
        # shared by all leaves was broadcast once per leaf shape and written out in full, a leaf-sized temp buffer.
        own = [jnp.where(jnp.isnan(s), 0, exponent) for s in sums]
        rescaled = [_power_sum(x, ord, None, e).reshape(()).astype(jnp.float32) for x, e in zip(xs, own)]
        return [sum(rescaled[1:], rescaled[0])], [exponent]

    (total,), (exponent,) = _with_rescue([total], rescue, list(leaves), zero_suspect=True)
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
