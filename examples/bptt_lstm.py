"""Backpropagation through time with and without clipping: Pascanu et al.'s addition and temporal-order tasks.

An LSTM (``nnx.RNN`` over ``nnx.OptimizedLSTMCell``) or a tanh RNN (``nnx.SimpleCell``, the classic exploding case)
reads a sequence and answers at the last step. Every clipping method trains from the same initialisation, on the
same batches, with the same learning rate; only the clip in ``optax.chain(<clip>, <optimizer>)`` differs.

Tasks (Pascanu, Mikolov and Bengio 2013, arXiv:1211.5063; data drawn on the fly from a seeded NumPy generator):

- adding: two channels, values uniform in [0, 1] and a marker channel with two ones, at p0 in [0, 0.1 T) and p1 in
  [0.1 T, 0.5 T). Target: the mean of the two marked values, as in the paper's code (github.com/pascanur/trainingRNNs,
  addition.py): Hochreiter and Schmidhuber's (1997) 0.5 + (X1 + X2) / 4 for values in [-1, 1]. Always answering 0.5
  scores an MSE of 1/24 = 0.0417. A sequence is answered correctly when its squared error is at most 0.04 (the same
  code's test; Hochreiter and Schmidhuber ask for an absolute error below 0.04).
- temporal: six one-hot symbols; A or B at p0 in [0.1 T, 0.2 T) and at p1 in [0.5 T, 0.6 T), distractors c-f
  elsewhere; four classes AA, AB, BA, BB. A sequence is answered correctly when its class is.

Solved, for both tasks: at least 99% of 10,000 fresh test sequences answered correctly (the paper's code stops a run
only when none of 10,000 is wrong). Unlike that code, every sequence has the same length T (it draws T to 1.1 T).

A run stops when its validation set (500 sequences, checked every --eval-every steps) meets the criterion, when
its parameters turn non-finite, or after --steps. Outputs in --out: steps.jsonl (every step of every run: loss,
gradient norm, the clip's statistics from ``optclip.stats``), runs.jsonl (one line per run), summary.md (the tables
printed at the end) and bptt.png (gradient norm and loss of seed 0, one line per method).

    python examples/bptt_lstm.py --quick
    python examples/bptt_lstm.py --task temporal --optimizer sgd --lr 0.1 --lengths 50 100 200
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

ADDING_BASELINE_MSE = 1.0 / 24.0  # variance of the mean of two uniforms: the MSE of always answering 0.5
ADDING_TOLERANCE = 0.04  # a sequence is answered correctly when its squared error is at most this
SOLVED_FRACTION = 0.99  # a run is solved when at least this fraction of the test sequences is answered correctly
VALID_SIZE = 500  # sequences checked every --eval-every steps to stop a solved run; the test set decides success


def adding_batch(rng: np.random.Generator, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(batch, length, 2)``: channel 0 the values, channel 1 the two markers; targets ``(batch,)``."""
    first_end, second_end = max(1, int(0.1 * length)), max(2, int(0.5 * length))
    values = rng.uniform(size=(batch, length)).astype(np.float32)
    p0 = rng.integers(0, first_end, size=batch)
    p1 = rng.integers(first_end, second_end, size=batch)
    markers = np.zeros((batch, length), np.float32)
    rows = np.arange(batch)
    markers[rows, p0] = 1.0
    markers[rows, p1] = 1.0
    return np.stack([values, markers], axis=-1), (values[rows, p0] + values[rows, p1]) / 2


