"""Safe norms of gradient pytrees: per unit, per leaf and global, for ord in {1, 2, inf}; and the hand-over that lets
one measurement serve every transform of a step.

Three promises shape this module (DESIGN.md, "Numerics"):

* Norms accumulate in at least float32, whatever the gradient dtype: bf16/f16 squares overflow or round badly.
* Finite inputs give a finite, correct norm even where the sum of powers overflows (float32 entries near 3e38) or
  underflows. This is the one rescue, used by every scope: each array's power sums are taken once; where any of them
  overflowed, may have lost entries to underflow, or all of them are 0 (a complete underflow reads as 0 too), they
  are taken again with the entries of each such array divided by ``2**80`` (overflow) or multiplied by it
  (underflow), and the norm carries that power of two. The second read happens only on those rare steps
  (``_xla.rare_second_pass`` says how). A sum that underflowed completely in one leaf or unit while others did not
  stays 0: only a second read on every step could tell it from an all-zero leaf (a dead ReLU unit, an unused
  parameter), so a leaf or unit whose entries are all below about ``2**-63 ~ 1e-19`` (ord 2; ord 1 and inf: float32
  denormals) reads as norm 0 unless the whole gradient is that small. Its effect: a threshold strictly between 0
  and such a norm is not honoured for it.
* No square root or division happens at exactly zero, so ``jax.grad`` through a norm of zeros stays finite.

A norm is carried as ``NormParts(mantissa, exponent)``, ``norm = mantissa * 2**exponent``, so that a norm beyond
float32's range (the 2-norm of two entries of 3e38) can still scale gradients exactly.

One measurement per step: ``LeafNorms`` records the per-leaf norms of a list of arrays. A transform that measured
them hands the record to the transforms it wraps through the ``optclip_leaf_norms`` extra argument
(``optax.GradientTransformationExtraArgs``); a transform that needs norms calls ``leaf_norms_of``, which uses the
record when it measured the very arrays it is given (the same array objects: anything that changed the gradients
in between made new ones) and measures them otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optclip import _xla
from optclip._validation import check_ord

Array = jax.Array
Axes = int | tuple[int, ...] | None

# The rescue scales entries by 2**-80 where a sum overflowed and by 2**80 where it may have underflowed. Down:
# float32's largest entry becomes 2.8e14, whose square summed over 2**31 entries stays finite, and an entry whose
# scaled square underflows (below 1.3e5) is under 1e-28 of a sum that overflowed. Up: a sum that underflowed has
# entries below 3e-16, which become at most 4e8, and every normal float32 entry gets a normal square.
_RESCUE_EXPONENT = 80
# A power sum below this may have lost entries to float32 underflow.
_UNDERFLOW_GUARD = float(np.finfo(np.float32).tiny / np.finfo(np.float32).eps)
HANDOVER_ARG = "optclip_leaf_norms"


class NormParts(NamedTuple):
    """A norm as ``mantissa * 2**exponent``: mantissa in the accumulation dtype (float32, float64 for float64
    gradients), int32 exponent (zero on the common path)."""

    mantissa: Array
    exponent: Array

    def value(self) -> Array:
        """The norm as one float (``inf`` where it exceeds the dtype's range)."""
        return times_pow2(self.mantissa, self.exponent)

    def take(self, index: Any) -> NormParts:
        """The norms at ``index`` (an index or an index array into the mantissa and the exponent alike)."""
        return NormParts(self.mantissa[index], self.exponent[index])


def times_pow2(x: Array, exponent: Array) -> Array:
    """``x * 2**exponent`` exactly (``pow2_halves``)."""
    low, high = pow2_halves(exponent, x.dtype)
    return x * low * high


def pow2_halves(exponent: Array, dtype: Any = jnp.float32) -> tuple[Array, Array]:
    """``2**exponent`` as two factors, so that neither is a denormal flushed to zero where the power itself is."""
    exponent = jnp.asarray(exponent, jnp.int32)
    half = exponent >> 1  # floor(exponent / 2) in one op
    return pow2(half, dtype), pow2(exponent - half, dtype)


def pow2(exponent: Array, dtype: Any = jnp.float32) -> Array:
    """``2.0**exponent`` in ``dtype`` for exponents of normal numbers, built from its bits: exact, and a few integer
    ops that compile to nothing where a power or ``ldexp`` would be a kernel of its own."""
    wide = jnp.dtype(dtype) == jnp.float64
    bits, mantissa_bits, bias = (jnp.int64, 52, 1023) if wide else (jnp.int32, 23, 127)
    biased = jax.lax.convert_element_type(exponent, bits) + bias
    value = jax.lax.bitcast_convert_type(
        jax.lax.shift_left(biased, jnp.asarray(mantissa_bits, bits)), jnp.float64 if wide else jnp.float32
    )
    return value if wide or jnp.dtype(dtype) == jnp.float32 else value.astype(dtype)


LOWEST_NORMAL_EXPONENT = int(np.finfo(np.float32).minexp)  # -126: 2**-126 is float32's smallest normal number


def binary_exponent(x: Array) -> Array:
    """``floor(log2(x))`` of a positive normal float32 or float64, read from its exponent bits (no gradient)."""
    x = jax.lax.stop_gradient(x)
    if x.dtype == jnp.float64:
        bits = jax.lax.bitcast_convert_type(x, jnp.int64)
        return (((bits >> 52) & 0x7FF) - 1023).astype(jnp.int32)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return ((bits >> 23) & 0xFF) - 127


def accumulation_dtype(dtype: Any) -> np.dtype:
    """The real dtype norms of ``dtype`` entries accumulate in: at least float32 (float64 stays float64)."""
    real: np.dtype = jnp.finfo(dtype).dtype  # type: ignore[no-untyped-call]  # ml_dtypes' finfo has no stubs
    return jnp.promote_types(real, jnp.float32)


def magnitude(x: Array) -> Array:
    """``|x|`` in the accumulation dtype."""
    return jnp.abs(x).astype(accumulation_dtype(x.dtype))


def unit_shape(shape: Sequence[int], axis: Axes) -> tuple[int, ...]:
    """The shape of the norms of an array of ``shape`` over ``axis``: the reduced dims kept, of size 1."""
    reduced = range(len(shape)) if axis is None else [a % len(shape) for a in np.atleast_1d(axis)]
    return tuple(1 if d in reduced else n for d, n in enumerate(shape))


def _unit_count(x: Array, axis: Axes) -> int:
    """How many norms ``x`` has over ``axis`` (one per unit)."""
    return math.prod(unit_shape(jnp.shape(x), axis))


def _power_sums(arrays: Sequence[Array], ord: float, axes: Sequence[Axes], scale: Array | float) -> list[Array]:
    """``sum(|x * scale| ** ord)`` of every array over its axes (reduced dims kept), in the accumulation dtype (at
    least float32); ``scale`` is a power
    of two. In ``lax`` primitives: this runs once per leaf, and tracing cost counts at 1000 leaves.

    The scaling comes first, so that no part of a sum is independent of it (a loop would hoist that part and write
    out a copy of ``x``).
    """
    sums = []
    for x, axis in zip(arrays, axes):
        dtype = accumulation_dtype(x.dtype)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            x = jax.lax.abs(x)
        value = jax.lax.convert_element_type(x, dtype)
        if isinstance(scale, float):
            value = value if scale == 1.0 else jax.lax.mul(value, jnp.asarray(scale, dtype))
        else:
            value = jax.lax.mul(value, _xla.tied(jax.lax.convert_element_type(scale, dtype), x))
        powered = jax.lax.abs(value) if ord == 1 else jax.lax.mul(value, value)
        dims = _reduced_dims(x.ndim, axis)
        total = jax.lax.reduce_sum_p.bind(powered, axes=dims, out_sharding=None) if dims else powered
        sums.append(jax.lax.reshape(total, unit_shape(x.shape, axis)))
    return sums


@functools.partial(_xla.traced_once, static_argnames=("ord", "axes", "per_array", "constant"))
def _measured(
    arrays: list[Array], scale: Array | None, *, ord: float, axes: tuple[Axes, ...], per_array: bool, constant: float
) -> list[Array]:
    """``_power_sums`` at ``scale`` (``None``: at ``constant``), one buffer per array or (not ``per_array``) one
    vector of all of them."""
    sums = _power_sums(arrays, ord, axes, constant if scale is None else scale)
    return sums if per_array else [flat_values(sums)]


def _reduced_dims(ndim: int, axis: Axes) -> tuple[int, ...]:
    return tuple(range(ndim)) if axis is None else tuple(sorted({int(a) % ndim for a in np.atleast_1d(axis)}))


def flat_values(values: Sequence[Array]) -> Array:
    """Arrays of any shapes as one vector, in order (empty: a float32 vector of length 0)."""
    return jnp.concatenate([jnp.ravel(v) for v in values]) if values else jnp.zeros((0,), jnp.float32)


def _needs_rescue(first: Array) -> tuple[Array, Array]:
    """For the vector of every first-pass sum: whether a second pass is needed (a sum overflowed or partly
    underflowed, or every sum is 0: the whole input may have underflowed), and the one exponent it reads at: 80 if a
    sum overflowed, else -80."""
    lost = (first == jnp.inf) | ((first > 0) & (first < _UNDERFLOW_GUARD))
    needed = jnp.any(lost) | jnp.all(first == 0)
    return needed, jnp.where(jnp.any(first == jnp.inf), _RESCUE_EXPONENT, -_RESCUE_EXPONENT).astype(jnp.int32)


class PowerSums(NamedTuple):
    """Each array's power sums from the first pass and, where ``needed``, from the second pass at ``2**-exponent``.

    A sum is taken from the second pass where it lost something in the first (overflowed, or below the underflow
    guard, 0 included). ``flat`` makes that choice once for the vector of every sum, ``per_array`` once per array,
    so that each array's norm is a buffer of its own (the kernels that read it then stay identical across
    same-shape leaves, where a slice of a shared vector would make each one different).
    """

    first: list[Array]
    second: list[Array]
    exponent: Array
    needed: Array

    @staticmethod
    def _pick(first: Array, second: Array, exponent: Array, needed: Array) -> tuple[Array, Array]:
        again = needed & ((first == jnp.inf) | (first < _UNDERFLOW_GUARD))  # sums are >= 0 or NaN
        return jnp.where(again, second, first), jnp.where(again, exponent, 0)

    def flat(self) -> tuple[Array, Array]:
        return self._pick(flat_values(self.first), flat_values(self.second), self.exponent, self.needed)

    def per_array(self) -> list[tuple[Array, Array]]:
        return [self._pick(f, s, self.exponent, self.needed) for f, s in zip(self.first, self.second)]


def _measurement_groups(
    arrays: Sequence[Array], axes: Sequence[Axes], per_array: bool, computed: bool
) -> tuple[list[int], list[int]]:
    """The indices of the arrays measured in the step and of those measured in the loop (``_xla.rare_second_pass``),
    each in the order their sums come out: by unit count (then as given), and unless ``per_array`` in the groups
    ``_xla.stacked`` reduces together. By unit count, so that the units of arrays of one count sit together, as
    ``_xla.segments`` hands values out (``paired_unit_norms``)."""
    counts = [_unit_count(x, a) for x, a in zip(arrays, axes)]
    large = set() if computed else {i for i, x in enumerate(arrays) if _xla.fastest_unscaled(x)}
    in_step = sorted(large, key=lambda i: (counts[i], i))
    in_loop = sorted((i for i in range(len(arrays)) if i not in large), key=lambda i: (counts[i], i))
    if not per_array:  # each group's sums come out together
        dims = [_reduced_dims(arrays[i].ndim, axes[i]) for i in in_loop]
        groups = _xla.stacking_groups([arrays[i] for i in in_loop], dims)
        in_loop = [in_loop[p] for group in groups for p in group]
    return in_step, in_loop


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _rescued_power_sums(
    arrays: Sequence[Array], ord: float, axes: Sequence[Axes], per_array: bool, computed: bool, as_measured: bool
) -> PowerSums:
    """Each array's power sums, read a second time on the rare step that needs it (see the module docstring).

    The second read scales every array by one power of two, the one the largest problem needs: where one sum
    overflowed and another underflowed in the same step, the small one keeps its partly underflowed sum (it is
    negligible beside the other in any norm that holds both). A custom JVP: the CPU form is a loop, which reverse
    mode cannot differentiate, and a power sum's derivative needs no rescue.

    ``per_array``: keep each array's sums in buffers of their own (what a per-leaf scale needs, see ``PowerSums``);
    otherwise one vector of all of them, which costs less to compile (one loop-carried buffer instead of two per
    array, and small arrays of one shape reduced together: ``_xla.stacked``).

    ``computed``: the arrays are computed in the step (the clamped values) rather than given to it. They all take
    the one loop, whose reductions compute them as they read: a pass in the step would write them out first.

    ``as_measured`` (not ``per_array``): the sums as measured, one vector per group of ``_measurement_groups``
    (each in its order; an empty group none), not put back in the arrays' order by a gather.
    """

    in_step, in_loop = _measurement_groups(arrays, axes, per_array, computed)

    def measuring(group: list[int]) -> Callable[[Array | float], list[Array]]:
        """The measurement of ``group``'s arrays, their sums in ``group``'s order."""
        members: Sequence[Array] = [arrays[i] for i in group]
        member_axes: Sequence[Axes] = [axes[i] for i in group]
        if not per_array:  # stacked once, outside the loop and branches that measure them; ``group`` is in
            # stacking order (``_measurement_groups``), so the sums come out in its order
            dims = [_reduced_dims(x.ndim, axes[i]) for x, i in zip(members, group)]
            members, member_axes = _xla.stacked(members, dims)

        def measure(scale: Array | float) -> list[Array]:
            if not group:
                return []
            signature = {"ord": ord, "axes": tuple(member_axes), "per_array": per_array}
            if isinstance(scale, float):
                return _measured(list(members), None, constant=scale, **signature)
            # Strongly typed: a weakly typed scale (a loop's carry may be) would be a signature of its own.
            return _measured(list(members), jax.lax.convert_element_type(scale, jnp.float32), constant=1.0, **signature)

        return measure

    def plan(first: list[Array]) -> tuple[Array, Array]:
        return _needs_rescue(flat_values(first))

    first, second, exponent, needed = _xla.rare_second_pass(
        measuring(in_step), measuring(in_loop), plan, (_RESCUE_EXPONENT, -_RESCUE_EXPONENT)
    )
    if as_measured:
        return PowerSums(first, second, exponent, needed)
    restore = functools.partial(_in_array_order, [*in_step, *in_loop], arrays, axes, per_array)
    return PowerSums(restore(first), restore(second), exponent, needed)


def _in_array_order(
    group_order: list[int], arrays: Sequence[Array], axes: Sequence[Axes], per_array: bool, sums: list[Array]
) -> list[Array]:
    """Sums measured group by group (``group_order``: the arrays' indices in that order) back in the arrays' order:
    a list of one buffer per array, or one vector of every array's sums."""
    if per_array:
        at = {index: position for position, index in enumerate(group_order)}
        return [sums[at[i]] for i in range(len(arrays))]
    vector = flat_values(sums)
    if group_order == sorted(group_order):
        return [vector]
    counts = [_unit_count(arrays[i], axes[i]) for i in group_order]
    starts = dict(zip(group_order, np.cumsum([0, *counts]).tolist()))
    ends = {i: starts[i] + n for i, n in zip(group_order, counts)}
    return [vector[np.concatenate([np.arange(starts[i], ends[i]) for i in range(len(arrays))]).astype(np.int32)]]


@_rescued_power_sums.defjvp
def _rescued_power_sums_jvp(
    ord: float,
    axes: Sequence[Axes],
    per_array: bool,
    computed: bool,
    as_measured: bool,
    primals: tuple[Sequence[Array]],
    tangents: tuple[Sequence[Array]],
) -> tuple[PowerSums, PowerSums]:
    (arrays,), (directions,) = primals, tangents
    sums = _rescued_power_sums(arrays, ord, axes, per_array, computed, as_measured)
    groups = [group for group in _measurement_groups(arrays, axes, per_array, computed) if group]

    def slopes(scale: Array) -> list[Array]:
        out = []
        for x, t, a in zip(arrays, directions, axes):
            dtype = accumulation_dtype(x.dtype)
            x, t = x.astype(dtype) * scale.astype(dtype), t.astype(dtype) * scale.astype(dtype)
            slope = jnp.sign(x) if ord == 1 else 2 * x
            out.append(jnp.sum(slope * t, axis=_reduced_dims(x.ndim, a), keepdims=True))
        if as_measured:
            return [flat_values([out[i] for i in group]) for group in groups]
        return out if per_array else [flat_values(out)]

    no_tangent: Any = np.zeros((), jax.dtypes.float0)  # integer and boolean outputs have float0 tangents
    return sums, PowerSums(slopes(jnp.float32(1)), slopes(pow2(-sums.exponent)), no_tangent, no_tangent)


def _root(power_sum: Array, ord: float) -> Array:
    if ord != 2:
        return power_sum
    positive = power_sum > 0  # zero stays zero with a finite gradient; NaN stays NaN
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, power_sum, 1.0)), power_sum)


