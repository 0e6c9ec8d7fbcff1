"""Property tests: the invariants of DESIGN.md over random pytrees, magnitudes, dtypes and thresholds.

Tree structures come from a fixed pool (1 to 20 leaves, ranks 0 to 4, f32/bf16/f16 and a mixed tree) drawn once
with a seeded RNG; hypothesis draws which structure, every value, each leaf's magnitude (1e-30 to 1e30 for f32 and
bf16, 1e-4 to 1e4 for f16: each dtype's finite range) and the threshold. Thresholds are traced arguments and the
clips are jitted once per structure, so the XLA compile (about a second a tree on CPU) is paid a bounded number
of times instead of once per example.

Tolerances. Float32: the clipped norm is at most ``c * (1 + 1e-5)``, as the issue asks; the scale is exact up to
float32 rounding of the norm and of the product. bf16/f16: the result is rounded to the dtype, so each entry may
grow by the unit roundoff ``u`` (2**-9 for bf16, 2**-12 for f16) and, below the smallest normal, by half the
subnormal spacing: the clipped norm is at most ``c * (1 + 1e-5) * (1 + u) + sqrt(n) * subnormal / 2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _reference import INF, agc64, as64, clip_global64, clip_leaf64, norm64, unit_axes
from hypothesis import given
from hypothesis import strategies as st

import optclip

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
EXPONENTS = {F32: (-30.0, 30.0), BF16: (-30.0, 30.0), F16: (-4.0, 4.0)}
# The per-leaf 2-norm of a leaf whose every square underflows reads 0 (optclip/_norms.py, module docstring):
# leaf-scope trees in ord 2 keep each leaf's largest entry above 1e-18 (> 2**-63).
LEAF_ORD2_MIN_EXPONENT = -18.0


def _random_structures() -> dict[str, list[tuple[tuple[int, ...], object]]]:
    rng = np.random.default_rng(20250101)

    def shapes(n):
        ranks = [r % 5 for r in range(n)]  # every rank 0..4 once the tree has five leaves
        return [tuple(int(d) for d in rng.integers(1, 4, size=r)) for r in rng.permutation(ranks)]

    return {
        "1-leaf-f32": [((), F32)],
        "20-leaves-f32": [(s, F32) for s in shapes(20)],
        "5-leaves-bf16": [(s, BF16) for s in shapes(5)],
        "4-leaves-f16": [(s, F16) for s in shapes(4)],
        "3-leaves-mixed": [((2, 3), F32), ((3,), BF16), ((2, 1, 2), F16)],
    }


STRUCTURES = _random_structures()


@st.composite
def trees(draw, min_exponent: float = -np.inf, structures=tuple(STRUCTURES), huge: bool = False):
    """``{"x0": leaf, ...}``: every leaf has one entry of its drawn magnitude, the rest up to 1e3 below it, some 0."""
    spec = STRUCTURES[draw(st.sampled_from(structures))]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tree = {}
    for i, (shape, dtype) in enumerate(spec):
        low, high = EXPONENTS[dtype]
        if huge:  # float32 up to 3e38, where the sum of squares overflows
            low, high = 30.0, float(np.log10(3e38))
        exponent = draw(st.floats(max(low, min_exponent), high))
        size = int(np.prod(shape))
        magnitude = 10.0 ** (exponent + rng.uniform(-3.0, 0.0, size))
        magnitude[0] = 10.0**exponent
        values = rng.choice([-1.0, 1.0], size) * magnitude * (rng.uniform(size=size) > 0.1).astype(float)
        values[0] = magnitude[0] * rng.choice([-1.0, 1.0])
        tree[f"x{i:02d}"] = jnp.asarray(values.reshape(shape), dtype)
    return tree


factors = st.floats(-2.0, 0.0).map(lambda e: 10.0**e)  # the threshold relative to the norm: 0.01 to 1


def _rounding(tree):
    """The worst unit roundoff and half-subnormal spacing over the tree's dtypes (float32 for the norm itself)."""
    finfos = [jnp.finfo(x.dtype) for x in jax.tree.leaves(tree)]
    low_precision = [f for f in finfos if f.dtype != np.float32]
    u = max((float(f.eps) / 2 for f in low_precision), default=0.0)
    half_subnormal = max((float(f.smallest_subnormal) / 2 for f in low_precision), default=0.0)
    tiny = max(float(f.tiny) for f in finfos)
    return u, half_subnormal, tiny


def _norm_bound(threshold, tree, size):
    u, half_subnormal, _ = _rounding(tree)
    return threshold * (1 + 1e-5) * (1 + u) + np.sqrt(size) * half_subnormal


