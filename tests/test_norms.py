"""Safe norms (optclip/_norms.py): exact against float64, float32 accumulation, overflow and underflow rescue."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxprs import eqns
from _lowering import lowered_text, runtime_control_flow
from _reference import INF, as64, norm64

import optclip
from optclip import _norms, _xla

ORDS = (1, 2, INF)
F32_MAX = float(np.finfo(np.float32).max)


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(), (3,), (2, 3), (2, 1, 3), (1, 2, 2, 3)]
    return {
        f"x{i}": jnp.asarray(rng.normal(size=s) * 10.0 ** rng.integers(-3, 4), jnp.float32)
        for i, s in enumerate(shapes)
    }


def _parts64(parts: _norms.NormParts) -> np.ndarray:
    """A norm that may exceed float32's range, read exactly in float64."""
    return as64(parts.mantissa) * 2.0 ** np.asarray(parts.exponent, np.float64)


def _leaf_norm_parts(leaves, ord):
    return _norms.leaf_norm_vector(leaves, ord)


@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_matches_float64(ord):
    tree = _tree()
    expected = norm64([as64(x) for x in jax.tree.leaves(tree)], ord)
    np.testing.assert_allclose(float(optclip.global_norm(tree, ord)), expected, rtol=1e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_leaf_and_unit_norms_match_float64(ord):
    leaves = jax.tree.leaves(_tree(1))
    per_leaf = _leaf_norm_parts(leaves, ord)
    np.testing.assert_allclose(_parts64(per_leaf), [norm64([as64(x)], ord) for x in leaves], rtol=1e-6)
    kernel = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3, 5)), jnp.float32)
    (unit,) = _norms.unit_norms([kernel], ord, [(0, 1)])
    assert unit.mantissa.shape == (1, 1, 5)  # reduced dims kept, so the norm broadcasts against its array
    np.testing.assert_allclose(_parts64(unit), norm64([as64(kernel)], ord, axis=(0, 1))[None, None], rtol=1e-6)


def test_empty_tree_has_norm_zero():
    assert float(optclip.global_norm({})) == 0.0
    assert _leaf_norm_parts([], 2).mantissa.shape == (0,)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_norms_accumulate_in_float32(dtype):
    # 1e3 is exact in both; its square 1e6 overflows f16 (max 65504), so an f16 accumulation reads inf.
    x = jnp.full((64,), 1e3, dtype)
    if dtype == jnp.float16:
        assert float(jnp.sqrt(jnp.sum(x * x))) == np.inf
    np.testing.assert_allclose(float(optclip.global_norm({"x": x})), 8e3, rtol=1e-6)
    np.testing.assert_allclose(_parts64(_leaf_norm_parts([x], 2)), [8e3], rtol=1e-6)
    # Every reduction over the gradient reads it as float32, on the common path and in the rescue alike.
    for ord in ORDS:
        jaxpr = jax.make_jaxpr(lambda t, ord=ord: optclip.global_norm(t, ord))({"x": x}).jaxpr
        reductions = [e for e in eqns(jaxpr) if e.primitive.name.startswith("reduce_") and e.invars[0].aval.size > 1]
        assert reductions, ord
        assert all(e.invars[0].aval.dtype == jnp.float32 for e in reductions), ord


def test_bfloat16_sum_of_many_entries_is_exact():
    # 4096 ones: a bf16 running sum stops at 256 (its 8-bit significand); float32 holds 4096 exactly.
    x = jnp.ones((4096,), jnp.bfloat16)
    assert float(optclip.global_norm(x)) == 64.0
    assert float(optclip.global_norm(x, 1)) == 4096.0


@pytest.mark.parametrize("ord", ORDS)
def test_huge_float32_entries_give_the_exact_norm(ord):
    leaves = [jnp.array([3e38, -1e38], jnp.float32), jnp.array([[2.5e38], [F32_MAX]], jnp.float32)]
    expected = norm64([as64(x) for x in leaves], ord)
    assert expected > F32_MAX or ord == INF  # beyond float32 range: only the (mantissa, exponent) form holds it
    np.testing.assert_allclose(_parts64(_norms.global_norm_parts(leaves, ord)), expected, rtol=1e-6)
    np.testing.assert_allclose(
        _parts64(_leaf_norm_parts(leaves, ord)), [norm64([as64(x)], ord) for x in leaves], rtol=1e-6
    )
    kernel = jnp.array([[3e38, 1.0], [3e38, -2.0]], jnp.float32)
    (unit,) = _norms.unit_norms([kernel], ord, [(0,)])
    np.testing.assert_allclose(_parts64(unit)[0], norm64([as64(kernel)], ord, axis=0), rtol=1e-6)