def _sums(
    arrays: Sequence[Array],
    ord: float,
    axes: Sequence[Axes],
    per_array: bool,
    computed: bool = False,
    as_measured: bool = False,
) -> PowerSums:
    check_ord(ord)
    return _rescued_power_sums(list(arrays), ord, tuple(axes), per_array, computed, as_measured)


def _maxima(arrays: Sequence[Array], axes: Sequence[Axes]) -> list[Array]:
    """ord inf: a maximum of magnitudes is exact, nothing to rescue."""
    return [
        jnp.max(magnitude(x), axis=_reduced_dims(x.ndim, a), keepdims=True, initial=0.0) for x, a in zip(arrays, axes)
    ]


def unit_norms(arrays: Sequence[Array], ord: float, axes: Sequence[Axes]) -> list[NormParts]:
    """The norms of each array over its ``axes`` (``None``: all of it), float32, with the reduced dims kept (shape
    ``unit_shape``), so that each broadcasts against its array and is a buffer of its own. One norm per leaf is
    ``axes = [None] * n``; AGC's one norm per output unit reduces over the unit's input dims; a per-example norm over
    all dims but the first.
    """
    check_ord(ord)
    if not arrays:
        return []
    if ord == math.inf:
        return [NormParts(p, jnp.zeros(p.shape, jnp.int32)) for p in _maxima(arrays, axes)]
    return [NormParts(_root(s, ord), e) for s, e in _sums(arrays, ord, axes, True).per_array()]


