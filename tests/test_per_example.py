"""clip_per_example: DP-SGD's per-example clipping against a NumPy loop, its noise, private adaptive clipping (Andrew
et al. 2021), the rules it takes, its memory, and bad inputs."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optclip
from optclip._clipping import capped_ratio
from optclip._per_example import _example_norm_parts, sum_noise_multiplier

SHAPES = {"a_kernel": (3, 4), "b_bias": (4,), "c_scalar": ()}  # sorted keys: jax's leaf order
PARAMS = {key: jnp.zeros(shape) for key, shape in SHAPES.items()}
BATCH = 6


def _reference(per_example, clip, mode):
    """A NumPy loop over examples (float64): clip each finite example, sum, divide by the batch size."""
    keys = sorted(per_example)
    batch = per_example[keys[0]].shape[0]
    sizes = np.array([np.prod(per_example[k].shape[1:]) for k in keys], np.float64)
    shares = {"flat": None, "per_leaf": np.full(len(keys), 1 / np.sqrt(len(keys))), "per_leaf_by_size": None}[mode]
    if mode == "per_leaf_by_size":
        shares = np.sqrt(sizes / sizes.sum())
    total = {k: np.zeros(per_example[k].shape[1:]) for k in keys}
    kept = clipped = 0
    for i in range(batch):
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
    return {k: v / batch for k, v in total.items()}, kept, clipped / max(kept, 1)


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


def test_a_non_finite_example_adds_zero_and_the_divisor_stays_the_batch_size():
    tx = optclip.clip_per_example(optclip.quantile(initial=1.0))
    grads = {"w": jnp.array([[0.3, 0.4], [jnp.nan, 1.0], [6.0, 8.0], [-jnp.inf, 0.0]])}
    update_fn = jax.jit(tx.update)
    update, state = update_fn(grads, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_allclose(update["w"], [(0.3 + 0.6) / 4, (0.4 + 0.8) / 4], rtol=1e-6)
    stats = optclip.stats(state)
    assert (int(stats["clip_per_example/dropped"]), float(stats["clip_per_example/clipped"])) == (2, 0.5)
    assert float(stats["clip_per_example/fraction_below"]) == 0.5  # without noise the rule sees the finite ones
    all_bad, new_state = update_fn(jax.tree.map(lambda g: g * jnp.nan, grads), state)
    np.testing.assert_array_equal(all_bad["w"], [0.0, 0.0])
    assert int(optclip.stats(new_state)["clip_per_example/dropped"]) == 4
    assert float(new_state.rule_state.clip) == float(state.rule_state.clip)  # no finite norm: the rule stays


@pytest.mark.parametrize("mode", ["flat", "per_leaf"])
def test_the_contraction_and_the_example_by_example_sum_agree(mode):
    # Five plain examples take the contraction; the same five and a NaN one take the loop, whose sum must be the same.
    grads = _per_example_grads(3, [0.1, 2.0, 0.5, 30.0, 1.0, 4.0])
    plain = jax.tree.map(lambda g: g[:5], grads)
    with_nan = jax.tree.map(lambda g: g.at[5].set(jnp.nan), grads)
    tx = optclip.clip_per_example(1.0, mode=mode)
    five, _ = jax.jit(tx.update)(plain, tx.init(PARAMS), PARAMS)
    six, state = jax.jit(tx.update)(with_nan, tx.init(PARAMS), PARAMS)
    assert int(optclip.stats(state)["clip_per_example/dropped"]) == 1
    for key in SHAPES:
        np.testing.assert_allclose(np.asarray(six[key]) * 6, np.asarray(five[key]) * 5, rtol=2e-6, atol=1e-7)


CASES = {  # per-example gradients (one leaf "a" of 2 entries, one leaf "b" of 1) and the threshold
    "huge, two exponents": (
        [[3e38, 3e38], [1e38, -2e38], [3.0, 4.0], [1e-30, 0.0]],
        [[1e38], [0.0], [0.0], [0.0]],
        1.0,
    ),
    "huge to a tiny bound": ([[3e38, 3e38], [3.0, 4.0], [1e-36, 0.0]], [[0.0], [2e38], [0.0]], 1e-30),
    "tiny": ([[1e-25, 1e-25], [2e-25, -1e-25], [0.0, 0.0]], [[1e-25], [0.0], [3e-25]], 1e-26),
}


@pytest.mark.parametrize("mode", ["flat", "per_leaf"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_huge_and_tiny_examples_are_clipped_exactly(case, mode):
    a, b, clip = CASES[case]
    grads = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    if mode == "flat" and case.startswith("huge"):  # the case holds scales below float32's range, as 2**exponent
        scale = capped_ratio(_example_norm_parts([grads["a"], grads["b"]]), jnp.float32(clip))
        assert np.any(np.asarray(scale.exponent) < 0) and np.any(np.asarray(scale.exponent) == 0)
    tx = optclip.clip_per_example(clip, mode=mode)
    update, _ = jax.jit(tx.update)(grads, tx.init({"a": jnp.zeros(2), "b": jnp.zeros(1)}))
    expected, kept, _ = _reference({k: np.asarray(v) for k, v in grads.items()}, clip, mode)
    assert kept == len(a)
    for key in ("a", "b"):
        np.testing.assert_allclose(update[key], expected[key], rtol=2e-6, atol=0)


def test_dtypes_are_kept():
    tx = optclip.clip_per_example(1.0)
    half = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]], jnp.bfloat16)}
    update, _ = jax.jit(tx.update)(half, tx.init({"w": jnp.zeros(2, jnp.bfloat16)}))
    assert update["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(update["w"].astype(np.float32), [0.45, 0.6], rtol=1e-2)


def _noise_samples(tx, grads, steps):
    @jax.jit
    def run(state):
        return jax.lax.scan(lambda s, _: tuple(reversed(tx.update(grads, s))), state, None, length=steps)

    state, updates = run(tx.init(jax.tree.map(lambda g: g[0], grads)))
    return state, updates


def _check_std(samples, std):
    """The mean within 4 standard errors of 0 and the std within 4 standard errors of ``std`` (normal samples:
    the sample std's standard error is std / sqrt(2 (n - 1)))."""
    n = samples.size
    assert abs(samples.mean()) < 4 * std / math.sqrt(n)
    assert abs(samples.std() - std) < 4 * std / math.sqrt(2 * (n - 1))


@pytest.mark.parametrize("dropped", [0, 1])
def test_noise_is_added_to_the_sum_with_std_sigma_c_and_divided_by_the_batch(dropped):
    sigma, clip, batch = 1.5, 2.0, 4
    grads = {"u": jnp.full((batch, 300), 0.01), "v": jnp.full((batch, 20, 20), -0.02)}
    grads["u"] = grads["u"].at[: dropped or 0, 0].set(jnp.nan)
    tx = optclip.clip_per_example(clip, noise_multiplier=sigma, seed=7)
    state, updates = _noise_samples(tx, grads, steps=100)
    kept = batch - dropped
    std = sigma * clip / batch  # N(0, sigma^2 C^2) on the sum, then divided by the batch size
    mean = {"u": 0.01 * kept / batch, "v": -0.02 * kept / batch}
    noise = np.concatenate([np.asarray(updates[k] - mean[k])[:, 1:].ravel() for k in ("u", "v")])
    _check_std(noise, std)
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
    for noise in (0.0, 1.0):  # without noise, and private (sigma_b = 64 / 20)
        tx = optclip.clip_per_example(optclip.quantile(initial=20.0), noise_multiplier=noise)

        def step(state, inputs, tx=tx):
            norm, direction = inputs
            return tx.update({"w": direction * norm[:, None]}, state)[1], None

        state, _ = jax.jit(lambda s, step=step: jax.lax.scan(step, s, (batches, directions)))(
            tx.init({"w": jnp.zeros(3)})
        )
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


# ---------------------------------------------------------------------------------------------------------------------
# private adaptive clipping (Andrew et al. 2021, Algorithm 1)


def _split_batch(batch, below, clip=1.0):
    """``batch`` examples of 3 entries, the first ``below`` with norm clip / 2 and the rest with norm 2 clip."""
    norms = jnp.where(jnp.arange(batch) < below, clip / 2, 2 * clip)
    return {"w": jnp.stack([norms, jnp.zeros(batch), jnp.zeros(batch)], axis=1)}


@pytest.mark.parametrize(("batch", "count_stddev"), [(40, None), (40, 4.0), (7, 0.35)])
def test_the_noised_fraction_has_variance_sigma_b_squared_over_batch_squared(batch, count_stddev):
    steps = 20_000
    grads = _split_batch(batch, batch // 2)
    exact = (batch // 2) / batch
    rule = optclip.quantile(learning_rate=0.0, initial=1.0)  # C stays 1: every step counts the same examples
    noise = 1.0 if count_stddev is None else 0.5
    tx = optclip.clip_per_example(rule, noise_multiplier=noise, clipped_count_stddev=count_stddev)

    def step(state, _):
        state = tx.update(grads, state)[1]
        return state, state.rule_state.fraction_below

    _, fractions = jax.jit(lambda s: jax.lax.scan(step, s, None, length=steps))(tx.init({"w": jnp.zeros(3)}))
    sigma_b = batch / 20 if count_stddev is None else count_stddev
    std = sigma_b / batch  # b~ = (count + N(0, sigma_b^2)) / B
    samples = np.asarray(fractions, np.float64) - exact
    assert abs(samples.mean()) < 4 * std / math.sqrt(steps)
    # The sample variance of n normal draws has standard error var * sqrt(2 / (n - 1)): 1% here, so 4 of them.
    assert abs(samples.var(ddof=1) / std**2 - 1) < 4 * math.sqrt(2 / (steps - 1))


@pytest.mark.parametrize("count_stddev", [None, 0.6])
def test_the_sum_noise_has_the_adjusted_multiplier(count_stddev):
    batch, clip, z = 40, 2.0, 1.0
    sigma_b = batch / 20 if count_stddev is None else count_stddev
    sigma_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5  # 1.0328 for sigma_b = 2, 1.8091 for 0.6
    grads = {"u": jnp.full((batch, 300), 0.01), "v": jnp.full((batch, 20, 20), -0.02)}  # all under C: unclipped
    rule = optclip.quantile(learning_rate=0.0, initial=clip)
    tx = optclip.clip_per_example(rule, noise_multiplier=z, clipped_count_stddev=count_stddev, seed=5)
    state, updates = _noise_samples(tx, grads, steps=100)
    std = sigma_delta * clip / batch  # N(0, sigma_Delta^2 C^2) on the sum, divided by B in the update
    noise = np.concatenate([np.asarray(updates["u"] - 0.01).ravel(), np.asarray(updates["v"] + 0.02).ravel()])
    _check_std(noise, std)
    assert abs(noise.std() - z * clip / batch) > 8 * std / math.sqrt(2 * noise.size)  # not the unadjusted z C
    assert float(optclip.stats(state)["clip_per_example/noise_std"]) == pytest.approx(std, rel=1e-6)
    assert float(sum_noise_multiplier(z, sigma_b)) == pytest.approx(sigma_delta, rel=1e-6)


@pytest.mark.parametrize("threshold", [1.0, optclip.quantile(initial=1.0)], ids=["fixed", "quantile"])
def test_the_private_update_divides_by_the_batch_size_whatever_is_finite(threshold):
    # The same key draws the same noise for both batches, so the updates differ by the fourth example / B exactly.
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.normal(size=(4, 3)) * 0.2, jnp.float32)}
    spoiled = {"w": grads["w"].at[3, 1].set(jnp.nan)}
    tx = optclip.clip_per_example(
        threshold, noise_multiplier=0.3, clipped_count_stddev=None if threshold == 1.0 else 0.5
    )
    state = tx.init({"w": jnp.zeros(3)})
    full, _ = jax.jit(tx.update)(grads, state)
    partial, new_state = jax.jit(tx.update)(spoiled, state)
    np.testing.assert_allclose(np.asarray(full["w"] - partial["w"]), np.asarray(grads["w"][3]) / 4, rtol=1e-5)
    assert int(optclip.stats(new_state)["clip_per_example/dropped"]) == 1


def test_a_non_finite_example_counts_as_not_under_the_bound_and_the_state_always_moves():
    rule = optclip.quantile(initial=1.0, learning_rate=0.2)
    tx = optclip.clip_per_example(rule, clipped_count_stddev=1e-4)  # noise on the count only: the private count
    grads = _split_batch(8, 8)  # every example under C = 1
    grads["w"] = grads["w"].at[:3, 0].set(jnp.nan)
    update_fn = jax.jit(tx.update)
    _, state = update_fn(grads, tx.init({"w": jnp.zeros(3)}))
    assert float(state.rule_state.fraction_below) == pytest.approx(5 / 8, abs=1e-4)
    nothing, state = update_fn(jax.tree.map(lambda g: g * jnp.nan, grads), tx.init({"w": jnp.zeros(3)}))
    np.testing.assert_array_equal(nothing["w"], np.zeros(3))
    assert float(state.rule_state.fraction_below) == pytest.approx(0.0, abs=1e-4)
    assert float(state.rule_state.clip) == pytest.approx(math.exp(0.2 * 0.5), rel=1e-5)  # moved on a NaN batch


def test_the_default_count_noise_needs_a_batch_of_more_than_ten_z():
    tx = optclip.clip_per_example(optclip.quantile(), noise_multiplier=1.0)  # sigma_b = B / 20 > z / 2 iff B > 10
    state = tx.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"noise_multiplier=1\.0.*batch of 10 needs a batch of more than 10"):
        jax.jit(tx.update)({"w": jnp.ones((10, 2))}, state)
    update, _ = jax.jit(tx.update)({"w": jnp.ones((11, 2))}, state)
    assert np.all(np.isfinite(update["w"]))