def _assert_close_entrywise(out, ref, tree, rtol=1e-5, roundings=1):
    """``out`` is ``ref`` rounded ``roundings`` times to the dtype: relative ``rtol + roundings * u``, absolute up to
    the smallest normal (an entry flushed to zero or rounded as a subnormal)."""
    u, _, tiny = _rounding(tree)
    for o, r in zip(jax.tree.leaves(out), ref):
        o = as64(o)
        assert np.all(np.isfinite(o))
        assert np.all(np.abs(o - r) <= (rtol + roundings * u) * np.abs(r) + tiny), (o, r)
        assert np.all((np.sign(o) == np.sign(r)) | (o == 0))  # direction kept, entry by entry


def _assert_unchanged(out, tree, which=None):
    for i, (o, g) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(tree))):
        if which is None or which[i]:
            assert o.dtype == g.dtype and o.shape == g.shape
            np.testing.assert_array_equal(np.asarray(o), np.asarray(g))


def _global(tree, threshold, ord):
    tx = optclip.clip_by_global_norm(threshold, ord=ord)
    return tx.update(tree, tx.init(tree))[0]


def _leaf(tree, threshold, ord):
    tx = optclip.clip_by_leaf_norm(threshold, ord=ord)
    return tx.update(tree, tx.init(tree))[0]


def _agc(grads, params, clipping):
    tx = optclip.adaptive_grad_clip(clipping)
    return tx.update(grads, tx.init(params), params)[0]


def _value(tree, low, high):
    tx = optclip.clip_by_value(high, min_value=low)
    return tx.update(tree, tx.init(tree))[0]


_global_jit = jax.jit(_global, static_argnames="ord")
_leaf_jit = jax.jit(_leaf, static_argnames="ord")
_agc_jit = jax.jit(_agc)
_value_jit = jax.jit(_value)


def _every_clip(tree, threshold):
    """Every transform at one threshold, through the jitted clips above (their compiled signatures are reused)."""
    threshold = np.float32(threshold)
    return [
        _global_jit(tree, threshold, 2),
        _leaf_jit(tree, threshold, 2),
        _agc_jit(tree, tree, threshold),
        _value_jit(tree, -threshold, threshold),
    ]


@given(trees(), factors, st.sampled_from([1, 2, INF]))
def test_global_norm_clip_invariants(tree, factor, ord):
    leaves = [as64(x) for x in jax.tree.leaves(tree)]
    norm = norm64(leaves, ord)
    threshold = np.float32(factor * norm)
    out = _global_jit(tree, threshold, ord)
    size = sum(x.size for x in leaves)
    assert norm64([as64(x) for x in jax.tree.leaves(out)], ord) <= _norm_bound(float(threshold), tree, size)
    _assert_close_entrywise(out, clip_global64(leaves, float(threshold), ord), tree)
    again = _global_jit(out, threshold, ord)  # idempotent, up to one rounding of an already clipped norm
    _assert_close_entrywise(again, [as64(x) for x in jax.tree.leaves(out)], out, rtol=2e-5, roundings=2)
    _assert_unchanged(_global_jit(tree, np.float32(1.001 * norm), ord), tree)  # below the threshold: untouched


@given(st.data(), factors, st.sampled_from([1, 2, INF]))
def test_leaf_norm_clip_invariants(data, factor, ord):
    tree = data.draw(trees(min_exponent=LEAF_ORD2_MIN_EXPONENT if ord == 2 else -np.inf))
    leaves = [as64(x) for x in jax.tree.leaves(tree)]
    norms = np.array([norm64([x], ord) for x in leaves])
    threshold = np.float32(factor * np.median(norms))  # some leaves above it, some below
    out = _leaf_jit(tree, threshold, ord)
    for o, x in zip(jax.tree.leaves(out), leaves):
        assert norm64([as64(o)], ord) <= _norm_bound(float(threshold), tree, x.size)
    _assert_close_entrywise(out, clip_leaf64(leaves, float(threshold), ord), tree)
    _assert_unchanged(out, tree, which=norms * 1.001 <= threshold)
    again = _leaf_jit(out, threshold, ord)
    _assert_close_entrywise(again, [as64(x) for x in jax.tree.leaves(out)], out, rtol=2e-5, roundings=2)


def _unit_norms64(x):
    return np.sqrt(np.sum(x * x, axis=unit_axes(x.ndim)))