def flat_unit_norms(arrays: Sequence[Array], ord: float, axes: Sequence[Axes], *, computed: bool = False) -> NormParts:
    """``unit_norms`` as one vector, array after array, each array's units in C order: what a statistic or a
    combined norm needs, at no per-array cost after the reductions. ``computed``: the arrays are computed in the
    step rather than given to it (see ``_rescued_power_sums``)."""
    check_ord(ord)
    if not arrays:
        return NormParts(jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32))
    if ord == math.inf:
        values = flat_values(_maxima(arrays, axes))
        return NormParts(values, jnp.zeros(values.shape, jnp.int32))
    sums, exponents = _sums(arrays, ord, axes, False, computed).flat()
    return NormParts(_root(sums, ord), exponents)


def paired_unit_norms(
    first: Sequence[Array], second: Sequence[Array], ord: float, axes: Sequence[Axes]
) -> tuple[NormParts, NormParts, list[int]]:
    """``flat_unit_norms`` of two lists of arrays of matching shapes (AGC's gradients and weights; array ``i`` of
    each over ``axes[i]``) from one measurement, and the order of the arrays in both: the units of array
    ``order[0]``, then of ``order[1]``, ..., so that the two vectors pair up entry by entry. The arrays come by unit
    count, the order ``_xla.segments`` hands out values in, so neither the formula nor the hand-out reorders
    anything: each vector is a few slices of the measurement, where ``flat_unit_norms`` gathers its units back in the
    arrays' order.
    """
    check_ord(ord)
    if not first:
        empty = NormParts(jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32))
        return empty, empty, []
    arrays, both_axes = [*first, *second], [*axes, *axes]
    counts = [_unit_count(x, a) for x, a in zip(arrays, both_axes)]
    measured = [i for group in _measurement_groups(arrays, both_axes, False, False) for i in group]
    if ord == math.inf:  # maxima need no rescue: taken array by array, in the same order
        values = flat_values(_maxima([arrays[i] for i in measured], [both_axes[i] for i in measured]))
        pieces = [NormParts(values, jnp.zeros(values.shape, jnp.int32))]
    else:  # each group's norms a piece of its own: one vector of all of them would be written out first
        sums = _sums(arrays, ord, both_axes, False, as_measured=True)
        pieces = [NormParts(_root(s, ord), e) for s, e in sums.per_array()]
    start = dict(zip(measured, np.cumsum([0, *(counts[i] for i in measured)]).tolist()))
    piece_starts = np.cumsum([0, *(p.mantissa.size for p in pieces)]).tolist()
    order = sorted(range(len(first)), key=lambda i: (counts[i], start[i]))

    def picked(offset: int) -> NormParts:
        runs: list[list[int]] = []  # [start, end) of each stretch of the measurement, consecutive ones merged
        for i in order:
            begin, end = start[i + offset], start[i + offset] + counts[i]
            if runs and runs[-1][1] == begin:
                runs[-1][1] = end
            else:
                runs.append([begin, end])
        cuts = [
            piece.take(slice(max(b, low) - low, min(e, high) - low))
            for b, e in runs
            for piece, low, high in zip(pieces, piece_starts, piece_starts[1:])
            if b < high and e > low
        ]
        return NormParts(*(flat_values(halves) for halves in zip(*cuts)))

    return picked(0), picked(len(first)), order


