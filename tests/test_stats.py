"""Clip statistics (optclip/_stats.py): their values, and ``optclip.stats`` through every kind of nested state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optclip

METRICS = ("norm", "threshold", "scale", "norm_after", "clipped")


def _stats_after(tx, grads, params=None):
    params = grads if params is None else params
    _, state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    return {key: round(float(value), 5) for key, value in optclip.stats(state).items()}


def _named(name, values):
    return {f"{name}/{metric}": value for metric, value in zip(METRICS, values)}


def test_global_norm_stats():
    grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    assert _stats_after(optclip.clip_by_global_norm(1.0), grads) == _named("clip_by_global_norm", (5, 1, 0.2, 1, 1))
    assert _stats_after(optclip.clip_by_global_norm(10.0), grads) == _named("clip_by_global_norm", (5, 10, 1, 5, 0))


def test_leaf_norm_stats_are_the_extremes_and_the_fraction_clipped():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5]), "c": jnp.array([2.0])}
    # norms 5, 0.5, 2 against 1: largest norm 5, smallest scale 0.2, largest norm after 1, two of three clipped
    expected = _named("clip_by_leaf_norm", (5, 1, 0.2, 1, round(2 / 3, 5)))
    assert _stats_after(optclip.clip_by_leaf_norm(1.0), grads) == expected


def test_adaptive_grad_clip_stats_are_ratios_to_the_weights():
    grads = {"w": jnp.array([[3.0, 0.1], [4.0, 0.0]])}  # unit norms 5 and 0.1
    params = {"w": jnp.array([[6.0, 1.0], [8.0, 0.0]])}  # unit norms 10 and 1
    # ratios 0.5 and 0.1 against 0.2: the first unit is clipped to 0.2 (scale 0.4), the second is not
    expected = _named("adaptive_grad_clip", (0.5, 0.2, 0.4, 0.2, 0.5))
    assert _stats_after(optclip.adaptive_grad_clip(0.2), grads, params) == expected


def test_adaptive_grad_clip_full_stats_name_each_leaf_its_own_units():
    # AGC measures and clips its units in an order of its own (by unit count, small leaves stacked), not the leaves';
    # each leaf's largest ratio and fraction of units clipped must still be its own. Units: the input dims (axis 0).
    rng = np.random.default_rng(0)
    shapes = {"a": (64, 96), "b": (5,), "c": (4, 3), "d": (100, 48), "e": (4, 3), "f": (2, 3)}
    grads = {k: jnp.asarray(rng.normal(size=s) * (1 + i), jnp.float32) for i, (k, s) in enumerate(shapes.items())}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    ratio = 1.5
    found = _stats_after(optclip.adaptive_grad_clip(ratio, stats="full"), grads, params)
    for key in shapes:
        g, w = np.asarray(grads[key], np.float64), np.asarray(params[key], np.float64)
        axis = None if g.ndim == 1 else 0
        ratios = np.linalg.norm(g, axis=axis) / np.maximum(np.linalg.norm(w, axis=axis), 1e-3)
        assert found[f"adaptive_grad_clip/norm/{key}"] == pytest.approx(ratios.max(), rel=1e-5)
        assert found[f"adaptive_grad_clip/clipped/{key}"] == pytest.approx(np.mean(ratios > ratio), abs=1e-5)


def test_clip_by_value_stats():
    grads = {"w": jnp.array([3.0, -4.0, 0.5, 0.0])}
    after = np.sqrt(1 + 1 + 0.25)
    expected = _named(
        "clip_by_value", (round(np.sqrt(25.25), 5), 1, round(after / np.sqrt(25.25), 5), round(after, 5), 0.5)
    )
    assert _stats_after(optclip.clip_by_value(1.0, stats="full"), grads) == expected
    # The default level keeps what the clamp needs no extra read for: the pre-clip norm and the bound.
    assert _stats_after(optclip.clip_by_value(1.0), grads) == {
        "clip_by_value/norm": round(np.sqrt(25.25), 5),
        "clip_by_value/threshold": 1.0,
    }


@pytest.mark.parametrize(
    "factory",
    [optclip.clip_by_global_norm, optclip.clip_by_leaf_norm, lambda c: optclip.clip_by_value(c, stats="full")],
    ids=["clip_by_global_norm", "clip_by_leaf_norm", "clip_by_value"],
)
def test_stats_before_the_first_update_are_an_all_zero_step(factory, request):
    tx = factory(1.0)
    name = request.node.callspec.id
    stats = {k: float(v) for k, v in optclip.stats(tx.init({"w": jnp.ones(3)})).items()}
    assert stats == _named(name, (0.0, 0.0, 1.0, 0.0, 0.0))
    assert all(v.dtype == jnp.float32 and v.shape == () for v in optclip.stats(tx.init({"w": jnp.ones(3)})).values())


def _wrapped(kind):
    """``(transform, read)``: a clip named "inner" inside ``kind``; ``read(state)`` is what a user passes to stats."""
    clip = optclip.clip_by_global_norm(1.0, name="inner")
    chain = optax.chain(clip, optax.sgd(0.1))
    return {
        "chain": chain,
        "named_chain": optax.named_chain(("clip", clip), ("sgd", optax.sgd(0.1))),
        "inject_hyperparams": optax.inject_hyperparams(
            lambda learning_rate: optax.chain(clip, optax.sgd(learning_rate))
        )(0.1),
        "masked": optax.masked(chain, {"a": True, "b": True}),
        "partition": optax.partition({"x": chain}, {"a": "x", "b": "x"}),
        "multisteps": optax.MultiSteps(chain, every_k_schedule=1),
        "apply_if_finite": optax.apply_if_finite(chain, max_consecutive_errors=2),
    }[kind]


@pytest.mark.parametrize(
    "kind", ["chain", "named_chain", "inject_hyperparams", "masked", "partition", "multisteps", "apply_if_finite"]
)
def test_stats_are_found_in_nested_states(kind):
    grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    assert _stats_after(_wrapped(kind), grads) == _named("inner", (5, 1, 0.2, 1, 1))


def test_stats_are_found_in_a_flax_nnx_optimizer_and_its_state():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(optclip.clip_by_global_norm(0.01), optax.sgd(0.1)), wrt=nnx.Param)
    x = jnp.array([[3.0, 4.0]])
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)  # d/dkernel = x, d/dbias = 1: norm sqrt(26)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x)))(model))

    step(model, optimizer)
    norm = float(optclip.global_norm(grads))
    np.testing.assert_allclose(norm, np.sqrt(26.0), rtol=1e-6)
    for source in (optimizer, optimizer.opt_state):
        stats = optclip.stats(source)
        np.testing.assert_allclose(float(stats["clip_by_global_norm/norm"]), norm, rtol=1e-6)
        assert float(stats["clip_by_global_norm/clipped"]) == 1.0


def test_two_clips_with_one_name_are_refused_and_name_keeps_them_apart():
    grads = {"w": jnp.array([3.0, 4.0])}
    clash = optax.chain(optclip.clip_by_global_norm(1.0), optclip.clip_by_global_norm(2.0))
    with pytest.raises(ValueError, match=r"'clip_by_global_norm'.*name="):
        optclip.stats(clash.init(grads))
    apart = optax.chain(optclip.clip_by_global_norm(4.0, name="first"), optclip.clip_by_global_norm(2.0, name="second"))
    stats = _stats_after(apart, grads)
    assert stats["first/norm"] == 5.0 and stats["first/norm_after"] == 4.0
    assert stats["second/norm"] == 4.0 and stats["second/norm_after"] == 2.0  # it sees the first clip's output


def test_stats_never_change_the_update():
    grads = {"a": jnp.array([3.0, -1.0]), "b": jnp.array([4.0])}
    default, named = optclip.clip_by_global_norm(1.0), optclip.clip_by_global_norm(1.0, name="other")
    updates, state = default.update(grads, default.init(grads))
    renamed, _ = named.update(grads, named.init(grads))
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(renamed)):
        np.testing.assert_array_equal(a, b)
    # Dropping the state (stats included) lets XLA remove their computation: the update must not move.
    only_updates = jax.jit(lambda g: default.update(g, default.init(g))[0])(grads)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(only_updates)):
        np.testing.assert_allclose(a, b, rtol=1e-7)
    before = jax.tree.map(np.asarray, state)
    read = optclip.stats(state)
    assert list(read) == [f"clip_by_global_norm/{metric}" for metric in METRICS]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state))  # reading is pure


def test_states_without_clips_have_no_stats():
    assert optclip.stats(optax.adam(1e-3).init({"w": jnp.zeros(2)})) == {}


@dataclasses.dataclass(frozen=True)
class _LargestSeen:
    """A minimal stateful rule: threshold 1, and the largest norm it was fed (to see what reaches a rule)."""

    def init(self):
        return jnp.zeros((), jnp.float32)

    def update(self, norm, state, count):
        return jnp.float32(1.0), jnp.maximum(state, norm)

    def stats(self, state):
        return {"largest_seen": state}


def test_rule_stats_skip_non_finite_norms_and_average_over_leaves():
    rule = _LargestSeen()
    tx = optclip.clip_by_global_norm(rule)
    state, update = tx.init({"w": jnp.zeros(2)}), jax.jit(tx.update)
    for grads in ({"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([jnp.nan, 1e3])}, {"w": jnp.array([1.0, 0.0])}):
        _, state = update(grads, state)
    assert float(optclip.stats(state)["clip_by_global_norm/largest_seen"]) == 5.0  # the NaN step never entered
    leafwise = optclip.clip_by_leaf_norm(rule)
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0]), "c": jnp.array([jnp.inf])}
    _, state = jax.jit(leafwise.update)(grads, leafwise.init(grads))
    assert state.rule_state.shape == (3,)  # one rule state per leaf
    np.testing.assert_allclose(np.asarray(state.rule_state), [5.0, 1.0, 0.0])
    assert float(optclip.stats(state)["clip_by_leaf_norm/largest_seen"]) == 2.0  # the mean over leaves
