"""The four clipping transforms (optclip/_clipping.py): each numeric promise of the issue, one test each."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import INF, agc64, as64, clip_global64, clip_leaf64, expected64, factories, leaves64

import optclip

FACTORIES = factories()
KINDS = sorted(FACTORIES)
NORM_KINDS = ["clip_by_global_norm", "clip_by_leaf_norm"]
F32_TINY = float(np.finfo(np.float32).tiny)  # results below it may be flushed to 0 (XLA on CPU flushes denormals)


def _update(kind, grads, params, threshold, **kwargs):
    tx = FACTORIES[kind](threshold, **kwargs)
    return tx.update(grads, tx.init(params), params)


_JITTED = {}


def _apply(kind, grads, threshold, params=None, jit=True, **kwargs):
    """One update of a fresh transform; AGC gets ``params`` (ones of the gradients' shapes by default).

    Jitted with a numeric threshold as a traced argument, cached per transform and options: tests that share a
    tree's shapes share one XLA compile (an eager first call costs several times more).
    """
    if params is None:
        params = jax.tree.map(lambda g: jnp.ones(jnp.shape(g), jnp.result_type(g)), grads)
    if not jit:
        updates, state = _update(kind, grads, params, threshold, **kwargs)
    elif callable(threshold):
        updates, state = jax.jit(lambda g, p: _update(kind, g, p, threshold, **kwargs))(grads, params)
    else:
        key = (kind, *sorted(kwargs.items(), key=lambda item: item[0]))
        if key not in _JITTED:
            _JITTED[key] = jax.jit(lambda g, p, c: _update(kind, g, p, c, **kwargs))
        updates, state = _JITTED[key](grads, params, jnp.float32(threshold))
    return updates, optclip.stats(state)


def _grads():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)) * 5, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        "s": jnp.float32(2.5),
    }


def _assert_tree_close(tree, expected, rtol=1e-6, atol=0.0):
    for got, want in zip(jax.tree.leaves(tree), expected):
        np.testing.assert_allclose(as64(got), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_its_formula_with_and_without_jit(kind):
    grads, threshold = _grads(), 0.3
    eager, eager_stats = _apply(kind, grads, threshold, jit=False)
    jitted, jitted_stats = _apply(kind, grads, threshold)
    _assert_tree_close(eager, expected64(kind, grads, threshold))
    _assert_tree_close(jitted, expected64(kind, grads, threshold))
    assert eager_stats.keys() == jitted_stats.keys()
    for key in eager_stats:
        np.testing.assert_allclose(eager_stats[key], jitted_stats[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("threshold", [0.0, 1e-30, 1.0, np.inf])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_gradients_give_zero_updates(kind, threshold):
    zeros = jax.tree.map(jnp.zeros_like, _grads())
    updates, stats = _apply(kind, zeros, threshold, params=_grads())
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, 0.0)
    assert all(bool(jnp.isfinite(v)) for k, v in stats.items() if not k.endswith("threshold"))


@pytest.mark.parametrize("threshold", [0.0, 1.0])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_through_the_clip_at_zero_is_finite(kind, threshold):
    params = _grads()

    def loss(g):
        updates, _ = _apply(kind, g, threshold, params=params)
        return sum(jnp.sum(u * u + u) for u in jax.tree.leaves(updates))

    grad = jax.jit(jax.grad(loss))(jax.tree.map(jnp.zeros_like, params))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))


def test_the_gradient_through_a_zero_threshold_clip_at_zero_is_zero():
    # optax.clip_by_global_norm(0.0) gives NaN here (0 / 0 in its scale, optax 0.2.8); optclip's scale is 0 for a
    # zero threshold and the norm's safe root keeps the chain rule finite. The expected value is optclip's alone, so
    # the test does not depend on what optax does.
    tx = optclip.clip_by_global_norm(0.0)

    def loss(g):
        return jnp.sum(tx.update({"w": g}, tx.init({"w": g}))[0]["w"])

    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(jnp.zeros(3))), 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_threshold_zeroes_the_update(kind):
    updates, stats = _apply(kind, _grads(), 0.0)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, 0.0)
    assert float(stats[f"{kind}/clipped"]) > 0


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["clip_by_global_norm", "clip_by_leaf_norm", "adaptive_grad_clip"])
def test_half_precision_gradients_are_measured_in_float32(kind, dtype):
    # 1e3 squares to 1e6, beyond f16's 65504: only a float32 accumulation sees the norm 1e3 * sqrt(n).
    grads = {"w": jnp.full((4, 4), 1e3, dtype)}
    params = {"w": jnp.ones((4, 4), dtype)}
    updates, stats = _apply(kind, grads, 0.5, params=params)
    assert updates["w"].dtype == dtype
    expected = expected64(kind, grads, 0.5, params)[0]
    np.testing.assert_allclose(as64(updates["w"]), expected, rtol=2.0**-8)
    if kind != "adaptive_grad_clip":
        np.testing.assert_allclose(float(stats[f"{kind}/norm"]), 4e3, rtol=1e-6)


HUGE = {"a": jnp.array([3e38, -2e38, 1.0], jnp.float32), "b": jnp.array([[3e38], [1e-3]], jnp.float32)}


@pytest.mark.parametrize("ord", [1, 2, INF])
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_huge_float32_gradients_are_clipped_to_the_threshold(kind, ord):
    updates, stats = _apply(kind, HUGE, 2.0, ord=ord)
    leaves = leaves64(HUGE)
    expected = (clip_global64 if kind == "clip_by_global_norm" else clip_leaf64)(leaves, 2.0, ord)
    _assert_tree_close(updates, expected, rtol=1e-6, atol=F32_TINY)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(np.max(np.abs(as64(updates["a"])))) > 0  # never zeroed
    assert float(stats[f"{kind}/norm_after"]) == 2.0


def test_huge_float32_gradients_are_clipped_unit_wise():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 1))}
    updates, _ = _apply("adaptive_grad_clip", HUGE, 0.01, params=params)
    _assert_tree_close(updates, expected64("adaptive_grad_clip", HUGE, 0.01, params), rtol=1e-6, atol=F32_TINY)
    assert float(np.max(np.abs(as64(updates["a"])))) > 0


def test_small_entries_of_a_large_gradient_survive_the_scale():
    # A representable scale (0.1) must be applied as one factor: splitting it as 2**-35 * 3.4e9 flushed 1e-28 to 0.
    grads = {"big": jnp.array([1e21], jnp.float32), "small": jnp.array([1e-28, -3e-29], jnp.float32)}
    updates, _ = _apply("clip_by_global_norm", grads, 1e20)
    np.testing.assert_allclose(as64(updates["small"]), [1e-29, -3e-30], rtol=1e-6)


def test_global_norm_clip_honours_a_tiny_threshold_when_every_square_underflows():
    grads = {"w": jnp.full((3,), 1e-25, jnp.float32)}  # squares 1e-50: 0 in float32
    updates, stats = _apply("clip_by_global_norm", grads, 1e-30)
    np.testing.assert_allclose(as64(updates["w"]), np.full(3, 1e-30 / np.sqrt(3)), rtol=1e-6)
    assert float(stats["clip_by_global_norm/clipped"]) == 1.0


def test_leaf_whose_squares_all_underflow_follows_the_documented_rule():
    # optclip/_norms.py: such a leaf reads as norm 0: unchanged by a larger threshold, zeroed by threshold 0.
    grads = {"tiny": jnp.full((3,), 1e-25, jnp.float32), "w": jnp.array([3.0, 4.0])}
    updates, _ = _apply("clip_by_leaf_norm", grads, 1.0)
    np.testing.assert_array_equal(updates["tiny"], grads["tiny"])
    np.testing.assert_allclose(updates["w"], [0.6, 0.8], rtol=1e-6)
    zeroed, _ = _apply("clip_by_leaf_norm", grads, 0.0)
    np.testing.assert_array_equal(zeroed["tiny"], 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_shape_and_direction_are_kept(kind):
    dtypes = {"b": jnp.bfloat16, "s": jnp.float16, "w": jnp.float32}
    grads = {key: x.astype(dtypes[key]) for key, x in _grads().items()} | {
        "h": jnp.linspace(-2, 3, 6, dtype=jnp.float16)
    }
    updates, _ = _apply(kind, grads, 0.3)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        assert got.dtype == want.dtype and got.shape == want.shape
        eps = float(jnp.finfo(want.dtype).eps)
        got, want = as64(got), as64(want)
        assert np.all((np.sign(got) == np.sign(want)) | (got == 0))
        if kind in NORM_KINDS:  # these scale each leaf as a whole (AGC: each unit), so its direction stays
            cosine = np.sum(got * want) / (np.linalg.norm(got) * np.linalg.norm(want))
            assert cosine > 1 - 4 * eps


@pytest.mark.parametrize("kind", KINDS)
def test_none_leaves_pass_through(kind):
    grads = {"frozen": None, **_grads()}
    updates, _ = _apply(kind, grads, 0.3, params=_grads() | {"frozen": jnp.ones(2)})
    assert updates["frozen"] is None
    _assert_tree_close(updates, expected64(kind, _grads(), 0.3, _grads()))  # None counts nowhere, not in the norm


@pytest.mark.parametrize("kind", KINDS)
def test_masked_nodes_pass_through(kind):
    params = _grads()
    tx = optax.masked(FACTORIES[kind](0.3), {"w": True, "b": False, "s": True})
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    np.testing.assert_array_equal(updates["b"], params["b"])
    masked_in = {"w": params["w"], "s": params["s"]}
    _assert_tree_close({k: updates[k] for k in masked_in}, expected64(kind, masked_in, 0.3, masked_in))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
@pytest.mark.parametrize("kind", KINDS)
def test_integer_and_bool_leaves_are_refused_by_path(kind, dtype):
    grads = {"layer": {"step": jnp.zeros(3, dtype)}, "w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"\['layer'\]\['step'\].*" + jnp.dtype(dtype).name):
        _apply(kind, grads, 1.0, params={"layer": {"step": jnp.ones(3)}, "w": jnp.ones(3)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["clip_by_global_norm", "adaptive_grad_clip"])
def test_non_finite_gradients_pass_through_norm_clips(kind, bad):
    grads = {"w": jnp.array([bad, 3.0, 4.0, 1.0]), "b": jnp.array([30.0, 40.0])}  # each leaf one unit for AGC
    updates, stats = _apply(kind, grads, 0.1)
    np.testing.assert_array_equal(updates["w"], grads["w"])  # the unit / whole gradient holding it: unchanged
    assert not np.isfinite(float(stats[f"{kind}/norm"]))
    if kind == "adaptive_grad_clip":  # the other units are still clipped
        np.testing.assert_allclose(as64(updates["b"]), agc64([as64(grads["b"])], [np.ones(2)], 0.1)[0], rtol=1e-6)
    else:
        np.testing.assert_array_equal(updates["b"], grads["b"])
        assert float(stats[f"{kind}/clipped"]) == 0.0


def test_non_finite_leaf_passes_through_leaf_clip_and_others_are_clipped():
    grads = {"w": jnp.array([np.nan, 3.0]), "b": jnp.array([3.0, 4.0])}
    updates, stats = _apply("clip_by_leaf_norm", grads, 1.0)
    np.testing.assert_array_equal(updates["w"], grads["w"])
    np.testing.assert_allclose(updates["b"], [0.6, 0.8], rtol=1e-6)
    assert float(stats["clip_by_leaf_norm/clipped"]) == 0.5


def test_clip_by_value_maps_infinities_to_the_bounds_and_keeps_nan():
    updates, _ = _apply("clip_by_value", {"w": jnp.array([np.inf, -np.inf, np.nan, 0.5])}, 1.0)
    np.testing.assert_array_equal(updates["w"], [1.0, -1.0, np.nan, 0.5])


def test_clip_by_value_asymmetric_bounds():
    values = np.array([-3.0, -0.5, 0.2, 4.0], np.float32)
    updates, _ = _apply("clip_by_value", {"w": jnp.asarray(values)}, 1.0, min_value=-0.25)
    np.testing.assert_array_equal(updates["w"], np.clip(values, np.float32(-0.25), np.float32(1.0)))


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_thresholds_follow_the_step_count(kind):
    schedule = optax.linear_schedule(0.1, 0.4, transition_steps=3)
    tx = FACTORIES[kind](schedule)
    grads = _grads()
    params = jax.tree.map(jnp.ones_like, grads)
    state, update = tx.init(params), jax.jit(tx.update)
    for step in range(5):
        updates, state = update(grads, state, params)
        threshold = float(schedule(step))
        np.testing.assert_allclose(float(optclip.stats(state)[f"{kind}/threshold"]), threshold, rtol=1e-6)
        _assert_tree_close(updates, expected64(kind, grads, threshold), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_negative_run_time_threshold_acts_as_zero(kind):
    updates, stats = _apply(kind, _grads(), lambda count: -1.0 + 0.0 * count)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, 0.0)
    assert float(stats[f"{kind}/threshold"]) == 0.0


def test_agc_default_units_by_rank():
    rng = np.random.default_rng(3)
    shapes = [(), (5,), (4, 3), (2, 4, 3), (3, 3, 2, 4), (2, 2, 3, 2, 4)]  # ranks 0 to 5
    grads = {f"rank{len(s)}": jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes}
    params = {f"rank{len(s)}": jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for s in shapes}
    updates, _ = _apply("adaptive_grad_clip", grads, 0.05, params=params)
    _assert_tree_close(updates, expected64("adaptive_grad_clip", grads, 0.05, params), rtol=1e-6)


@pytest.mark.parametrize("axis", [1, (1,), lambda shape: (1,)])
def test_agc_axis_picks_the_reduced_dims(axis):
    rng = np.random.default_rng(7)
    grads, params = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)) * 0.1
    updates, _ = _apply("adaptive_grad_clip", {"w": jnp.asarray(grads, jnp.float32)}, 0.05,
                        params={"w": jnp.asarray(params, jnp.float32)}, axis=axis)  # fmt: skip
    # Units are rows now: the transpose of the default (in, out) layout.
    expected = agc64([grads.T], [params.T], 0.05)[0].T
    np.testing.assert_allclose(as64(updates["w"]), expected, rtol=1e-6)


def test_agc_rank_six_needs_an_axis():
    grads = {"w": jnp.ones((1, 1, 1, 1, 1, 2))}
    with pytest.raises(ValueError, match="axis="):
        _apply("adaptive_grad_clip", grads, 0.1)
    updates, _ = _apply("adaptive_grad_clip", grads, 0.1, axis=(0, 1, 2, 3, 4))
    assert updates["w"].shape == (1, 1, 1, 1, 1, 2)


def test_agc_needs_params():
    tx = optclip.adaptive_grad_clip(0.1)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_tree(kind):
    updates, stats = _apply(kind, {}, 1.0, params={})
    assert updates == {}
    assert float(stats[f"{kind}/clipped"]) == 0.0