def test_an_injected_noise_multiplier_gets_the_adjusted_sum_noise_or_a_nan_update():
    tx = optax.inject_hyperparams(optclip.clip_per_example)(
        l2_norm_clip=optclip.quantile(learning_rate=0.0), noise_multiplier=0.0, clipped_count_stddev=0.6
    )
    state = tx.init({"w": jnp.zeros(3)})
    update = jax.jit(tx.update)
    grads = {"w": jnp.full((4, 3), 0.1)}
    quiet, state = update(grads, state)
    np.testing.assert_allclose(quiet["w"], np.full(3, 0.1), rtol=1e-6)
    state.hyperparams["noise_multiplier"] = jnp.float32(1.0)
    _, state = update(grads, state)
    expected = (1.0 - 1.2**-2) ** -0.5 / 4
    assert float(optclip.stats(state)["clip_per_example/noise_std"]) == pytest.approx(expected, rel=1e-6)
    state.hyperparams["noise_multiplier"] = jnp.float32(1.2)  # 2 sigma_b = 1.2: no private sum noise exists
    refused, _ = update(grads, state)
    assert np.all(np.isnan(refused["w"]))


# ---------------------------------------------------------------------------------------------------------------------
# rules by scope, and the state they keep


@pytest.mark.parametrize("make", [optclip.zscore, optclip.percentile, optclip.ema])
def test_rules_that_take_scalar_norms_only_are_refused_at_construction(make):
    with pytest.raises(ValueError) as info:
        optclip.clip_per_example(make())
    message = str(info.value)
    assert "l2_norm_clip" in message and type(make()).__name__ in message
    assert "the per_example scope" in message and "accepts_norm_vector is True" in message