def test_huge_norm_within_range_is_a_finite_float():
    value = optclip.global_norm({"w": jnp.array([3e38, 1e38], jnp.float32)})
    assert jnp.isfinite(value)
    np.testing.assert_allclose(float(value), np.hypot(3e38, 1e38), rtol=1e-6)


@pytest.mark.parametrize("magnitude", [1e-17, 1e-25, 1e-30, 1e-37])
@pytest.mark.parametrize("ord", ORDS)
def test_tiny_float32_entries_give_the_exact_global_norm(magnitude, ord):
    # 1e-17: squares partly underflow (a rescue on a tiny sum); 1e-25 and below: every square is 0 in float32.
    x = jnp.asarray(np.array([1.0, -0.5, 0.25]) * magnitude, jnp.float32)
    np.testing.assert_allclose(float(optclip.global_norm({"x": x}, ord)), norm64([as64(x)], ord), rtol=1e-6)


def test_tiny_float32_entries_give_the_exact_leaf_norm_when_the_sum_is_not_zero():
    x = jnp.asarray(np.array([1.0, -0.5, 0.25]) * 1e-17, jnp.float32)  # squares ~1e-34: a partial underflow
    np.testing.assert_allclose(_parts64(_leaf_norm_parts([x], 2)), [norm64([as64(x)])], rtol=1e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_gradient_of_norm_is_finite_at_zero(ord):
    grad = jax.jit(jax.grad(lambda x: optclip.global_norm({"x": x}, ord)))(jnp.zeros(3))
    assert bool(jnp.all(jnp.isfinite(grad)))
    if ord == 2:  # and the usual x / ||x|| elsewhere
        x = jnp.array([3.0, 0.0, 4.0])
        np.testing.assert_allclose(jax.grad(lambda x: optclip.global_norm(x))(x), x / 5.0, rtol=1e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_non_finite_entries_propagate(ord):
    assert np.isnan(float(optclip.global_norm({"a": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2)}, ord)))
    assert float(optclip.global_norm({"a": jnp.array([1.0, -jnp.inf]), "b": jnp.ones(2)}, ord)) == np.inf


@pytest.mark.parametrize("ord", (1, 2))
def test_the_rescue_is_a_second_pass_of_the_same_reductions_on_cpu(ord):
    # Small arrays are reduced once, inside a loop body that runs a second time only on the rare step: no copy of
    # the reductions sits in a conditional branch, which made the rescue cost about as much to compile as the rest.
    tree = {"a": jnp.ones((4, 3)), "b": jnp.ones((5, 1)), "c": jnp.ones((2, 2, 2))}
    jaxpr = jax.make_jaxpr(lambda t: optclip.global_norm(t, ord))(tree).jaxpr
    loops = [e for e in eqns(jaxpr) if e.primitive.name == "while"]
    assert len(loops) == 2  # the CPU form's and the TPU form's (platform_dependent keeps both in the jaxpr)
    for loop in loops:
        in_loop = [e for e in eqns(loop.params["body_jaxpr"].jaxpr) if e.primitive.name == "reduce_sum"]
        assert sum(e.invars[0].aval.ndim > 1 for e in in_loop) == len(tree)  # one reduction per array, in the body
    # Beside the loops, only the GPU form reads the arrays: three sibling reductions each (one read on GPU).
    everywhere = [e for e in eqns(jaxpr) if e.primitive.name == "reduce_sum" and e.invars[0].aval.ndim > 1]
    assert len(everywhere) == 2 * len(tree) + 3 * len(tree)
    flow = runtime_control_flow(lowered_text(lambda t: optclip.global_norm(t, ord), tree, platform="cpu"))
    assert [kind.split()[0] for kind in flow] == ["while"]


@pytest.mark.parametrize("ord", (1, 2))
def test_on_gpu_the_rescue_needs_no_host_round_trip(ord):
    # XLA:GPU reads the predicate of a loop or conditional back to the host, a stream synchronisation every step:
    # on GPU the common path must have neither (DESIGN.md, "Numerics").
    tree = {"a": jnp.ones((4, 3)), "b": jnp.ones((5, 1))}
    assert runtime_control_flow(lowered_text(lambda t: optclip.global_norm(t, ord), tree, platform="cuda")) == []


@pytest.mark.parametrize("ord", (1, 2))
def test_the_one_read_form_computes_what_the_loop_computes(monkeypatch, ord):
    # The GPU form cannot run here; run it on CPU in place of the loop and compare on every kind of input.
    inputs = [
        [jnp.array([3.0, 4.0]), jnp.ones((2, 2))],
        [jnp.array([3e38, 3e38]), jnp.array([1e-30])],
        [jnp.array([1e-30, 2e-30]), jnp.zeros(3)],
        [jnp.zeros(2), jnp.zeros(3)],
        [jnp.array([jnp.nan, 1.0]), jnp.ones(2)],
    ]
    on_cpu = [_parts64(_norms.global_norm_parts(leaves, ord)) for leaves in inputs]
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *a, default, **_: default(*a))
    one_read = [_parts64(_norms.global_norm_parts(leaves, ord)) for leaves in inputs]
    np.testing.assert_allclose(one_read, on_cpu, rtol=1e-6)
    np.testing.assert_allclose(on_cpu[1], norm64([np.array([3e38, 3e38]), np.array([1e-30])], ord), rtol=1e-6)


