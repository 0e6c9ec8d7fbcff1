"""A first end-to-end check: every clip inside a jitted optax chain trains a small model to finite parameters."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optclip

TRANSFORMS = {
    "clip_by_value": lambda: optclip.clip_by_value(1.0, stats="full"),
    "clip_by_leaf_norm": lambda: optclip.clip_by_leaf_norm(1.0),
    "clip_by_global_norm": lambda: optclip.clip_by_global_norm(1.0),
    "adaptive_grad_clip": lambda: optclip.adaptive_grad_clip(0.01),
}
METRICS = ("norm", "threshold", "scale", "norm_after", "clipped")


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_chain_trains_and_reports(kind):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = optax.chain(TRANSFORMS[kind](), optax.adam(1e-2))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(lambda q: jnp.sum((q["w"].sum(0) + q["b"] - 100.0) ** 2))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(3):
        params, state = step(params, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    stats = optclip.stats(state)
    assert set(stats) == {f"{kind}/{metric}" for metric in METRICS}
    assert float(stats[f"{kind}/clipped"]) > 0


CORE_MODULES = ("optclip._clipping", "optclip._norms", "optclip._stats")


@pytest.mark.parametrize("name", sorted(n for n in optclip.__all__ if getattr(optclip, n).__module__ in CORE_MODULES))
def test_public_core_docstrings_carry_a_runnable_example(name):
    # pyproject runs these as doctests (--doctest-modules); this checks that each one has an example to run.
    doc = getattr(optclip, name).__doc__ or ""
    assert ">>> " in doc and "Example" in doc, name