def leaf_norm_vector(leaves: Sequence[Array], ord: float) -> NormParts:
    """One norm per leaf, as one vector of each half."""
    check_ord(ord)
    return LeafNorms(leaves, ord).flat()


def combine(parts: NormParts, ord: float, axis: int | None = None) -> NormParts:
    """The norm of norms (over ``axis``; ``None``: all): the global norm from per-leaf norms, an example's norm from
    its per-leaf norms. Each norm is divided by the largest one's power of two before the powers are summed, so the
    sum neither overflows nor loses the large terms; a NaN or Inf norm makes the result non-finite."""
    check_ord(ord)
    mantissa, exponent = parts.mantissa, parts.exponent
    if mantissa.size == 0:
        shape = () if axis is None else tuple(n for d, n in enumerate(mantissa.shape) if d != axis % mantissa.ndim)
        return NormParts(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32))
    usable = jnp.isfinite(mantissa) & (mantissa > 0)
    binary = jnp.frexp(jax.lax.stop_gradient(jnp.where(usable, mantissa, 1.0)))[1] + exponent
    lowest = int(np.iinfo(np.int32).min)
    top = jnp.max(jnp.where(usable, binary, lowest), axis=axis, keepdims=True, initial=lowest)
    top = jnp.where(jnp.any(usable, axis=axis, keepdims=True), top, 0)
    relative = times_pow2(mantissa, exponent - top)  # each in [0, 1]
    if ord == math.inf:
        total = jnp.max(relative, axis=axis)
    else:
        total = _root(jnp.sum(relative if ord == 1 else relative * relative, axis=axis), ord)
    return NormParts(total, jnp.squeeze(top, axis=axis) if axis is not None else top.reshape(()))