def _in_step(x):
    """``x``'s entries followed by zeros (the same norms) in an array large enough that its first pass is taken in
    the step rather than in the rescue loop (``_xla.fastest_unscaled``)."""
    size = _xla.FAST_REDUCTION_MIN_SIZE
    padded = jnp.zeros(size, x.dtype).at[: x.size].set(jnp.ravel(x)).reshape(64, size // 64)
    assert _xla.fastest_unscaled(padded)
    return padded


@pytest.mark.parametrize("where", ["in_loop", "in_step"])
@pytest.mark.parametrize("ord", (1, 2))
def test_rescue_runs_only_when_a_sum_overflows_or_underflows(monkeypatch, ord, where):
    # A small array takes both passes in the rescue loop; a large one its first pass in the step and its second in
    # a loop of its own. Either way it is read once unless a sum overflowed or underflowed.
    place = _in_step if where == "in_step" else (lambda x: x)
    passes = []
    power_sums = _norms._power_sums

    def counted(arrays, ord, axes, scale):
        # Fires each time the pass executes, with the exponent it reads at.
        jax.debug.callback(lambda s: passes.append(-int(np.log2(s))), scale)
        return power_sums(arrays, ord, axes, scale)

    monkeypatch.setattr(_norms, "_power_sums", counted)
    # The measurement is a nested jit (``_xla.traced_once``): a trace of it cached by another test would keep the
    # uncounted passes.
    jax.clear_caches()
    norm = jax.jit(lambda t: _norms.global_norm_parts(t, ord).value())
    np.testing.assert_allclose(float(norm([place(jnp.array([3.0, 4.0]))])), 7.0 if ord == 1 else 5.0, rtol=1e-6)
    jax.effects_barrier()
    assert passes == [0]
    passes.clear()
    assert np.isfinite(_parts64(_norms.global_norm_parts([place(jnp.array([3e38, 3e38]))], ord)))
    jax.effects_barrier()
    assert passes == [0, 80]


_MIXED = {
    "normal": [np.array([3.0, -4.0, 0.5]), np.array([[1e-3, 2.0]]), np.array([7.0])],
    "huge": [np.array([3e38, -1e38]), np.array([[2.5e38], [F32_MAX]]), np.array([1.0, 2.0])],
    "tiny": [np.array([1.0, -0.5, 0.25]) * 1e-17, np.array([2.0, 1.0]) * 1e-17, np.array([3.0]) * 1e-17],
    "vanishing": [np.array([1.0, -0.5, 0.25]) * 1e-30, np.array([2.0, 1.0]) * 1e-30, np.array([3.0]) * 1e-30],
    "non-finite": [np.array([np.inf, 1.0]), np.array([2.0, 1.0]), np.array([3.0])],
}


@pytest.mark.parametrize("large", [(0,), (1,), (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("case", list(_MIXED))
@pytest.mark.parametrize("ord", ORDS)
def test_arrays_measured_in_the_step_keep_every_numeric_promise(ord, case, large):
    # Large arrays take their first pass in the step and their rescue in a loop of their own; small ones both
    # passes in the rescue loop. Either way, and mixed in any order, every norm is the float64 one.
    values = [jnp.asarray(v, jnp.float32) for v in _MIXED[case]]
    leaves = [_in_step(v) if i in large else v for i, v in enumerate(values)]
    with np.errstate(over="ignore", invalid="ignore"):
        expected = norm64([as64(x) for x in values], ord)
        expected_leaves = [norm64([as64(x)], ord) for x in values]
    np.testing.assert_allclose(_parts64(_norms.global_norm_parts(leaves, ord)), expected, rtol=1e-6)
    if case != "vanishing" or len(large) == len(values):  # a leaf that vanished beside others reads 0 (documented)
        np.testing.assert_allclose(_parts64(_leaf_norm_parts(leaves, ord)), expected_leaves, rtol=1e-6)
    per_array = [_parts64(p).item() for p in _norms.unit_norms(leaves, ord, [None] * len(leaves))]
    np.testing.assert_allclose(per_array, _parts64(_leaf_norm_parts(leaves, ord)), rtol=1e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_unit_norms_of_a_large_kernel_beside_small_ones(ord):
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(64, 128)).astype(np.float32)
    kernel[:, 5] *= 1e38 / np.abs(kernel[:, 5]).max()  # one unit's sum of squares overflows float32
    small = rng.normal(size=(3, 4)).astype(np.float32)
    arrays = [jnp.asarray(small), jnp.asarray(kernel), jnp.asarray(small * 2)]
    axes = [(0,), (0,), (0,)]
    flat = _parts64(_norms.flat_unit_norms(arrays, ord, axes))
    expected = np.concatenate([norm64([a.astype(np.float64)], ord, axis=0) for a in (small, kernel, small * 2)])
    np.testing.assert_allclose(flat, expected, rtol=1e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_paired_unit_norms_pair_the_units_of_two_lists(ord):
    # AGC's gradients and weights, measured together: large kernels of several unit counts (one unit overflows),
    # small ones reduced stacked, vectors between them, bf16 gradients beside float32 weights. Both vectors hold
    # the units of the arrays in the order returned, each array's in C order; gradients flow as through
    # ``flat_unit_norms``.
    rng = np.random.default_rng(4)
    shapes = [(64, 128), (8,), (300, 20), (8,), (16, 16), (4, 64, 32), (128, 64), (3, 2), (16, 16)]
    axes = [(0,), None, (0,), None, (0,), (0, 1), (0,), (0,), (0,)]
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads[0][:, 5] *= 1e38 / np.abs(grads[0][:, 5]).max()
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads_in = [jnp.asarray(g, jnp.bfloat16) if g.ndim == 1 else jnp.asarray(g) for g in grads]
    units, unit_weights, order = _norms.paired_unit_norms(grads_in, [jnp.asarray(w) for w in weights], ord, axes)

    def expected(arrays):
        return np.concatenate([norm64([as64(arrays[i])], ord, axis=axes[i]).ravel() for i in order])

    assert sorted(order) == list(range(len(shapes)))
    np.testing.assert_allclose(_parts64(units), expected(grads_in), rtol=1e-6)
    np.testing.assert_allclose(_parts64(unit_weights), expected(weights), rtol=1e-6)

    counts = [int(np.prod(_norms.unit_shape(s, a))) for s, a in zip(shapes, axes)]
    starts = np.cumsum([0, *counts])
    in_order = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order])
    small = [jnp.asarray(g / 1e30) for g in grads]
    weighting = jnp.arange(in_order.size, dtype=jnp.float32)

    def paired(g):
        return jnp.sum(_norms.paired_unit_norms(g, small, ord, axes)[0].value() * weighting)

    def flat(g):
        return jnp.sum(_norms.flat_unit_norms(g, ord, axes).value()[in_order] * weighting)

    for a, b in zip(jax.grad(paired)(small), jax.grad(flat)(small)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("ord", (1, 2))
def test_the_second_pass_stays_in_its_loop(ord):
    # XLA moves loop-invariant work out of a loop: were the second pass's scale invariant, its reductions would run
    # on every step beside the first pass's (``_xla.rare_second_pass`` changes the scale in the loop's body).
    tree = {"a": jnp.ones((128, 64)), "b": jnp.ones((64, 128)), "c": jnp.ones((3, 2))}
    hlo = jax.jit(lambda t: optclip.global_norm(t, ord)).lower(tree).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    assert hlo.count(" while(") == 2 and " while(" in entry  # the large arrays' second pass, the small arrays' loop
    in_loop = re.compile(r'op_name="[^"]*while/body/[^"]*reduce_sum"')
    assert in_loop.search(hlo)
    assert not in_loop.search(entry)


def test_times_pow2_is_exact_where_one_power_would_not_be():
    # 2**-200 is not a float32 (it flushes to 0), yet 2**100 * 2**-200 = 2**-100 is.
    assert float(_norms.times_pow2(jnp.float32(2.0**100), jnp.int32(-200))) == 2.0**-100
    assert float(_norms.times_pow2(jnp.float32(0.75), jnp.int32(128))) == 0.75 * 2.0**128
    parts = _norms.NormParts(jnp.float32(0.5), jnp.int32(3))
    assert float(parts.value()) == 4.0


def test_accumulation_dtype_is_at_least_float32():
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        assert _norms.accumulation_dtype(dtype) == jnp.float32
    assert _norms.accumulation_dtype(np.float64) == np.float64


@pytest.mark.parametrize("ord", [0, 3, -1, 2.5, "fro", None, True])
def test_unknown_ord_is_refused(ord):
    with pytest.raises(ValueError, match="ord must be 1, 2 or inf"):
        optclip.global_norm({"x": jnp.ones(2)}, ord)