@dataclasses.dataclass(frozen=True)
class _MedianRule:
    """A rule that takes a vector of norms but reads them without noise: it cannot be made private."""

    accepts_norm_vector = True

    def init(self):
        return jnp.float32(1.0)

    def update(self, norm, state, count):
        return jnp.nanmedian(norm), state

    def stats(self, state):
        return {}


def test_a_rule_that_cannot_be_made_private_refuses_noise():
    with pytest.raises(ValueError, match=r"noise_multiplier=0\.5 cannot make the rule .*_MedianRule.*private"):
        optclip.clip_per_example(_MedianRule(), noise_multiplier=0.5)
    tx = optclip.clip_per_example(_MedianRule())  # without noise it is taken
    update, _ = jax.jit(tx.update)({"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [0.6, 0.8]])}, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_allclose(update["w"], [(0.6 + 0.3 + 0.6) / 3, (0.8 + 0.4 + 0.8) / 3], rtol=1e-6)


def _shapes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@pytest.mark.parametrize(("mode", "noise"), [("flat", 0.0), ("flat", 1.0), ("per_leaf", 1.0)])
def test_quantile_state_keeps_its_shapes_and_dtypes_step_after_step(mode, noise):
    batch = 20
    params = {"a": jnp.zeros((3, 2)), "frozen": None, "b": jnp.zeros(4), "masked": optax.MaskedNode()}

    def grads(t):
        rng = np.random.default_rng(t)
        scale = np.exp(rng.normal(size=batch))
        return {
            "a": jnp.asarray(rng.normal(size=(batch, 3, 2)) * scale[:, None, None], jnp.float32),
            "frozen": None,
            "b": jnp.asarray(rng.normal(size=(batch, 4)) * scale[:, None], jnp.float32),
            "masked": optax.MaskedNode(),
        }

    clip = optclip.clip_per_example(optclip.quantile(), mode=mode, noise_multiplier=noise)
    dense = {"a": params["a"], "b": params["b"], "c": jnp.zeros(2)}
    transforms = {
        "alone": (clip, params, grads),
        "masked": (
            optax.masked(clip, {"a": True, "b": True, "c": False}),
            dense,
            lambda t: {"a": grads(t)["a"], "b": grads(t)["b"], "c": jnp.ones((batch, 2))},
        ),
        "before MultiSteps": (optax.chain(clip, optax.MultiSteps(optax.sgd(0.1), 2)), params, grads),
    }
    for name, (tx, p, make_grads) in transforms.items():
        state = tx.init(p)
        initial = _shapes(state)
        update = jax.jit(tx.update)
        clips = []
        for t in range(4):
            updates, state = update(make_grads(t), state, p)
            assert _shapes(state) == initial, (name, t)
            assert updates["a"].shape == (3, 2), name
            rule_state = next(
                s
                for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "fraction_below"))
                if hasattr(s, "fraction_below")
            )
            assert rule_state.clip.shape == () and rule_state.fraction_below.shape == (), name
            clips.append(float(rule_state.clip))
        assert len(set(clips)) == 4, name  # the threshold moved every step


