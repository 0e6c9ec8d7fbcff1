"""optclip.monitor, optclip.host_stats, culprits and optclip.suggest_threshold (optclip/_monitor.py, optclip/_stats.py).

Norms are checked against float64 NumPy; names through nested chains, masks, partitions, MultiSteps, a
flax.nnx.Optimizer and an orbax checkpoint; the measurement shared with a clip on the optimized HLO; sharded
parameters on 8 simulated CPU devices in a subprocess (this file run as a script, see the end).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

if __name__ == "__main__":  # the sharding check: 8 host devices, fixed when JAX starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optclip
from optclip import _norms
from optclip._stats import ClipStats, Culprit, PerLeaf


def _tree():
    """Parameters and gradients with a nested path structure, three shapes, a zero leaf."""
    rng = np.random.default_rng(0)

    def draw(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    params = {
        "encoder": {"layers_0": {"attn": {"kernel": draw(4, 3), "bias": draw(3)}}, "layers_1": {"kernel": draw(3, 3)}},
        "head": {"kernel": draw(3, 2), "bias": jnp.zeros(2)},
    }
    grads = jax.tree.map(lambda p: draw(*p.shape), params)
    grads["head"]["bias"] = jnp.zeros(2)
    return params, grads


def _norm64(*arrays):
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays))


def _paths(tree):
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _run(tx, grads, params, steps=1):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        updates, state = update(grads, state, params)
    return updates, state


# ------------------------------------------------------------------------------------------------ what it records


def test_every_leaf_norm_and_the_global_norm_by_path_and_the_updates_pass_through():
    params, grads = _tree()
    tx = optclip.monitor()
    updates, state = tx.update(grads, tx.init(params), params)
    assert all(a is b for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)))  # the same arrays
    stats = optclip.host_stats(state)
    expected = {"monitor/norm": _norm64(*jax.tree.leaves(grads))}
    expected |= {f"monitor/norm/{path}": _norm64(leaf) for path, leaf in _paths(grads).items()}
    assert list(stats) == list(expected)  # the global norm first, then the leaves in tree order
    np.testing.assert_allclose([stats[k] for k in expected], list(expected.values()), rtol=1e-6)
    assert stats["monitor/norm/head/bias"] == 0.0


def test_groups_by_prefix_depth_and_by_function():
    params, grads = _tree()
    leaves = _paths(grads)

    def group_norm(prefix):
        return _norm64(*[v for k, v in leaves.items() if k.startswith(prefix)])

    _, state = _run(optclip.monitor(group=2), grads, params)
    stats = optclip.host_stats(state)
    groups = ["encoder/layers_0", "encoder/layers_1", "head/bias", "head/kernel"]  # tree order: sorted keys
    assert list(stats) == ["monitor/norm", *(f"monitor/norm/{g}" for g in groups)]
    np.testing.assert_allclose([stats[f"monitor/norm/{g}"] for g in groups], [group_norm(g) for g in groups], rtol=1e-6)

    kernels = optclip.monitor(group=lambda path: "kernels" if path.endswith("kernel") else None, name="by_fn")
    stats = optclip.host_stats(_run(kernels, grads, params)[1])
    assert list(stats) == ["by_fn/norm", "by_fn/norm/kernels"]
    want = _norm64(*[v for k, v in leaves.items() if k.endswith("kernel")])
    np.testing.assert_allclose(stats["by_fn/norm/kernels"], want, rtol=1e-6)
    np.testing.assert_allclose(stats["by_fn/norm"], _norm64(*leaves.values()), rtol=1e-6)  # every leaf


def test_parameter_norms_and_the_update_to_parameter_ratio():
    params, grads = _tree()
    params["head"]["bias"] = jnp.zeros(2)  # both zero: ratio 0
    grads["encoder"]["layers_1"]["kernel"] = grads["encoder"]["layers_1"]["kernel"] * 1e-3
    tx = optax.chain(optax.adam(1e-2), optclip.monitor(param_norms=True))  # after the optimizer: the step's size
    updates, state = _run(tx, grads, params)
    stats = optclip.host_stats(state)
    for path, u in _paths(updates).items():
        p = _paths(params)[path]
        np.testing.assert_allclose(stats[f"monitor/norm/{path}"], _norm64(u), rtol=1e-6)
        np.testing.assert_allclose(stats[f"monitor/param_norm/{path}"], _norm64(p), rtol=1e-6)
        want = _norm64(u) / _norm64(p) if _norm64(p) else 0.0
        np.testing.assert_allclose(stats[f"monitor/ratio/{path}"], want, rtol=1e-5)
    total = _norm64(*jax.tree.leaves(updates)) / _norm64(*jax.tree.leaves(params))
    np.testing.assert_allclose(stats["monitor/ratio"], total, rtol=1e-5)
    # A zero parameter under a non-zero update: an infinite ratio, not a NaN.
    zero = {"w": jnp.zeros(2)}
    stats = optclip.host_stats(optclip.monitor(param_norms=True).update({"w": jnp.ones(2)}, _init(zero), zero)[1])
    assert stats["monitor/ratio/w"] == math.inf and stats["monitor/param_norm"] == 0.0
    with pytest.raises(ValueError, match="needs params"):
        optclip.monitor(param_norms=True).update(zero, _init(zero))


def _init(params, **kwargs):
    return optclip.monitor(param_norms=True, **kwargs).init(params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_gradients_are_measured_in_float32(dtype):
    # f16 squares of 300 overflow (max 65504); bf16 sums of 1e4 equal entries lose every addend past 256.
    grads = {"a": jnp.full((100, 100), 300.0, dtype), "b": jnp.full((7,), 1e-3, dtype)}
    stats = optclip.host_stats(optclip.monitor().update(grads, optclip.monitor().init(grads))[1])
    a, b = (np.asarray(grads[k]).astype(np.float64) for k in "ab")  # the values the half dtype holds
    np.testing.assert_allclose(stats["monitor/norm/a"], _norm64(a), rtol=1e-6)
    np.testing.assert_allclose(stats["monitor/norm/b"], _norm64(b), rtol=1e-6)
    np.testing.assert_allclose(stats["monitor/norm"], _norm64(a, b), rtol=1e-6)


def test_huge_zero_and_non_finite_gradients():
    tx = optclip.monitor()
    huge = {"a": jnp.array([3e38, 3e38], jnp.float32), "b": jnp.zeros(3)}
    stats = optclip.host_stats(tx.update(huge, tx.init(huge))[1])
    assert math.isinf(stats["monitor/norm"])  # beyond float32, as optclip.global_norm
    assert stats["monitor/norm/b"] == 0.0
    stats = optclip.host_stats(_run(tx, {"w": jnp.zeros(3)}, {"w": jnp.zeros(3)})[1])
    assert stats == {"monitor/norm": 0.0, "monitor/norm/w": 0.0}
    bad = {"w": jnp.array([1.0, jnp.nan]), "v": jnp.ones(2)}
    updates, state = tx.update(bad, tx.init(bad))
    stats = optclip.host_stats(state)
    assert math.isnan(stats["monitor/norm"]) and math.isnan(stats["monitor/norm/w"]) and stats["monitor/norm/v"] > 0
    assert updates is bad  # passed through, NaN and all


def test_levels():
    params, grads = _tree()
    full = optclip.host_stats(_run(optclip.monitor(param_norms=True), grads, params)[1])
    basic = optclip.host_stats(_run(optclip.monitor(param_norms=True, stats="basic"), grads, params)[1])
    assert list(basic) == ["monitor/norm", "monitor/param_norm", "monitor/ratio"]
    assert {k: full[k] for k in basic} == basic
    updates, state = _run(optclip.monitor(stats="none"), grads, params)
    assert optclip.stats(state) == {} and int(state.count) == 1
    assert jax.tree.map(np.asarray, updates) is not None


def test_every_k_keeps_the_values_of_every_kth_update():
    tx = optclip.monitor(every=3)
    params = {"w": jnp.zeros(2)}
    state, update, seen = tx.init(params), jax.jit(tx.update), []
    for step in range(7):
        _, state = update({"w": jnp.array([3.0 * (step + 1), 4.0 * (step + 1)])}, state, params)
        seen.append(optclip.host_stats(state)["monitor/norm/w"])
    assert seen == [5.0, 5.0, 5.0, 20.0, 20.0, 20.0, 35.0]  # updates 0, 3, 6 are kept


def test_under_multisteps_the_monitor_counts_accumulated_updates():
    inner = optax.chain(optclip.monitor(every=2), optax.sgd(1.0))
    tx = optax.MultiSteps(inner, every_k_schedule=2)
    params = {"w": jnp.zeros(2)}
    state, update, seen = tx.init(params), jax.jit(tx.update), []
    for micro in range(6):
        _, state = update({"w": jnp.array([3.0, 4.0]) * (micro + 1)}, state, params)
        seen.append(optclip.host_stats(state)["monitor/norm"])
    # Accumulated updates at micro-steps 1, 3, 5 (means of 1-2, 3-4, 5-6 times the 3-4-5 vector); every=2 keeps the
    # first and the third of them.
    assert seen == [0.0, 7.5, 7.5, 7.5, 7.5, 27.5]
    assert int(state.inner_opt_state[0].count) == 3


# ------------------------------------------------------------------------------------------- names everywhere


def test_names_through_nested_chains_masks_and_partitions():
    params, grads = _tree()
    mask = jax.tree.map(lambda p: p.ndim == 2, params)  # kernels only
    labels = {"encoder": jax.tree.map(lambda _: "enc", params["encoder"]), "head": {"kernel": "head", "bias": "head"}}
    tx = optax.named_chain(
        ("outer", optclip.monitor(name="outer", group=1)),
        (
            "inner",
            optax.chain(
                optax.masked(optax.chain(optclip.monitor(name="masked"), optax.sgd(0.1)), mask),
                optax.partition(
                    {
                        "enc": optax.chain(optclip.monitor(name="enc"), optax.adam(1e-3)),
                        "head": optax.inject_hyperparams(
                            lambda learning_rate: optax.chain(optclip.monitor(name="head"), optax.sgd(learning_rate))
                        )(0.1),
                    },
                    labels,
                ),
            ),
        ),
    )
    stats = optclip.host_stats(_run(tx, grads, params)[1])
    paths = list(_paths(params))
    assert [k for k in stats if k.startswith("outer/norm/")] == ["outer/norm/encoder", "outer/norm/head"]
    assert [k[len("masked/norm/") :] for k in stats if k.startswith("masked/norm/")] == [
        p for p in paths if p.endswith("kernel")
    ]
    assert [k[len("enc/norm/") :] for k in stats if k.startswith("enc/norm/")] == [
        p for p in paths if p.startswith("encoder")
    ]
    assert [k[len("head/norm/") :] for k in stats if k.startswith("head/norm/")] == ["head/bias", "head/kernel"]
    # The partition sees what the masked sgd left: its kernels scaled by 0.1, its biases as they were.
    seen = [0.1 * g if g.ndim == 2 else g for g in jax.tree.leaves(grads["encoder"])]
    np.testing.assert_allclose(stats["enc/norm"], _norm64(*seen), rtol=1e-6)
    np.testing.assert_allclose(stats["masked/norm/head/kernel"], _norm64(grads["head"]["kernel"]), rtol=1e-6)


def test_two_monitors_with_one_name_are_refused():
    params, _ = _tree()
    tx = optax.chain(optclip.monitor(), optax.sgd(0.1), optclip.monitor())
    with pytest.raises(ValueError, match=r"'monitor'.*name="):
        optclip.stats(tx.init(params))


def test_flax_nnx_optimizer_keeps_names_and_jits():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(2)])
            self.head = nnx.Linear(3, 1, rngs=rngs)

        def __call__(self, x):
            for block in self.blocks:
                x = jnp.tanh(block(x))
            return self.head(x)

    model = Model(nnx.Rngs(0))
    tx = optax.chain(optclip.monitor(group=2), optclip.clip_by_global_norm(0.1), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((4, 3))

    def loss(m):
        return jnp.mean(m(x) ** 2)

    grads = nnx.grad(loss)(model)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))
        return optclip.stats(optimizer)

    returned = step(model, optimizer)
    stats = optclip.host_stats(optimizer)
    assert [k for k in stats if k.startswith("monitor/")] == [
        "monitor/norm",
        "monitor/norm/blocks/0",
        "monitor/norm/blocks/1",
        "monitor/norm/head/bias",
        "monitor/norm/head/kernel",
    ]  # nnx's Variables add no "/value" to the paths
    np.testing.assert_allclose(stats["monitor/norm"], float(optclip.global_norm(grads)), rtol=1e-6)
    np.testing.assert_allclose(stats["monitor/norm"], stats["clip_by_global_norm/norm"], rtol=1e-6)
    assert optclip.host_stats(returned) == stats  # the dict a jitted step returns, read the same way


def test_an_orbax_checkpoint_round_trips_names_and_values(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, grads = _tree()

    def make():
        return optax.chain(
            optclip.monitor(group=2, param_norms=True),
            optclip.clip_by_global_norm(1.0, stats="full"),
            optax.adam(1e-3),
        )

    _, state = _run(make(), grads, params, steps=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"opt_state": state})
    checkpointer.wait_until_finished()
    target = jax.eval_shape(lambda: {"opt_state": make().init(params)})  # a restart: fresh transforms
    restored = checkpointer.restore(tmp_path / "ckpt", target)["opt_state"]
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # the names are part of the structure
    assert optclip.host_stats(restored) == optclip.host_stats(state)
    # The restored state keeps working: the next step of both agrees.
    step = jax.jit(make().update)
    after = [optclip.host_stats(step(grads, s, params)[1]) for s in (state, restored)]
    assert after[0] == after[1]


# -------------------------------------------------------------------------------------------------- host stats


def test_host_stats_copies_everything_in_one_transfer(monkeypatch):
    params, grads = _tree()
    tx = optax.chain(optclip.monitor(param_norms=True), optclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    _, state = _run(tx, grads, params)
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: calls.append(tree) or real(tree))
    stats = optclip.host_stats(state)
    assert len(calls) == 1
    copied = jax.tree.leaves(calls[0])
    assert sum(np.size(x) for x in copied) == 3 * (1 + 5) + 5  # statistics only: no moment of adam
    assert all(type(v) is float for v in stats.values())
    on_device = optclip.stats(state)
    assert list(stats) == list(on_device)
    assert stats == {k: float(v) for k, v in on_device.items()}


def _hand_built(culprit, names=("a/kernel", None, "b/kernel")):
    """A state as a guard would keep it: a culprit index and a per-leaf statistic in one record."""
    per_leaf = PerLeaf(jnp.asarray([1.0, np.nan, 2.0], jnp.float32), names)
    return (optax.EmptyState(), ClipStats({"guard": {"skipped": jnp.float32(1), "culprit": culprit, "n": per_leaf}}))


@pytest.mark.parametrize(
    ("culprit", "path"),
    [(jnp.int32(2), "b/kernel"), (jnp.float32(0), "a/kernel"), (jnp.int32(-1), None), (jnp.int32(1), None)],
    ids=["int", "float", "none", "slot_without_parameter"],
)
def test_a_culprit_is_named_by_the_per_leaf_statistic_of_its_record(culprit, path):
    state = _hand_built(culprit)
    assert optclip.host_stats(state) == {"guard/skipped": 1.0, "guard/culprit": path, "guard/n/a/kernel": 1.0} | {
        "guard/n/b/kernel": 2.0
    }
    # Inside jit the statistics stay arrays, the culprit an index with its names beside it.
    inside = jax.jit(optclip.stats)(state)
    assert isinstance(inside["guard/culprit"], Culprit) and int(inside["guard/culprit"]) == int(culprit)
    assert optclip.host_stats(inside)["guard/culprit"] == path


def test_a_culprit_node_names_itself_and_one_without_names_stays_a_number():
    node = ClipStats({"spike": {"culprit": Culprit(jnp.int32(1), ("x", "y"))}})
    assert optclip.host_stats(node) == {"spike/culprit": "y"}
    bare = ClipStats({"clip": {"culprit": jnp.float32(3)}})
    assert optclip.host_stats(bare) == {"clip/culprit": 3.0}


def test_the_culprit_of_a_global_clip_is_its_largest_leaf_norm():
    """clip_by_global_norm(stats="full") records each leaf's norm; the leaf it blames is the largest of them."""
    params, grads = _tree()
    state = _run(optclip.clip_by_global_norm(1.0, stats="full"), grads, params)[1]
    stats = optclip.host_stats(state)
    leaf_norms = {k.rsplit("leaf_norm/", 1)[1]: v for k, v in stats.items() if "/leaf_norm/" in k}
    assert stats["clip_by_global_norm/culprit"] == max(leaf_norms, key=leaf_norms.get)
    # A non-finite leaf is blamed before any finite one, however large; a leaf beyond float32's range is the largest.
    nan_leaf = min((k for k in leaf_norms if leaf_norms[k] > 0), key=leaf_norms.get)

    def _path(path):
        return "/".join(str(k.key) for k in path)

    tree = jax.tree_util.tree_map_with_path(lambda p, g: g * jnp.nan if _path(p) == nan_leaf else g, grads)
    state = _run(optclip.clip_by_global_norm(1.0, stats="full"), tree, params)[1]
    assert optclip.host_stats(state)["clip_by_global_norm/culprit"] == nan_leaf
    huge = jax.tree_util.tree_map_with_path(lambda p, g: g * 1e30 if _path(p) == nan_leaf else g * 1e20, grads)
    state = _run(optclip.clip_by_global_norm(1.0, stats="full"), huge, params)[1]
    assert optclip.host_stats(state)["clip_by_global_norm/culprit"] == nan_leaf


