"""clip_per_example: DP-SGD's per-example clipping against a NumPy loop, its noise, rules and bad inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optclip

SHAPES = {"a_kernel": (3, 4), "b_bias": (4,), "c_scalar": ()}  # sorted keys: jax's leaf order
PARAMS = {key: jnp.zeros(shape) for key, shape in SHAPES.items()}
BATCH = 6


def _reference(per_example, clip, mode):
    """A NumPy loop over examples (float64): clip each finite example, average over the finite ones."""
    keys = sorted(per_example)
    sizes = np.array([np.prod(per_example[k].shape[1:]) for k in keys], np.float64)
    shares = {"flat": None, "per_leaf": np.full(len(keys), 1 / np.sqrt(len(keys))), "per_leaf_by_size": None}[mode]
    if mode == "per_leaf_by_size":
        shares = np.sqrt(sizes / sizes.sum())
    total = {k: np.zeros(per_example[k].shape[1:]) for k in keys}
    kept = clipped = 0
    for i in range(per_example[keys[0]].shape[0]):
        example = [np.asarray(per_example[k][i], np.float64) for k in keys]
        if not all(np.all(np.isfinite(g)) for g in example):
            continue
        kept += 1
        if mode == "flat":
            norm = np.sqrt(sum(np.sum(g**2) for g in example))
            factors = [min(1.0, clip / norm) if norm > 0 else 1.0] * len(keys)
        else:
            norms = [np.sqrt(np.sum(g**2)) for g in example]
            factors = [min(1.0, clip * s / n) if n > 0 else 1.0 for n, s in zip(norms, shares)]
        clipped += any(f < 1.0 for f in factors)
        for k, g, f in zip(keys, example, factors):
            total[k] += g * f
    return {k: v / max(kept, 1) for k, v in total.items()}, kept, clipped / max(kept, 1)


def _per_example_grads(seed, scales, nan_rows=()):
    rng = np.random.default_rng(seed)
    grads = {k: rng.normal(size=(BATCH, *s)) * np.reshape(scales, (BATCH,) + (1,) * len(s)) for k, s in SHAPES.items()}
    for row, key in nan_rows:
        grads[key][row] = np.nan if row % 2 else np.inf
    return {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}


_UPDATES = {mode: jax.jit(optclip.clip_per_example(1.0, mode=mode).update) for mode in optclip._per_example.MODES}


@pytest.mark.parametrize("mode", ["flat", "per_leaf", "per_leaf_by_size"])
@given(
    seed=st.integers(0, 2**31 - 1),
    scales=st.lists(st.floats(1e-3, 1e2), min_size=BATCH, max_size=BATCH),
    nan_rows=st.lists(st.tuples(st.integers(0, BATCH - 1), st.sampled_from(sorted(SHAPES))), max_size=2),
)
def test_matches_a_numpy_loop_over_examples(mode, seed, scales, nan_rows):
    grads = _per_example_grads(seed, scales, nan_rows)
    tx = optclip.clip_per_example(1.0, mode=mode)
    update, state = _UPDATES[mode](grads, tx.init(PARAMS), PARAMS)
    expected, kept, fraction = _reference(grads, 1.0, mode)
    for key in SHAPES:
        assert update[key].shape == SHAPES[key]
        np.testing.assert_allclose(update[key], expected[key], rtol=1e-6, atol=1e-6)
    stats = optclip.stats(state)
    assert int(stats["clip_per_example/dropped"]) == BATCH - kept
    assert float(stats["clip_per_example/clipped"]) == pytest.approx(fraction)


def test_a_nan_example_is_dropped_and_an_all_nan_batch_changes_nothing():
    tx = optclip.clip_per_example(optclip.quantile(initial=1.0))
    grads = {"w": jnp.array([[0.3, 0.4], [jnp.nan, 1.0], [6.0, 8.0], [-jnp.inf, 0.0]])}
    update_fn = jax.jit(tx.update)
    update, state = update_fn(grads, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_allclose(update["w"], [(0.3 + 0.6) / 2, (0.4 + 0.8) / 2], rtol=1e-6)
    stats = optclip.stats(state)
    assert (int(stats["clip_per_example/dropped"]), float(stats["clip_per_example/clipped"])) == (2, 0.5)
    assert float(stats["clip_per_example/fraction_below"]) == 0.5  # the rule saw the two finite examples only
    all_bad, new_state = update_fn(jax.tree.map(lambda g: g * jnp.nan, grads), state)
    np.testing.assert_array_equal(all_bad["w"], [0.0, 0.0])
    assert int(optclip.stats(new_state)["clip_per_example/dropped"]) == 4
    assert float(new_state.rule_state.clip) == float(state.rule_state.clip)  # no finite norm: the rule stays


def _noise_samples(tx, grads, steps):
    @jax.jit
    def run(state):
        return jax.lax.scan(lambda s, _: tuple(reversed(tx.update(grads, s))), state, None, length=steps)

    state, updates = run(tx.init(jax.tree.map(lambda g: g[0], grads)))
    return state, updates


@pytest.mark.parametrize("dropped", [0, 1])
def test_noise_is_added_to_the_sum_with_std_sigma_c_and_mean_zero(dropped):
    sigma, clip, batch = 1.5, 2.0, 4
    grads = {"u": jnp.full((batch, 300), 0.01), "v": jnp.full((batch, 20, 20), -0.02)}
    grads["u"] = grads["u"].at[: dropped or 0, 0].set(jnp.nan)
    tx = optclip.clip_per_example(clip, noise_multiplier=sigma, seed=7)
    state, updates = _noise_samples(tx, grads, steps=100)
    kept = batch - dropped
    std = sigma * clip / kept  # N(0, sigma^2 C^2) on the sum, then divided by the finite examples
    noise = np.concatenate([np.asarray(updates["u"] - 0.01).ravel(), np.asarray(updates["v"] + 0.02).ravel()])
    n = noise.size
    assert abs(noise.mean()) < 3 * std / math.sqrt(n)
    assert abs(noise.std() - std) < 3 * std / math.sqrt(2 * (n - 1))
    assert float(optclip.stats(state)["clip_per_example/noise_std"]) == pytest.approx(std)
    # Fresh noise every step and every leaf: no two draws are alike.
    assert not np.allclose(updates["u"][0], updates["u"][1])
    assert not np.allclose(updates["v"][0].ravel()[:300], updates["u"][0])


def test_the_noise_key_lives_in_the_state():
    grads = {"w": jnp.ones((3, 5))}
    tx = optclip.clip_per_example(1.0, noise_multiplier=1.0, seed=0)
    update = jax.jit(tx.update)
    first, state = update(grads, tx.init({"w": jnp.zeros(5)}))
    again, _ = update(grads, tx.init({"w": jnp.zeros(5)}))
    second, _ = update(grads, state)
    other_seed = optclip.clip_per_example(1.0, noise_multiplier=1.0, seed=1)
    other, _ = jax.jit(other_seed.update)(grads, other_seed.init({"w": jnp.zeros(5)}))
    np.testing.assert_array_equal(first["w"], again["w"])
    assert not np.array_equal(first["w"], second["w"])
    assert not np.array_equal(first["w"], other["w"])


def test_quantile_rule_gets_the_per_example_fraction_and_tracks_the_median():
    rule = optclip.quantile(target=0.5, learning_rate=0.2, initial=1.0)
    tx = optclip.clip_per_example(rule)
    norms = jnp.array([0.5, 0.8, 2.0, 3.0, 4.0])
    grads = {"w": jnp.stack([norms, jnp.zeros(5)], axis=1)}  # example i has norm norms[i]
    _, state = jax.jit(tx.update)(grads, tx.init({"w": jnp.zeros(2)}))
    stats = optclip.stats(state)
    assert float(stats["clip_per_example/threshold"]) == 1.0
    assert float(stats["clip_per_example/clipped"]) == pytest.approx(0.6)
    assert float(state.rule_state.clip) == pytest.approx(math.exp(-0.2 * (0.4 - 0.5)), rel=1e-6)

    # Over many batches of log-normal norms the threshold settles near their median, exp(0) = 1, from far away.
    batches = jnp.exp(jax.random.normal(jax.random.PRNGKey(1), (400, 64)))
    directions = jax.random.normal(jax.random.PRNGKey(2), (400, 64, 3))
    directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
    tx = optclip.clip_per_example(optclip.quantile(initial=20.0))

    def step(state, inputs):
        norm, direction = inputs
        return tx.update({"w": direction * norm[:, None]}, state)[1], None

    state, _ = jax.jit(lambda s: jax.lax.scan(step, s, (batches, directions)))(tx.init({"w": jnp.zeros(3)}))
    assert float(state.rule_state.clip) == pytest.approx(1.0, rel=0.15)


def test_per_leaf_modes_judge_an_example_by_its_worst_leaf():
    # The example's norm is sqrt(1.2^2 + 1.5^2) = 1.92 < C = 2: "flat" clips nothing. In "per_leaf" each leaf's
    # share is C / sqrt(2) = 1.414: leaf "a" (1.2) is under it, leaf "b" (1.5) over, so the example counts as clipped.
    grads = {"a": jnp.array([[1.2, 0.0]]), "b": jnp.array([[1.5]])}
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    for mode, expected_clipped in [("flat", 0.0), ("per_leaf", 1.0)]:
        tx = optclip.clip_per_example(2.0, mode=mode)
        update, state = jax.jit(tx.update)(grads, tx.init(params), params)
        assert float(optclip.stats(state)["clip_per_example/clipped"]) == expected_clipped
        norm_after = math.sqrt(float(jnp.sum(update["a"] ** 2) + jnp.sum(update["b"] ** 2)))
        assert norm_after <= 2.0 + 1e-6
    np.testing.assert_allclose(update["b"], [2.0 / math.sqrt(2)], rtol=1e-6)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_zero_gradients_and_a_zero_threshold_give_zero_updates(clip):
    tx = optclip.clip_per_example(clip)
    update = jax.jit(tx.update)
    zeros, _ = update({"w": jnp.zeros((4, 3))}, tx.init({"w": jnp.zeros(3)}))
    np.testing.assert_array_equal(zeros["w"], np.zeros(3))
    big, _ = update({"w": jnp.full((4, 3), 5.0)}, tx.init({"w": jnp.zeros(3)}))
    np.testing.assert_allclose(big["w"], np.full(3, clip / math.sqrt(3)), rtol=1e-6)


def test_huge_finite_examples_are_clipped_exactly_and_dtypes_are_kept():
    tx = optclip.clip_per_example(1.0)
    huge = {"w": jnp.array([[3e38, 3e38], [1e-30, 0.0]], jnp.float32)}
    update, state = jax.jit(tx.update)(huge, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_allclose(update["w"], [(1 / math.sqrt(2) + 1e-30) / 2, (1 / math.sqrt(2)) / 2], rtol=1e-6)
    assert int(optclip.stats(state)["clip_per_example/dropped"]) == 0
    half = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]], jnp.bfloat16)}
    update, _ = jax.jit(tx.update)(half, tx.init({"w": jnp.zeros(2, jnp.bfloat16)}))
    assert update["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(update["w"].astype(np.float32), [0.45, 0.6], rtol=1e-2)


def test_a_jitted_dp_sgd_step_with_vmapped_gradients():
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    xs = jax.random.normal(kx, (32, 5))
    ys = xs @ jax.random.normal(kw, (5,))
    params = {"w": jnp.zeros(5), "b": jnp.zeros(())}
    tx = optax.chain(optclip.clip_per_example(1.0, noise_multiplier=0.5), optax.sgd(0.3))

    def loss(p, x, y):
        return (x @ p["w"] + p["b"] - y) ** 2

    @jax.jit
    def step(p, s):
        per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, xs, ys)
        updates, s = tx.update(per_example, s, p)
        return optax.apply_updates(p, updates), s

    start = float(jnp.mean(jax.vmap(loss, (None, 0, 0))(params, xs, ys)))
    params, state = step(params, tx.init(params))
    assert float(optclip.stats(state)["clip_per_example/clipped"]) > 0.5  # far from the optimum: most are clipped
    for _ in range(100):
        params, state = step(params, state)
    assert float(jnp.mean(jax.vmap(loss, (None, 0, 0))(params, xs, ys))) < 0.2 * start


@pytest.mark.parametrize(
    ("grads", "params", "message"),
    [
        ({"w": jnp.ones((3, 2))}, {"w": jnp.zeros((3, 2))}, r"\['w'\] has shape \(3, 2\), which is not \(batch"),
        ({"a": jnp.ones((4, 2)), "b": jnp.ones((5,))}, None, r"\['b'\] has batch size 5.*\['a'\] has 4"),
        ({"w": jnp.ones(())}, None, r"\['w'\] is a scalar"),
        ({"w": jnp.ones((0, 2))}, {"w": jnp.zeros(2)}, "batch is empty"),
        ({"w": jnp.ones((4, 2))}, {"w": jnp.zeros(2), "extra": jnp.zeros(1)}, "different trees"),
    ],
)
def test_bad_batch_axes_and_mismatched_trees_raise_at_trace_time(grads, params, message):
    tx = optclip.clip_per_example(1.0)
    state = tx.init(params if params is not None else jax.tree.map(lambda g: g[0] if g.ndim else g, grads))
    with pytest.raises(ValueError, match=message):
        jax.jit(tx.update)(grads, state, params)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"l2_norm_clip": -1.0}, "l2_norm_clip.*-1.0"),
        ({"l2_norm_clip": 1.0, "mode": "layer"}, "mode.*'layer'"),
        ({"l2_norm_clip": 1.0, "noise_multiplier": -0.5}, "noise_multiplier.*-0.5"),
        ({"l2_norm_clip": 1.0, "noise_multiplier": float("nan")}, "noise_multiplier.*nan"),
        ({"l2_norm_clip": 1.0, "noise_multiplier": lambda t: 1.0}, "noise_multiplier"),
        ({"l2_norm_clip": 1.0, "seed": 1.5}, "seed.*1.5"),
        ({"l2_norm_clip": 1.0, "name": ""}, "name"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optclip.clip_per_example(**kwargs)


def test_inject_hyperparams_injects_the_threshold_noise_and_seed():
    tx = optax.inject_hyperparams(optclip.clip_per_example)(l2_norm_clip=1.0, noise_multiplier=0.0, seed=3)
    state = tx.init({"w": jnp.zeros(3)})
    update = jax.jit(tx.update)
    quiet, state = update({"w": jnp.full((4, 3), 2.0)}, state)
    np.testing.assert_allclose(quiet["w"], np.full(3, 1 / math.sqrt(3)), rtol=1e-6)
    state.hyperparams["noise_multiplier"] = jnp.float32(1.0)
    noisy, state = update({"w": jnp.full((4, 3), 2.0)}, state)
    assert not np.allclose(noisy["w"], quiet["w"])
    assert float(optclip.stats(state)["clip_per_example/noise_std"]) == pytest.approx(1.0 / 4)
