"""Compile structure: every leaf of one shape gets the same update kernels, so XLA compiles them once.

XLA:CPU compiles identical kernels once. A clip whose per-leaf scale is sliced out of a vector inside the update
kernels makes every leaf's kernels different, and compile time then grows several-fold with the leaf count
(clip_by_leaf_norm at 1000 leaves: 9x optax's, see the benchmarks issue). These tests read the optimized HLO of a
jitted chain(clip, adam) step and check that the kernels producing leaf-shaped arrays do not multiply with leaves.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jaxprs import eqns

import optclip
from optclip import _norms, _xla

SHAPE = (8, 8)


def _normalised_computations(hlo: str) -> dict[str, str]:
    """Each computation's signature and body with names, metadata and configs removed, by computation name."""
    found = {}
    for name, signature, body in re.findall(r"\n(%[\w.\-]+) (\([^\n]*\)) -> [^\n]*\{\n(.*?)\n\}", hlo, re.S):
        text = signature + body
        text = re.sub(r"(metadata|backend_config)=\{.*?\}(?=[,\n]|$)", "", text, flags=re.M)
        text = re.sub(r"%?[\w.\-]+(?=:)", "p", text)
        found[name] = re.sub(r"%[\w.\-]+", "%v", text)
    return found


def _compiled_step(tx: optax.GradientTransformation, params: dict) -> jax.stages.Compiled:
    """The jitted training step (update, then apply) with donated parameters and state, compiled."""

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()


def _leaf_kernel_bodies(
    tx: optax.GradientTransformation, num_leaves: int, bias: bool = False, shape: tuple[int, ...] = SHAPE
) -> set[str]:
    """The distinct kernels that write a leaf of ``shape`` in a step over ``num_leaves`` such leaves (each with a
    bias of ``shape[-1:]`` beside it where ``bias``)."""
    leaf = {"bias": jnp.zeros(shape[-1:]), "kernel": jnp.zeros(shape)} if bias else jnp.zeros(shape)
    hlo = _compiled_step(tx, {f"w{i:02d}": leaf for i in range(num_leaves)}).as_text()
    computations = _normalised_computations(hlo)
    entry = hlo[hlo.index("\nENTRY") :]
    leaf_shaped = rf"= f32\[{','.join(map(str, shape))}\]\{{[^}}]*\}} fusion\([^\n]*calls=(%[\w.\-]+)"
    return {computations[name] for name in re.findall(leaf_shaped, entry)}


@pytest.mark.parametrize(
    "make",
    [
        lambda: optclip.clip_by_global_norm(1.0),
        lambda: optclip.clip_by_leaf_norm(1.0),
        lambda: optclip.clip_by_leaf_norm(optclip.ema()),
        lambda: optclip.adagc(),
        lambda: optclip.adaptive_grad_clip(0.1),
        lambda: optclip.clip_by_value(1.0),
    ],
    ids=["global", "leaf", "leaf_ema", "adagc", "agc", "value"],
)
def test_update_kernels_are_shared_by_all_leaves_of_one_shape(make):
    few, many = (_leaf_kernel_bodies(optax.chain(make(), optax.adam(1e-3)), n) for n in (3, 6))
    assert few, "no leaf-shaped kernel found: the HLO text format changed, update the pattern"
    assert len(many) == len(few)


@pytest.mark.parametrize("shape", [SHAPE, (2, 4100)], ids=["short", "long"])
def test_update_kernels_are_shared_when_leaves_of_other_shapes_sit_between(shape):
    # A model's leaves alternate shapes (kernel, bias, kernel, ...), so AGC's leaves of one number of units do not
    # sit side by side. ``_norms.paired_unit_norms`` puts them together and ``_xla.segments`` hands them out
    # together; handed out leaf by leaf, each leaf's rows were a slice at its own offset, fused into its update
    # kernels: one distinct kernel per leaf, each compiled on its own. Rows too long to share a hand-out kernel
    # (4100 units) are slices computed once, for the same reason.
    tx = optax.chain(optclip.adaptive_grad_clip(0.1), optax.adam(1e-3))
    few, many = (_leaf_kernel_bodies(tx, n, bias=True, shape=shape) for n in (3, 6))
    assert few, "no leaf-shaped kernel found: the HLO text format changed, update the pattern"
    assert len(many) == len(few)