def global_norm_parts(leaves: Sequence[Array], ord: float, *, computed: bool = False) -> NormParts:
    """One norm over every entry of every leaf (torch ``clip_grad_norm_``'s ``total_norm``). ``computed``: the
    leaves are computed in the step rather than given to it (see ``_rescued_power_sums``)."""
    check_ord(ord)
    return combine(flat_unit_norms(leaves, ord, [None] * len(leaves), computed=computed), ord)


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


# --------------------------------------------------------------------------------------------------------------------
# one measurement per step


class LeafNorms:
    """The norm of each of ``leaves`` (the very array objects measured), read once, as one vector (``flat()``): what
    a global norm, a statistic and the scales of a per-leaf clip (computed as vectors) all need.

    Measured when first asked. Handed down through an extra argument (``HANDOVER_ARG``): it is neither a pytree nor
    an array, so optax wrappers pass it through untouched (``optax.MultiSteps`` treats non-array extra arguments as
    static) and no state holds it.
    """

    def __init__(self, leaves: Sequence[Array], ord: float):
        self.leaves = tuple(leaves)
        self.ord = ord
        self._flat: NormParts | None = None
        self._index = {id(x): i for i, x in enumerate(self.leaves)}

    def flat(self) -> NormParts:
        if self._flat is None:
            self._flat = flat_unit_norms(self.leaves, self.ord, [None] * len(self.leaves))
        return self._flat

    def total(self) -> NormParts:
        """The norm over every leaf together (``optclip.global_norm``)."""
        return combine(self.flat(), self.ord)

    def subset(self, leaves: Sequence[Array], ord: float) -> LeafNorms | None:
        """The record of ``leaves`` if this one measured each of them (same object, same ord), else ``None``."""
        if ord != self.ord:
            return None
        found_at = [self._index.get(id(x)) for x in leaves]
        picks = [i for i in found_at if i is not None]
        if len(picks) != len(leaves) or any(self.leaves[i] is not x for i, x in zip(picks, leaves)):
            return None
        if picks == list(range(len(self.leaves))):
            return self
        found = LeafNorms(leaves, ord)
        if self._flat is not None:  # else the subset is measured on its own, when asked
            found._flat = self._flat.take(np.asarray(picks, np.int32))
        return found


def leaf_norms_of(leaves: Sequence[Array], ord: float, extra_args: Mapping[str, Any]) -> LeafNorms:
    """The norms of ``leaves``: from the record an enclosing transform handed down when it measured these very
    arrays, else measured here."""
    record = extra_args.get(HANDOVER_ARG)
    found = record.subset(leaves, ord) if isinstance(record, LeafNorms) else None
    return found if found is not None else LeafNorms(leaves, ord)


def handing_over(extra_args: Mapping[str, Any], record: LeafNorms) -> dict[str, Any]:
    """``extra_args`` with ``record`` for the transforms inside."""
    return {**extra_args, HANDOVER_ARG: record}
