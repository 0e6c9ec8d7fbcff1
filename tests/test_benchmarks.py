"""Smoke test of benchmarks/run.py: the whole configuration table runs at a tiny size and the JSON says what it
measured. Speed itself is never asserted here (benchmarks/results/ holds the measurements)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("optclip_benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_a_tiny_run_of_the_whole_table(run, tmp_path):
    # One test, so that the run (every configuration compiled) happens once even when xdist splits the module.
    out = tmp_path / "results"
    argv = ["--sizes", "1e3", "--leaves", "2", "--no-models", "--repeats", "3", "--warmup", "1"]
    argv += ["--target-tree", "1e3/2", "--compile-leaves", "2", "--out", str(out), "--tag", "smoke"]
    tiny = run.main(argv), out
    _writes_the_json_it_returns_and_a_markdown_table(tiny)
    _meta_names_the_machine_versions_threads_device_and_load(tiny)
    _every_available_config_is_timed_compiled_and_measured(run, tiny)
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


def _every_available_config_is_timed_compiled_and_measured(run, tiny):
    assert [r for r in tiny[0]["rows"] if "error" in r] == []
    rows = {r["config"]: r for r in tiny[0]["rows"]}
    expected = {c.name for c in run.CONFIGS if c.available()}
    assert expected <= set(rows)
    assert {c.name for c in run.CONFIGS if not c.available()} == set(tiny[0]["meta"]["left_out"])
    for name in expected:
        r = rows[name]
        assert r["tree"] == "1e3/2" and r["params"] == 1000 and r["leaves"] == 2 and r["param_bytes"] == 4000
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 3
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["baseline"] == run.BASELINE
        assert r["lower_s"] > 0 and r["compile_s"] > 0
        assert r["lower_compile_s"] == pytest.approx(r["lower_s"] + r["compile_s"])
        assert r["temp_bytes"] >= 0 and r["output_bytes"] >= r["param_bytes"] and r["fusions"] >= 1
    assert rows[run.BASELINE]["ratio"] == 1.0


def _torch_rows_are_paired_with_torch_adam_when_torch_is_there(tiny):
    rows = {r["config"]: r for r in tiny[0]["rows"]}
    if tiny[0]["meta"]["torch_device"] is None:
        assert not any(name.startswith("torch.") for name in rows)
        return
    assert {"torch.Adam", "torch.clip_grad_norm_", "torch.clip_grad_value_"} <= set(rows)
    assert rows["torch.Adam"]["ratio"] == 1.0
    assert all(rows[n]["baseline"] == "torch.Adam" for n in rows if n.startswith("torch."))


def _targets_are_judged_from_the_rows(run, tiny):
    result = tiny[0]
    rows = {r["config"]: r for r in result["rows"]}
    targets = result["targets"]
    assert targets and all(isinstance(t["passed"], bool) for t in targets)
    for t in targets:
        assert t["passed"] == (t["measured"] <= t["limit"])
        if t["target"] == "step time / adam":
            assert t["measured"] == rows[t["config"]]["ratio"]
    judged = {(t["config"], t["target"].split(" ")[0]) for t in targets}
    for c in run.CONFIGS:
        if c.available() and c.vs is not None:
            assert (c.name, "compile") in judged


def _row(config, ratio, temp=0, compile_s=1.0, tree="T", leaves=10):
    return {
        "tree": tree,
        "config": config,
        "ratio": ratio,
        "temp_bytes": temp,
        "param_bytes": 1000,
        "lower_compile_s": compile_s,
        "leaves": leaves,
    }


def test_a_target_above_its_limit_is_a_miss_and_a_missing_tree_is_not_judged(run):
    configs = [
        run.Config("adam", None),
        run.Config("optax.x", None),
        run.Config("optclip.x", None, max_ratio=1.1, vs="optax.x"),
    ]
    rows = [_row("adam", 1.0), _row("optax.x", 1.0, compile_s=2.0), _row("optclip.x", 1.2, temp=50, compile_s=2.1)]
    verdicts = {t["target"]: t for t in run.evaluate_targets(rows, configs, "T", 10)}
    assert verdicts["step time / adam"]["passed"] is False
    assert verdicts["step time / optax.x"]["measured"] == pytest.approx(1.2)
    assert verdicts["compile time / optax.x"]["passed"] is True
    assert verdicts["extra temp bytes / param bytes"]["measured"] == pytest.approx(0.05)
    assert verdicts["extra temp bytes / param bytes"]["passed"] is False
    unjudged = run.evaluate_targets(rows, configs, "another tree", 1000)
    assert unjudged and all(t["passed"] is None for t in unjudged)


def test_quick_is_the_target_tree_alone(run):
    args = run.parse_args(["--quick"])
    assert (args.sizes, args.leaves, args.no_models) == ("1e7", "10", True)
    assert f"{args.sizes}/{args.leaves}" == run.TARGET_TREE
    with pytest.raises(SystemExit):
        run.parse_args(["--repeats", "0"])