@pytest.mark.parametrize("stats", ["basic", "full"])
def test_agc_reorders_no_units(stats):
    # Why ``_norms.paired_unit_norms``: a model's leaves alternate unit counts and small ones are reduced stacked,
    # so AGC's units come out of the measurement in an order of their own. Put back in leaf order (a gather of 2
    # entries per unit: gradients and weights) and then in order of length for the hand-out (a gather of 3), they
    # held vectors of units in the step's scratch (transformer12: 22% of the parameters' bytes, 17% without them).
    params = {}
    for i in range(3):
        params |= {
            f"b{i}/qkv": jnp.ones((64, 192)),
            f"b{i}/qkv_bias": jnp.ones((192,)),
            f"b{i}/out": jnp.ones((64, 64)),
            f"b{i}/mlp": jnp.ones((64, 256)),
            f"b{i}/mlp_out": jnp.ones((256, 64)),
            f"b{i}/scale": jnp.ones((64,)),
            f"b{i}/small": jnp.ones((8, 32)),
        }
    tx = optax.chain(optclip.adaptive_grad_clip(0.1, stats=stats), optax.adam(1e-3))
    hlo = _compiled_step(tx, params).as_text()
    assert " reduce(" in hlo and not re.search(r" gather\(", hlo)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optclip.clip_by_leaf_norm(1.0),
        lambda: optclip.clip_by_leaf_norm(optclip.ema()),
        lambda: optclip.adagc(),
        lambda: optclip.adaptive_grad_clip(0.1),
    ],
    ids=["leaf", "leaf_ema", "adagc", "agc"],
)
def test_a_per_leaf_scale_takes_a_few_kernels_not_one_per_leaf(make):
    # Why ``_xla.segments``: each leaf reading its scale as a slice of the vector of every leaf's scale made one
    # kernel per leaf (the slices' offsets differ), each compiled on its own: 12 more leaves added 12 kernels.
    def distinct_kernels(num_leaves: int) -> int:
        params = {f"w{i:02d}": jnp.zeros(SHAPE) for i in range(num_leaves)}
        hlo = _compiled_step(optax.chain(make(), optax.adam(1e-3)), params).as_text()
        return len(set(_normalised_computations(hlo).values()))

    assert distinct_kernels(24) - distinct_kernels(12) <= 2


def test_the_segments_of_many_leaves_share_their_kernels():
    # Why ``_xla.segments`` hands out equal blocks first: each block's kernel read its block as a slice at its own
    # offset, one distinct kernel per 64 segments; handed out as buffers, the blocks' kernels are one.
    def distinct_kernels(count: int) -> int:
        matrix = jax.ShapeDtypeStruct((3, count), jnp.float32)
        hlo = jax.jit(lambda m: _xla.segments(m, [1] * count, jnp.float32(1))).lower(matrix).compile().as_text()
        return len(set(_normalised_computations(hlo).values()))

    assert distinct_kernels(1000) <= distinct_kernels(130) + 1