def test_a_frozen_parameter_has_no_gradient_and_passes_through():
    params = {"a": jnp.zeros(2), "frozen": jnp.zeros(3), "masked": optax.MaskedNode()}
    grads = {"a": jnp.array([[3.0, 4.0], [0.3, 0.4]]), "frozen": None, "masked": optax.MaskedNode()}
    tx = optclip.clip_per_example(1.0)
    update, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert update["frozen"] is None and isinstance(update["masked"], optax.MaskedNode)
    np.testing.assert_allclose(update["a"], [0.45, 0.6], rtol=1e-6)
    with pytest.raises(ValueError, match=r"\['frozen'\] has shape \(2, 2\), which is not \(batch, \*\(3,\)\)"):
        jax.jit(tx.update)({**grads, "frozen": jnp.ones((2, 2))}, tx.init(params), params)


def test_inside_multisteps_it_is_refused_with_a_pointer_to_the_chain_that_works():
    tx = optax.MultiSteps(optclip.clip_per_example(optclip.quantile()), every_k_schedule=2)
    # Leaves whose first dims differ: the pointer comes before the batch-size check would blame the batch axis.
    params = {"w": jnp.zeros(3), "b": jnp.zeros((5, 2))}
    pointer = r"parameter's own shape.*optax\.MultiSteps.*chain it first, optax\.chain\(clip_per_example"
    with pytest.raises(ValueError, match=pointer):
        jax.jit(tx.update)({"w": jnp.ones((4, 3)), "b": jnp.ones((5, 2))}, tx.init(params), params)


