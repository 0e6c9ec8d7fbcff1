"""Guards: skip_nonfinite and skip_on_spike skip bad steps exactly, count them, and leave good steps alone."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lowering import lowered_text, runtime_control_flow
from hypothesis import given
from hypothesis import strategies as st

import optclip
from optclip import _norms

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
    with pytest.raises(FloatingPointError, match=r"step 2 .*first non-finite gradient leaf layer/kernel"):
        tx.update(bad, state, params)

    step = jax.jit(lambda g, s, loss: tx.update(g, s, params, loss=loss))
    _, jit_state = step(good, tx.init(params), 1.0)
    with pytest.raises(Exception, match=r"step 1 .*leaf layer/kernel \(2 of 3 leaves\)"):
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
    assert float(optclip.stats(state)["spike/loss"]) == 0.5  # the loss is watched, and the gradient norm too
    assert float(optclip.stats(state)["spike/norm"]) == pytest.approx(3.0 * float(optclip.global_norm(_grads())))
    _, state = tx.update(_grads(), state, params, factor=3.0, loss=jnp.float32(np.nan))
    assert float(optclip.stats(state)["skip_nonfinite/skipped"]) == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# skip_on_spike: the window rule


def _reference_spike_skips(values, *, k, window, warmup, std_floor=1e-3):
    """NumPy, float64: skip iff non-finite, or (once ``warmup`` values entered) ``x - mean > k * sigma`` over the last
    ``window`` values entered, ``sigma = max(std (ddof 1), std_floor * |mean|)``. A finite value enters unless it is
    a spike after a value that was not; such a spike is held back and enters with the next value if that is a spike
    too."""
    seen, skips, thresholds = [], [], []
    held, holding, spiked = None, False, False
    for x in values:
        recent = np.asarray(seen[-window:], np.float64)
        mean = recent.mean() if len(recent) else 0.0
        std = recent.std(ddof=1) if len(recent) > 1 else 0.0
        sigma = max(std, std_floor * abs(mean))
        spike = bool(np.isfinite(x) and len(seen) >= warmup and x - mean > k * sigma)
        skips.append(spike or not np.isfinite(x))
        thresholds.append(mean + k * sigma)
        if np.isfinite(x):
            if spike and holding:
                seen.append(held)
            if not spike or spiked:
                seen.append(x)
            holding = spike and not spiked
            held = x if holding else held
            spiked = spike
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


def _spike_run(tx, norms, losses=None):
    """``skipped`` per step of ``tx`` fed gradients of global norm ``norms[t]`` (one leaf of 4 equal entries) and,
    when given, ``losses[t]``; with every step's statistics. One jitted scan."""
    norms = np.asarray(norms, np.float32)
    pass_loss = losses is not None
    losses = np.asarray(losses if pass_loss else np.zeros_like(norms), np.float32)
    params = {"w": jnp.zeros(4)}

    @jax.jit
    def run(norms, losses):
        def step(state, inputs):
            norm, loss = inputs
            grads = {"w": jnp.full(4, norm / 2)}
            _, state = tx.update(grads, state, params, **({"loss": loss} if pass_loss else {}))
            return state, optclip.stats(state)

        return jax.lax.scan(step, tx.init(params), (norms, losses))[1]

    stats = {key: np.asarray(getattr(value, "index", value)) for key, value in run(norms, losses).items()}
    return stats["skip_on_spike/skipped"].astype(bool), stats


def _noisy(level, steps, seed, noise=0.02):
    return level * (1 + noise * np.random.default_rng(seed).standard_normal(steps))


@pytest.mark.parametrize("watched", ["norm", "loss"])
def test_a_lasting_level_shift_up_resumes_within_the_window(watched):
    window, before, after = 32, 64, 96
    series = np.concatenate([_noisy(1.0, before, 0), _noisy(2.0, after, 1)])
    calm = _noisy(1.0, before + after, 2)
    tx = optclip.skip_on_spike(optax.sgd(1.0), window=window)  # no max_consecutive
    skipped, _ = _spike_run(tx, *((series, calm) if watched == "norm" else (calm, series)))
    assert not skipped[:before].any()
    assert skipped[before]  # the shift is a spike when it comes
    # Every finite value enters the window, skipped or not: within `window` steps the window holds only the new level.
    assert not skipped[before + window :].any()
    assert skipped.sum() < window


