"""What the example scripts share: the clipping methods, the train step, logging, timing, the figure and the table.

Each script (``bptt_lstm.py``, ``exploding_mlp.py``, ``sequential_digits.py``, ``transformer_spikes.py``) defines its
data, its model and its loop; everything that would otherwise be copied between them lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optclip

# Each method maps the parsed CLI to a clip chained before the optimizer (None: no clipping), or to a guard wrapped
# around it. An adaptive rule from optclip is one more line here.
CLIPS: dict[str, Callable[[argparse.Namespace], optax.GradientTransformation | None]] = {
    "none": lambda args: None,
    "value": lambda args: optclip.clip_by_value(args.clip_value),
    "leaf": lambda args: optclip.clip_by_leaf_norm(args.leaf_norm),
    "global": lambda args: optclip.clip_by_global_norm(args.global_norm),
    "agc": lambda args: optclip.adaptive_grad_clip(args.agc),
    "autoclip": lambda args: optclip.autoclip(),
    "zclip": lambda args: optclip.zclip(),
    "adagc": lambda args: optclip.adagc(),
}
GUARDS: dict[str, Callable[[optax.GradientTransformation], optax.GradientTransformation]] = {
    "guards": lambda tx: optclip.skip_on_spike(optclip.skip_nonfinite(tx)),
}

# What the recurrent and MLP scripts compare unless --methods says otherwise: their published tables use these.
CLASSIC_METHODS = ("none", "value", "leaf", "global", "agc", "autoclip", "zclip")

# What each method means, for --help and the tables.
DESCRIPTIONS = {
    "none": "no clipping",
    "value": "clip_by_value(--clip-value)",
    "leaf": "clip_by_leaf_norm(--leaf-norm)",
    "global": "clip_by_global_norm(--global-norm)",
    "agc": "adaptive_grad_clip(--agc)",
    "autoclip": "autoclip() (AutoClip, 10th percentile)",
    "zclip": "zclip() (ZClip, z-score 2.5)",
    "adagc": "adagc() (AdaGC, each tensor to 1.05 x an EMA of its norm)",
    "guards": "skip_on_spike(skip_nonfinite(optimizer)) (no clip; a step whose gradient norm is not finite or "
    "above mean + 6 std of the last 128 is skipped)",
}


def available_methods() -> list[str]:
    """Every method, in table order."""
    return [*CLIPS, *GUARDS]


def make_clip(method: str, args: argparse.Namespace) -> optax.GradientTransformation | None:
    """The clip a method name stands for, with its threshold from the CLI; None for ``"none"``."""
    if method not in CLIPS:
        raise ValueError(f"unknown clip {method!r}; choose from {list(CLIPS)}")
    return CLIPS[method](args)


def layer_of_path(path: str) -> str:
    """The layer of a parameter path, for ``--monitor``: its first component, and the second too when that is an
    index into a list of layers (``blocks/0/attn/kernel`` -> ``blocks/0``, ``head/kernel`` -> ``head``)."""
    parts = path.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def make_transform(
    method: str, optimizer: optax.GradientTransformation, args: argparse.Namespace
) -> optax.GradientTransformation:
    """``optax.chain(<clip>, optimizer)`` for a clip, ``<guard>(optimizer)`` for a guard, ``optimizer`` for none.

    With ``--monitor``, ``optclip.monitor(group=layer_of_path)`` comes first in the chain (inside a guard): it logs
    each layer's gradient norm as ``monitor/norm/<layer>`` and shares its measurement with the clip or the guard."""
    monitored = getattr(args, "monitor", False)
    first = [optclip.monitor(group=layer_of_path)] if monitored else []
    if method in GUARDS:
        return GUARDS[method](optax.chain(*first, optimizer) if first else optimizer)
    clip = make_clip(method, args)
    chained = [*first, *([] if clip is None else [clip]), optimizer]
    return chained[0] if len(chained) == 1 else optax.chain(*chained)