# ---------------------------------------------------------------------------------------------------------------------
# no clipped copy


def _temp_fraction(tx, shapes, batch=64):
    params = {f"leaf{i}": jax.ShapeDtypeStruct(shape, jnp.float32) for i, shape in enumerate(shapes)}
    grads = {k: jax.ShapeDtypeStruct((batch, *v.shape), v.dtype) for k, v in params.items()}
    compiled = jax.jit(tx.update).lower(grads, jax.eval_shape(tx.init, params), params).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip(f"the {jax.default_backend()} backend reports no memory analysis")
    return analysis.temp_size_in_bytes / sum(4 * batch * math.prod(shape) for shape in shapes)


LEAVES = [(256, 256)] * 6  # 64 x 256 x 256 floats per leaf, six leaves: 96 MiB of per-example gradients


@pytest.mark.parametrize(
    ("mode", "threshold", "noise"),
    [("flat", 1.0, 0.0), ("per_leaf", optclip.quantile(), 1.0)],
    ids=["flat-fixed", "per_leaf-private-quantile"],
)
def test_scratch_memory_is_at_most_five_percent_of_the_per_example_gradients(mode, threshold, noise):
    # A clipped copy would be one batch-sized buffer per leaf (100%). What remains are buffers of one parameter's
    # size per leaf (1/64 of its gradients each): the contraction's result and, with noise, the random bits.
    tx = optclip.clip_per_example(threshold, mode=mode, noise_multiplier=noise)
    assert _temp_fraction(tx, LEAVES) <= 0.05