# ------------------------------------------------------------------------------------------ one measurement


def _reductions_over_leaves(tx, shape=(37, 11), leaves=4):
    """Leaves read by reductions, anywhere in the optimized HLO (fusions, loop bodies): a reduction whose input has
    a leaf's shape reads one, one of a stack of ``k`` leaves (small leaves are reduced stacked) reads ``k``."""
    params = {f"w{i}": jnp.zeros(shape) for i in range(leaves)}

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile().as_text()
    leaf = re.compile(r"f32\[(?:(\d+),)?" + ",".join(map(str, shape)) + r"\]")
    shapes, count = {}, 0
    for line in hlo.splitlines():
        found = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\((.*)$", line)
        if not found:
            continue
        name, result, opcode, rest = found.groups()
        shapes[name] = result
        if opcode in ("reduce", "reduce-window"):
            operand = re.findall(r"%([\w.\-]+)", rest)[0]
            read = leaf.match(shapes.get(operand, ""))
            count += 0 if read is None else int(read.group(1) or 1)
    return count


def test_a_monitor_beside_a_clip_adds_no_reduction_over_the_gradients():
    """XLA's CSE merges the monitor's measurement with the clip's: the same ops on the same arrays."""
    clip = _reductions_over_leaves(optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-3)))
    assert clip >= 4, "no reduction over leaf-shaped arrays found: the HLO text format changed, update the pattern"
    both = optax.chain(optclip.monitor(), optclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    assert _reductions_over_leaves(both) == clip
    grouped = optax.chain(optclip.monitor(group=1, stats="full"), optclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    assert _reductions_over_leaves(grouped) == clip
    # After the optimizer the monitor measures other arrays (the updates): a measurement of its own.
    after = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-3), optclip.monitor())
    assert _reductions_over_leaves(after) == 2 * clip