def make_optimizer(name: str, learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """SGD (with heavy-ball momentum unless it is 0) or Adam with default betas."""
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def make_nnx_optimizer(
    model: nnx.Module, method: str, optimizer: optax.GradientTransformation, args: argparse.Namespace
) -> nnx.Optimizer:
    """``nnx.Optimizer`` over the model's parameters with the method's transform (``make_transform``)."""
    return nnx.Optimizer(model, make_transform(method, optimizer, args), wrt=nnx.Param)


GradMetrics = Callable[[Any], dict[str, jax.Array]]
StepFn = Callable[[np.ndarray, np.ndarray], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@functools.partial(nnx.jit, static_argnames=("loss_fn", "grad_metrics"))
def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    x: jax.Array,
    y: jax.Array,
    loss_fn: Callable[..., jax.Array],
    grad_metrics: GradMetrics | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """One update; returns the loss, the global 2-norm of the raw gradient and the statistics of every optclip
    transform in the optimizer, plus ``grad_metrics(grads)`` when given (measured on the raw gradient)."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    extra = grad_metrics(grads) if grad_metrics is not None else {}
    return loss, optclip.global_norm(grads), {**optclip.stats(optimizer), **extra}


def bind_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[..., jax.Array],
    grad_metrics: GradMetrics | None = None,
) -> StepFn:
    """``train_step`` for this model and optimizer, called as ``step(x, y)``.

    ``nnx.cached_partial`` walks the two object graphs once instead of on every call: on these small models that
    halves the time of a step (the result is the same, to the bit)."""
    cached = nnx.cached_partial(train_step, model, optimizer)
    return functools.partial(cached, loss_fn=loss_fn, grad_metrics=grad_metrics)


def step_record(loss: Any, grad_norm: Any, stats: dict[str, Any]) -> dict[str, float | None]:
    """The per-step JSONL fields. ``norm``, ``norm_after``, ``threshold`` and ``clipped`` are the clip's, from
    ``optclip.stats`` (``norm`` is the clip's own pre-clip measure: the largest leaf norm for ``leaf``, the largest
    gradient-to-weight ratio for ``agc``); ``grad_norm`` is the global norm of the raw gradient for every method.
    Without a clip, nothing is clipped and the norms are the raw gradient's. The clip is the transform that reports
    ``clipped``; every other statistic (a guard's, a monitor's) keeps its full ``<name>/<metric>`` key."""
    record: dict[str, float | None] = {"loss": float(loss), "grad_norm": float(grad_norm)}
    clip = next((key.split("/", 1)[0] for key in stats if key.endswith("/clipped") and key.count("/") == 1), None)
    if clip is None:
        record.update(norm=record["grad_norm"], norm_after=record["grad_norm"], threshold=None, clipped=0.0)
    for key, value in stats.items():
        name, metric = key.split("/", 1)
        record[metric if name == clip else key] = float(value)
    return record


@dataclasses.dataclass
class Curve:
    """One run's per-step history, kept for the figure."""

    loss: list[float] = dataclasses.field(default_factory=list)
    grad_norm: list[float] = dataclasses.field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.loss.append(record["loss"])
        self.grad_norm.append(record["grad_norm"])


@dataclasses.dataclass
class Tracker:
    """What the tables report of one run: steps, non-finite steps, the largest gradient norm, divergence."""

    total_steps: int  # the most steps the run may take
    steps: int = 0
    nonfinite_steps: int = 0  # steps with a non-finite loss or gradient (a diverged run: every step it had left)
    max_grad_norm: float = 0.0  # the largest finite gradient norm seen
    clipped_steps: int = 0  # steps where the clip acted (for a leaf or unit clip: on at least one leaf or unit)
    skipped_steps: int = 0  # steps a guard skipped (no parameter or optimizer-state change)
    diverged_step: int | None = None  # the step after which the parameters were non-finite

    def observe(self, record: dict[str, Any], model: nnx.Module) -> bool:
        """Count one step; True when the parameters are no longer finite, so that the run should stop."""
        self.steps += 1
        if math.isfinite(record["grad_norm"]):
            self.max_grad_norm = max(self.max_grad_norm, record["grad_norm"])
        self.clipped_steps += bool(record["clipped"])
        self.skipped_steps += any(value for key, value in record.items() if key.endswith("/skipped"))
        if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
            return False
        self.nonfinite_steps += 1
        if finite_params(model):
            return False
        # Every later step would be non-finite too: count them, and stop.
        self.diverged_step = self.steps
        self.nonfinite_steps += self.total_steps - self.steps
        return True


def finite_params(model: nnx.Module) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def run_step(
    step: Callable[..., Any],
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    tracker: Tracker,
    log: JsonlWriter,
    run_id: str,
) -> tuple[dict[str, Any], bool]:
    """One training step (``step`` from ``bind_step``), logged to JSONL and counted by ``tracker``; returns the
    record and whether to stop."""
    loss, grad_norm, clip_stats = jax.device_get(step(x, y))
    record = step_record(loss, grad_norm, clip_stats)
    log.write({"run": run_id, "step": tracker.steps + 1, **record})
    return record, tracker.observe(record, model)


def fit_epochs(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    train: tuple[np.ndarray, np.ndarray],
    loss_fn: Callable[..., jax.Array],
    args: argparse.Namespace,
    *,
    seed: int,
    log: JsonlWriter,
    run_id: str,
) -> tuple[Tracker, Curve]:
    """``args.epochs`` epochs of shuffled batches of ``args.batch`` (the last may be smaller); returns the tracker
    and the per-step curve."""
    x, y = train
    rng = np.random.default_rng(seed)
    step = bind_step(model, optimizer, loss_fn)
    per_epoch = math.ceil(len(x) / args.batch)
    tracker, curve = Tracker(args.epochs * per_epoch), Curve()
    with progress(args.epochs * per_epoch, run_id, args.progress) as bar:
        for _ in range(args.epochs):
            for index in batches(rng.permutation(len(x)), args.batch):
                record, stop = run_step(step, model, x[index], y[index], tracker, log, run_id)
                curve.add(record)
                bar.update(1)
                if stop:
                    return tracker, curve
            bar.set_postfix_str(f"loss {curve.loss[-1]:.3g}")
    return tracker, curve


def interleaved_times(
    steps: dict[str, Callable[[], Any]], rounds: int, calls: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each of ``steps`` (each waited for with ``jax.block_until_ready``), one value per round.

    Each round calls every step ``calls`` times, the steps in a fresh shuffled order, so that a change of load on a
    shared machine hits every step alike; compare steps round by round. One untimed round first (compilation)."""
    rng = np.random.default_rng(seed)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        for index in rng.permutation(len(names)):
            name = names[index]
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(steps[name]())
            if round_:
                times[name].append((time.perf_counter() - start) / calls)
    return times


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class JsonlWriter:
    """Appends one JSON object per line; non-finite floats become ``null`` so every line is strict JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("w")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()  # a long run can be followed with tail -f

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorBoard:
    """Every numeric field of each step record as a TensorBoard scalar (tag: the field's name, such as
    ``monitor/norm/blocks/0``), one event-file folder per run (``DIR/<run id>``), written by tensorboardX's
    ``SummaryWriter`` (the ``examples`` extra; no TensorFlow needed). ``tensorboard --logdir DIR`` shows them."""

    def __init__(self, root: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise SystemExit("--tensorboard needs tensorboardX: pip install 'optclip[examples]'") from err
        self.root = root
        self._writer_class = SummaryWriter
        self._writers: dict[str, Any] = {}

    def write(self, record: dict[str, Any]) -> None:
        run, step = str(record["run"]), int(record["step"])
        if run not in self._writers:
            self._writers[run] = self._writer_class(logdir=str(self.root / run), flush_secs=30)
        writer = self._writers[run]
        for key, value in record.items():
            if key not in ("run", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, step)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


class StepLog(JsonlWriter):
    """``steps.jsonl``, and the same records as TensorBoard scalars when ``tensorboard`` (``--tensorboard DIR``) is
    given."""

    def __init__(self, path: Path, tensorboard: Path | None = None) -> None:
        super().__init__(path)
        self.tensorboard = TensorBoard(tensorboard) if tensorboard is not None else None

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        super().close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=0.5)


def add_common_args(parser: argparse.ArgumentParser, *, script: str, methods: Sequence[str] | None = None) -> None:
    """--out, --seeds, --methods, the clip thresholds, --quick and --progress."""
    parser.add_argument(
        "--out", type=Path, default=Path("examples/out") / script, help="folder for steps.jsonl, summary.md and the PNG"
    )
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...): initialisation and data")
    choices = available_methods()
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=choices,
        default=[m for m in (methods or CLASSIC_METHODS) if m in choices],
        metavar="METHOD",
        help="clipping methods to compare, from: " + "; ".join(f"{m} = {DESCRIPTIONS[m]}" for m in choices),
    )
    parser.add_argument("--clip-value", type=float, default=1.0, help="bound c of clip_by_value (entries in [-c, c])")
    parser.add_argument("--leaf-norm", type=float, default=1.0, help="threshold of clip_by_leaf_norm (each array)")
    parser.add_argument("--global-norm", type=float, default=1.0, help="threshold of clip_by_global_norm")
    parser.add_argument("--agc", type=float, default=0.1, help="ratio lambda of adaptive_grad_clip (unit-wise AGC)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small setting that finishes in minutes on 2 CPU cores (options given explicitly win)",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a tqdm progress bar over steps"
    )
    parser.add_argument(
        "--monitor",
        action="store_true",
        help="chain optclip.monitor() first: each layer's gradient norm (monitor/norm/<layer>) in steps.jsonl",
    )
    parser.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write every step's statistics as TensorBoard scalars, one folder per run under DIR (tensorboardX)",
    )


