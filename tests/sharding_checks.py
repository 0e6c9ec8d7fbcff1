"""Sharding checks on 8 simulated CPU devices, run by tests/test_sharding.py in a subprocess of its own.

XLA fixes the number of host devices when JAX starts, so this must run in a fresh process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py

(the flag is set here when missing). Prints one JSON object ``{check: {"ok": bool, "detail": str}}``. Every transform
of ``catalog.py`` runs for a few steps on one device and under each layout of a 4 x 2 ("data", "model") mesh:
replicated, FSDP-style (each leaf split over "data"), tensor-parallel (split over "model") and both at once; the
updates and statistics must agree to rtol 1e-6 and the updates must keep the gradients' sharding. All transforms go
through one jitted function per layout, so the whole file costs a handful of compilations.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Compile-time flags for this process only: 8 host devices, and no LLVM optimisation (the checks compare results,
# not speed; optimisation level 0 cuts their compile time, most of their cost, by about a third).
FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAGS}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402  (after XLA_FLAGS: the device count is fixed when JAX starts)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optclip  # noqa: E402

RTOL = 1e-6
STEPS = 7  # past the warm-ups of catalog.py, through its spike at step 5


def _layouts(mesh: Mesh) -> dict[str, dict[str, P]]:
    return {
        "replicated": {"b": P(), "w": P()},
        "fsdp": {"b": P("data"), "w": P("data")},
        "tensor_parallel": {"b": P("model"), "w": P(None, "model")},
    }


def _put(tree, mesh, specs):
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}


def _first_device(tree):
    return jax.device_put(tree, jax.devices()[0])


def _compare(got, want) -> str:
    """'' when every leaf agrees to RTOL (and exactly where the reference is 0 or non-finite), else the worst leaf."""
    problems = []
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = np.max(np.abs(w[np.isfinite(w)]), initial=0.0)
        # rtol against the leaf's largest entry: a sum in another order moves an entry that cancels to near zero
        # by a few ulps of the entries it came from, not of itself.
        close = np.isclose(g, w, rtol=RTOL, atol=RTOL * scale, equal_nan=True)
        if g.shape != w.shape or not np.all(close):
            worst = np.nanmax(np.abs(g - w)) if g.shape == w.shape else "shape"
            problems.append(f"{jax.tree_util.keystr(path)}: max |diff| {worst} (scale {scale:.3g})")
    return "; ".join(problems)


def _sharding_problems(updates, specs, mesh) -> str:
    problems = []
    for k, u in updates.items():
        expected = NamedSharding(mesh, specs[k])
        if not u.sharding.is_equivalent_to(expected, u.ndim):
            problems.append(f"{k}: {u.sharding.spec} instead of {specs[k]}")
    return "; ".join(problems)


def _run_all(transforms, inputs, params):
    """Every transform over the steps of ``inputs`` (stacked on a leading axis, already placed): init and a scan in
    one jitted function, so each layout compiles once. Returns the stacked updates and statistics."""

    @jax.jit
    def run(inputs, params):
        states = {name: tx.init(params) for name, tx in transforms.items()}

        def step(states, grads):
            out = {name: tx.update(grads, states[name], params) for name, tx in transforms.items()}
            states = {n: s for n, (_, s) in out.items()}
            return states, ({n: u for n, (u, _) in out.items()}, {n: optclip.stats(s) for n, s in states.items()})

        return jax.lax.scan(step, states, inputs)[1]

    return run(inputs, params)


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _problems(name, sharded, reference) -> list[str]:
    (updates, stats), (want_updates, want_stats) = sharded, reference
    return [
        f"{what}: {diff}"
        for what, diff in (
            ("updates", _compare(updates[name], want_updates[name])),
            ("stats", _compare(stats[name], want_stats[name])),
        )
        if diff
    ]


def check_transforms(results, mesh):
    import catalog

    transforms = {name: catalog.TRANSFORMS[name]() for name in catalog.SHARDING}
    inputs = _stack([catalog.grads(t) for t in range(STEPS)])
    reference = _run_all(transforms, _first_device(inputs), _first_device(catalog.params()))
    for layout, specs in _layouts(mesh).items():
        stacked_specs = {k: P(None, *spec) for k, spec in specs.items()}  # the step axis is not split
        sharded = _run_all(transforms, _put(inputs, mesh, stacked_specs), _put(catalog.params(), mesh, specs))
        for name in transforms:
            problems = _problems(name, sharded, reference)
            layout_problem = _sharding_problems(sharded[0][name], stacked_specs, mesh)
            if layout_problem:
                problems.append(f"output sharding: {layout_problem}")
            results[f"{layout}/{name}"] = {"ok": not problems, "detail": " | ".join(problems[:3])}


def check_per_example(results, mesh):
    """Per-example gradients split over "data" along the batch (the DP layout), and the kernel over "model"."""
    import catalog

    transforms = {name: make() for name, make in catalog.PER_EXAMPLE.items()}
    inputs = _stack([catalog.per_example_grads(t) for t in range(4)])
    reference = _run_all(transforms, _first_device(inputs), _first_device(catalog.params()))
    param_specs = {"b": P(), "w": P(None, "model")}
    example_specs = {k: P(None, "data", *spec) for k, spec in param_specs.items()}
    sharded = _run_all(transforms, _put(inputs, mesh, example_specs), _put(catalog.params(), mesh, param_specs))
    for name in transforms:
        problems = _problems(name, sharded, reference)
        results[f"batch_over_data/{name}"] = {"ok": not problems, "detail": " | ".join(problems[:3])}


def check_global_norm_counts_each_shard_once(results, mesh):
    """Small-integer entries make every sum exact in float32, so any order gives the same bits; a shard counted twice
    (or not at all) would change the result."""
    import catalog

    rng = np.random.default_rng(7)
    tree = {k: jnp.asarray(rng.integers(-3, 4, size=s), jnp.float32) for k, s in catalog.SHAPES.items()}
    flat = np.concatenate([np.asarray(v, np.float64).ravel() for v in tree.values()])
    expected = {1: np.sum(np.abs(flat)), 2: np.sqrt(np.sum(flat**2)), np.inf: np.max(np.abs(flat))}
    leaf_expected = {k: np.sqrt(np.sum(np.asarray(v, np.float64) ** 2)) for k, v in tree.items()}
    leaf_clip = optclip.clip_by_leaf_norm(1e9)

    @jax.jit
    def norms(tree):
        largest_leaf = optclip.stats(leaf_clip.update(tree, leaf_clip.init(tree))[1])["clip_by_leaf_norm/norm"]
        return {ord: optclip.global_norm(tree, ord) for ord in expected}, largest_leaf

    for layout, specs in _layouts(mesh).items():
        got, largest_leaf = norms(_put(tree, mesh, specs))
        problems = [
            f"ord {ord}: {float(got[ord])} != {want}" for ord, want in expected.items() if got[ord] != np.float32(want)
        ]
        if largest_leaf != np.float32(max(leaf_expected.values())):
            problems.append(f"clip_by_leaf_norm's largest leaf norm {float(largest_leaf)} differs")
        results[f"global_norm_once/{layout}"] = {"ok": not problems, "detail": "; ".join(problems)}


def check_shard_map_data_parallel(results, mesh):
    """A data-parallel step: each device's gradient of its batch shard, lax.pmean, then the clip: the clip must act on
    the averaged (full-batch) gradient, exactly as one device clipping the full-batch gradient. Twice: pmean of the
    gradients (check_vma=False), and the gradient of the pmean'd loss (check_vma=True, the default, under which the
    gradient of a replicated parameter is already summed over the axis, so a pmean of it would not average)."""
    import catalog

    data_mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("data",))
    params = catalog.params()
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    tx = optax.chain(optclip.clip_by_global_norm(0.05), optax.sgd(0.1))

    def loss(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)

    def pmean_of_grads(p, state, x, y):  # the classic pattern: average the per-device gradients
        grads = jax.lax.pmean(jax.grad(loss)(p, x, y), "data")
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    def grad_of_pmean(p, state, x, y):  # with check_vma, grads of replicated params are summed: average the loss
        grads = jax.grad(lambda q: jax.lax.pmean(loss(q, x, y), "data"))(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    specs = {"in_specs": (P(), P(), P("data"), P("data")), "out_specs": (P(), P()), "mesh": data_mesh}
    steps = {
        "pmean_then_clip": jax.jit(jax.shard_map(pmean_of_grads, check_vma=False, **specs)),
        "pmean_loss_then_clip": jax.jit(jax.shard_map(grad_of_pmean, **specs)),
    }

    @jax.jit
    def one_device_step(p, x, y):
        updates, state = tx.update(jax.grad(loss)(p, x, y), tx.init(p), p)
        return optax.apply_updates(p, updates), state, optclip.global_norm(jax.grad(loss)(p, x[:8], y[:8]))

    want_params, want_state, local_norm = one_device_step(*_first_device((params, xs, ys)))
    for check, step in steps.items():
        new_params, state = step(params, tx.init(params), xs, ys)
        problems = [_compare(new_params, want_params), _compare(optclip.stats(state), optclip.stats(want_state))]
        norm = float(optclip.stats(state)["clip_by_global_norm/norm"])
        if not float(optclip.stats(state)["clip_by_global_norm/clipped"]):
            problems.append(f"the averaged gradient (norm {norm:.3g}) was not clipped; the check needs it to be")
        if abs(norm - local_norm) < 1e-3 * norm:
            problems.append("the clipped norm is that of one device's shard, not of the averaged gradient")
        problems = [p for p in problems if p]
        results[f"shard_map/{check}"] = {"ok": not problems, "detail": "; ".join(problems)}


def main() -> int:
    if jax.device_count() != 8:
        print(json.dumps({"devices": {"ok": False, "detail": f"{jax.device_count()} devices, not 8"}}))
        return 1
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    results: dict[str, dict] = {}
    for check in (
        check_transforms,
        check_per_example,
        check_global_norm_counts_each_shard_once,
        check_shard_map_data_parallel,
    ):
        start = time.process_time()
        try:
            check(results, mesh)
        except Exception as err:  # one broken check must not hide the others' results
            results[check.__name__] = {"ok": False, "detail": f"{type(err).__name__}: {err}"}
        print(f"{check.__name__}: {time.process_time() - start:.1f} s of CPU", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