@given(st.data(), st.floats(-3.0, 1.0).map(lambda e: 10.0**e))
def test_adaptive_grad_clip_invariants(data, clipping):
    grads = data.draw(trees())
    # Parameters of the same structure and dtypes, of moderate magnitude (a unit's threshold is relative to them).
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    params = jax.tree.map(lambda g: jnp.asarray(rng.normal(size=g.shape) * 10.0 ** rng.uniform(-4, 2), g.dtype), grads)
    clipping = np.float32(clipping)
    out = _agc_jit(grads, params, clipping)
    g64, p64 = [as64(x) for x in jax.tree.leaves(grads)], [as64(x) for x in jax.tree.leaves(params)]
    _assert_close_entrywise(out, agc64(g64, p64, float(clipping)), grads)
    for o, p in zip(jax.tree.leaves(out), p64):
        axis = unit_axes(p.ndim)
        unit_threshold = float(clipping) * np.maximum(_unit_norms64(p), 1e-3)
        size = p.size if axis is None else int(np.prod([p.shape[a] for a in axis]))
        assert np.all(_unit_norms64(as64(o)) <= _norm_bound(unit_threshold, grads, size))
    again = _agc_jit(out, params, clipping)
    _assert_close_entrywise(again, [as64(x) for x in jax.tree.leaves(out)], out, rtol=2e-5, roundings=2)
    largest_ratio = max(np.max(_unit_norms64(g) / np.maximum(_unit_norms64(p), 1e-3)) for g, p in zip(g64, p64))
    _assert_unchanged(_agc_jit(grads, params, np.float32(1.001 * largest_ratio)), grads)


@given(trees(), factors, st.booleans())
def test_clip_by_value_invariants(tree, factor, symmetric):
    leaves = [as64(x) for x in jax.tree.leaves(tree)]
    peak = max(np.max(np.abs(x)) for x in leaves)
    high = np.float32(factor * peak)
    low = np.float32(-high if symmetric else -0.5 * high)
    out = _value_jit(tree, low, high)
    for o, x, g in zip(jax.tree.leaves(out), leaves, jax.tree.leaves(tree)):
        # The bounds are rounded to the leaf's dtype, as in jnp.clip on a leaf of that dtype.
        lo, hi = as64(jnp.asarray(low).astype(g.dtype)), as64(jnp.asarray(high).astype(g.dtype))
        assert o.dtype == g.dtype and o.shape == g.shape
        np.testing.assert_array_equal(as64(o), np.clip(x, lo, hi))
    _assert_unchanged(_value_jit(out, low, high), out)  # idempotent exactly
    _assert_unchanged(_value_jit(tree, np.float32(-peak), np.float32(peak)), tree)


@given(st.sampled_from(sorted(STRUCTURES)))
def test_zero_gradients_give_zero_updates(name):
    zeros = {f"x{i:02d}": jnp.zeros(shape, dtype) for i, (shape, dtype) in enumerate(STRUCTURES[name])}
    for out in [*_every_clip(zeros, 0.0), *_every_clip(zeros, 1.0)]:
        for o, z in zip(jax.tree.leaves(out), jax.tree.leaves(zeros)):
            assert o.dtype == z.dtype and o.shape == z.shape
            np.testing.assert_array_equal(np.asarray(o, np.float32), 0.0)


@given(trees(), factors)
def test_finite_gradients_give_finite_updates(tree, factor):
    threshold = np.float32(factor * norm64([as64(x) for x in jax.tree.leaves(tree)]))
    for out in _every_clip(tree, threshold):
        assert all(bool(jnp.all(jnp.isfinite(o))) for o in jax.tree.leaves(out))


@given(trees(structures=("1-leaf-f32", "20-leaves-f32"), huge=True), factors, st.sampled_from([1, 2]))
def test_huge_float32_gradients_are_clipped_exactly(tree, factor, ord):
    # Entries up to 3e38: the sum of squares (or of magnitudes) overflows float32, the norm may exceed its range.
    leaves = [as64(x) for x in jax.tree.leaves(tree)]
    threshold = np.float32(min(factor * norm64(leaves, ord), 1e38))
    out = _global_jit(tree, threshold, ord)
    _assert_close_entrywise(out, clip_global64(leaves, float(threshold), ord), tree)
    assert norm64([as64(x) for x in jax.tree.leaves(out)], ord) <= float(threshold) * (1 + 1e-5)
    leaf_threshold = np.float32(min(factor * np.median([norm64([x], ord) for x in leaves]), 1e38))
    _assert_close_entrywise(_leaf_jit(tree, leaf_threshold, ord), clip_leaf64(leaves, float(leaf_threshold), ord), tree)