def add_recurrent_args(parser: argparse.ArgumentParser, *, forget_bias: float, lr: float, several_lr: bool) -> None:
    """--hidden, --forget-bias, --optimizer, --lr (one, or a list to sweep), --momentum."""
    parser.add_argument("--hidden", type=int, default=32, help="hidden units of the recurrent layer")
    parser.add_argument(
        "--forget-bias",
        type=float,
        default=forget_bias,
        help="initial LSTM forget-gate bias (1: sigmoid 0.73; 3: sigmoid 0.95, a longer memory at the start)",
    )
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="the optimizer after the clip")
    if several_lr:
        parser.add_argument("--lr", type=float, nargs="+", default=[lr], help="learning rates (several: a sweep)")
    else:
        parser.add_argument("--lr", type=float, default=lr, help="learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0: plain SGD)")


def parse_with_quick(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict[str, Any]
) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick``, ``quick`` replaces the defaults (options given explicitly still win)."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _vector_isa() -> str:
    """The widest vector instructions XLA:CPU may use here, which decide the rounding of its reductions and
    elementwise code (so the trajectory of a chaotic run): AVX-512, AVX2 with FMA, or neither; and ``XLA_FLAGS``."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = set(next(line for line in info if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    isa = "AVX-512" if "avx512f" in flags else "AVX2+FMA" if {"avx2", "fma"} <= flags else "no AVX2/FMA or unknown"
    return isa + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else "")


def code_version() -> str:
    """The commit the run used, and whether optclip/ or examples/ differed from it (a table is only reproducible
    from a commit)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "optclip", "examples")
    except (OSError, subprocess.CalledProcessError):
        return f"optclip {optclip.__version__} (not a git checkout)"
    return f"commit {commit}" + (" with uncommitted changes in optclip/ or examples/" if dirty else "")


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def machine() -> str:
    """The processor, its vector instructions, the cores and the software, for the record."""
    return (
        f"{_cpu_name()} ({_vector_isa()}), {os.cpu_count()} cores visible; "
        f"Python {platform.python_version()}, jax {jax.__version__} on {jax.default_backend()}"
    )


