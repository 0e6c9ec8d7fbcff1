"""Sequential digits: an LSTM reads scikit-learn's bundled 8x8 digits step by step, clipped and unclipped.

``sklearn.datasets.load_digits`` (1,797 images, no download), pixels scaled to [0, 1], a fixed stratified split of
1,347 training and 450 test images. Two readings of each image:

- rows: one row of 8 pixels per step, T = 8;
- pixels: one pixel per step, T = 64 (the harder variant: the class depends on inputs up to 64 steps back).

Every method trains from the same initialisation on the same shuffled batches with the same optimizer; seeds change
the initialisation and the shuffling, never the split. Outputs in --out: steps.jsonl (every step: loss, gradient
norm, the clip's statistics from ``optclip.stats``), runs.jsonl (one line per run), summary.md (the tables printed at
the end) and digits.png (gradient norm and loss of seed 0, one line per method).

    python examples/sequential_digits.py --quick
    python examples/sequential_digits.py --variants pixels --optimizer sgd --lr 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

VARIANTS = {"rows": (8, 8), "pixels": (64, 1)}  # (steps T, inputs per step)


def digits_data(variant: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train x, train y), (test x, test y): x of shape (n, T, inputs) in [0, 1], y the digit; a fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    steps, inputs = VARIANTS[variant]
    x = (images / 16.0).astype(np.float32).reshape(-1, steps, inputs)
    x_train, x_test, y_train, y_test = train_test_split(
        x, labels.astype(np.int32), test_size=450, stratify=labels, random_state=0
    )
    return (x_train, y_train), (x_test, y_test)


QUICK = {"epochs": 4, "seeds": 2}  # what --quick changes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["rows", "pixels"], help="readings")
    _common.add_recurrent_args(parser, forget_bias=1.0, lr=0.3, several_lr=False)
    parser.add_argument("--batch", type=int, default=32, help="images per step (shuffled each epoch)")
    parser.add_argument("--epochs", type=int, default=15, help="passes over the 1,347 training images")
    _common.add_common_args(parser, script="sequential_digits")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _common.parse_with_quick(build_parser(), argv, QUICK)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train every (variant, method, seed); write the outputs; return the tables by variant."""
    args = parse_args(argv)
    report = _common.Report(args.out, f"Sequential digits: LSTM, {args.optimizer} lr {args.lr}", __file__, argv)
    panels: dict[str, dict[str, _common.Curve]] = {}
    tables: dict[str, list[list[str]]] = {}
    headers = ["method", "test accuracy: median (min-max)", *_common.TRACKER_HEADERS]
    with (
        _common.StepLog(args.out / "steps.jsonl", args.tensorboard) as steps_log,
        _common.JsonlWriter(args.out / "runs.jsonl") as runs_log,
    ):
        for variant in args.variants:
            train, test = digits_data(variant)
            rows = []
            for method in args.methods:
                trackers, accuracies = [], []
                for seed in range(args.seeds):
                    model = _common.SequenceModel(
                        "lstm", train[0].shape[-1], args.hidden, 10, forget_bias=args.forget_bias, rngs=nnx.Rngs(seed)
                    )
                    base = _common.make_optimizer(args.optimizer, args.lr, args.momentum)
                    optimizer = _common.make_nnx_optimizer(model, method, base, args)
                    run_id = f"digits-{variant}-{method}-s{seed}"
                    tracker, curve = _common.fit_epochs(
                        model,
                        optimizer,
                        train,
                        _common.cross_entropy_loss,
                        args,
                        seed=seed,
                        log=steps_log,
                        run_id=run_id,
                    )
                    accuracy = math.nan
                    if tracker.diverged_step is None:
                        accuracy = float(np.mean(np.argmax(_common.predict(model, test[0]), -1) == test[1]))
                    trackers.append(tracker)
                    accuracies.append(accuracy)
                    runs_log.write(
                        {"run": run_id, "variant": variant, "method": method, "seed": seed, "test_accuracy": accuracy}
                        | dataclasses.asdict(tracker)
                    )
                    if seed == 0:
                        panels.setdefault(f"{variant} (T={train[0].shape[1]})", {})[method] = curve
                rows.append([method, _common.fmt_spread(accuracies), *_common.tracker_cells(trackers)])
            tables[variant] = rows
            report.add(f"{variant}: T={train[0].shape[1]}", _common.markdown_table(headers, rows))
    _common.plot_curves(
        args.out / "digits.png",
        panels,
        f"sequential digits, LSTM {args.hidden} units, {args.optimizer} lr {args.lr}, seed 0 of {args.seeds}",
    )
    report.finish(
        [
            f"LSTM {args.hidden} units, forget bias {args.forget_bias}, {args.optimizer} lr {args.lr}"
            + (f" momentum {args.momentum}" if args.optimizer == "sgd" else "")
            + f", batch {args.batch}, {args.epochs} epochs, {args.seeds} seeds",
            f"thresholds: value {args.clip_value}, leaf norm {args.leaf_norm}, global norm {args.global_norm}, "
            f"AGC {args.agc}",
        ]
    )
    return {"headers": headers, "tables": tables, "out": args.out}


if __name__ == "__main__":
    main()
