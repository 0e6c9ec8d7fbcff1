"""What exists only to steer XLA: each item here changes how optclip's math is compiled, never what it computes.

A future XLA that no longer needs one of these can drop it here, in one place; each names the test that shows why
it exists (``tests/test_compile_structure.py``, ``tests/test_norms.py``).

* ``computed_once``: XLA's fusion copies a cheap producer (adds, selects, bit arithmetic, a slice) into every kernel
  that reads it: a scale read by a leaf's update kernels would be computed again for each of its entries, and a
  leaf's row sliced out of the scales of every leaf (computed together as vectors) would make each leaf's update
  kernels different (XLA:CPU compiles identical kernels once, different ones one by one). A division is never
  copied this way; dividing by a 1 that XLA only learns at run time (an integer division for an integer) is exact
  and ends the chain in a small kernel of its own, which the update kernels read. Tests:
  ``test_update_kernels_are_shared_by_all_leaves_of_one_shape``, ``test_the_scale_is_computed_once_not_per_entry``.
* ``segments``: a scale per leaf (or per unit) is computed for every leaf at once, as a matrix, and each leaf reads
  its own columns. XLA:CPU compiles each slice as a kernel of its own (the offsets differ), one per leaf. A variadic
  reduction, each segment summed with every other one read as -0.0, hands out many segments from one kernel; more
  segments than one kernel takes are first handed out as equal blocks (where blocks are short enough to be), so
  that every block's kernel is the same (compiled once). A model's leaves alternate shapes (kernel, bias, kernel):
  consecutive segments of one length are handed out together, so a caller puts them in order of length
  (``_norms.paired_unit_norms`` measures them in that order, which costs no reordering); a segment too long to share
  a kernel is a slice computed once, so that the kernels that read it do not differ by its offset. Tests:
  ``test_a_per_leaf_scale_takes_a_few_kernels_not_one_per_leaf``,
  ``test_the_segments_of_many_leaves_share_their_kernels``,
  ``test_update_kernels_are_shared_when_leaves_of_other_shapes_sit_between``, ``test_agc_reorders_no_units``.
* ``tied``: XLA:CPU merges identical broadcasts of one scalar to one shape, and hands its fast reduction kernels a
  broadcast with several readers as a buffer it writes out first, the size of a leaf. A scalar made to depend on one
  entry of each leaf (times 0) is that leaf's own operand, and its broadcast fuses into the leaf's reduction. Test:
  ``test_the_norm_writes_no_leaf_sized_buffer``. Only for arrays of at least ``FAST_REDUCTION_MIN_SIZE`` entries:
  XLA:CPU reduces smaller ones from a buffer of the powers it writes out first whatever the scale, and a tie would
  be one more kernel per leaf for nothing (test: ``test_small_leaves_are_reduced_from_a_written_buffer_anyway``).
* ``stacked``: XLA:CPU compiles one reduction kernel per array, and each kernel costs compile time (a
  model of 1000 small leaves compiles 1000 of them); it writes the powers of an array below
  ``FAST_REDUCTION_MIN_SIZE`` out before reducing them anyway. Small arrays of one shape are stacked (the one
  buffer written in place of their powers) and reduced in one kernel, wherever they sit in the tree (a model's
  leaves alternate shapes: kernel, bias, scale); where each is reduced whole, arrays of one size are, raveled.
  Test: ``test_small_leaves_of_one_shape_are_reduced_in_one_kernel``.
* ``rare_second_pass``: the norm rescue reads the gradients a second time only on the rare step that needs it. On
  CPU, an array large enough for XLA:CPU's fast reductions (``fastest_unscaled``) is reduced in the step, unscaled,
  and read again in a loop that runs only when asked: XLA:CPU reduces ``x * scale`` more slowly than ``x``. Smaller
  arrays, arrays computed in the step (a pass of their own would write them out) and on TPU every array take both
  passes in one loop whose body runs once more when asked, so their reductions are compiled once (each kernel
  costs compile time, and XLA:CPU writes the powers of small arrays out before reducing them anyway); a
  ``lax.cond`` would compile every reduction a second time inside its branch. On GPU a loop or
  conditional reads its predicate back to the host, a stream synchronisation per step, so there both passes are
  taken in the same read (sibling reductions of one input fuse into one kernel) and the result is selected. Tests:
  ``test_the_rescue_is_a_second_pass_of_the_same_reductions_on_cpu``, ``test_the_second_pass_stays_in_its_loop``,
  ``test_on_gpu_the_rescue_needs_no_host_round_trip``.
* ``traced_once``: ``rare_second_pass`` builds the rescue for every platform (``lax.platform_dependent`` traces
  each form), so a step calls the measurement of one group of arrays up to seven times (the forms, their loops, the
  shapes of a loop's carry), each call tracing a few operations per array again. A nested ``jax.jit`` is traced
  once per signature and lowered once per module (JAX caches both), and XLA inlines the call: the compiled
  program is the same. A guard's ``inner`` likewise: ``run_unless`` calls it in every form, and an enclosing
  guard's forms call the guard. Tests: ``test_the_rescue_traces_each_measurement_once``,
  ``test_a_guard_traces_the_transformation_inside_it_once``.
* ``run_unless``: a guard's choice between running the optimizer and holding its state. On CPU and TPU a
  ``lax.cond`` whose true branch runs it (with the branches the other way round XLA:CPU copies a donated state into
  and out of the conditional; a select over both results keeps the old and the new state alive, so the donated
  state is copied every step). On GPU a conditional reads its predicate back to the host every step, so there both
  are computed and each leaf is selected. Tests: ``test_a_donated_state_is_updated_in_place_not_copied``,
  ``test_guards_lowered_for_gpu_have_no_control_flow``, ``test_the_select_form_gives_the_bits_of_the_conditional``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp

Array = jax.Array
T = TypeVar("T")


def runtime_one(count: Array) -> Array:
    """A float32 1 that XLA cannot fold: ``count`` (a step counter, never negative) is only known at run time."""
    return (jnp.asarray(count) >= 0).astype(jnp.float32)


def computed_once(x: Array, one: Array) -> Array:
    """``x`` unchanged, computed in a kernel of its own that every reader shares (see the module docstring)."""
    return jax.lax.div(x, jnp.broadcast_to(one.astype(x.dtype), jnp.shape(x)))


# How many segments one kernel of ``segments`` hands out: one kernel for hundreds compiles more slowly than a few.
# It reads its whole block once per segment, so a block also holds at most BLOCK_ROW_ENTRIES entries of each row.
SEGMENTS_PER_KERNEL = 64
BLOCK_ROW_ENTRIES = 4096


def segments(matrix: Array, lengths: Sequence[int], one: Array) -> list[Array]:
    """``matrix[:, s : s + n]`` for consecutive segments of the given ``lengths``, each a buffer of its own, from
    kernels of ``SEGMENTS_PER_KERNEL`` segments of one length (fewer for segments longer than
    ``BLOCK_ROW_ENTRIES / SEGMENTS_PER_KERNEL``; see the module docstring). ``one``: ``runtime_one``. Bit for bit but
    for denormals, which are flushed to zero where the platform flushes them in arithmetic (XLA:CPU does).

    Consecutive segments of one length are handed out together: where lengths alternate (a kernel's units, a bias's,
    the next kernel's), each run of one length takes kernels of its own, so callers give them in order of length."""
    matrix = computed_once(matrix, one)
    found: list[Array] = []
    start = 0
    for length, run in itertools.groupby(lengths):
        count = len(list(run))
        found += _run_segments(matrix[:, start : start + count * length], count, length, one)
        start += count * length
    return found


def _run_segments(matrix: Array, count: int, length: int, one: Array) -> list[Array]:
    """``count`` segments of ``length`` columns of ``matrix`` (exactly its columns), as ``segments``. More than one
    kernel's worth are first handed out as equal blocks (the last one padded), themselves segments: every block's
    kernel is then the same, and XLA:CPU compiles it once. Segments too long to be handed out together are slices,
    each computed once (a small kernel of its own), so that the kernels reading them do not differ by its offset."""
    per_kernel = max(1, min(SEGMENTS_PER_KERNEL, BLOCK_ROW_ENTRIES // max(length, 1)))
    if count == 1 or per_kernel == 1:
        return [computed_once(matrix[:, i * length : (i + 1) * length], one) for i in range(count)]
    if count <= per_kernel:
        return _last_axis_entries(jnp.moveaxis(matrix.reshape(matrix.shape[0], count, length), 1, -1))
    width = per_kernel * length
    if BLOCK_ROW_ENTRIES // width < 2:
        starts = range(0, count, per_kernel)
        parts = [(matrix[:, i * length : i * length + width], min(per_kernel, count - i)) for i in starts]
    else:
        blocks = -(-count // per_kernel)
        padded = jnp.pad(matrix, ((0, 0), (0, blocks * width - count * length)))
        parts = [(block, per_kernel) for block in _run_segments(padded, blocks, width, one)]
    return [segment for block, taken in parts for segment in _run_segments(block, taken, length, one)][:count]


def _last_axis_entries(x: Array) -> list[Array]:
    """``[x[..., j] for j]`` from one variadic reduction over the last axis: entry ``j`` summed with every other one
    read as -0.0, which adds nothing (not even to a zero)."""
    if x.shape[-1] == 1:
        return [x[..., 0]]
    position = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    negative_zero = jnp.array(-0.0, x.dtype)
    everywhere = jnp.broadcast_to(negative_zero, x.shape)
    alone = tuple(jax.lax.select(position == j, x, everywhere) for j in range(x.shape[-1]))
    zeros = (negative_zero,) * len(alone)
    return list(jax.lax.reduce(alone, zeros, lambda a, b: tuple(map(jax.lax.add, a, b)), (x.ndim - 1,)))


# The smallest array XLA:CPU reduces with its fast kernels (found by compiling, see ``tied``'s tests).
FAST_REDUCTION_MIN_SIZE = 4096


def tied(scalar: Array, x: Array) -> Array:
    """``scalar`` unchanged, as an operand of ``x``'s kernels alone (see the module docstring)."""
    if x.size < FAST_REDUCTION_MIN_SIZE:
        return scalar
    # In lax primitives: this runs once per large array per trace, and a jnp operation is a nested jit to look up.
    lax = jax.lax
    first = lax.stop_gradient(lax.reshape(lax.slice(x, (0,) * x.ndim, (1,) * x.ndim), ()))
    finite = lax.select(lax.is_finite(first), first, lax.full((), 0, first.dtype))
    return lax.add(scalar, lax.mul(lax.convert_element_type(finite, scalar.dtype), lax.full((), 0, scalar.dtype)))


def stacking_groups(arrays: Sequence[Array], dims: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """The indices of ``arrays`` that ``stacked`` reduces together, group by group in the order their reductions
    come out: those below ``FAST_REDUCTION_MIN_SIZE`` entries by (shape, dtype, ``dims``), or by (size, dtype) where
    ``dims`` is all of it; every other array alone."""
    groups: dict[object, list[int]] = {}
    for i, (x, d) in enumerate(zip(arrays, dims)):
        whole = len(d) == x.ndim  # then only the size matters: the stack is of raveled arrays
        key = (x.dtype, (x.size,) if whole else (x.shape, d)) if x.size < FAST_REDUCTION_MIN_SIZE else i
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def stacked(arrays: Sequence[Array], dims: Sequence[tuple[int, ...]]) -> tuple[list[Array], list[tuple[int, ...]]]:
    """``arrays`` stacked as ``stacking_groups`` says, wherever they sit, in its order of groups; and the dims to
    reduce each over (see the module docstring)."""
    found: list[Array] = []
    found_dims: list[tuple[int, ...]] = []
    for group in stacking_groups(arrays, dims):
        x, reduced = arrays[group[0]], dims[group[0]]
        if len(group) == 1:
            found.append(x)
            found_dims.append(reduced)
        elif any(arrays[i].shape != x.shape for i in group):  # arrays of one size, reduced whole
            found.append(jnp.stack([arrays[i].reshape(-1) for i in group]))
            found_dims.append((1,))
        else:
            found.append(jnp.stack([arrays[i] for i in group]))
            found_dims.append(tuple(d + 1 for d in reduced))
    return found, found_dims


def traced_once(fn: Callable[..., T], static_argnames: Sequence[str]) -> Callable[..., T]:
    """``fn`` as a nested ``jax.jit`` (``static_argnames`` static): traced once per signature, lowered once per
    module, inlined by XLA (see the module docstring)."""
    return jax.jit(fn, static_argnames=static_argnames)


def fastest_unscaled(x: Array) -> bool:
    """Whether XLA:CPU reduces ``x`` fastest in the step itself, unscaled (see ``rare_second_pass``)."""
    return x.size >= FAST_REDUCTION_MIN_SIZE


def rare_second_pass(
    in_step: Callable[[Array | float], list[Array]],
    in_loop: Callable[[Array | float], list[Array]],
    plan: Callable[[list[Array]], tuple[Array, Array]],
    candidates: tuple[int, int],
) -> tuple[list[Array], list[Array], Array, Array]:
    """``(first, second, exponent, needed)`` of two groups of arrays, each list ``in_step``'s then ``in_loop``'s:
    ``first = measure(1.0)``, ``(needed, exponent) = plan(first)``, and where ``needed``, ``second =
    measure(2.0**-exponent)`` (``exponent`` is one of ``candidates``; else ``second`` is unspecified). Each
    ``measure`` takes the power of two to scale its input by (an empty group gives ``[]``).

    On CPU ``in_step``'s first pass is taken in the step, unscaled, and its second in a loop that runs only when
    needed: XLA:CPU's fused reduction of ``x * scale`` is slower than of ``x`` (each operation per entry costs),
    and the loop's reductions are compiled once more. ``in_loop``'s arrays (small ones, whose reductions cost
    compile time per kernel: ``fastest_unscaled``; and arrays computed in the step, which the loop's reductions
    compute as they read) take both passes in one loop whose body is their one ``measure``, run a second time only
    when needed: compiled once, at the price of the scaling. On TPU every array takes the one loop. Elsewhere (GPU)
    ``measure`` at 1 and at both candidates, each array read once for all three (XLA fuses sibling reductions of one
    input into one kernel), so that no predicate leaves the device.
    """
    Carry = tuple[Array, Array, Array, Array, list[Array], list[Array]]  # passes, needed, exponent, scale, sums

    def in_loops(
        in_step: Callable[[Array | float], list[Array]], in_loop: Callable[[Array | float], list[Array]]
    ) -> tuple[list[Array], list[Array], Array, Array]:
        direct = in_step(1.0)

        def again(carry: Carry) -> Array:
            taken, needed = carry[0], carry[1]
            return (taken == 0) | ((taken == 1) & needed)

        def take(carry: Carry) -> Carry:
            taken, needed, exponent, scale, first, _ = carry
            latest = in_loop(scale)
            first = [jnp.where(taken == 0, new, old) for new, old in zip(latest, first)]
            planned_needed, planned_exponent = plan(direct + first)
            # The scale of the second pass, computed once here rather than in every kernel that reads the arrays.
            next_scale = 2.0 ** -planned_exponent.astype(jnp.float32)
            keep = taken > 0
            return (
                taken + 1,
                jnp.where(keep, needed, planned_needed),
                jnp.where(keep, exponent, planned_exponent),
                jnp.where(keep, scale, next_scale),
                first,
                latest,
            )

        shapes = jax.eval_shape(in_loop, 1.0)
        if shapes:
            empty = [jnp.zeros(s.shape, s.dtype) for s in shapes]
            start = (jnp.int32(0), jnp.bool_(False), jnp.int32(0), jnp.float32(1), empty, empty)
            _, needed, exponent, _, first, second = jax.lax.while_loop(again, take, start)
        else:
            (needed, exponent), first, second = plan(direct), [], []
        if not direct:
            return first, second, exponent, needed

        def again_direct(carry: tuple[Array, Array, list[Array]]) -> Array:
            once: Array = needed & (carry[0] == 0)
            return once

        def take_direct(carry: tuple[Array, Array, list[Array]]) -> tuple[Array, Array, list[Array]]:
            # The body's scale comes from the carry and changes: XLA moves the reductions of a loop invariant out
            # of the loop, where they would run on every step (test: test_the_second_pass_stays_in_its_loop).
            taken, scale, _ = carry
            return taken + 1, jnp.where(taken == 0, scale, 1.0), in_step(scale)

        start_direct = (jnp.int32(0), 2.0 ** -exponent.astype(jnp.float32), direct)
        _, _, direct_second = jax.lax.while_loop(again_direct, take_direct, start_direct)
        return direct + first, direct_second + second, exponent, needed

    def in_one_read() -> tuple[list[Array], list[Array], Array, Array]:
        # The measurements the CPU form traced already (``traced_once``): ``in_step`` unscaled at the number 1, as the
        # step's first pass; every other scale an array, as the loops' run-time scale.
        high_scale, low_scale = (jnp.float32(2.0**-e) for e in candidates)
        first = [*in_step(1.0), *in_loop(jnp.float32(1.0))]
        high, low = ([*in_step(scale), *in_loop(scale)] for scale in (high_scale, low_scale))
        needed, exponent = plan(first)
        return first, [jnp.where(exponent == candidates[0], h, lo) for h, lo in zip(high, low)], exponent, needed

    def nothing(scale: Array | float) -> list[Array]:
        return []

    def every(scale: Array | float) -> list[Array]:
        return [*in_step(scale), *in_loop(scale)]

    chosen: tuple[list[Array], list[Array], Array, Array] = jax.lax.platform_dependent(
        cpu=lambda: in_loops(in_step, in_loop), tpu=lambda: in_loops(nothing, every), default=in_one_read
    )
    return chosen


def run_unless(skip: Array, run: Callable[[], T], hold: Callable[[], T]) -> T:
    """``hold()`` where ``skip``, else ``run()``; both give trees of the same types (see the module docstring)."""

    # lax.cond, tree.map and platform_dependent are annotated to return Any: each result has the branches' type.
    def branching() -> T:
        taken: T = jax.lax.cond(~skip, run, hold)
        return taken

    def selecting() -> T:
        ran, held = run(), hold()
        selected: T = jax.tree.map(lambda r, h: jax.lax.select(jnp.broadcast_to(skip, r.shape), h, r), ran, held)
        return selected

    chosen: T = jax.lax.platform_dependent(cpu=branching, tpu=branching, default=selecting)
    return chosen