@pytest.mark.parametrize("watched", ["norm", "loss"])
def test_a_level_shift_down_is_never_skipped_and_the_window_follows_it(watched):
    window, before, after = 32, 64, 64
    series = np.concatenate([_noisy(2.0, before, 0), _noisy(1.0, after, 1), [2.0]])  # then the old level again
    calm = _noisy(1.0, before + after + 1, 2)
    tx = optclip.skip_on_spike(optax.sgd(1.0), window=window)
    skipped, _ = _spike_run(tx, *((series, calm) if watched == "norm" else (calm, series)))
    assert not skipped[:-1].any()
    assert skipped[-1]  # the old level is a spike against the new one


def test_a_flat_window_does_not_turn_rounding_noise_into_spikes():
    steps = 100
    wobble = 1.0 + 1e-4 * np.random.default_rng(0).uniform(0, 1, steps)
    norms = np.concatenate([np.ones(steps), wobble, [1.1]])  # identical values (std 0), then noise, then +10%
    tx = optclip.skip_on_spike(optax.sgd(1.0), window=32)
    skipped, stats = _spike_run(tx, norms)
    assert stats["skip_on_spike/std"][steps] == 0.0
    assert not skipped[:-1].any()  # the floor 1e-3 * |mean| lets +1e-4 relative through
    assert skipped[-1]
    unfloored, _ = _spike_run(optclip.skip_on_spike(optax.sgd(1.0), window=32, std_floor=0.0), norms)
    assert unfloored[steps:-1].any()  # without the floor the same noise is a "spike"


def test_nonfinite_gradients_with_a_finite_loss_are_skipped_and_stay_out_of_the_window():
    tx = optclip.skip_on_spike(optax.sgd(1.0), window=8)
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t, bad in enumerate([np.nan, np.inf, 1.0, 1.0, np.nan]):  # before and after anything is armed
        grads = _grads(1.0)
        grads["w"] = grads["w"].at[0, 0].set(bad)
        updates, state = update(grads, state, params, loss=jnp.float32(1.0))
        stats = optclip.stats(state)
        assert bool(stats["skip_on_spike/skipped"]) == (not np.isfinite(bad)), t
        assert int(stats["skip_on_spike/culprit"]) == (-1 if np.isfinite(bad) else 1)  # the first bad leaf: w
    assert int(state.norms.count) == 2 and int(state.losses.count) == 5
    assert _bits(updates) == _bits(jax.tree.map(jnp.zeros_like, params))


def test_a_loss_spike_with_normal_gradients_is_skipped():
    steps = 40
    losses = np.concatenate([_noisy(3.0, steps, 0), [6.0], _noisy(3.0, 3, 1)])
    norms = _noisy(1.0, steps + 4, 2)
    skipped, stats = _spike_run(optclip.skip_on_spike(optax.sgd(1.0), window=32), norms, losses)
    assert skipped.tolist() == [False] * steps + [True, False, False, False]
    assert stats["skip_on_spike/loss_armed"][steps] and stats["skip_on_spike/norm"][steps] < 1.2
    assert stats["skip_on_spike/loss_threshold"][steps] < 6.0 < stats["skip_on_spike/threshold"][steps] + 6
    assert stats["skip_on_spike/culprit"][steps] == -1  # the gradients did not spike: no leaf to blame


def test_an_isolated_spike_after_warm_up_is_skipped_and_leaves_the_bar_where_it_was():
    window, steps = 32, 120
    norms = _noisy(1.0, steps, 0)
    norms[40] = norms[50] = 1e3  # isolated: each is held back, then dropped when the next step is normal
    norms[90] = norms[91] = 1e3  # a run of two: both skipped, then both enter (the start of a new level?)
    skipped, stats = _spike_run(optclip.skip_on_spike(optax.sgd(1.0), window=window), norms)
    assert np.flatnonzero(skipped).tolist() == [40, 50, 90, 91]
    threshold = stats["skip_on_spike/threshold"]
    assert threshold[41:91].max() < 1.5 and threshold[92:].min() > 100
    assert (stats["skip_on_spike/culprit"] == np.where(skipped, 0, -1)).all()