class Report:
    """Times a run and writes ``summary.md``: the command, the date, the machine, the tables."""

    def __init__(self, out: Path, title: str, script: str, argv: Sequence[str] | None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.title = title
        script_path = Path(script).resolve()
        shown = script_path.relative_to(Path.cwd()) if script_path.is_relative_to(Path.cwd()) else script_path
        self.command = "python " + shlex.join([str(shown), *(sys.argv[1:] if argv is None else argv)])
        self.load_at_start = _load()
        self.code = code_version()  # at the start: the code the run imported
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        self.sections: list[tuple[str, str]] = []

    def add(self, heading: str, table: str) -> None:
        self.sections.append((heading, table))
        print(f"\n{heading}\n\n{table}\n", flush=True)

    def write(self, notes: Sequence[str] = ()) -> Path:
        wall = time.perf_counter() - self._start
        parts = [
            f"# {self.title}",
            "",
            f"- command: `{self.command}`",
            f"- date: {self.started:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min, "
            f"CPU time {(time.process_time() - self._cpu_start) / 60:.1f} min (this process, all threads)",
            f"- machine: {machine()}",
            f"- code: {self.code}",
            f"- load average (1, 5, 15 min; the cores are shared): {self.load_at_start} at the start, "
            f"{_load()} at the end",
            *(f"- {note}" for note in notes),
        ]
        for heading, table in self.sections:
            parts += ["", f"## {heading}", "", table]
        path = self.out / "summary.md"
        path.write_text("\n".join(parts) + "\n")
        return path

    def finish(self, notes: Sequence[str] = ()) -> Path:
        """Write ``summary.md`` for the last time and say so."""
        path = self.write(notes)
        print(f"wall time {(time.perf_counter() - self._start) / 60:.1f} min; wrote {path}", flush=True)
        return path


def plot_curves(
    path: Path,
    panels: dict[str, dict[str, Curve | list[Curve]]],
    title: str,
    x_label: str = "step",
    steps_per_x: float = 1.0,
) -> None:
    """One row per panel, gradient norm (left) and loss (right), log scale; one colour per method (one line per run).

    A run that turned non-finite ends with an ``x`` at its last finite point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(panels), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (panel, by_method) in enumerate(panels.items()):
        for col, (field, label) in enumerate((("grad_norm", "gradient norm (before clipping)"), ("loss", "loss"))):
            ax = axes[row][col]
            clipped_methods = [method for method in by_method if method != "none"]
            for method, curves in by_method.items():
                # The unclipped run is black and on top: an identical clipped run (one whose clip never acted)
                # would otherwise hide it.
                unclipped = method == "none"
                color = "black" if unclipped else colors[clipped_methods.index(method) % len(colors)]
                for run, curve in enumerate(curves if isinstance(curves, list) else [curves]):
                    values = np.asarray(getattr(curve, field), dtype=float)
                    steps = np.arange(1, len(values) + 1) / steps_per_x
                    values = np.where(values > 0, values, np.nan)  # log scale: zero and NaN are gaps
                    style = {"lw": 1.0, "zorder": 3, "alpha": 0.9} if unclipped else {"lw": 0.8, "alpha": 0.75}
                    ax.plot(steps, values, color=color, label=None if run else method, **style)
                    finite = np.flatnonzero(np.isfinite(values))
                    if len(values) and not np.isfinite(values[-1]) and len(finite):
                        ax.plot(steps[finite[-1]], values[finite[-1]], "x", color=color, ms=9, mew=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_title(f"{panel}: {label}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
        axes[row][0].legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(value: float | None, digits: int = 3) -> str:
    """A table cell: ``-`` for missing, ``nan``/``inf`` spelled out, else ``digits`` significant digits."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    return f"{value:.{digits}g}"


def fmt_spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of the finite values, and how many were not finite (diverged runs)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    text = fmt(float(np.median(finite)))
    if len(finite) > 1:
        text += f" ({fmt(min(finite))}-{fmt(max(finite))})"
    if len(finite) < len(values):
        text += f", {len(values) - len(finite)} nan"
    return text


TRACKER_HEADERS = ["diverged", "non-finite steps", "largest grad norm", "steps clipped"]


def tracker_cells(trackers: Sequence[Tracker]) -> list[str]:
    """The table cells under ``TRACKER_HEADERS`` for the runs of one method."""
    steps = max(sum(t.steps for t in trackers), 1)
    return [
        f"{sum(t.diverged_step is not None for t in trackers)}/{len(trackers)}",
        str(sum(t.nonfinite_steps for t in trackers)),
        fmt(max(t.max_grad_norm for t in trackers)),
        f"{sum(t.clipped_steps for t in trackers) / steps:.0%}",
    ]


def median_or_none(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start : start + size]


def predict(model: nnx.Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """The model's outputs on ``x``, evaluated in batches (one compiled shape per batch size)."""
    return np.concatenate([np.asarray(_forward(model, jnp.asarray(chunk))) for chunk in batches(x, batch_size)])


@nnx.jit
def _forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


def cross_entropy_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def forget_gate_bias(hidden: int, value: float) -> Callable[..., jax.Array]:
    """Bias init for ``nnx.OptimizedLSTMCell``, whose gates are packed (input, forget, cell, output): ``value`` on
    the forget gate, 0 elsewhere. A positive forget bias lets the cell remember from the first step (Gers et al.
    2000; Jozefowicz et al. 2015), which shortens the plateau these tasks start on."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jnp.zeros(shape, dtype).at[hidden : 2 * hidden].set(value)

    return init


class SequenceModel(nnx.Module):
    """A recurrent layer read at the last step by a linear head."""

    def __init__(
        self, cell: str, inputs: int, hidden: int, outputs: int, *, forget_bias: float = 1.0, rngs: nnx.Rngs
    ) -> None:
        if cell == "lstm":
            bias_init = forget_gate_bias(hidden, forget_bias)
            recurrent = nnx.OptimizedLSTMCell(inputs, hidden, bias_init=bias_init, rngs=rngs)
        else:
            recurrent = nnx.SimpleCell(inputs, hidden, rngs=rngs)
        self.rnn = nnx.RNN(recurrent)
        self.head = nnx.Linear(hidden, outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.rnn(x)[:, -1])