@pytest.mark.parametrize("jit", [False, True])
def test_the_segments_are_handed_out_bit_for_bit(jit):
    # Every value survives the sum with -0.0 unchanged: signed zeros, infinities, NaN; across kernels and lengths,
    # through the blocks of a run longer than one kernel's (150 segments of 1), and blocks too long to be handed out
    # together (3 of 1500: slices of 2 and 1).
    # (Not a denormal, which XLA:CPU flushes to zero in any arithmetic; a scale's multipliers are normal numbers.)
    special = np.array([-0.0, 0.0, np.inf, -np.inf, np.nan, 1.2e-38, -3e38, 1.0], np.float32)
    lengths = (1, 1, 3, 3, 3, 0, 2, *[1] * 150, 5, 3000, 3000, 1500, 1500, 1500)
    matrix = np.arange(3 * sum(lengths), dtype=np.float32).reshape(3, sum(lengths))
    matrix[:, : len(special)] = special
    matrix[:, 13 + 60 : 13 + 60 + len(special)] = special  # across the first two blocks of the 150
    matrix[:, 13 + 150 - len(special) : 13 + 150] = special  # the last, padded block
    hand_out = jax.jit(_xla.segments, static_argnums=1) if jit else _xla.segments
    found = hand_out(jnp.asarray(matrix), lengths, jnp.float32(1))
    starts = np.cumsum([0, *lengths])
    assert [x.shape for x in found] == [(3, n) for n in lengths]
    for segment, start, n in zip(found, starts, lengths):
        np.testing.assert_array_equal(np.asarray(segment).view(np.int32), matrix[:, start : start + n].view(np.int32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: optclip.clip_by_global_norm(1.0),
        lambda: optclip.clip_by_leaf_norm(1.0),
        lambda: optclip.clip_by_value(1.0),
    ],
    ids=["global", "leaf", "value"],
)
def test_the_norm_writes_no_leaf_sized_buffer(make):
    # Large same-shape leaves take XLA:CPU's fast reduction kernels; a scale shared by all of them was written out
    # as one leaf-sized buffer first (optclip/_xla.py, ``tied``). One leaf here is 4 MB; allow 1% of one.
    temp = _temp_bytes(make(), (1000, 1000))
    assert temp <= 0.01 * 4 * 1000 * 1000, temp


def test_the_clamped_values_are_not_written_out_again_for_their_norm():
    # clip_by_value(stats="full") measures the norm of the clamped values, arrays computed in the step: they take
    # the rescue loop (``computed`` in optclip/_norms.py), as a pass in the step would write them out once more
    # (3 parameter sizes of scratch here instead of 2).
    param_bytes = 3 * 4 * 1000 * 1000
    assert _temp_bytes(optclip.clip_by_value(1.0, stats="full"), (1000, 1000)) < 2.5 * param_bytes


def _temp_bytes(tx: optax.GradientTransformation, shape: tuple[int, ...]) -> int:
    params = {f"w{i}": jnp.zeros(shape) for i in range(3)}
    return _compiled_step(optax.chain(tx, optax.adam(1e-3)), params).memory_analysis().temp_size_in_bytes


def test_small_leaves_are_reduced_from_a_written_buffer_anyway():
    # Why ``_xla.tied`` skips arrays below FAST_REDUCTION_MIN_SIZE entries: XLA:CPU writes out the squares of a
    # smaller leaf before reducing them, as it does for optax's own norm, so there is nothing to save; from that
    # size on it reduces without a leaf-sized buffer. If XLA moves the boundary, move the constant.
    below, at = _xla.FAST_REDUCTION_MIN_SIZE - 96, _xla.FAST_REDUCTION_MIN_SIZE
    for tx in (optax.clip_by_global_norm(1.0), optclip.clip_by_global_norm(1.0)):
        assert _temp_bytes(tx, (below,)) >= 3 * 4 * below  # each leaf's squares
    assert _temp_bytes(optclip.clip_by_global_norm(1.0), (at,)) <= 0.05 * 3 * 4 * at