def _olmo_core_skips(losses, grad_norms, rolling_interval_length, sigma_factor):
    """OLMo-core's ``SkipStepOptimizer.get_step_factor`` (src/olmo_core/optim/skip_step_optimizer.py at fa6c5014),
    line for line in NumPy: the lists keep the last ``rolling_interval_length + 1`` values, the current included,
    every value appended whether skipped or not; the step is skipped unless both ``x - mean <= sigma * std``."""
    kept_losses, kept_norms, skipped = [], [], []
    for loss, norm in zip(losses, grad_norms):
        kept_losses = [*kept_losses, loss][-(rolling_interval_length + 1) :]
        kept_norms = [*kept_norms, norm][-(rolling_interval_length + 1) :]
        if len(kept_losses) < max(2, rolling_interval_length // 2):
            skipped.append(False)
            continue
        ok = True
        for kept in (kept_losses, kept_norms):
            previous = np.asarray(kept[:-1], np.float64)
            ok &= kept[-1] - previous.mean() <= sigma_factor * previous.std(ddof=1)
        skipped.append(not ok)
    return skipped


@pytest.mark.parametrize("spike_at", [62, 63])
def test_warm_up_arms_at_olmo_cores_step(spike_at):
    window, steps = 128, 100
    losses, norms = _noisy(3.0, steps, 0, noise=0.1), _noisy(1.0, steps, 1, noise=0.1)
    norms[spike_at] = 20.0
    skipped, stats = _spike_run(optclip.skip_on_spike(optax.sgd(1.0), window=window), norms, losses)
    assert skipped.tolist() == _olmo_core_skips(losses, norms, window, 6)
    assert skipped[spike_at] == (spike_at >= 63)  # the first step that can be skipped is number 63, OLMo-core's
    assert np.flatnonzero(stats["skip_on_spike/armed"])[0] == 63


def test_max_consecutive_lets_a_step_through():
    losses = [1.0, 1.1, 0.9, 1.0, 1e2, 1e4, 1e6, 1e8]  # each a spike against the window before it
    limited = optclip.skip_on_spike(optax.sgd(1.0), window=8, warmup=4, max_consecutive=2)
    skipped, _ = _spike_run(limited, np.ones(len(losses)), losses)
    # Two spikes are skipped, the third is let through (max_consecutive=2) and the count starts again.
    assert skipped.tolist() == [False, False, False, False, True, True, False, True]
    skipped, _ = _spike_run(optclip.skip_on_spike(optax.sgd(1.0), window=8, warmup=4), np.ones(len(losses)), losses)
    assert skipped.tolist() == [False, False, False, False, True, True, True, True]


# ---------------------------------------------------------------------------------------------------------------------
# One norm per step: the guards measure the gradients once and hand the measurement down

_SHAPES = {"a": (17, 3), "b": (5, 7, 2), "c": (11,)}  # distinct shapes: a reduction's input names its leaf


def _recommended_stack(policy="skip"):
    """The stack docs/guards.md recommends."""
    inner = optax.chain(optclip.clip_by_global_norm(optclip.zscore()), optax.adam(1e-3))
    return optclip.skip_on_spike(optclip.skip_nonfinite(inner, policy=policy))


def _optimized_hlo(tx, with_loss=False):
    params = {k: jnp.zeros(s) for k, s in _SHAPES.items()}

    def step(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, **({"loss": loss} if with_loss else {}))
        return optax.apply_updates(params, updates), state

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params, jnp.float32(1.0))
    return lowered.compile().as_text()


