"""Guards: skip_nonfinite and skip_on_spike skip bad steps exactly, count them, and leave good steps alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optclip

# These runs compare bits between runs of one program, not speed: skip LLVM's optimisation to compile faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _bits(tree):
    """Every leaf's raw bytes, so that two trees compare bit for bit (0.0 and -0.0 differ, NaN equals itself)."""
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _params():
    return {"b": jnp.zeros(3), "w": jnp.ones((2, 3))}


def _grads(fill=0.5):
    return {"b": jnp.full(3, fill), "w": jnp.full((2, 3), -fill)}


def _scale_by_extra_arg() -> optax.GradientTransformationExtraArgs:
    """An inner transform that needs its own extra argument, to check the guards hand extra arguments on."""

    def update(updates, state, params=None, *, factor, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda g: g * factor, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


# ---------------------------------------------------------------------------------------------------------------------
# skip_nonfinite


_guarded_adam = optclip.skip_nonfinite(optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(0.1)))
_guarded_adam_update = jax.jit(_guarded_adam.update)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["one_leaf", "all_leaves", "loss"])
def test_skip_returns_zeros_and_the_inner_state_bit_for_bit(bad, where):
    params = _params()
    state = _guarded_adam.init(params)
    _, state = _guarded_adam_update(_grads(), state, params, loss=1.0)  # a real step first: adam moments non-zero
    grads, loss = _grads(0.3), jnp.float32(2.0)
    if where == "one_leaf":
        grads["w"] = grads["w"].at[1, 2].set(bad)
    elif where == "all_leaves":
        grads = jax.tree.map(lambda g: g.at[0].set(bad), grads)
    else:
        loss = jnp.float32(bad)
    updates, new_state = _guarded_adam_update(grads, state, params, loss=loss)
    assert _bits(updates) == _bits(jax.tree.map(jnp.zeros_like, params))
    assert _bits(new_state.inner_state) == _bits(state.inner_state)
    stats = optclip.stats(new_state)
    assert float(stats["skip_nonfinite/skipped"]) == 1.0
    assert float(stats["skip_nonfinite/total_skipped"]) == 1.0
    assert float(stats["clip_by_global_norm/norm"]) == float(optclip.stats(state)["clip_by_global_norm/norm"])


@pytest.mark.parametrize("make_guard", [optclip.skip_nonfinite, optclip.skip_on_spike])
def test_a_donated_state_is_updated_in_place_not_copied(make_guard):
    """The guard's only scratch is the updates leaving its conditional: a select over the outputs of an inner that
    always runs makes XLA copy the whole donated state each step (2 Adam moments: twice the parameters)."""
    params = {f"w{i}": jnp.zeros((256, 256)) for i in range(4)}
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    tx = make_guard(optax.adam(1e-3))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 1.05 * param_bytes


def test_finite_steps_are_exactly_the_inner_transform():
    inner = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(0.1))
    tx = optclip.skip_nonfinite(inner)
    params = _params()
    state, inner_state = tx.init(params), inner.init(params)
    update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
    for fill in (0.5, 3.0, -0.2):
        updates, state = update(_grads(fill), state, params, loss=fill)
        expected, inner_state = inner_update(_grads(fill), inner_state, params)
        assert _bits(updates) == _bits(expected)
        assert _bits(state.inner_state) == _bits(inner_state)
    assert float(optclip.stats(state)["skip_nonfinite/total_skipped"]) == 0.0


def test_counters_and_max_consecutive_let_the_next_update_through():
    tx = optclip.skip_nonfinite(optax.sgd(1.0), max_consecutive=2)
    params = _params()
    state = tx.init(params)
    bad = _grads(np.nan)
    seen = []
    for grads in (bad, bad, bad, _grads(), bad):
        updates, state = tx.update(grads, state, params)
        s = optclip.stats(state)
        seen.append((int(s["skip_nonfinite/skipped"]), int(s["skip_nonfinite/consecutive"])))
        seen_nan = bool(jnp.isnan(updates["b"]).any())
        assert seen_nan == (seen[-1][0] == 0 and grads is bad)
    # Two skips, then the third bad step goes through (its NaN update is applied) and the count starts again.
    assert seen == [(1, 1), (1, 2), (0, 0), (0, 0), (1, 1)]
    s = optclip.stats(state)
    assert int(s["skip_nonfinite/total_skipped"]) == 3
    assert int(s["skip_nonfinite/total_nonfinite"]) == 4