def test_the_contraction_asks_for_full_float32_precision():
    # A default-precision float32 dot runs in bf16 passes on TPU and TF32 on recent GPUs.
    tx = optclip.clip_per_example(1.0)
    text = jax.jit(tx.update).lower({"w": jnp.ones((4, 3))}, tx.init({"w": jnp.zeros(3)})).as_text()
    assert re.search(r"dot_general .*precision = \[HIGHEST, HIGHEST\]", text)


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(
    ("grads", "params", "message"),
    [
        ({"w": jnp.ones((3, 2))}, {"w": jnp.zeros((3, 2))}, r"\['w'\] has its parameter's own shape \(3, 2\)"),
        ({"w": jnp.ones((4, 3, 2))}, {"w": jnp.zeros((2, 3))}, r"\['w'\] has shape \(4, 3, 2\), which is not \(batch"),
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
        ({"l2_norm_clip": optclip.quantile(), "clipped_count_stddev": -1.0}, "clipped_count_stddev.*-1.0"),
        ({"l2_norm_clip": 1.0, "clipped_count_stddev": 2.0}, r"clipped_count_stddev=2\.0 .*l2_norm_clip=1\.0"),
        (
            {"l2_norm_clip": optclip.quantile(), "noise_multiplier": 1.0, "clipped_count_stddev": 0.5},
            r"clipped_count_stddev=0\.5 is too small for noise_multiplier=1\.0.*2 \* clipped_count_stddev >",
        ),
        (
            {"l2_norm_clip": optclip.quantile(), "noise_multiplier": 1.0, "clipped_count_stddev": 0.0},
            r"clipped_count_stddev=0\.0 is too small",
        ),
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
