"""The example scripts: their data generators match the task definitions, and each runs end to end in-process.

The end-to-end runs use settings smaller than ``--quick`` (seconds each) and check what a run must write: strict
JSONL per step and per run, a summary table with one row per method, a PNG. ``main(argv)`` is called directly so that
JAX starts once for the whole file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import optclip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _common
import bptt_lstm
import exploding_mlp
import sequential_digits
import transformer_spikes

SCRIPTS = (bptt_lstm, exploding_mlp, sequential_digits, transformer_spikes)
STEP_FIELDS = {"run", "step", "loss", "grad_norm", "norm", "norm_after", "threshold", "clipped"}


def _strict(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    return [json.loads(line, parse_constant=_strict) for line in lines]


def check_outputs(out: Path, figure: str, methods: list[str], runs_expected: int) -> tuple[list[dict], list[dict]]:
    """The files every script writes, well formed; returns the step and run records."""
    steps, runs = read_jsonl(out / "steps.jsonl"), read_jsonl(out / "runs.jsonl")
    assert len(runs) == runs_expected
    for record in steps:
        assert record.keys() >= STEP_FIELDS
        assert 0.0 <= record["clipped"] <= 1.0
    # Every run logged each of its steps once, in order.
    for run in runs:
        taken = run.get("tracker", run)["steps"]  # bptt_lstm nests the tracker, the others flatten it
        assert [r["step"] for r in steps if r["run"] == run["run"]] == list(range(1, taken + 1))
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# ") and "- command:" in summary and "wall time" in summary
    table_rows = [line for line in summary.splitlines() if line.startswith("| ")]
    for method in methods:
        assert any(line.startswith(f"| {method} |") for line in table_rows), method
    png = (out / figure).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    return steps, runs


# ---------------------------------------------------------------------------------------------- data generators


@pytest.mark.parametrize("length", [50, 100, 200, 17])
def test_adding_batch_matches_the_task_definition(length):
    x, y = bptt_lstm.adding_batch(np.random.default_rng(length), 4000, length)
    assert x.shape == (4000, length, 2) and x.dtype == np.float32 and y.shape == (4000,)
    values, markers = x[..., 0], x[..., 1]
    assert np.all((values >= 0) & (values < 1))
    assert set(np.unique(markers)) == {0.0, 1.0}
    assert np.all(markers.sum(axis=1) == 2)
    positions = np.argsort(-markers, axis=1, kind="stable")[:, :2]  # the two marked steps, earlier first
    p0, p1 = positions.min(axis=1), positions.max(axis=1)
    first, second = int(0.1 * length), int(0.5 * length)
    assert p0.min() == 0 and p0.max() == first - 1  # p0 in [0, 0.1 T), every position drawn
    assert p1.min() == first and p1.max() == second - 1  # p1 in [0.1 T, 0.5 T)
    rows = np.arange(len(y))
    # The mean of the two marked values, as Pascanu et al.'s addition.py (Hochreiter and Schmidhuber's
    # 0.5 + (X1 + X2) / 4 with X = 2 * value - 1).
    np.testing.assert_allclose(y, (values[rows, p0] + values[rows, p1]) / 2, rtol=1e-6)
    x1, x2 = 2 * values[rows, p0] - 1, 2 * values[rows, p1] - 1
    np.testing.assert_allclose(y, 0.5 + (x1 + x2) / 4, rtol=1e-5, atol=1e-6)
    # The constant answer 0.5 scores the baseline MSE 1/24 that the table's "beats baseline" column is measured
    # against, and gets 64% of the sequences within the 0.04 tolerance: P(|U1 + U2 - 1| <= 0.4) = 1 - 0.6 ** 2.
    assert abs(np.mean((y - 0.5) ** 2) - bptt_lstm.ADDING_BASELINE_MSE) < 0.003
    constant = bptt_lstm.TASKS["adding"].score(np.full((len(y), 1), 0.5), y)
    assert abs(constant - 0.64) < 0.03


def test_adding_task_judges_each_sequence_by_its_squared_error():
    task = bptt_lstm.TASKS["adding"]
    y = np.array([0.5, 0.5, 0.5, 0.5])
    outputs = np.array([[0.5], [0.69], [0.71], [np.nan]])  # squared errors 0, 0.0361, 0.0441, nan
    np.testing.assert_array_equal(task.correct(outputs, y), [True, True, False, False])
    assert task.score(outputs, y) == 0.5 and not task.solved(0.5)
    assert task.solved(bptt_lstm.SOLVED_FRACTION) and not task.solved(0.989)


@pytest.mark.parametrize("length", [50, 100, 200])
def test_temporal_order_batch_matches_the_task_definition(length):
    x, y = bptt_lstm.temporal_order_batch(np.random.default_rng(length), 8000, length)
    assert x.shape == (8000, length, 6) and x.dtype == np.float32 and y.dtype == np.int32
    assert np.all(x.sum(axis=-1) == 1)  # one symbol per step
    symbols = x.argmax(axis=-1)
    relevant = symbols < 2  # A = 0 or B = 1; everything else is a distractor c-f
    assert np.all(relevant.sum(axis=1) == 2)
    band = int(0.1 * length)
    steps = np.nonzero(relevant)[1].reshape(-1, 2)
    assert steps[:, 0].min() == band and steps[:, 0].max() == 2 * band - 1  # p0 in [0.1 T, 0.2 T)
    assert steps[:, 1].min() == int(0.5 * length) and steps[:, 1].max() == int(0.5 * length) + band - 1
    rows = np.arange(len(y))
    np.testing.assert_array_equal(y, 2 * symbols[rows, steps[:, 0]] + symbols[rows, steps[:, 1]])  # AA AB BA BB
    # Four balanced classes: each within 5 standard deviations of a quarter.
    counts = np.bincount(y, minlength=4)
    assert np.all(np.abs(counts - 2000) < 5 * math.sqrt(8000 * 0.25 * 0.75)), counts
    distractors = np.bincount(symbols[~relevant], minlength=6)[2:]
    assert distractors.min() > 0.24 * distractors.sum()


def test_generators_are_reproducible_from_the_seed():
    for make in (bptt_lstm.adding_batch, bptt_lstm.temporal_order_batch):
        first, second = make(np.random.default_rng(7), 8, 30), make(np.random.default_rng(7), 8, 30)
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])


def test_regression_data_is_the_classic_split():
    from sklearn.datasets import make_regression

    (x_train, y_train), (x_test, y_test) = exploding_mlp.regression_data()
    x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
    assert x_train.shape == (500, 20) and x_test.shape == (500, 20)
    np.testing.assert_allclose(np.concatenate([x_train, x_test]), x, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([y_train, y_test]), y, rtol=1e-6)


def test_digits_data_reads_the_same_images_by_row_and_by_pixel():
    (rows_x, rows_y), (rows_tx, rows_ty) = sequential_digits.digits_data("rows")
    (pix_x, pix_y), (pix_tx, _) = sequential_digits.digits_data("pixels")
    assert rows_x.shape == (1347, 8, 8) and pix_x.shape == (1347, 64, 1) and rows_tx.shape == (450, 8, 8)
    np.testing.assert_array_equal(rows_x.reshape(-1, 64), pix_x.reshape(-1, 64))
    np.testing.assert_array_equal(rows_tx.reshape(-1, 64), pix_tx.reshape(-1, 64))
    np.testing.assert_array_equal(rows_y, pix_y)
    assert rows_x.min() == 0.0 and rows_x.max() == 1.0
    # A stratified split: every digit holds the same share of the test set as of the whole set (to one image).
    totals = np.bincount(np.concatenate([rows_y, rows_ty]), minlength=10)
    assert np.all(np.abs(np.bincount(rows_ty, minlength=10) - totals * 450 / 1797) <= 1)


# The transformer's language: its successor table and the validation set of language seed 0 (see the test below).
SUCCESSORS_SHA, VALID_SHA = "651346c5318bf5d0", "c719b5fa661075b2"


def test_transformer_language_matches_its_definition():
    language = transformer_spikes.Language.from_seed(0)
    tokens = language.sample(np.random.default_rng(3), 4000)
    markov, copy = transformer_spikes.MARKOV, transformer_spikes.COPY
    assert tokens.shape == (4000, transformer_spikes.LENGTH) and tokens.dtype == np.int32
    prefix = tokens[:, :markov]
    assert prefix.min() == 1 and prefix.max() == transformer_spikes.VOCAB - 1  # symbols; 0 is the separator
    assert np.all(tokens[:, markov] == 0)
    # Every Markov symbol is one of its pair's successors, and the successors come in the weights 6:3:2:1.
    allowed = language.successors[prefix[:, :-2], prefix[:, 1:-1]]
    rank = np.argmax(allowed == prefix[:, 2:, None], axis=-1)
    assert np.all(np.take_along_axis(allowed, rank[..., None], axis=-1)[..., 0] == prefix[:, 2:])
    shares = np.bincount(rank.ravel(), minlength=4) / rank.size
    np.testing.assert_allclose(shares, np.array([6, 3, 2, 1]) / 12, atol=0.01)
    # What follows the pair (a, b) is one of b's few candidates, whatever a is.
    for b in range(1, 10):
        assert len(np.unique(language.successors[1:, b])) == transformer_spikes.CANDIDATES
    # After the separator: a copy of a span of the prefix, every possible start drawn.
    copied = tokens[:, markov + 1 :]
    starts = [
        [s for s in range(markov - copy + 1) if np.array_equal(row[s : s + copy], out)]
        for row, out in zip(prefix, copied)
    ]
    assert all(starts)
    assert {s[0] for s in starts if len(s) == 1} == set(range(markov - copy + 1))


def test_transformer_language_is_the_same_on_every_machine():
    """Integer arithmetic only (PCG64 integers, permutations, an integer cumulative sum): these bits do not depend
    on the processor, its vector width or the thread count. A change here changes every published number."""
    language = transformer_spikes.Language.from_seed(0)
    tokens = language.sample(np.random.default_rng([0, 7]), 512)
    assert hashlib.sha256(language.successors.astype(np.int64).tobytes()).hexdigest()[:16] == SUCCESSORS_SHA
    assert hashlib.sha256(tokens.tobytes()).hexdigest()[:16] == VALID_SHA


def test_transformer_optimal_loss_is_the_entropy_of_the_generator():
    language = transformer_spikes.Language.from_seed(0)
    tokens = language.sample(np.random.default_rng(5), 6)
    markov, copy = transformer_spikes.MARKOV, transformer_spikes.COPY
    weights = np.array(transformer_spikes.SUCCESSOR_WEIGHTS) / sum(transformer_spikes.SUCCESSOR_WEIGHTS)
    total = 0.0
    for row in tokens:  # token by token, with the posterior over the copy's start written out
        total += math.log(transformer_spikes.VOCAB - 1)
        for t in range(2, markov):
            total -= math.log(weights[list(language.successors[row[t - 2], row[t - 1]]).index(row[t])])
        starts = list(range(markov - copy + 1))
        for k in range(copy):
            fitting = [s for s in starts if row[s + k] == row[markov + 1 + k]]
            total -= math.log(len(fitting) / len(starts))
            starts = fitting
    expected = total / (len(tokens) * (transformer_spikes.LENGTH - 1))
    assert language.optimal_loss(tokens) == pytest.approx(expected, rel=1e-12)


def test_the_figure_reads_the_monitors_per_layer_norms_in_depth_order():
    record = {"loss": 2.0, "grad_norm": 3.0, "norm": 3.0, "threshold": None, "monitor/norm": 3.0}
    record |= {
        "monitor/norm/head": 1.0,
        "monitor/norm/blocks/1": 2.0,
        "monitor/norm/embed": 2.0,
        "layer_norm/head": 9.0,
    }
    curve = transformer_spikes.LayerCurve()
    curve.add(record)
    assert curve.layers == {"head": [1.0], "blocks/1": [2.0], "embed": [2.0]}  # the monitor's, not layer_norm's
    curve = transformer_spikes.LayerCurve()
    curve.add({"loss": 2.0, "grad_norm": 3.0, "norm": 3.0, "threshold": None, "layer_norm/block0": 1.0})
    assert curve.layers == {"block0": [1.0]}  # no monitor in the chain: the script's own
    names = ["head", "blocks/10", "norm", "blocks/2", "position", "embed"]
    assert sorted(names, key=transformer_spikes.layer_depth) == [
        "embed",
        "position",
        "blocks/2",
        "blocks/10",
        "norm",
        "head",
    ]
    assert sorted(["head", "block1", "embed", "block0"], key=transformer_spikes.layer_depth) == [
        "embed",
        "block0",
        "block1",
        "head",
    ]


def test_spikes_are_runs_of_steps_above_the_running_median():
    losses = [2.0] * 20 + [3.5, 3.6] + [2.0] * 10 + [2.9] + [2.0] * 5 + [3.1]
    assert transformer_spikes.count_spikes(losses, factor=1.5, window=10) == 2  # 2.9 is below 1.5 x 2.0
    assert transformer_spikes.count_spikes(losses, factor=1.4, window=10) == 3
    assert transformer_spikes.count_spikes([5.0, 4.0, 3.0, 2.0, 1.0] * 4, factor=1.5, window=3) == 3
    assert transformer_spikes.count_spikes([2.0] * 5 + [math.nan] + [2.0] * 5, factor=1.5, window=3) == 0


def test_layer_grad_norms_split_the_global_norm_by_layer():
    from flax import nnx

    model = transformer_spikes.Transformer(16, 2, 2, rngs=nnx.Rngs(0))
    tokens = transformer_spikes.Language.from_seed(0).sample(np.random.default_rng(0), 4)

    @nnx.jit  # op by op, the backward pass of even this small model takes seconds
    def measured(model):
        grads = nnx.grad(_common.cross_entropy_loss)(model, tokens[:, :-1], tokens[:, 1:])
        return transformer_spikes.layer_grad_norms(grads), optclip.global_norm(grads)

    norms, global_norm = measured(model)
    assert sorted(norms) == ["layer_norm/block0", "layer_norm/block1", "layer_norm/embed", "layer_norm/head"]
    total = math.sqrt(sum(float(v) ** 2 for v in norms.values()))
    assert total == pytest.approx(float(global_norm), rel=1e-5)


# ------------------------------------------------------------------------------------------- shared machinery


def test_methods_are_every_clip_then_every_guard_in_table_order():
    methods = _common.available_methods()
    assert methods == ["none", "value", "leaf", "global", "agc", "autoclip", "zclip", "adagc", "guards"]
    with pytest.raises(ValueError, match="'bogus'"):
        _common.make_clip("bogus", argparse.Namespace())


def test_step_record_keeps_the_clip_plain_and_every_other_statistic_by_name():
    stats = {"zclip/norm": 2.0, "zclip/norm_after": 1.0, "zclip/threshold": 1.0, "zclip/clipped": 1.0}
    stats |= {"skip_on_spike/skipped": 0.0, "layer_norm/block0": 0.5}
    record = _common.step_record(1.5, 2.0, stats)
    assert record["norm"] == 2.0 and record["threshold"] == 1.0 and record["clipped"] == 1.0
    assert record["skip_on_spike/skipped"] == 0.0 and record["layer_norm/block0"] == 0.5 and "zclip/norm" not in record
    # No clip (the guards alone): nothing clipped, the norms are the raw gradient's, the guard's keys kept.
    record = _common.step_record(1.5, 3.0, {"skip_on_spike/skipped": 1.0, "skip_on_spike/threshold": 2.5})
    assert record["clipped"] == 0.0 and record["norm"] == record["norm_after"] == 3.0 and record["threshold"] is None
    assert record["skip_on_spike/threshold"] == 2.5


def test_guards_wrap_the_optimizer_and_a_skipped_step_is_counted():
    import jax.numpy as jnp
    import optax

    tx = _common.make_transform("guards", optax.sgd(0.1), argparse.Namespace())
    params = jnp.ones(2)
    state = tx.init(params)
    updates, state = tx.update(jnp.array([jnp.nan, 1.0]), state, params)
    assert np.all(np.asarray(updates) == 0.0)
    record = _common.step_record(1.0, math.nan, {k: float(v) for k, v in optclip.stats(state).items()})
    assert record["skip_on_spike/skipped"] == 1.0
    tracker = _common.Tracker(total_steps=1)
    assert not tracker.observe(record, nnx_model_with_finite_params())
    assert tracker.skipped_steps == 1 and tracker.nonfinite_steps == 1 and tracker.diverged_step is None
    chained = _common.make_transform("global", optax.sgd(0.1), argparse.Namespace(global_norm=1.0))
    assert "clip_by_global_norm/clipped" in optclip.stats(chained.init(params))


def nnx_model_with_finite_params():
    from flax import nnx

    return nnx.Linear(2, 1, rngs=nnx.Rngs(0))


def test_interleaved_times_calls_every_step_in_every_round():
    calls = {"a": 0, "b": 0}

    def step(name):
        calls[name] += 1
        return np.zeros(1)

    times = _common.interleaved_times({"a": lambda: step("a"), "b": lambda: step("b")}, rounds=3, calls=2)
    assert calls == {"a": 8, "b": 8}  # one untimed round, then three timed, two calls each
    assert all(len(values) == 3 and min(values) >= 0 for values in times.values())


def test_summaries_say_what_the_numbers_depend_on():
    assert _common.code_version().startswith(("commit ", "optclip "))
    assert any(isa in _common.machine() for isa in ("AVX-512", "AVX2+FMA", "no AVX2/FMA"))


def test_jsonl_writer_writes_non_finite_floats_as_null(tmp_path):
    with _common.JsonlWriter(tmp_path / "x.jsonl") as log:
        log.write({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    assert read_jsonl(tmp_path / "x.jsonl") == [{"a": None, "b": [None, 1.5], "c": {"d": None}}]


def test_quick_changes_defaults_but_not_explicit_options():
    args = bptt_lstm.parse_args(["--quick", "--seeds", "4"])
    assert args.lengths == bptt_lstm.QUICK["lengths"] and args.steps == bptt_lstm.QUICK["steps"]
    assert args.seeds == 4
    assert bptt_lstm.parse_args([]).lengths == [50, 100, 200]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_every_option_is_explained(script, capsys):
    parser = script.build_parser()
    for action in parser._actions:
        assert action.help, f"{script.__name__}: {action.option_strings} has no help"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- end to end


def test_bptt_lstm_end_to_end(tmp_path):
    argv = ["--task", "temporal", "--lengths", "12", "--hidden", "8", "--seeds", "2", "--steps", "30", "--lr", "0.1"]
    argv += ["--eval-every", "10", "--test-size", "300", "--methods", "none", "global", "--no-progress"]
    result = bptt_lstm.main([*argv, "--out", str(tmp_path / "a")])
    steps, runs = check_outputs(tmp_path / "a", "bptt.png", ["none", "global"], runs_expected=4)
    assert list(result["tables"]) == ["T=12, sgd lr=0.1"]
    assert [row[0] for row in result["tables"]["T=12, sgd lr=0.1"]] == ["none", "global"]
    for run in runs:
        assert run["length"] == 12 and 0.0 <= run["test_score"] <= 1.0
        assert [step for step, _ in run["evals"]] == list(range(10, run["tracker"]["steps"] + 1, 10))
    for record in steps:
        if "-none-" in record["run"]:  # no clip: nothing clipped, the norms are the raw gradient's
            assert record["threshold"] is None and record["clipped"] == 0.0
            assert record["norm"] == record["norm_after"] == record["grad_norm"]
        else:  # optclip.stats of clip_by_global_norm(1.0): its norm is the raw global norm, held to 1
            assert record["threshold"] == 1.0
            assert record["norm"] == pytest.approx(record["grad_norm"], rel=1e-5)
            assert record["norm_after"] == pytest.approx(min(record["norm"], 1.0), rel=1e-5)
            assert record["clipped"] == float(record["norm"] > 1.0)
    # Seeded: the same command gives the same numbers.
    bptt_lstm.main([*argv, "--out", str(tmp_path / "b")])
    assert read_jsonl(tmp_path / "b" / "steps.jsonl") == steps


def test_bptt_lstm_adding_task_reports_the_baseline(tmp_path):
    argv = ["--task", "adding", "--lengths", "10", "--hidden", "8", "--seeds", "1", "--steps", "20"]
    argv += ["--eval-every", "10", "--test-size", "200", "--methods", "none", "--no-progress", "--out", str(tmp_path)]
    result = bptt_lstm.main(argv)
    check_outputs(tmp_path, "bptt.png", ["none"], runs_expected=1)
    assert "beats baseline (MSE < 0.0417)" in result["headers"]
    (run,) = read_jsonl(tmp_path / "runs.jsonl")
    assert 0 <= run["test_score"] < bptt_lstm.SOLVED_FRACTION and run["solved_step"] is None  # 20 steps solve nothing
    assert run["test_mse"] > 0


def test_exploding_mlp_end_to_end(tmp_path):
    argv = ["--epochs", "3", "--seeds", "1", "--methods", "none", "global", "--no-progress", "--out", str(tmp_path)]
    result = exploding_mlp.main([*argv, "--monitor"])
    steps, runs = check_outputs(tmp_path, "mlp.png", ["none", "global"], runs_expected=2)
    # --monitor: optclip.monitor first in the chain logs each layer's norm; they make up the raw gradient's norm.
    finite = [r for r in steps if r["grad_norm"] is not None and np.isfinite(r["grad_norm"]) and r["grad_norm"] < 1e30]
    assert len(finite) > len(steps) // 2
    for record in finite:
        layers = [v for k, v in record.items() if k.startswith("monitor/norm/")]
        assert layers and np.hypot.reduce(layers) == pytest.approx(record["grad_norm"], rel=1e-4)
    by_method = {run["method"]: run for run in runs}
    # The demo's claim, in miniature: unclipped SGD overflows within three epochs, the clipped run does not.
    unclipped, clipped = by_method["none"], by_method["global"]
    assert unclipped["diverged_step"] is not None and unclipped["train_mse"] is None
    # A diverged run stops; its non-finite steps are those it logged plus every step it had left.
    logged = [r for r in steps if r["run"] == unclipped["run"] and None in (r["loss"], r["grad_norm"])]
    assert logged and logged[-1]["step"] == unclipped["diverged_step"] == unclipped["steps"]
    left = unclipped["total_steps"] - unclipped["steps"]
    assert unclipped["nonfinite_steps"] == len(logged) + left
    assert clipped["diverged_step"] is None and clipped["nonfinite_steps"] == 0
    assert math.isfinite(clipped["train_mse"]) and clipped["clipped_steps"] > 0
    assert [row[1] for row in result["rows"]] == ["1/1", "0/1"]  # the "diverged" column


def test_sequential_digits_end_to_end(tmp_path):
    argv = ["--variants", "rows", "--epochs", "1", "--seeds", "1", "--hidden", "8", "--methods", "none", "value"]
    result = sequential_digits.main([*argv, "--no-progress", "--out", str(tmp_path)])
    _, runs = check_outputs(tmp_path, "digits.png", ["none", "value"], runs_expected=2)
    assert {run["variant"] for run in runs} == {"rows"}
    assert all(0.0 <= run["test_accuracy"] <= 1.0 for run in runs)
    assert all(run["steps"] == math.ceil(1347 / 32) for run in runs)
    assert [row[0] for row in result["tables"]["rows"]] == ["none", "value"]


def test_transformer_spikes_end_to_end(tmp_path):
    argv = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch", "4", "--steps", "12", "--warmup", "3"]
    argv += ["--seeds", "2", "--eval-every", "5", "--valid-size", "8", "--spike-window", "4", "--timing-rounds", "2"]
    argv += ["--timing-steps", "1", "--methods", "none", "global", "guards", "--no-progress", "--lr", "0.01"]
    argv += ["--tensorboard", str(tmp_path / "tb")]  # tensorboardX comes with the examples extra, as flax does
    result = transformer_spikes.main([*argv, "--out", str(tmp_path / "out")])
    steps, runs = check_outputs(tmp_path / "out", "transformer.png", ["none", "global", "guards"], runs_expected=6)
    rows = result["tables"]["methods"]
    assert [row[0] for row in rows] == ["none", "global", "guards"]
    assert rows[0][-1].startswith("1 (1-1)")  # no clipping against itself, round by round
    # optclip.monitor() comes first in every method's chain here: its per-layer norms, and the script's own.
    layers = {"layer_norm/embed", "layer_norm/block0", "layer_norm/head", "monitor/norm/embed", "monitor/norm/blocks/0"}
    for record in steps:
        assert record.keys() >= layers
        if "-global-" in record["run"]:  # the clip's statistics, unprefixed, as in the other scripts
            assert record["threshold"] == 1.0 and record["norm"] == pytest.approx(record["grad_norm"], rel=1e-5)
        if "-guards-" in record["run"]:  # the guards' statistics keep their names; nothing is clipped
            assert record["clipped"] == 0.0 and record["skip_on_spike/skipped"] in (0.0, 1.0)
            assert "skip_nonfinite/nonfinite" in record
    for run in runs:
        assert run["tracker"]["steps"] == 12 and math.isfinite(run["valid_loss"])
        assert run["diverged"] == (run["valid_loss"] > transformer_spikes.UNIFORM_LOSS)  # finite: judged by its loss
        assert [step for step, _ in run["evals"]] == [5, 10, 12]
    # 12 steps are too few for the guards to arm (64 accepted norms first): none is skipped.
    assert all(run["tracker"]["skipped_steps"] == 0 for run in runs)
    # Same seed, same batches, same initialisation: the first step is the same for every method.
    first = {r["run"]: r["loss"] for r in steps if r["step"] == 1}
    assert len({round(loss, 6) for run, loss in first.items() if run.endswith("-s0")}) == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "lowest possible loss" in summary and "step time / none" in summary
    tensorboard_event_files_hold_every_step_and_the_monitor_per_layer(tmp_path / "tb", steps)


def test_transformer_spikes_sweep(tmp_path):
    argv = ["--sweep", "--sweep-lr", "0.001", "0.1", "--sweep-methods", "none", "--dim", "16", "--depth", "1"]
    argv += ["--heads", "2", "--batch", "4", "--steps", "6", "--warmup", "2", "--seeds", "1", "--eval-every", "3"]
    argv += ["--valid-size", "8", "--no-progress", "--out", str(tmp_path)]
    result = transformer_spikes.main(argv)
    check_outputs(tmp_path, "sweep.png", ["0.001 | none", "0.1 | none"], runs_expected=2)
    assert [row[:2] for row in result["tables"]["sweep"]] == [["0.001", "none"], ["0.1", "none"]]
    assert not (tmp_path / "transformer.png").exists()


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every TensorBoard event file in ``folder``, read back as TensorBoard reads them: TFRecord
    framing (length, its masked CRC, the serialized ``Event`` protobuf, its masked CRC) around tensorboardX's own
    copy of TensorBoard's ``Event`` message."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def tensorboard_event_files_hold_every_step_and_the_monitor_per_layer(folder: Path, steps: list[dict]) -> None:
    """``--tensorboard`` wrote one folder per run whose event files hold every step's scalars, the monitor's
    per-layer norms among them (read back as TensorBoard reads them)."""
    runs = sorted({r["run"] for r in steps})
    assert sorted(p.name for p in folder.iterdir()) == runs
    for run in runs:
        scalars = read_scalars(folder / run)
        logged = [r for r in steps if r["run"] == run]
        layers = {"monitor/norm/blocks/0", "monitor/norm/embed", "monitor/norm/head"}
        assert scalars.keys() >= {"loss", "grad_norm", "monitor/norm"} | layers
        for tag in ("loss", "grad_norm", "monitor/norm/blocks/0"):
            assert [step for step, _ in scalars[tag]] == [r["step"] for r in logged] == list(range(1, 13))
            np.testing.assert_allclose([v for _, v in scalars[tag]], [r[tag] for r in logged], rtol=1e-6)
        if "-guards-" in run:
            continue  # inside the guards the monitor keeps a skipped step's previous values
        # The monitor measures the raw gradient, before the clip: its global norm is the step's gradient norm.
        np.testing.assert_allclose([v for _, v in scalars["monitor/norm"]], [r["grad_norm"] for r in logged], rtol=1e-5)
        # Its per-layer norms are the script's own per-layer norms, computed outside the optimizer.
        np.testing.assert_allclose(
            [r["monitor/norm/blocks/0"] for r in logged], [r["layer_norm/block0"] for r in logged], rtol=1e-5
        )
    global_run = next(run for run in runs if "-global-" in run)
    assert "clip_by_global_norm/norm" not in read_scalars(folder / global_run)  # logged plain
    assert {"norm", "threshold", "clipped"} <= read_scalars(folder / global_run).keys()