def test_inside_the_guards_the_whole_stack_reads_the_gradients_once():
    """The guards measure and hand their measurement down; the monitor and the clip inside take it."""
    alone = _reductions_over_leaves(optclip.skip_nonfinite(optax.adam(1e-3)))
    stack = optclip.skip_on_spike(
        optclip.skip_nonfinite(optax.chain(optclip.monitor(), optclip.clip_by_global_norm(1.0), optax.adam(1e-3)))
    )
    assert alone >= 4 and _reductions_over_leaves(stack) == alone


def test_a_guards_culprit_is_reported_as_the_parameter_path():
    tx = optclip.skip_nonfinite(optax.chain(optclip.monitor(), optax.sgd(0.1)))
    params = {"encoder": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}}
    grads = {"encoder": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.array([1.0, jnp.nan])}}
    step = jax.jit(lambda g, s: optclip.stats(tx.update(g, s, params)[1]))
    assert optclip.host_stats(step(grads, tx.init(params)))["skip_nonfinite/culprit"] == "head/kernel"
    clean = jax.tree.map(jnp.ones_like, grads)
    assert optclip.host_stats(step(clean, tx.init(params)))["skip_nonfinite/culprit"] is None


def test_a_measurement_handed_down_is_reused_not_repeated():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    leaves = jax.tree.leaves(grads)
    record = _norms.LeafNorms(leaves, 2.0)
    marker = _norms.NormParts(jnp.array([7.0, 24.0]), jnp.zeros(2, jnp.int32))  # not these leaves' norms
    record._flat = marker  # what an enclosing guard measured, as the record it hands down holds it
    tx = optclip.monitor()
    _, state = tx.update(grads, tx.init(grads), **_norms.handing_over({}, record))
    assert optclip.host_stats(state) == {"monitor/norm": 25.0, "monitor/norm/a": 7.0, "monitor/norm/b": 24.0}
    # Other arrays (a clip upstream made new ones): measured afresh.
    other = jax.tree.map(lambda x: x * 1.0, grads)
    _, state = tx.update(other, tx.init(grads), **_norms.handing_over({}, record))
    assert optclip.host_stats(state)["monitor/norm/a"] == 5.0


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group": 0}, "group must be None, an integer >= 1.*got 0"),
        ({"group": "layers"}, "group must be None.*got 'layers'"),
        ({"group": True}, "group must be None.*got True"),
        ({"every": 0}, "every must be an integer >= 1, got 0"),
        ({"every": 2.5}, "every must be an integer >= 1, got 2.5"),
        ({"stats": "all"}, "stats must be one of.*'all'"),
        ({"name": "a b"}, "name must be.*'a b'"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optclip.monitor(**kwargs)


def test_a_group_function_must_return_a_name_or_none():
    with pytest.raises(ValueError, match=r"group must return a non-empty string or None, got 3 for 'w'"):
        optclip.monitor(group=lambda path: 3).init({"w": jnp.zeros(2)})


# ------------------------------------------------------------------------------------------ suggest_threshold


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_suggest_threshold_is_the_float64_quantile(rate):
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(size=1001)).astype(np.float32)
    norms[[5, 50]] = [np.nan, np.inf]  # left out
    finite = norms[np.isfinite(norms)].astype(np.float64)
    got = optclip.suggest_threshold(jnp.asarray(norms), clip_rate=rate)
    assert got == pytest.approx(np.quantile(finite, 1 - rate), rel=1e-12)
    assert np.mean(finite > got) <= rate + 1 / finite.size
    assert np.mean(finite >= got) >= rate - 1 / finite.size
    assert optclip.suggest_threshold(norms, rate, last=100) == pytest.approx(
        np.quantile(norms[-100:].astype(np.float64), 1 - rate), rel=1e-12
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1.0], 1.5), "clip_rate must be a number in \\[0, 1\\], got 1.5"),
        (([1.0], -0.1), "clip_rate must be a number in \\[0, 1\\], got -0.1"),
        (([1.0], "0.1"), "clip_rate must be a number in \\[0, 1\\], got '0.1'"),
        (([np.nan, np.inf], 0.1), "no finite value"),
        (([], 0.1), "no finite value"),
    ],
)
def test_suggest_threshold_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        optclip.suggest_threshold(*args)
    with pytest.raises(ValueError, match="last must be an integer >= 1 or None, got 0"):
        optclip.suggest_threshold([1.0], 0.1, last=0)


