"""Every threshold rule with every scope (issue 11): accepted and working, or refused at construction.

A scope takes the rules that can digest its norms (``optclip._rules.as_rule``): the global and leaf clips take every
rule (a scalar rule runs once per leaf), AGC's unit scope only numbers and schedules, per-example clipping the rules
that take a vector of norms. Each accepted pair runs a few jitted steps on a tree with a frozen (``None``) and a
masked-out (``optax.MaskedNode``) leaf, alone, inside ``optax.masked`` and inside ``optax.MultiSteps``, and its state
keeps its structure, shapes and dtypes step after step (no silent broadcasting); each pair's state alone survives an
orbax round trip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optclip

RULES = {
    "number": lambda: 1.0,
    "schedule": lambda: optax.linear_schedule(2.0, 0.5, 4),
    "percentile": lambda: optclip.percentile(50.0, history=4),
    "zscore": lambda: optclip.zscore(z_thresh=1.0, warmup=2, max_norm=None),
    "ema": lambda: optclip.ema(warmup=2),
    "quantile": lambda: optclip.quantile(),
}
VECTOR_RULES = {"number", "schedule", "quantile"}  # what per-example clipping can feed
SCOPES = {
    "global": lambda rule: optclip.clip_by_global_norm(rule),
    "leaf": lambda rule: optclip.clip_by_leaf_norm(rule),
    "unit": lambda rule: optclip.adaptive_grad_clip(rule),
    "per_example_flat": lambda rule: optclip.clip_per_example(rule),
    "per_example_per_leaf": lambda rule: optclip.clip_per_example(rule, mode="per_leaf"),
}
ACCEPTS = {
    "global": set(RULES),
    "leaf": set(RULES),
    "unit": {"number", "schedule"},
    "per_example_flat": VECTOR_RULES,
    "per_example_per_leaf": VECTOR_RULES,
}
BATCH, STEPS = 4, 5
SHAPES = {"a": (3, 4), "b": (5,), "frozen": (2,)}


def _params(wrapper: str):
    params = {k: jnp.full(s, 0.5, jnp.float32) for k, s in SHAPES.items()}
    if wrapper == "multi_steps":  # optax.MultiSteps accumulates a gradient per parameter: None on both sides there
        params["frozen"] = None
    return params


def _grads(step: int, per_example: bool) -> dict:
    rng = np.random.default_rng(step)
    scale = 20.0 if step == 3 else 1.0

    def leaf(shape):
        full = (BATCH, *shape) if per_example else shape
        return jnp.asarray(rng.normal(size=full) * scale, jnp.float32)

    return {"a": leaf(SHAPES["a"]), "b": leaf(SHAPES["b"]), "frozen": None}  # a frozen parameter has no gradient


def _wrapped(kind: str, tx: optax.GradientTransformation, per_example: bool) -> optax.GradientTransformation:
    mask = {"a": True, "b": False, "frozen": True}
    if per_example:
        # Both wrappers work on gradients shaped like the parameters, which per-example gradients are only once
        # clip_per_example has reduced the batch axis: the wrapper goes after it (the other order is refused:
        # tests/test_per_example.py).
        if kind == "masked":
            return optax.chain(tx, optax.masked(optax.scale(0.5), mask))
        if kind == "multi_steps":
            return optax.chain(tx, optax.MultiSteps(optax.scale(0.5), every_k_schedule=2))
        return tx
    if kind == "masked":  # "b" is masked out: the clip sees an optax.MaskedNode there
        return optax.masked(tx, mask)
    if kind == "multi_steps":
        return optax.MultiSteps(tx, every_k_schedule=2)
    return tx


def _signature(state) -> list[tuple]:
    return [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state)]


def _pairs():
    for scope in SCOPES:
        for rule in RULES:
            yield scope, rule


@pytest.mark.parametrize(("scope", "rule"), [p for p in _pairs() if p[1] not in ACCEPTS[p[0]]])
def test_a_rule_a_scope_cannot_feed_is_refused_at_construction(scope, rule):
    with pytest.raises(ValueError) as error:
        SCOPES[scope](RULES[rule]())
    message = str(error.value)
    scope_word = "per_example" if scope.startswith("per_example") else scope
    assert scope_word in message, message  # names the scope
    assert type(RULES[rule]()).__name__ in message, message  # names the rule


@pytest.mark.parametrize("wrapper", ["alone", "masked", "multi_steps"])
@pytest.mark.parametrize(("scope", "rule"), [p for p in _pairs() if p[1] in ACCEPTS[p[0]]])
def test_every_accepted_pair_runs_and_keeps_its_state_shapes(scope, rule, wrapper, tmp_path):
    per_example = scope.startswith("per_example")
    tx = _wrapped(wrapper, SCOPES[scope](RULES[rule]()), per_example)
    params = _params(wrapper)
    state = tx.init(params)
    signature = _signature(state)

    @jax.jit
    def step(state, grads):
        return tx.update(grads, state, params)

    for t in range(STEPS):
        updates, state = step(state, _grads(t, per_example))
        assert _signature(state) == signature, f"step {t}: the state changed shape or dtype"
        assert updates["frozen"] is None
        for key in ("a", "b"):
            assert updates[key].shape == SHAPES[key] and bool(jnp.all(jnp.isfinite(updates[key]))), (t, key)
    if wrapper != "alone":
        return  # the wrappers' own states are optax's: one orbax round trip per rule and scope is enough
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _, again = step(restored, _grads(STEPS, per_example))  # the restored state steps on
    assert _signature(again) == signature
