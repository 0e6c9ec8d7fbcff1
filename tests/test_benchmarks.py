"""Smoke test of benchmarks/run.py: the whole configuration table runs at a tiny size and the JSON says what it
measured. Speed itself is never asserted here (benchmarks/results/ holds the measurements)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("optclip_benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# The run below compiles a few configurations (each compile of a step is about half a second on CI's cores): one of
# each kind that feeds a target, and every configuration of the table is built and traced on its own.
TIMED = ["optax.clip", "optclip.clip_by_value", "optclip.clip_by_global_norm", "optclip.safety_stack"]


def test_every_config_of_the_table_builds_and_traces_a_step(run):
    tree = run._trees.synthetic(1000, 2)
    for config in run.CONFIGS:
        if not config.available():
            continue
        tx = config.make(run.thresholds(tree))
        state = tx.init(tree.params)

        def step(p, s, g, tx=tx):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        params, new_state = jax.eval_shape(step, tree.params, state, tree.grads)
        assert jax.tree.structure(new_state) == jax.tree.structure(state), config.name
        assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
            lambda x: (x.shape, x.dtype), tree.params
        ), config.name


def test_a_tiny_run_of_the_table(run, tmp_path):
    # One test, so that the run happens once even when xdist splits the module.
    out = tmp_path / "results"
    argv = ["--sizes", "1e3", "--leaves", "2", "--no-models", "--repeats", "3", "--warmup", "1"]
    argv += ["--target-tree", "1e3/2", "--out", str(out), "--tag", "smoke", "--only", "|".join(f"^{n}$" for n in TIMED)]
    tiny = run.main(argv), out
    _writes_the_json_it_returns_and_a_markdown_table(tiny)
    _meta_names_the_machine_versions_threads_device_and_load(tiny)
    _every_chosen_config_is_timed_compiled_and_measured(run, tiny)
    _torch_rows_are_paired_with_torch_adam_when_torch_is_there(tiny)
    _targets_are_judged_from_the_rows(run, tiny)
    _report_rewrites_the_markdown_from_the_json_alone(run, tiny)


def _writes_the_json_it_returns_and_a_markdown_table(tiny):
    result, out = tiny
    assert json.loads((out / "smoke.json").read_text()) == json.loads(json.dumps(result))
    table = (out / "smoke.md").read_text()
    for row in result["rows"]:
        assert f"| {row['config']} |" in table


def _report_rewrites_the_markdown_from_the_json_alone(run, tiny):
    result, out = tiny
    (out / "smoke.md").unlink()
    assert run.main(["--report", str(out / "smoke.json")]) == json.loads(json.dumps(result))
    assert (out / "smoke.md").read_text() == run.markdown(json.loads(json.dumps(result)))


def _meta_names_the_machine_versions_threads_device_and_load(tiny):
    meta = tiny[0]["meta"]
    assert {"jax", "jaxlib", "optax", "optclip", "python"} <= set(meta["versions"])
    assert meta["threads"] >= 1
    assert meta["device"].startswith(meta["backend"]) or meta["backend"] in meta["device"]
    assert len(meta["load_before"]) == 3 and len(meta["load_after"]) == 3
    assert meta["repeats"] == 3 and meta["warmup"] == 1
    assert meta["machine"] and meta["command"].startswith("python benchmarks/run.py")


def _every_chosen_config_is_timed_compiled_and_measured(run, tiny):
    assert [r for r in tiny[0]["rows"] if "error" in r] == []
    expected = {run.BASELINE, *TIMED}
    assert tiny[0]["meta"]["left_out"] == [c.name for c in run.CONFIGS if not c.available()]
    for donated in (True, False):  # the target tree is timed with donated buffers and without
        rows = {r["config"]: r for r in tiny[0]["rows"] if r["donated"] == donated}
        assert expected <= set(rows)
        assert rows[run.BASELINE]["ratio"] == 1.0
    rows = {r["config"]: r for r in tiny[0]["rows"] if r["donated"]}
    for name in expected:
        r = rows[name]
        assert r["tree"] == "1e3/2" and r["params"] == 1000 and r["leaves"] == 2 and r["param_bytes"] == 4000
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 3
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["baseline"] == run.BASELINE
        assert r["lower_s"] > 0 and r["compile_s"] > 0
        assert r["lower_compile_s"] == pytest.approx(r["lower_s"] + r["compile_s"])
        assert r["temp_bytes"] >= 0 and r["output_bytes"] >= r["param_bytes"] and r["fusions"] >= 1


def _torch_rows_are_paired_with_torch_adam_when_torch_is_there(tiny):
    rows = {r["config"]: r for r in tiny[0]["rows"] if r["donated"]}
    if tiny[0]["meta"]["torch_device"] is None:
        assert not any(name.startswith("torch.") for name in rows)
        return
    assert {"torch.Adam", "torch.clip_grad_norm_", "torch.clip_grad_value_"} <= set(rows)
    assert rows["torch.Adam"]["ratio"] == 1.0
    assert all(rows[n]["baseline"] == "torch.Adam" for n in rows if n.startswith("torch."))


def _targets_are_judged_from_the_rows(run, tiny):
    result = tiny[0]
    judged = {(t["config"], t["target"], t["where"]) for t in result["targets"]}
    for t in run.TARGETS:
        if t.kind == "compile":
            continue  # --compile measures those
        if not {t.config, t.other or run.BASELINE} <= {run.BASELINE, *TIMED}:
            assert all(
                v["passed"] is None for v in result["targets"] if (v["config"], v["target"]) == (t.config, t.describe())
            ), t
            continue
        modes = ["donated", "not donated"] if t.kind == "step" else ["donated"]
        for mode in modes:
            assert (t.config, t.describe(), f"1e3/2, {mode}") in judged
    # A step target's measured value is the row's ratio; its limit comes from the other row's.
    rows = {(r["config"], r["donated"]): r for r in result["rows"]}
    for t in result["targets"]:
        if t["target"] == "step / adam <= optax.clip + 0.05":
            donated = t["where"].endswith(", donated")
            assert t["measured"] == rows[("optclip.clip_by_value", donated)]["ratio"]
            assert t["limit"] == pytest.approx(rows[("optax.clip", donated)]["ratio"] + 0.05)


def _row(config, ratio, temp=0, donated=True, tree="T"):
    return {"tree": tree, "config": config, "ratio": ratio, "temp_bytes": temp, "param_bytes": 1000, "donated": donated}


def test_targets_pass_at_or_below_their_limit_and_miss_above_it(run):
    targets = [
        run.Target("step", "optclip.x", 1.1),
        run.Target("step", "optclip.x", 0.05, "optax.x"),
        run.Target("step", "optclip.x", 0.0, "optax.x", 0.8),
        run.Target("temp", "optclip.x", 0.01),
        run.Target("compile", "optclip.x", 0.0, "optax.x", 1.25),
    ]
    rows = [_row("adam", 1.0), _row("optax.x", 1.1), _row("optclip.x", 1.15, temp=50)]
    compile_rows = [{"config": "optax.x", "median_s": 2.0, "tree": "C"}, {"config": "optclip.x", "median_s": 2.5}]
    got = {(t["target"], t["kind"]): t for t in run.judge(targets, rows, compile_rows, "T")}
    assert got[("step / adam <= 1.1", "step")]["passed"] is False  # 1.15 > 1.1
    assert got[("step / adam <= optax.x + 0.05", "step")]["passed"] is True  # 1.15 <= 1.15
    assert got[("step / adam <= 0.8 x optax.x", "step")]["limit"] == pytest.approx(0.88)
    assert got[("step / adam <= 0.8 x optax.x", "step")]["passed"] is False
    assert got[("extra temp / param bytes <= 0.01", "temp")]["measured"] == pytest.approx(0.05)
    assert got[("extra temp / param bytes <= 0.01", "temp")]["passed"] is False
    assert got[("compile s <= 1.25 x optax.x", "compile")]["passed"] is True  # 2.5 <= 2.5
    assert got[("compile s <= 1.25 x optax.x", "compile")]["where"] == "C, fresh processes"
    # A tree the rows do not hold, or a missing comparison, is not judged.
    assert all(t["passed"] is None for t in run.judge(targets[:4], rows, None, "another tree"))
    assert run.judge(targets[4:], rows, None, "T")[0]["passed"] is None


def test_the_targets_are_judged_again_on_a_models_tree_where_it_ran(run):
    def rows(tree, agc_ratio, agc_temp):
        base = {"tree": tree, "donated": True, "param_bytes": 100}
        return [
            {**base, "config": "adam", "ratio": 1.0, "temp_bytes": 0},
            {**base, "config": "optax.adaptive_grad_clip", "ratio": 1.3, "temp_bytes": 1},
            {**base, "config": "optclip.adaptive_grad_clip", "ratio": agc_ratio, "temp_bytes": agc_temp},
        ]

    def agc(verdicts, tree):
        return {v["kind"]: v["passed"] for v in verdicts
                if v["config"] == "optclip.adaptive_grad_clip" and v["where"].startswith(tree)}  # fmt: skip

    on_target_tree = rows(run.TARGET_TREE, 1.2, 1)
    both = run.judged_targets(on_target_tree + rows(run.MODEL_TREE, 1.8, 15), run.TARGET_TREE)
    assert agc(both, run.TARGET_TREE) == {"step": True, "temp": True}
    assert agc(both, run.MODEL_TREE) == {"step": False, "temp": False}
    assert agc(run.judged_targets(on_target_tree, run.TARGET_TREE), run.MODEL_TREE) == {}


def test_a_step_target_shows_its_clips_floor_from_the_same_rows(run):
    target = run.Target("step", "optclip.clip_by_leaf_norm", 1.15)
    rows = [_row("adam", 1.0), _row("optclip.clip_by_leaf_norm", 1.1), _row("floor.clip_by_leaf_norm", 1.05)]
    assert run.FLOORS["optclip.clip_by_leaf_norm"] == "floor.clip_by_leaf_norm"
    assert run.judge([target], rows, None, "T")[0]["floor"] == 1.05
    assert run.judge([run.Target("step", "optclip.x", 1.1)], rows, None, "T")[0]["floor"] is None


def test_a_compile_target_shows_its_clips_floor_compiled_beside_it(run):
    # The floor's compile time says whether any clip that records what optclip's records could meet the target.
    target = run.Target("compile", "optclip.clip_by_value", 0.0, "optax.clip", 1.25)
    assert run.FLOORS["optclip.clip_by_value"] in run.COMPILE_CONFIGS
    compile_rows = [
        {"config": "optax.clip", "median_s": 2.0, "tree": "C"},
        {"config": "optclip.clip_by_value", "median_s": 3.0},
        {"config": "floor.clip_by_value", "median_s": 2.6},
    ]
    assert run.judge([target], [], compile_rows, "T")[0]["floor"] == 2.6


def test_each_floor_computes_the_clip_it_stands_for(run):
    # A floor that computed something else would say nothing about how low the clip's step can go.
    import optclip

    tree = run._trees.synthetic(3000, 3)
    th = run.thresholds(tree)
    floors = run._floors
    pairs = [
        (floors.value_with_norm(th.value), optclip.clip_by_value(th.value)),
        (floors.global_norm(th.global_norm), optclip.clip_by_global_norm(th.global_norm)),
        (floors.leaf_norm(th.leaf_norm), optclip.clip_by_leaf_norm(th.leaf_norm)),
        (floors.leaf_norm(th.leaf_norm, barrier=True), optclip.clip_by_leaf_norm(th.leaf_norm)),
        (floors.unit_wise(th.agc), optclip.adaptive_grad_clip(th.agc)),
        (floors.unit_wise(th.agc, barrier=True), optclip.adaptive_grad_clip(th.agc)),
    ]
    for floor, clip in pairs:
        expected, state = clip.update(tree.grads, clip.init(tree.params), tree.params)
        got, floor_state = floor.update(tree.grads, floor.init(tree.params), tree.params)
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=0)
        assert not jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got, tree.grads))  # it clips
        if floor is pairs[0][0]:  # the value floor keeps what the value clip records
            norm = optclip.stats(state)["clip_by_value/norm"]
            assert float(floor_state) == pytest.approx(float(norm), rel=1e-5)
    # The stack's floor: the global clip and Adam where the norm is finite, nothing (state kept) where it is not.
    floor = floors.guarded_global_norm(th.global_norm, optax.adam(1e-3))
    stack = optclip.skip_nonfinite(optax.chain(optclip.clip_by_global_norm(th.global_norm), optax.adam(1e-3)))
    got, floor_state = floor.update(tree.grads, floor.init(tree.params), tree.params)
    expected, _ = stack.update(tree.grads, stack.init(tree.params), tree.params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    bad = jax.tree.map(lambda g: jnp.asarray(g).at[0, 0].set(np.nan), tree.grads)
    held, held_state = floor.update(bad, floor_state, tree.params)
    assert all(not np.any(x) for x in jax.tree.leaves(held))
    assert jax.tree.all(jax.tree.map(np.array_equal, held_state, floor_state))


def test_compile_mode_measures_each_config_in_a_fresh_process(run, tmp_path):
    rows = run.compile_in_fresh_processes(["adam", "optax.clip"], "1e3/2", rounds=2)
    assert [r["config"] for r in rows] == ["adam", "optax.clip"]
    for r in rows:
        assert len(r["seconds"]) == 2 and all(s > 0 for s in r["seconds"]) and r["median_s"] > 0


def test_a_compile_tree_is_named_by_its_size_or_its_model(run):
    # --compile-tree takes a synthetic tree or a model's (whose leaves of mixed shapes alternate, as a model has them).
    synthetic = run._trees.named("1e3/2")
    assert [x.shape for x in jax.tree.leaves(synthetic.params)] == [x.shape for x in jax.tree.leaves(
        run._trees.synthetic(1000, 2).params)]  # fmt: skip
    model = run._trees.named("transformer1")
    assert model.name == "Transformer 1x256"
    assert len({x.shape for x in jax.tree.leaves(model.params)}) > 5
    with pytest.raises(ValueError, match="'resnet'"):
        run._trees.named("resnet")


def test_quick_is_the_target_tree_alone(run):
    args = run.parse_args(["--quick"])
    assert (args.sizes, args.leaves, args.no_models) == ("1e7", "10", True)
    assert f"{args.sizes}/{args.leaves}" == run.TARGET_TREE
    with pytest.raises(SystemExit):
        run.parse_args(["--repeats", "0"])
