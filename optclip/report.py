"""A run's gradient norms, read back: clip rate, percentiles, spikes, a suggested fixed threshold, and a figure.

    python -m optclip.report examples/out/transformer_spikes/steps.jsonl --run none-s0 --clip-rate 0.1

``RUN`` is the ``steps.jsonl`` the example scripts write (one JSON object per step: ``run``, ``step``,
``grad_norm``, the clip's ``norm``, ``threshold``, ``clipped``, and every other statistic by name, such as a
monitor's ``monitor/norm/<layer>``), or a saved history of norms: a ``.npy`` array, a JSON array, or a text file
with one number per line. For each run it prints:

* the clip rate: the fraction of steps the run's own clip acted on (its ``clipped`` field; absent: not reported);
* percentiles of the norm over the whole run and over its last part (``--last``, a fraction of the steps);
* the steps where the norm spiked: a step whose norm is above ``--spike-factor`` times the median of the
  ``--spike-window`` norms before it (the examples' definition of a gradient-norm spike); consecutive such steps
  are one spike, reported at its first step;
* a suggested fixed threshold, ``optclip.suggest_threshold(norms, clip_rate)``: the ``1 - clip_rate`` quantile of the
  run's finite norms (the AutoClip percentile rule, Seetharaman et al. 2020), also from the last part alone;

and writes a PNG (``--png``; default beside ``RUN``) of each run's norm history with its suggested threshold drawn
in, and, where the log holds a monitor's per-layer norms for one run, those too. matplotlib (the ``examples``
extra) is imported only for the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optclip._monitor import suggest_threshold

PERCENTILES = (50, 90, 99, 100)
FIELDS = ("grad_norm", "monitor/norm", "norm")  # the field read by default: the first a log has


@dataclasses.dataclass
class History:
    """One run's norms by step, what its clip did (``clipped``: 0/1 or a fraction per step, if logged) and any
    per-layer norms logged beside them (``layers``: ``{layer: norms}``)."""

    steps: np.ndarray
    norms: np.ndarray
    clipped: np.ndarray | None = None
    layers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def spike_steps(norms: Sequence[float] | np.ndarray, factor: float = 5.0, window: int = 50) -> list[int]:
    r"""The positions where a spike starts: step :math:`t` is above when

    .. math:: x_t > f \cdot \operatorname{median}(x_{t-w}, \dots, x_{t-1})

    (NaN in the window is left out, a non-finite :math:`x_t` is not a spike: it is divergence), and a maximal run of
    consecutive steps above counts once, at its first step. The first :math:`w` steps have no full window and are
    never spikes. The definition of the examples' gradient-norm spikes (after the loss-spike counts of OLMo,
    Groeneveld et al. 2024, arXiv:2402.00838, which compare against a running statistic of recent steps).

    Args:
      norms: the norms in step order.
      factor: :math:`f > 0`.
      window: :math:`w \ge 1`.

    Returns:
      The 0-based positions of the first step of every spike.

    Example:
      >>> from optclip.report import spike_steps
      >>> spike_steps([1.0] * 10 + [9.0, 8.0] + [1.0] * 5 + [7.0], factor=5.0, window=5)
      [10, 17]
    """
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    values = np.asarray(norms, dtype=np.float64)
    starts, inside = [], False
    for t in range(window, len(values)):
        before = values[t - window : t]
        before = before[np.isfinite(before)]
        above = bool(before.size and np.isfinite(values[t]) and values[t] > factor * np.median(before))
        if above and not inside:
            starts.append(t)
        inside = above
    return starts


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _read_jsonl(path: Path, field: str | None) -> tuple[dict[str, History], str]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no record")
    if field is None:
        field = next((f for f in FIELDS if f in records[0]), None)
        if field is None:
            raise ValueError(f"{path}: no norm field among {FIELDS}; pass --field (fields: {sorted(records[0])})")
    runs: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if field not in record:
            raise ValueError(f"{path}: a record has no field {field!r} (fields: {sorted(record)})")
        runs.setdefault(str(record.get("run", "run")), []).append(record)
    histories = {}
    layer_prefix = "monitor/norm/"
    for run, rows in runs.items():
        layers = sorted({k for row in rows for k in row if k.startswith(layer_prefix)})
        histories[run] = History(
            steps=np.asarray([row.get("step", i + 1) for i, row in enumerate(rows)]),
            norms=np.asarray([_number(row[field]) for row in rows]),
            clipped=np.asarray([_number(row["clipped"]) for row in rows]) if "clipped" in rows[0] else None,
            layers={k[len(layer_prefix) :]: np.asarray([_number(row.get(k)) for row in rows]) for k in layers},
        )
    return histories, field


def load(path: Path, field: str | None = None) -> tuple[dict[str, History], str]:
    """The histories in ``path`` by run, and the field they were read from (see the module docstring)."""
    if path.suffix == ".npy":
        norms = np.load(path).astype(np.float64).ravel()
    elif path.suffix in (".jsonl", ".ndjson") or (path.suffix != ".json" and path.read_text().lstrip()[:1] == "{"):
        return _read_jsonl(path, field)
    elif path.suffix == ".json":
        norms = np.asarray([_number(v) for v in json.loads(path.read_text())], np.float64)
    else:
        norms = np.asarray([float(v) for v in path.read_text().split()], np.float64)
    return {path.stem: History(np.arange(1, norms.size + 1), norms)}, "norm"


@dataclasses.dataclass
class RunReport:
    """What ``report`` finds in one run (see the module docstring)."""

    run: str
    steps: int
    finite: int
    clip_rate: float | None
    percentiles: dict[str, list[float]]
    spikes: list[int]
    threshold: float | None
    threshold_last: float | None


def _percentiles(values: np.ndarray) -> list[float]:
    finite = values[np.isfinite(values)]
    return [float(np.percentile(finite, p)) if finite.size else math.nan for p in PERCENTILES]


def analyse(run: str, history: History, args: argparse.Namespace) -> RunReport:
    norms = history.norms
    tail = max(1, math.ceil(len(norms) * args.last))
    finite = int(np.isfinite(norms).sum())
    clip_rate = None
    if history.clipped is not None:
        known = history.clipped[np.isfinite(history.clipped)]
        clip_rate = float(np.mean(known > 0)) if known.size else None

    def suggested(values: np.ndarray) -> float | None:
        return suggest_threshold(values, args.clip_rate) if np.isfinite(values).any() else None

    return RunReport(
        run=run,
        steps=len(norms),
        finite=finite,
        clip_rate=clip_rate,
        percentiles={"whole run": _percentiles(norms), f"last {args.last:.0%}": _percentiles(norms[-tail:])},
        spikes=[int(history.steps[i]) for i in spike_steps(norms, args.spike_factor, args.spike_window)],
        threshold=suggested(norms),
        threshold_last=suggested(norms[-tail:]),
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def render(report: RunReport, field: str, args: argparse.Namespace) -> str:
    lines = [f"run {report.run}: {report.steps} steps, {report.finite} with a finite {field}"]
    if report.clip_rate is not None:
        lines.append(f"  clip rate of the run's own clip: {report.clip_rate:.1%} of steps")
    header = "  percentiles of " + field
    lines.append(f"{header:34s}" + "".join(f"{'max' if p == 100 else f'p{p}':>11s}" for p in PERCENTILES))
    for part, values in report.percentiles.items():
        lines.append(f"    {part:30s}" + "".join(f"{_fmt(v):>11s}" for v in values))
    rule = f"{args.spike_factor:g} x the median of the {args.spike_window} steps before"
    where = ", ".join(map(str, report.spikes[:20])) + (" ..." if len(report.spikes) > 20 else "")
    lines.append(f"  spikes ({field} above {rule}): {len(report.spikes)}" + (f", at steps {where}" if where else ""))
    lines.append(
        f"  suggested fixed threshold: {_fmt(report.threshold)} "
        f"(clip rate {args.clip_rate:.0%}: the {1 - args.clip_rate:.0%} quantile of the run's finite norms, "
        f"the AutoClip percentile rule; optclip.suggest_threshold); from the last {args.last:.0%} alone: "
        f"{_fmt(report.threshold_last)}"
    )
    return "\n".join(lines)


def plot(path: Path, histories: dict[str, History], reports: list[RunReport], field: str) -> None:
    """Each run's norm history (log scale) with its suggested threshold dashed and its spikes marked; below it, a
    monitor's per-layer norms when the log holds them for a single run."""
    # matplotlib is optional (the examples extra), so it is looked up by name when a figure is asked for: an import
    # statement in optclip/ declares a runtime dependency (tests/test_packaging.py reads them).
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as err:
        raise SystemExit(
            "optclip.report: the figure needs matplotlib (pip install 'optclip[examples]'), or pass --no-png"
        ) from err
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    layered = len(histories) == 1 and next(iter(histories.values())).layers
    fig, axes = plt.subplots(2 if layered else 1, 1, figsize=(9, 6.4 if layered else 3.6), squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, report in enumerate(reports):
        history, color = histories[report.run], colors[i % len(colors)]
        values = np.where(history.norms > 0, history.norms, np.nan)
        ax.plot(history.steps, values, lw=0.8, color=color, label=report.run)
        if report.threshold is not None:
            ax.axhline(report.threshold, ls="--", lw=1.0, color=color, label=f"suggested {report.threshold:.3g}")
        marks = np.isin(history.steps, report.spikes)
        ax.plot(history.steps[marks], values[marks], "v", ms=5, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{field} and the suggested fixed threshold (v: spikes)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="major", alpha=0.3)
    if layered:
        history = next(iter(histories.values()))
        ax = axes[1][0]
        shades = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(history.layers)))
        for (layer, norms), shade in zip(history.layers.items(), shades):
            ax.plot(history.steps, np.where(norms > 0, norms, np.nan), lw=0.7, color=shade, label=layer)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("per-layer norms (optclip.monitor)", fontsize=10)
        ax.legend(fontsize=7, ncol=4)
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m optclip.report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", type=Path, help="steps.jsonl of an example run, or a .npy / .json / text of norms")
    parser.add_argument("--field", default=None, help=f"the norm to read from a JSONL (default: first of {FIELDS})")
    parser.add_argument("--run", dest="select", default=None, help="regex: only the runs whose id matches")
    parser.add_argument("--clip-rate", type=float, default=0.1, help="target fraction of steps to clip (0-1)")
    parser.add_argument("--last", type=float, default=0.25, help="the last part of a run, as a fraction of its steps")
    parser.add_argument("--spike-factor", type=float, default=5.0, help="a spike: norm above this x running median")
    parser.add_argument("--spike-window", type=int, default=50, help="steps in the running median of a spike")
    parser.add_argument("--png", type=Path, default=None, help="the figure (default: <RUN stem>_report.png beside it)")
    parser.add_argument("--no-png", action="store_true", help="write no figure")
    return parser


def main(argv: Sequence[str] | None = None) -> list[RunReport]:
    """Print the report of ``argv`` (the command line), write its figure, and return the per-run findings."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.clip_rate <= 1.0:
        parser.error(f"--clip-rate must be in [0, 1], got {args.clip_rate}")
    if not 0.0 < args.last <= 1.0:
        parser.error(f"--last must be in (0, 1], got {args.last}")
    try:
        histories, field = load(args.run, args.field)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if args.select is not None:
        histories = {run: h for run, h in histories.items() if re.search(args.select, run)}
        if not histories:
            parser.error(f"no run matches --run {args.select!r}")
    reports = [analyse(run, history, args) for run, history in histories.items()]
    print("\n\n".join(render(report, field, args) for report in reports))
    if not args.no_png:
        png = args.png or args.run.with_name(f"{args.run.stem}_report.png")
        plot(png, histories, reports, field)
        print(f"\nwrote {png}")
    return reports


if __name__ == "__main__":
    main(sys.argv[1:])
