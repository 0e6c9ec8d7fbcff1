"""Checkpoints: every optclip state (each transform and rule, chained and wrapped) round-trips through
orbax-checkpoint, and a run interrupted and resumed from its checkpoint ends bit-identical to one never interrupted.
"""

import functools

import catalog
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

# The test compares bits between runs of one program, not speed: skip LLVM's optimisation to compile a third faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TRANSFORMS = {**catalog.TRANSFORMS, **catalog.PER_EXAMPLE}
BEFORE, AFTER = 6, 6  # steps before the checkpoint (past the warm-ups and the step-5 spike), steps after it


def _loss(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def _batch(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(16, 16)).astype(np.float32)
    y = rng.normal(size=(16, 8)).astype(np.float32) * (40.0 if step == 3 else 1.0)  # a spike for the guards
    return x, y


def _make_step(transforms):
    """One jitted training step of every transform at once, each on its own copy of the parameters."""

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, states, x, y):
        new_params, new_states = {}, {}
        for name, tx in transforms.items():
            if name in catalog.PER_EXAMPLE:
                grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(params[name], x[:, None], y[:, None])
            else:
                grads = jax.grad(_loss)(params[name], x, y)
            updates, new_states[name] = tx.update(grads, states[name], params[name])
            new_params[name] = optax.apply_updates(params[name], updates)
        return new_params, new_states

    return step


def _train(step, params, states, steps):
    for t in steps:
        params, states = step(params, states, *jax.device_put(_batch(t), jax.devices()[0]))
    return params, states


def _differences(got, want) -> list[str]:
    """The names whose trees differ in structure, dtype or any bit."""
    names = []
    for name in want:
        same_structure = jax.tree.structure(got[name]) == jax.tree.structure(want[name])
        pairs = zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]))
        same_bits = all(
            np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
            for a, b in pairs
        )
        if not (same_structure and same_bits):
            names.append(name)
    return names


def test_every_state_round_trips_and_a_resumed_run_is_bit_identical(tmp_path):
    transforms = {name: make() for name, make in TRANSFORMS.items()}
    step = _make_step(transforms)
    params = {name: catalog.params() for name in transforms}
    # One compiled step must serve every call, restored arrays included: those are committed to a device and
    # strongly typed, so make the fresh ones so too (optax.inject_hyperparams keeps an injected int weakly typed).
    states = jax.tree.map(lambda x: jnp.asarray(x, x.dtype), {n: tx.init(params[n]) for n, tx in transforms.items()})
    params, states = jax.device_put((params, states), jax.devices()[0])
    params, states = _train(step, params, states, range(BEFORE))

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "step_6", {"params": params, "opt_state": states})
    checkpointer.wait_until_finished()

    # A restart rebuilds the transforms from scratch: the restore target comes from their fresh init.
    fresh = {name: make() for name, make in TRANSFORMS.items()}
    target = jax.eval_shape(lambda: {"params": params, "opt_state": {n: tx.init(params[n]) for n, tx in fresh.items()}})
    restored = checkpointer.restore(tmp_path / "step_6", target)
    assert _differences(restored["opt_state"], states) == []
    assert _differences(restored["params"], params) == []

    resumed = _train(step, restored["params"], restored["opt_state"], range(BEFORE, BEFORE + AFTER))
    uninterrupted = _train(step, params, states, range(BEFORE, BEFORE + AFTER))
    assert _differences(resumed[0], uninterrupted[0]) == []
    assert _differences(resumed[1], uninterrupted[1]) == []
    # The runs did something: every transform moved its parameters, and the statistics are live.
    assert all(not np.array_equal(uninterrupted[0][n]["w"], catalog.params()["w"]) for n in transforms)