# ---------------------------------------------------------------------------------------------- sharding


def _sharding_check() -> dict[str, str]:
    """Run by ``test_sharded_parameters_give_the_one_device_values`` in a fresh process with 8 CPU devices."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(3)
    params = {"b": jnp.asarray(rng.normal(size=(8,)), jnp.float32), "w": jnp.asarray(rng.normal(size=(16, 8)))}
    grads = {k: jnp.asarray(rng.normal(size=v.shape) * 1e3, jnp.bfloat16) for k, v in params.items()}
    tx = optax.chain(optclip.monitor(param_norms=True), optclip.monitor(group=lambda p: "all", name="grouped"))
    layouts = {
        "fsdp": {"b": P("data"), "w": P("data")},
        "tensor_parallel": {"b": P("model"), "w": P(None, "model")},
        "both": {"b": P("data"), "w": P("data", "model")},
    }

    @jax.jit
    def run(g, p):
        return tx.update(g, tx.init(p), p)

    _, want = run(*jax.device_put((grads, params), jax.devices()[0]))
    want = optclip.host_stats(want)
    problems = {}
    for layout, specs in layouts.items():

        def put(tree, specs=specs):
            return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}

        updates, state = run(put(grads), put(params))
        got = optclip.host_stats(state)
        bad = [k for k in want if not np.isclose(got[k], want[k], rtol=1e-6)]
        if list(got) != list(want) or bad:
            problems[layout] = f"stats differ: {bad or list(got)}"
        placed = put(grads)
        moved = [k for k in updates if not updates[k].sharding.is_equivalent_to(placed[k].sharding, updates[k].ndim)]
        if moved:
            problems[layout] = f"updates resharded: {moved}"
    return problems


def test_sharded_parameters_give_the_one_device_values():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    print(json.dumps(_sharding_check()))