def _gradient_reads(hlo):
    """Per gradient leaf, the reductions in the whole module (loop bodies and branches included) whose input has
    that leaf's shape: each is one read of the leaf for a norm (the update kernels are elementwise)."""
    leaf_of = {"f32[" + ",".join(map(str, s)) + "]": k for k, s in _SHAPES.items()}
    shapes, reads = {}, dict.fromkeys(_SHAPES, 0)
    for line in hlo.splitlines():
        found = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\((%[\w.\-]+)?", line)
        if found is None:
            continue
        name, shape, op, operand = found.groups()
        shapes[name] = shape
        if op == "reduce" and shapes.get(operand) in leaf_of:
            reads[leaf_of[shapes[operand]]] += 1
    return reads


@pytest.mark.parametrize("with_loss", [False, True])
def test_the_recommended_stack_reads_the_gradients_for_norms_once(monkeypatch, with_loss):
    once = dict.fromkeys(_SHAPES, 1)
    assert _gradient_reads(_optimized_hlo(_recommended_stack(), with_loss)) == once
    # Not vacuous: without the hand-over each guard and the clip read every leaf again.
    monkeypatch.setattr(_norms, "handing_over", lambda extra_args, record: dict(extra_args))
    assert _gradient_reads(_optimized_hlo(_recommended_stack(), with_loss)) == dict.fromkeys(_SHAPES, 3)


def test_zeroed_gradients_are_new_arrays_that_the_clip_measures_itself():
    # policy="zero": the guards read the gradients once, the clip reads the zeroed copy: two reads, not three.
    assert _gradient_reads(_optimized_hlo(_recommended_stack(policy="zero"))) == dict.fromkeys(_SHAPES, 2)
    inner = optax.chain(optclip.clip_by_global_norm(1.0), optax.sgd(1.0))
    tx = optclip.skip_nonfinite(inner, policy="zero")
    params = {"w": jnp.zeros(3)}
    _, state = jax.jit(tx.update)({"w": jnp.array([3.0, np.nan, 4.0])}, tx.init(params), params)
    assert float(optclip.stats(state)["clip_by_global_norm/norm"]) == 5.0  # the zeroed gradients' norm, not NaN


def test_a_clip_inside_the_guards_sees_the_same_norm_it_would_measure():
    inner = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(0.1))
    tx = optclip.skip_on_spike(optclip.skip_nonfinite(inner))
    params = {k: jnp.zeros(s) for k, s in _SHAPES.items()}
    grads = {k: jnp.full(s, 0.3) for k, s in _SHAPES.items()}
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    expected, inner_state = jax.jit(inner.update)(grads, inner.init(params), params)
    assert _bits(updates) == _bits(expected)
    assert _bits(state.inner_state.inner_state) == _bits(inner_state)
    stats = optclip.stats(state)
    assert float(stats["skip_on_spike/norm"]) == float(stats["clip_by_global_norm/norm"])
    assert float(stats["skip_on_spike/norm"]) == pytest.approx(float(optclip.global_norm(grads)), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: no conditional on the common path


def _stacks():
    return {
        "skip_nonfinite": optclip.skip_nonfinite(optax.adam(1e-3)),
        "skip_nonfinite_zero": optclip.skip_nonfinite(optax.adam(1e-3), policy="zero"),
        "skip_on_spike": optclip.skip_on_spike(optax.adam(1e-3)),
        "recommended": _recommended_stack(),
    }


@pytest.mark.parametrize("kind", list(_stacks()))
def test_guards_lowered_for_gpu_have_no_control_flow(kind):
    tx = _stacks()[kind]
    params = {k: jnp.zeros(s) for k, s in _SHAPES.items()}

    def step(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state

    args = (params, tx.init(params), params, jnp.float32(1.0))
    assert runtime_control_flow(lowered_text(step, *args, platform="cuda")) == []
    assert runtime_control_flow(lowered_text(step, *args, platform="cpu"))  # the conditional is there on CPU


@pytest.mark.parametrize("kind", list(_stacks()))
def test_the_select_form_gives_the_bits_of_the_conditional(monkeypatch, kind):
    # The GPU form cannot run here; run it on CPU in place of the conditional, over good, NaN and spiking steps.
    fills = [0.5, 0.4, 0.6, np.nan, 0.5, 0.45, 0.55, 0.5, 50.0, 0.5]

    def run():
        tx = _stacks()[kind]
        params = {k: jnp.zeros(s) for k, s in _SHAPES.items()}
        state, seen = tx.init(params), []
        update = jax.jit(lambda g, s, loss: tx.update(g, s, params, loss=loss))
        for fill in fills:
            updates, state = update({k: jnp.full(s, fill) for k, s in _SHAPES.items()}, state, jnp.float32(fill))
            seen.append(_bits((updates, state)))
        return seen

    conditional = run()
    real, selected = jax.lax.platform_dependent, []

    def guards_take_the_default(*args, default, **per_platform):
        # Only the guards' choice: the norm's own one-read form is checked in test_norms (it may differ by an ulp).
        if per_platform["cpu"].__qualname__.startswith("run_unless."):
            selected.append(kind)
            return default(*args)
        return real(*args, default=default, **per_platform)

    monkeypatch.setattr(jax.lax, "platform_dependent", guards_take_the_default)
    assert run() == conditional
    assert selected


# ---------------------------------------------------------------------------------------------------------------------
# The culprit


def _culprits(state):
    return {key: value for key, value in optclip.host_stats(state).items() if key.endswith("/culprit")}


def test_skip_nonfinite_names_the_first_nonfinite_leaf_in_stats_and_errors():
    params = {"enc": {"bias": jnp.zeros(2), "frozen": None, "kernel": jnp.zeros((2, 2))}, "out": jnp.zeros(2)}
    grads = {"enc": {"bias": jnp.ones(2), "frozen": None, "kernel": jnp.ones((2, 2))}, "out": jnp.ones(2)}
    grads["enc"]["kernel"] = grads["enc"]["kernel"].at[1, 1].set(np.inf)
    grads["out"] = grads["out"].at[0].set(np.nan)
    tx = optclip.skip_nonfinite(optax.sgd(0.1), stats="full")
    update = jax.jit(tx.update)
    _, state = update(grads, tx.init(params), params)
    culprit = optclip.stats(state)["skip_nonfinite/culprit"]
    assert culprit.index.dtype == jnp.int32
    assert int(culprit) == 2  # slots: enc/bias, enc/frozen (None), enc/kernel, out
    assert _culprits(state) == {"skip_nonfinite/culprit": "enc/kernel"}
    assert float(optclip.stats(state)["skip_nonfinite/leaf_norm/enc/bias"]) == pytest.approx(np.sqrt(2))
    assert np.isnan(float(optclip.stats(state)["skip_nonfinite/leaf_norm/out"]))
    _, state = update(jax.tree.map(jnp.ones_like, params), state, params)
    assert int(optclip.stats(state)["skip_nonfinite/culprit"]) == -1
    assert _culprits(state) == {"skip_nonfinite/culprit": None}
    raising = optclip.skip_nonfinite(optax.sgd(0.1), policy="raise")  # the same index names the leaf
    with pytest.raises(FloatingPointError, match=r"leaf enc/kernel \(2 of 3 leaves\)"):
        raising.update(grads, raising.init(params), params)


def test_skip_on_spike_names_the_leaf_whose_squared_norm_rose_most():
    params = {"bias": jnp.zeros(4), "kernel": jnp.zeros((16, 16))}
    tx = optclip.skip_on_spike(optax.sgd(0.1), window=16, stats="full")
    update = jax.jit(tx.update)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(12):
        wobble = 1 + 0.05 * rng.standard_normal()
        _, state = update({"bias": jnp.full(4, 0.005 * wobble), "kernel": jnp.full((16, 16), 0.1 * wobble)}, state)
    # The bias's norm rises 100x (0.01 -> 1), the kernel's 4x (1.6 -> 6.4): the kernel made the global norm spike.
    _, state = update({"bias": jnp.full(4, 0.5), "kernel": jnp.full((16, 16), 0.4)}, state)
    stats = optclip.stats(state)
    assert bool(stats["skip_on_spike/skipped"])
    assert _culprits(state) == {"skip_on_spike/culprit": "kernel"}
    assert float(stats["skip_on_spike/leaf_level/kernel"]) == pytest.approx(1.6, rel=0.1)
    assert float(stats["skip_on_spike/leaf_norm/kernel"]) == pytest.approx(6.4)


def test_culprits_through_nested_guards_and_a_chain():
    tx = optax.chain(optclip.skip_on_spike(optclip.skip_nonfinite(optax.sgd(0.1)), window=4), optax.identity())
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    _, state = jax.jit(tx.update)({"a": jnp.ones(2), "b": jnp.array([1.0, np.nan])}, tx.init(params), params)
    # The outer guard skips, so the inner one never runs and keeps its initial "none".
    assert _culprits(state) == {"skip_on_spike/culprit": "b", "skip_nonfinite/culprit": None}


@pytest.mark.parametrize("make", [optclip.skip_nonfinite, optclip.skip_on_spike])
def test_stats_levels(make):
    params = {"b": jnp.zeros(2), "w": jnp.zeros((2, 2))}
    grads = jax.tree.map(jnp.ones_like, params)
    keys = {}
    for level in ("none", "basic", "full"):
        tx = make(optax.sgd(0.1), stats=level)
        init_keys = set(optclip.stats(tx.init(params)))
        _, state = tx.update(grads, tx.init(params), params)
        keys[level] = set(optclip.stats(state))
        assert keys[level] == init_keys
    name = make(optax.sgd(0.1)).init(params).stats.by_name.keys()
    (name,) = name
    assert keys["none"] == set()
    assert f"{name}/culprit" in keys["basic"] and all(key.count("/") == 1 for key in keys["basic"])
    per_leaf = keys["full"] - keys["basic"]
    assert per_leaf and {key.rsplit("/", 1)[1] for key in per_leaf} == {"b", "w"}


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
    spike_steps = np.sort(rng.choice(np.arange(100, steps, 2), spikes, replace=False))  # isolated: none adjacent
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
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), std_floor=-1e-3), "std_floor.*-0.001"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), std_floor=float("inf")), "std_floor.*inf"),
        (lambda: optclip.skip_on_spike(optax.sgd(1.0), stats="all"), "stats.*'all'"),
        (lambda: optclip.skip_nonfinite(optax.sgd(1.0), stats="some"), "stats.*'some'"),
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
