"""Agreement with optax, torch and Keras, and every transform inside optax's wrappers and flax.nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import INF, agc64, as64, clip_global64, clip_leaf64, expected64, factories, leaves64
from flax import nnx

import optclip

FACTORIES = factories()
KINDS = sorted(FACTORIES)
THRESHOLD_ARG = {"clip_by_value": "max_value", "adaptive_grad_clip": "clipping"}
# Ranks 1 to 5, no size-1 dims: optax squeezes those away before choosing AGC's units, optclip does not.
SHAPES = [(6,), (4, 5), (3, 4, 5), (2, 3, 4, 5), (2, 2, 3, 3, 4)]


def _tree(seed=0, scale=10.0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {f"r{len(s)}": jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for s in shapes}


def _assert_close(tree, expected, rtol=1e-6, atol=1e-30):
    for got, want in zip(jax.tree.leaves(tree), expected, strict=True):
        np.testing.assert_allclose(as64(got), want, rtol=rtol, atol=atol)


def _run(tx, grads, params=None):
    """One jitted update from a fresh state (jitted: an eager first call compiles every op on its own, slower)."""
    params = grads if params is None else params
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)


def test_clip_by_value_equals_optax_clip():
    grads = _tree()
    ours, theirs = _run(optclip.clip_by_value(4.0), grads)[0], _run(optax.clip(4.0), grads)[0]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("relative", [0.3, 3.0])
def test_clip_by_global_norm_matches_optax(relative):
    grads = _tree()
    threshold = relative * float(optax.tree.norm(grads))
    ours = _run(optclip.clip_by_global_norm(threshold), grads)[0]
    theirs = _run(optax.clip_by_global_norm(threshold), grads)[0]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_adaptive_grad_clip_matches_optax_for_ranks_1_to_5():
    grads, params = _tree(1, scale=1.0), _tree(2, scale=3.0)
    ours = _run(optclip.adaptive_grad_clip(0.2), grads, params)[0]
    theirs = _run(optax.adaptive_grad_clip(0.2), grads, params)[0]
    changed = []
    for key in grads:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, err_msg=key)
        changed.append(not np.array_equal(ours[key], grads[key]))
    assert any(changed) and not all(np.array_equal(ours[k], grads[k]) for k in grads)


def _torch_clip_grad_norm(arrays, max_norm, norm_type):
    """``torch.nn.utils.clip_grad_norm_`` written out: ``scale = min(1, c / (total_norm + 1e-6))``."""
    if norm_type == INF:
        total_norm = max(np.max(np.abs(a)) for a in arrays)
    else:
        total_norm = sum(np.sum(np.abs(a) ** norm_type) for a in arrays) ** (1.0 / norm_type)
    clip_coef_clamped = min(max_norm / (total_norm + 1e-6), 1.0)
    return [a * clip_coef_clamped for a in arrays], total_norm


@pytest.mark.parametrize("ord", [1, 2, INF])
def test_clip_by_global_norm_matches_torch_clip_grad_norm(ord):
    # optclip has no 1e-6 in the denominator: with norms >= 10 it moves torch's scale by < 1e-7, below the tolerance.
    grads = _tree(3)
    expected, total_norm = _torch_clip_grad_norm(leaves64(grads), 5.0, ord)
    assert total_norm >= 10
    updates, state = _run(optclip.clip_by_global_norm(5.0, ord=ord), grads)
    _assert_close(updates, expected)
    np.testing.assert_allclose(float(optclip.stats(state)["clip_by_global_norm/norm"]), total_norm, rtol=1e-6)


def test_clip_by_leaf_norm_matches_keras_clipnorm():
    # Keras clipnorm (tf.clip_by_norm per variable): g * c / max(||g||, c).
    grads, c = _tree(4, scale=0.5), 6.0
    expected = [g * c / max(np.sqrt(np.sum(g * g)), c) for g in leaves64(grads)]
    assert any(np.sqrt(np.sum(g * g)) < c for g in leaves64(grads))  # some variables untouched, some clipped
    _assert_close(_run(optclip.clip_by_leaf_norm(c), grads)[0], expected)


def _setup(kind, threshold=0.5):
    """A clip and a three-leaf tree (ranks 1 to 3: each wrapper compiles the clip again, so keep it small)."""
    grads, params = _tree(5, scale=1.0, shapes=SHAPES[:3]), _tree(6, scale=1.0, shapes=SHAPES[:3])
    return FACTORIES[kind](threshold), grads, params, expected64(kind, grads, threshold, params)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_chain(kind):
    # Eagerly and jitted alike: test_clipping.py::test_matches_its_formula_with_and_without_jit runs both.
    clip, grads, params, expected = _setup(kind)
    tx = optax.chain(clip, optax.sgd(1.0))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    _assert_close(jax.tree.map(jnp.negative, updates), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_named_chain(kind):
    clip, grads, params, expected = _setup(kind)
    tx = optax.named_chain(("clip", clip), ("sgd", optax.sgd(1.0)))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    _assert_close(jax.tree.map(jnp.negative, updates), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_partition(kind):
    clip, grads, params, _ = _setup(kind)
    labels = {key: "clipped" if key in ("r1", "r3") else "free" for key in grads}
    tx = optax.partition({"clipped": clip, "free": optax.identity()}, labels)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    part = {key: grads[key] for key in ("r1", "r3")}
    _assert_close([updates["r1"], updates["r3"]], expected64(kind, part, 0.5, {k: params[k] for k in part}))
    np.testing.assert_array_equal(updates["r2"], grads["r2"])


@pytest.mark.parametrize("kind", KINDS)
def test_inside_masked(kind):
    clip, grads, params, _ = _setup(kind)
    mask = {key: key != "r2" for key in grads}
    tx = optax.masked(clip, mask)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    part = {key: grads[key] for key in grads if mask[key]}
    _assert_close([updates[k] for k in sorted(part)], expected64(kind, part, 0.5, {k: params[k] for k in part}))
    np.testing.assert_array_equal(updates["r2"], grads["r2"])


@pytest.mark.parametrize("kind", KINDS)
def test_inside_multisteps(kind):
    clip, grads, params, _ = _setup(kind)
    tx = optax.MultiSteps(optax.chain(clip, optax.sgd(1.0)), every_k_schedule=2)
    state, update = tx.init(params), jax.jit(tx.update)
    other = jax.tree.map(lambda g: -0.5 * g + 1.0, grads)
    first, state = update(grads, state, params)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(first))  # accumulating
    second, state = update(other, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grads, other)
    # MultiSteps keeps a float32 running mean: absolute rounding of about one ulp of the largest entry.
    _assert_close(jax.tree.map(jnp.negative, second), expected64(kind, mean, 0.5, params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_inject_hyperparams_the_threshold_changes_at_run_time(kind):
    _, grads, params, _ = _setup(kind)
    tx = optax.inject_hyperparams(FACTORIES[kind])(0.5)
    state, update = tx.init(params), jax.jit(tx.update)
    updates, state = update(grads, state, params)
    _assert_close(updates, expected64(kind, grads, 0.5, params))
    arg = THRESHOLD_ARG.get(kind, "max_norm")
    state.hyperparams[arg] = jnp.asarray(0.05)
    updates, state = update(grads, state, params)  # the same compiled step, a new threshold
    _assert_close(updates, expected64(kind, grads, 0.05, params))
    state.hyperparams[arg] = jnp.asarray(-1.0)  # cannot raise at run time: acts as 0
    updates, state = update(grads, state, params)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
    assert float(optclip.stats(state)[f"{kind}/threshold"]) == 0.0


@pytest.mark.parametrize("kind", ["clip_by_global_norm", "clip_by_leaf_norm"])
def test_inside_inject_hyperparams_ord_is_injected_and_chosen_at_run_time(kind):
    # inject_hyperparams injects every number, ord included: under jit it arrives as a tracer.
    _, grads, params, _ = _setup(kind)
    reference = clip_global64 if kind == "clip_by_global_norm" else clip_leaf64
    for first, then in ((2, 1), (INF, 2)):  # an int ord is injected as int32, so inf needs a float one
        tx = optax.inject_hyperparams(FACTORIES[kind])(0.5, ord=first)
        state, update = tx.init(params), jax.jit(tx.update)
        updates, state = update(grads, state, params)
        _assert_close(updates, reference(leaves64(grads), 0.5, first))
        state.hyperparams["ord"] = jnp.asarray(then, state.hyperparams["ord"].dtype)
        updates, state = update(grads, state, params)
        _assert_close(updates, reference(leaves64(grads), 0.5, then))


def test_agc_axis_under_inject_hyperparams():
    _, grads, params, _ = _setup("adaptive_grad_clip")
    injected = optax.inject_hyperparams(optclip.adaptive_grad_clip)(0.5, axis=0)
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(injected.update)(grads, injected.init(params), params)
    for tx in (
        optax.inject_hyperparams(optclip.adaptive_grad_clip, static_args=("axis",))(0.5, axis=0),
        optax.inject_hyperparams(optclip.adaptive_grad_clip)(0.5, axis=(0,)),
    ):
        updates, _ = jax.jit(tx.update)({"w": grads["r2"]}, tx.init({"w": params["r2"]}), {"w": params["r2"]})
        _assert_close(updates, agc64([as64(grads["r2"])], [as64(params["r2"])], 0.5))


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


def _loss(model, x):
    return jnp.sum(model(x) ** 2)


@pytest.mark.parametrize("kind", KINDS)
def test_inside_flax_nnx_optimizer(kind):
    model = _Tiny(nnx.Rngs(0))
    x = jnp.arange(12.0).reshape(4, 3)
    optimizer = nnx.Optimizer(model, optax.chain(FACTORIES[kind](0.5), optax.sgd(1.0)), wrt=nnx.Param)
    before = [np.asarray(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param))]  # copies: Variables mutate
    expected = expected64(kind, nnx.grad(_loss)(model, x), 0.5, before)

    @nnx.jit
    def step(model, optimizer, x):
        optimizer.update(model, nnx.grad(_loss)(model, x))

    step(model, optimizer, x)
    after = jax.tree.leaves(nnx.state(model, nnx.Param))
    _assert_close([b - a for b, a in zip(before, after)], expected, rtol=1e-5)  # sgd(1.0): params - clip(grads)
    assert float(optclip.stats(optimizer)[f"{kind}/clipped"]) > 0