def test_zero_policy_replaces_nonfinite_entries_and_runs_inner():
    inner = optax.adam(0.1)
    tx = optclip.skip_nonfinite(inner, policy="zero")
    params = _params()
    grads = _grads()
    grads["w"] = grads["w"].at[0, 1].set(np.nan).at[1, 0].set(-np.inf)
    updates, state = tx.update(grads, tx.init(params), params)
    cleaned = {"b": grads["b"], "w": jnp.where(jnp.isfinite(grads["w"]), grads["w"], 0.0)}
    expected, expected_state = inner.update(cleaned, inner.init(params), params)
    assert _bits(updates) == _bits(expected)
    assert _bits(state.inner_state) == _bits(expected_state)
    s = optclip.stats(state)
    assert (float(s["skip_nonfinite/nonfinite"]), float(s["skip_nonfinite/skipped"])) == (1.0, 0.0)


def test_raise_names_the_step_and_the_first_bad_leaf_eagerly_and_under_jit():
    tx = optclip.skip_nonfinite(optax.sgd(0.1), policy="raise")
    params = {"layer": {"bias": jnp.zeros(2), "kernel": jnp.zeros((2, 2))}, "out": jnp.zeros(2)}
    state = tx.init(params)
    good = jax.tree.map(jnp.ones_like, params)
    bad = {**good, "layer": {"bias": good["layer"]["bias"], "kernel": jnp.full((2, 2), np.inf)}, "out": -good["out"]}
    bad["out"] = bad["out"].at[0].set(np.nan)
    for _ in range(2):
        _, state = tx.update(good, state, params)
    with pytest.raises(FloatingPointError, match=r"step 2 .*first non-finite gradient leaf \['layer'\]\['kernel'\]"):
        tx.update(bad, state, params)

    step = jax.jit(lambda g, s, loss: tx.update(g, s, params, loss=loss))
    _, jit_state = step(good, tx.init(params), 1.0)
    with pytest.raises(Exception, match=r"step 1 .*\['layer'\]\['kernel'\] \(2 of 3 leaves\)"):
        jax.block_until_ready(step(bad, jit_state, 1.0))
    with pytest.raises(Exception, match=r"step 1 .*the loss is non-finite"):
        jax.block_until_ready(step(good, jit_state, jnp.nan))
    updates, _ = step(good, jit_state, 1.0)  # a good step under jit runs through the callback-free branch
    assert float(updates["out"][0]) == pytest.approx(-0.1)


def test_extra_args_reach_the_inner_transforms_through_a_chain():
    inner = optax.chain(_scale_by_extra_arg(), optax.sgd(1.0))
    tx = optax.chain(optclip.skip_nonfinite(inner), optclip.skip_on_spike(optax.identity(), name="spike"))
    params = _params()
    updates, state = tx.update(_grads(), tx.init(params), params, factor=3.0, loss=jnp.float32(0.5))
    assert _bits(updates) == _bits(jax.tree.map(lambda g: -3.0 * g, _grads()))
    assert float(optclip.stats(state)["spike/value"]) == 0.5  # the loss was watched, not the gradient norm
    _, state = tx.update(_grads(), state, params, factor=3.0, loss=jnp.float32(np.nan))
    assert float(optclip.stats(state)["skip_nonfinite/skipped"]) == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# skip_on_spike


def _reference_spike_skips(values, *, k, window, warmup):
    """NumPy: skip iff non-finite, or (after warm-up) above mean + k * std (ddof 1) of the last accepted values."""
    accepted, skips, thresholds = [], [], []
    for x in values:
        recent = np.asarray(accepted[-window:], np.float64)
        mean = recent.mean() if len(recent) else 0.0
        std = recent.std(ddof=1) if len(recent) > 1 else 0.0
        skip = (not np.isfinite(x)) or (len(accepted) >= warmup and x > mean + k * std)
        skips.append(skip)
        thresholds.append(mean + k * std)
        if not skip:
            accepted.append(x)
    return skips, thresholds


_SPIKE = dict(k=2.0, window=4, warmup=3)
_spike_tx = optclip.skip_on_spike(optax.identity(), **_SPIKE)
_spike_step = jax.jit(lambda g, s: _spike_tx.update(g, s))


@given(
    st.lists(
        st.one_of(st.floats(0.5, 2.0, width=32), st.floats(10.0, 1e4, width=32), st.just(float("nan"))),
        min_size=1,
        max_size=24,
    )
)
def test_spike_decisions_match_a_numpy_ring_buffer(values):
    expected_skips, expected_thresholds = _reference_spike_skips(values, **_SPIKE)
    state = _spike_tx.init(jnp.zeros(1))
    for value, skip, threshold in zip(values, expected_skips, expected_thresholds):
        updates, state = _spike_step(jnp.array([value], jnp.float32), state)
        s = optclip.stats(state)
        assert bool(s["skip_on_spike/skipped"]) == skip
        assert float(updates[0]) == (0.0 if skip else np.float32(value))
        np.testing.assert_allclose(float(s["skip_on_spike/threshold"]), threshold, rtol=1e-5, atol=1e-6)
    assert int(s["skip_on_spike/total_skipped"]) == sum(expected_skips)


