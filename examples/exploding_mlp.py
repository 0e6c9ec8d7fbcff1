"""The classic exploding-gradient regression: a 2-layer MLP on unscaled targets, with and without clipping.

``sklearn.datasets.make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)`` (first half to train,
second half to test); a 20 -> 25 -> 1 ReLU MLP with Xavier-uniform weights and biases 0.01; mean squared error;
SGD, learning rate 0.07, momentum 0.8, shuffled batches of 128, 50 epochs. The targets are in the hundreds, so the
first gradients are large and momentum compounds them: without clipping the run overflows to NaN within a few
epochs. ``clip_by_value(1.0)`` or ``clip_by_global_norm(1.0)`` keeps it finite. Seeds change the initialisation and
the shuffling, never the data.

Outputs in --out: steps.jsonl (every step: loss, gradient norm, the clip's statistics from ``optclip.stats``),
runs.jsonl (one line per run), summary.md (the table printed at the end) and mlp.png (the gradient norm and
the loss of every run, step by step, against epochs).

    python examples/exploding_mlp.py --quick
    python examples/exploding_mlp.py --methods none value global leaf agc
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def regression_data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The demo's data set, split in half: (train x, train y), (test x, test y), float32."""
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return (x[:500], y[:500]), (x[500:], y[500:])


class MLP(nnx.Module):
    """20 -> 25 -> 1 with ReLU, Xavier-uniform weights, biases 0.01 (the demo's Keras settings)."""

    def __init__(self, features: int = 20, hidden: int = 25, *, rngs: nnx.Rngs) -> None:
        init = {"kernel_init": nnx.initializers.xavier_uniform(), "bias_init": nnx.initializers.constant(0.01)}
        self.hidden = nnx.Linear(features, hidden, rngs=rngs, **init)
        self.out = nnx.Linear(hidden, 1, rngs=rngs, **init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))[:, 0]


def mse_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


def _mse(model: nnx.Module, data: tuple[np.ndarray, np.ndarray]) -> float:
    return float(np.mean((_common.predict(model, data[0]).astype(np.float64) - data[1]) ** 2))  # float64: no overflow


QUICK = {"epochs": 10, "seeds": 2}  # what --quick changes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50, help="passes over the 500 training examples")
    parser.add_argument("--batch", type=int, default=128, help="examples per step (shuffled each epoch)")
    parser.add_argument("--lr", type=float, default=0.07, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.8, help="SGD momentum")
    _common.add_common_args(parser, script="exploding_mlp", methods=["none", "value", "global"])
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_with_quick(build_parser(), argv, QUICK)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train every (method, seed); write the outputs; return the table."""
    args = parse_args(argv)
    train, test = regression_data()
    report = _common.Report(args.out, "Exploding gradients in a 2-layer MLP", __file__, argv)
    curves: dict[str, list[_common.Curve]] = {}
    rows = []
    with (
        _common.StepLog(args.out / "steps.jsonl", args.tensorboard) as steps_log,
        _common.JsonlWriter(args.out / "runs.jsonl") as runs_log,
    ):
        for method in args.methods:
            trackers, train_mse, test_mse = [], [], []
            for seed in range(args.seeds):
                model = MLP(rngs=nnx.Rngs(seed))
                sgd = _common.make_optimizer("sgd", args.lr, args.momentum)
                optimizer = _common.make_nnx_optimizer(model, method, sgd, args)
                run_id = f"mlp-{method}-s{seed}"
                tracker, curve = _common.fit_epochs(
                    model, optimizer, train, mse_loss, args, seed=seed, log=steps_log, run_id=run_id
                )
                diverged = tracker.diverged_step is not None
                trackers.append(tracker)
                train_mse.append(math.nan if diverged else _mse(model, train))
                test_mse.append(math.nan if diverged else _mse(model, test))
                curves.setdefault(method, []).append(curve)
                fields = {"run": run_id, "method": method, "seed": seed, "train_mse": train_mse[-1]}
                fields.update(test_mse=test_mse[-1], **dataclasses.asdict(tracker))
                runs_log.write(fields)
            per_epoch = math.ceil(len(train[0]) / args.batch)
            nan_epochs = [math.ceil(t.diverged_step / per_epoch) for t in trackers if t.diverged_step is not None]
            rows.append(
                [
                    method,
                    *_common.tracker_cells(trackers),
                    _common.fmt(_common.median_or_none(nan_epochs)),
                    _common.fmt_spread(train_mse),
                    _common.fmt_spread(test_mse),
                ]
            )
    headers = [
        "method",
        *_common.TRACKER_HEADERS,
        "median epoch of divergence",
        "train MSE: median (min-max)",
        "test MSE: median (min-max)",
    ]
    table = _common.markdown_table(headers, rows)
    report.add(f"{args.epochs} epochs, SGD lr {args.lr} momentum {args.momentum}, {args.seeds} seeds", table)
    _common.plot_curves(
        args.out / "mlp.png",
        {"make_regression MLP": curves},
        f"2-layer MLP, SGD lr {args.lr} momentum {args.momentum}: every seed, every step",
        x_label="epoch",
        steps_per_x=math.ceil(len(train[0]) / args.batch),
    )
    report.finish([f"thresholds: value {args.clip_value}, global norm {args.global_norm}, leaf norm {args.leaf_norm}"])
    return {"headers": headers, "rows": rows, "out": args.out}


if __name__ == "__main__":
    main()