@pytest.mark.parametrize(
    "make",
    [
        lambda: optclip.clip_by_global_norm(1.0),
        lambda: optclip.clip_by_leaf_norm(1.0),
        lambda: optclip.clip_by_value(1.0),
        lambda: optclip.skip_nonfinite(optax.identity()),
    ],
    ids=["global", "leaf", "value", "skip_nonfinite"],
)
@pytest.mark.parametrize("between", [(), ((64,), (5,))], ids=["alone", "others_between"])
def test_small_leaves_of_one_shape_are_reduced_in_one_kernel(make, between):
    # Why ``_xla.stacked``: XLA:CPU compiles a reduction kernel per array it reduces, so a model of many
    # small leaves paid compile time per leaf; stacked, same-shape small leaves are reduced together, and the
    # number of reductions in the step does not grow with the number of leaves. A model's leaves alternate shapes
    # (kernel, bias, scale): leaves of one size are stacked wherever they sit, whatever their shapes.
    def reductions(num_leaves: int) -> int:
        params = {f"w{i:02d}": jnp.zeros(SHAPE) for i in range(num_leaves)}
        params |= {f"w{i:02d}{k}": jnp.zeros(shape) for i in range(num_leaves) for k, shape in enumerate(between)}
        return len(re.findall(r" reduce\(", _compiled_step(optax.chain(make(), optax.adam(1e-3)), params).as_text()))

    assert reductions(6) == reductions(3)


def test_the_rescue_traces_each_measurement_once(monkeypatch):
    # Why ``_xla.traced_once``: every platform's form of the rescue is traced, and each form measures the same
    # arrays, some of them several times (in the step, in a loop, for the loop's carry): a few operations per
    # array each time. Odd shapes, so that no other test has traced these measurements already.
    traced = []
    power_sums = _norms._power_sums

    def recording(arrays, ord, axes, scale):
        traced.append((tuple(x.shape for x in arrays), scale if isinstance(scale, float) else "at run time"))
        return power_sums(arrays, ord, axes, scale)

    monkeypatch.setattr(_norms, "_power_sums", recording)
    jax.jit(optclip.global_norm).lower({"large": jnp.ones((4099,)), "small": jnp.ones((7, 3))})
    # The large array: unscaled in the step, scaled in the loop; the small one: in the loop alone. The GPU form's
    # three scales reuse these traces.
    assert sorted(traced, key=str) == sorted(
        [(((4099,),), 1.0), (((4099,),), "at run time"), (((7, 3),), "at run time")], key=str
    ), traced


def test_a_guard_traces_the_transformation_inside_it_once():
    # Why a guard runs ``inner`` through ``_xla.traced_once``: ``run_unless`` builds every platform's form (a
    # conditional, a select over both results), each calling ``inner``. Replayed into each form, every operation
    # of the chain inside was traced again per form, and again in each form of an enclosing guard (two copies of
    # it here). A nested jit is one jaxpr that every form calls. ``cosh`` marks the inner chain's operations.
    marked = optax.chain(optax.scale_by_adam(), optax.stateless(lambda u, p: jax.tree.map(jnp.cosh, u)))
    tx = optclip.skip_on_spike(optclip.skip_nonfinite(marked))
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    step = jax.make_jaxpr(lambda g, s: tx.update(g, s, params))(params, tx.init(params))
    traced = {id(eqn) for eqn in eqns(step.jaxpr) if eqn.primitive.name == "cosh"}
    assert len(traced) == len(params)  # one equation per leaf, however many forms call it


@pytest.mark.parametrize(
    "make",
    [
        lambda: optclip.clip_by_global_norm(1.0),
        lambda: optclip.clip_by_leaf_norm(1.0),
        lambda: optclip.adagc(),
        lambda: optclip.adaptive_grad_clip(0.1),
    ],
    ids=["global", "leaf", "adagc", "agc"],
)
def test_the_scale_is_computed_once_not_per_entry(make):
    # XLA copies the scale's cheap producers (the comparison with the threshold, the quotient, the exponent's bit
    # arithmetic) into every kernel that reads it, to run once per entry of each leaf: the scale's multipliers
    # are computed in kernels of their own (optclip/_xla.py, ``computed_once``). With SGD the leaf-shaped kernels do
    # nothing but scale: no comparison, no division.
    bodies = _leaf_kernel_bodies(optax.chain(make(), optax.sgd(1.0)), 3)
    assert bodies, "no leaf-shaped kernel found: the HLO text format changed, update the pattern"
    for body in bodies:
        assert " compare(" not in body and " divide(" not in body, body