def test_spike_on_the_loss_and_max_consecutive():
    tx = optclip.skip_on_spike(optax.sgd(1.0), window=8, warmup=4, max_consecutive=2)
    params = jnp.zeros(2)
    state = tx.init(params)
    grads = jnp.ones(2)
    skipped = []
    for loss in [1.0, 1.1, 0.9, 1.0, 50.0, 60.0, 55.0, 1.0]:
        _, state = tx.update(grads * (100.0 if loss == 1.1 else 1.0), state, params, loss=jnp.float32(loss))
        skipped.append(int(optclip.stats(state)["skip_on_spike/skipped"]))
    # A large gradient with a normal loss is not skipped: the loss is watched. Two spikes are skipped, the third is
    # let through (max_consecutive=2) and enters the window, so the next normal loss is accepted.
    assert skipped == [0, 0, 0, 0, 1, 1, 0, 0]
    assert int(optclip.stats(state)["skip_on_spike/total_skipped"]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Training runs with injected faults


def _mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def _mlp_init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (4, 16)) * 0.5,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16, 1)) * 0.25,
        "b2": jnp.zeros(1),
    }


def _batches(steps, seed=0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    xs = jax.random.normal(kx, (steps, 16, 4))
    ys = jnp.sin(xs @ jax.random.normal(kw, (4, 1)))
    return np.asarray(xs), np.asarray(ys)


def _make_run(tx, pass_loss=True):
    """A jitted 500-step (or any length) training scan returning every step's (params, state), stacked.

    ``poison`` multiplies (one leaf, all leaves, loss), so a clean step passes ones. The run without some batches
    uses the same compiled scan (the same length, padded at the end) and is read at its last real step: both runs
    execute the very same program, so "bit-identical" compares the arithmetic, not two compilations.
    """

    def step(carry, inputs):
        params, state = carry
        x, y, poison = inputs
        loss, grads = jax.value_and_grad(_mlp_loss)(params, x, y)
        grads = {**grads, "w1": grads["w1"] * poison[0]}
        grads = jax.tree.map(lambda g: g * poison[1], grads)
        extra_args = {"loss": loss * poison[2]} if pass_loss else {}
        updates, state = tx.update(grads, state, params, **extra_args)
        carry = (optax.apply_updates(params, updates), state)
        return carry, carry

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(xs, ys, poisons):
        params = _mlp_init(jax.random.PRNGKey(1))
        return jax.lax.scan(step, (params, tx.init(params)), (xs, ys, poisons))[1]

    return run


def _at(history, t):
    return jax.tree.map(lambda x: x[t], history)


def _with_and_without(run, bad_steps, poisons, steps, seed):
    """The faulty run's history, and the final (params, state) of the clean run with ``bad_steps`` left out."""
    xs, ys = _batches(steps, seed)
    history = run(xs, ys, poisons)
    kept = np.setdiff1d(np.arange(steps), bad_steps)
    padded = np.concatenate([kept, kept[: steps - len(kept)]])
    clean = run(xs[padded], ys[padded], np.ones((steps, 3), np.float32))
    return history, _at(clean, len(kept) - 1)


def _fault_run(run, where, steps=500, faults=25, seed=0):
    rng = np.random.default_rng(seed)
    bad_steps = rng.choice(steps, faults, replace=False)
    poisons = np.ones((steps, 3), np.float32)
    column = {"one_leaf": 0, "all_leaves": 1, "loss": 2}[where]
    poisons[bad_steps, column] = rng.choice([np.nan, np.inf, -np.inf], faults)
    return _with_and_without(run, bad_steps, poisons, steps, seed)


# Every adaptive rule (per leaf for AdaGC's ema) and a fixed clip, one chain, so that one compiled run checks them all.
_guarded_run = _make_run(
    optclip.skip_nonfinite(
        optax.chain(
            optclip.clip_by_leaf_norm(optclip.ema(), name="ema"),
            optclip.clip_by_global_norm(optclip.zscore(), name="zscore"),
            optclip.clip_by_global_norm(optclip.percentile(), name="percentile"),
            optclip.clip_by_global_norm(optclip.quantile(), name="quantile"),
            optclip.clip_by_global_norm(1.0),
            optax.adam(3e-3),
        )
    )
)


@pytest.mark.parametrize("where", ["one_leaf", "all_leaves", "loss"])
def test_fault_injection_ends_bit_identical_to_the_run_without_those_batches(where):
    history, (clean_params, clean_state) = _fault_run(_guarded_run, where)
    params, state = _at(history, -1)
    assert _bits(params) == _bits(clean_params)
    assert _bits(state.inner_state) == _bits(clean_state.inner_state)
    assert int(optclip.stats(state)["skip_nonfinite/total_skipped"]) == 25
    assert int(optclip.stats(clean_state)["skip_nonfinite/total_skipped"]) == 0
    # The adaptive rules inside: a rule reports an infinite threshold while it has nothing to go on (its warm-up,
    # its documented "no limit"); apart from that no statistic is ever non-finite, and none is NaN.
    for key, values in optclip.stats(history[1]).items():
        values = np.asarray(values)
        allowed = np.isposinf(values) & key.endswith("/threshold") & (np.arange(len(values)) < 100)
        assert np.all(np.isfinite(values) | allowed), (key, np.flatnonzero(~np.isfinite(values)))
    final = optclip.stats(state)
    assert all(0 < float(final[f"{rule}/threshold"]) < np.inf for rule in ("ema", "zscore", "percentile", "quantile"))


def test_spike_injection_is_skipped_and_normal_steps_are_not():
    steps, spikes = 600, 12
    run = _make_run(optclip.skip_on_spike(optax.adam(3e-3)), pass_loss=False)  # the gradient norm is watched
    rng = np.random.default_rng(3)
    spike_steps = np.sort(rng.choice(np.arange(100, steps), spikes, replace=False))
    poisons = np.ones((steps, 3), np.float32)
    poisons[spike_steps, 1] = 1e3
    history, (clean_params, clean_state) = _with_and_without(run, spike_steps, poisons, steps, seed=2)
    skipped = np.flatnonzero(np.asarray(optclip.stats(history[1])["skip_on_spike/skipped"]))
    assert set(spike_steps.tolist()) <= set(skipped.tolist())
    assert len(set(skipped.tolist()) - set(spike_steps.tolist())) <= steps // 100  # false skips
    params, state = _at(history, -1)
    assert _bits(params) == _bits(clean_params)
    assert _bits(state.inner_state) == _bits(clean_state.inner_state)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: optclip.skip_nonfinite(optax.sgd(1.0), policy="ignore"), "policy.*'ignore'"),
        (lambda: optclip.skip_nonfinite(optax.sgd(1.0), max_consecutive=0), "max_consecutive.*0"),
        (lambda: optclip.skip_nonfinite(optax.sgd(1.0), max_consecutive=2.5), "max_consecutive.*2.5"),
        (lambda: optclip.skip_nonfinite(optax.sgd(1.0), policy="zero", max_consecutive=3), "max_consecutive.*'zero'"),
        (lambda: optclip.skip_nonfinite(lambda g: g), "inner"),
        (lambda: optclip.skip_nonfinite(optax.sgd(1.0), name="a b"), "name"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), k=0.0), "k.*0.0"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), k=-1), "k.*-1"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), k=float("nan")), "k.*nan"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), window=1), "window.*1"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), window=True), "window.*True"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), warmup=1), "warmup.*1"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), max_consecutive=0), "max_consecutive.*0"),
        (lambda: optclip.skip_on_spike("adam"), "inner"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_spike_guard_rejects_a_loss_that_is_not_a_scalar():
    tx = optclip.skip_on_spike(optax.sgd(1.0))
    params = _params()
    with pytest.raises(ValueError, match=r"loss must be a scalar.*\(4,\)"):
        tx.update(_grads(), tx.init(params), params, loss=jnp.ones(4))


def test_inject_hyperparams_injects_k_and_asks_for_static_integers():
    params = _params()
    tx = optax.inject_hyperparams(optclip.skip_on_spike, static_args=("window", "warmup"))(
        optax.sgd(1.0), k=2.0, window=4, warmup=2
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    for fill in (1.0, 1.1, 0.9, 100.0):
        _, state = update(_grads(fill), state, params)
    assert float(optclip.stats(state)["skip_on_spike/skipped"]) == 1.0
    state.hyperparams["k"] = jnp.float32(1e6)  # an injected k can change between steps
    _, state = update(_grads(100.0), state, params)
    assert float(optclip.stats(state)["skip_on_spike/skipped"]) == 0.0
    with pytest.raises(ValueError, match=r"window must be an integer.*static_args"):
        optax.inject_hyperparams(optclip.skip_on_spike)(optax.sgd(1.0), window=8).init(params)