def temporal_order_batch(rng: np.random.Generator, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(batch, length, 6)`` one-hot (0 = A, 1 = B, 2-5 distractors); labels ``2 * first + second`` in 0..3."""
    band = max(1, int(0.1 * length))
    p0 = rng.integers(0, band, size=batch) + band
    p1 = rng.integers(0, band, size=batch) + int(0.5 * length)
    v0, v1 = rng.integers(0, 2, size=batch), rng.integers(0, 2, size=batch)
    symbols = rng.integers(2, 6, size=(batch, length))
    rows = np.arange(batch)
    symbols[rows, p0] = v0
    symbols[rows, p1] = v1
    return np.eye(6, dtype=np.float32)[symbols], (2 * v0 + v1).astype(np.int32)


def mse_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """Squared error of the single output read at the last step."""
    return jnp.mean((model(x)[:, 0] - y) ** 2)


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: its input and output sizes, its batch generator, its loss, and how a run is scored and judged."""

    inputs: int
    outputs: int
    make_batch: Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]
    loss_fn: Callable[..., jax.Array]
    metric: str  # "mse" (a regression, judged by each sequence's squared error) or "accuracy"

    def correct(self, outputs: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which sequences are answered correctly (a non-finite output never is)."""
        if self.metric == "mse":
            return (outputs[:, 0] - y) ** 2 <= ADDING_TOLERANCE
        return np.argmax(outputs, axis=-1) == y

    def score(self, outputs: np.ndarray, y: np.ndarray) -> float:
        """The fraction of sequences answered correctly."""
        return float(np.mean(self.correct(outputs, y)))

    def solved(self, score: float) -> bool:
        return score >= SOLVED_FRACTION


TASKS = {
    "adding": Task(2, 1, adding_batch, mse_loss, "mse"),
    "temporal": Task(6, 4, temporal_order_batch, _common.cross_entropy_loss, "accuracy"),
}


@dataclasses.dataclass
class RunResult:
    """One run (a method and a seed), as runs.jsonl records it."""

    method: str
    seed: int
    tracker: _common.Tracker
    solved_step: int | None = None  # the first validation check that met the criterion
    test_score: float = math.nan  # fraction of test sequences answered correctly at the end; NaN if it diverged
    test_mse: float = math.nan  # the adding task's test MSE at the end; NaN for temporal order or a diverged run
    evals: list[tuple[int, float]] = dataclasses.field(default_factory=list)


def train_one(
    args: argparse.Namespace,
    task: Task,
    length: int,
    lr: float,
    method: str,
    seed: int,
    valid: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    log: _common.JsonlWriter,
    run_id: str,
) -> tuple[RunResult, _common.Curve]:
    """Train one method from one seed until the validation set is solved, the parameters diverge, or --steps."""
    model = _common.SequenceModel(
        args.cell, task.inputs, args.hidden, task.outputs, forget_bias=args.forget_bias, rngs=nnx.Rngs(seed)
    )
    optimizer = _common.make_nnx_optimizer(
        model, method, _common.make_optimizer(args.optimizer, lr, args.momentum), args
    )
    data_rng = np.random.default_rng([seed, length])  # the same batches for every method and learning rate
    step_fn = _common.bind_step(model, optimizer, task.loss_fn)
    curve = _common.Curve()
    result = RunResult(method, seed, _common.Tracker(args.steps))
    with _common.progress(args.steps, run_id, args.progress) as bar:
        for step in range(1, args.steps + 1):
            x, y = task.make_batch(data_rng, args.batch, length)
            record, stop = _common.run_step(step_fn, model, x, y, result.tracker, log, run_id)
            curve.add(record)
            bar.update(1)
            if stop:
                return result, curve
            if step % args.eval_every == 0 or step == args.steps:
                score = task.score(_common.predict(model, valid[0]), valid[1])
                result.evals.append((step, score))
                bar.set_postfix_str(f"valid: {score:.1%} correct")
                if task.solved(score):
                    result.solved_step = step
                    break
    outputs = _common.predict(model, test[0])
    result.test_score = task.score(outputs, test[1])
    if task.metric == "mse":
        result.test_mse = float(np.mean((outputs[:, 0].astype(np.float64) - test[1]) ** 2))
    return result, curve


def _solved(task: Task, runs: Sequence[RunResult]) -> list[RunResult]:
    """The runs that met the criterion on the validation set and then on the test set."""
    return [r for r in runs if r.solved_step is not None and task.solved(r.test_score)]


def summarize(task: Task, results: Sequence[RunResult], methods: Sequence[str]) -> list[list[str]]:
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        n = len(runs)
        solved = _solved(task, runs)
        row = [method, f"{len(solved)}/{n}"]
        if task.metric == "mse":
            row.append(f"{sum(r.test_mse < ADDING_BASELINE_MSE for r in runs)}/{n}")
        row += [
            _common.fmt(_common.median_or_none([r.solved_step for r in solved]), 4),
            *_common.tracker_cells([r.tracker for r in runs]),
            _common.fmt_spread([r.test_score for r in runs]),
        ]
        if task.metric == "mse":
            row.append(_common.fmt_spread([r.test_mse for r in runs]))
        rows.append(row)
    return rows


def overview_cell(task: Task, runs: Sequence[RunResult]) -> str:
    """``solved/runs (median steps to solve)``, and how many runs diverged to NaN."""
    solved = _solved(task, runs)
    cell = f"{len(solved)}/{len(runs)}"
    if solved:
        cell += f" ({_common.fmt(_common.median_or_none([r.solved_step for r in solved]), 4)})"
    diverged = sum(r.tracker.diverged_step is not None for r in runs)
    return cell + (f", {diverged} NaN" if diverged else "")


def table_headers(task: Task) -> list[str]:
    if task.metric == "mse":
        headers = ["method", "solved (>= 99% within 0.04)", f"beats baseline (MSE < {ADDING_BASELINE_MSE:.3g})"]
        test = "test sequences within 0.04"
    else:
        headers, test = ["method", "solved (accuracy >= 99%)"], "test accuracy"
    headers += ["median steps to solve", *_common.TRACKER_HEADERS, f"{test}: median (min-max)"]
    return headers + (["test MSE: median (min-max)"] if task.metric == "mse" else [])


# What --quick changes: the tanh RNN on short sequences, where clipping decides the outcome within a minute or two.
QUICK = {"cell": "tanh", "lengths": [30], "lr": [0.03], "seeds": 3, "steps": 1000, "test_size": 2000}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="temporal", help="temporal order or adding problem")
    parser.add_argument("--cell", choices=("lstm", "tanh"), default="lstm", help="LSTM, or the tanh RNN control")
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 200], help="sequence lengths T to run")
    _common.add_recurrent_args(parser, forget_bias=3.0, lr=1.0, several_lr=True)
    parser.add_argument("--batch", type=int, default=20, help="sequences per training batch (20 in the paper)")
    parser.add_argument("--steps", type=int, default=2000, help="most training steps per run")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation checks")
    parser.add_argument("--test-size", type=int, default=10_000, help="fresh test sequences per length")
    _common.add_common_args(parser, script="bptt_lstm")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_with_quick(build_parser(), argv, QUICK)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every (length, learning rate, method, seed); write the outputs; return the tables by group."""
    args = parse_args(argv)
    task = TASKS[args.task]
    report = _common.Report(args.out, f"BPTT stability: {args.task}, {args.cell}, {args.optimizer}", __file__, argv)
    panels: dict[str, dict[str, _common.Curve]] = {}
    tables: dict[str, list[list[str]]] = {}
    overview: list[list[str]] = []
    notes = [
        f"task {args.task}, {args.cell} with {args.hidden} hidden units, batch {args.batch}, {args.optimizer}"
        + (f" momentum {args.momentum}" if args.optimizer == "sgd" else "")
        + f", at most {args.steps} steps, validation every {args.eval_every} steps, {args.test_size} test sequences",
        f"thresholds: value {args.clip_value}, leaf norm {args.leaf_norm}, global norm {args.global_norm}, "
        f"AGC {args.agc}; {args.seeds} seeds",
    ]
    with (
        _common.StepLog(args.out / "steps.jsonl", args.tensorboard) as steps_log,
        _common.JsonlWriter(args.out / "runs.jsonl") as runs_log,
    ):
        for length in args.lengths:
            valid = task.make_batch(np.random.default_rng([length, 1]), VALID_SIZE, length)
            test = task.make_batch(np.random.default_rng([length, 2]), args.test_size, length)
            for lr in args.lr:
                group = f"T={length}, {args.optimizer} lr={lr:g}"
                results = []
                for method in args.methods:
                    for seed in range(args.seeds):
                        run_id = f"{args.task}-{args.cell}-T{length}-{args.optimizer}-lr{lr:g}-{method}-s{seed}"
                        result, curve = train_one(args, task, length, lr, method, seed, valid, test, steps_log, run_id)
                        results.append(result)
                        fields = {"run": run_id, "task": args.task, "cell": args.cell, "length": length}
                        fields.update(optimizer=args.optimizer, lr=lr, hidden=args.hidden)
                        runs_log.write({**fields, **dataclasses.asdict(result)})
                        if seed == 0:
                            panels.setdefault(group, {})[method] = curve
                tables[group] = summarize(task, results, args.methods)
                report.add(group, _common.markdown_table(table_headers(task), tables[group]))
                overview.append(
                    [f"{length}", f"{lr:g}"]
                    + [overview_cell(task, [r for r in results if r.method == m]) for m in args.methods]
                )
                report.write(notes)  # so far: a long run can be read while it goes on
    report.add(
        "Overview: solved runs (median steps to solve)",
        _common.markdown_table(["T", f"{args.optimizer} lr", *args.methods], overview),
    )
    _common.plot_curves(
        args.out / "bptt.png",
        panels,
        f"{args.task}, {args.cell} {args.hidden} units, batch {args.batch}, seed 0 of {args.seeds}",
    )
    report.finish(notes)
    return {"tables": tables, "overview": overview, "headers": table_headers(task), "out": args.out}


if __name__ == "__main__":
    main()
