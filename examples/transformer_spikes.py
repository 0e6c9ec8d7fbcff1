"""Loss spikes in a small transformer trained with AdamW at the edge of stability, with and without clipping.

A decoder-only transformer (``flax.nnx``; 4 pre-LayerNorm blocks of width 64, learned positions, about 210,000
parameters) learns a synthetic language with AdamW at a learning rate high enough that the unclipped runs degrade
(the default, 0.05, from the sweep below). Every method trains from the same initialisation on the same batches with
the same schedule; only the transform around AdamW differs: ``optax.chain(<clip>, adamw)`` for a clip,
``skip_on_spike(skip_nonfinite(adamw))`` for the guards.

The language (no download; the same tokens on every machine, drawn with integer arithmetic only from NumPy's
seeded PCG64): 63 symbols and a separator. Each sequence is 20 symbols from a second-order Markov chain (each pair
of symbols has 4 possible successors, drawn with weights 6:3:2:1, out of 8 that may follow its second symbol), the
separator, then a copy of a random 11-symbol span of those 20. Predicting it takes a previous-token head (for the
pairs) and an induction head (to find and follow the copied span). The lowest possible loss (the entropy of the
language, exact, computed from the generator) is printed with the results.

Measured per method over --seeds seeds: the final validation loss, and how far it ended above the run's best;
loss spikes (a step whose training loss exceeds --spike-factor times the median of the --spike-window losses
before it; consecutive such steps are one spike) and gradient-norm spikes (likewise, --norm-spike-factor times);
diverged runs (a non-finite loss, or a final validation loss above the uniform guess, ln 64); steps clipped or
skipped; and the time of a training step relative to no clipping, measured in one process with the methods
interleaved in shuffled rounds so that the machine's load hits them alike. With ``--sweep`` it runs the
learning-rate sweep instead (``--sweep-lr``, ``--sweep-methods``) from which the default --lr was chosen.

Per-layer gradient norms: every method's chain starts with ``optclip.monitor()`` (``--monitor`` is always on here;
inside the guards), which records each layer's gradient norm as ``monitor/norm/<layer>``, sharing the clip's
measurement; the figure draws those. The script's ``layer_grad_norms`` measures them too, outside the optimizer,
as ``layer_norm/<layer>``, alike for every method: on a step the guards skip, the monitor inside them keeps its
last values, and ``layer_norm`` has the skipped step's. ``--tensorboard DIR`` writes every step's statistics as
TensorBoard scalars.

Outputs in --out: steps.jsonl (every step of every run: loss, gradient norm, the clip's and guards' statistics,
the per-layer gradient norms), runs.jsonl (one line per run), summary.md (the tables) and transformer.png (loss and
per-layer gradient norms of seed 0, one row per method; sweep.png, loss and gradient norm per learning rate, in
sweep mode).

    python examples/transformer_spikes.py --quick
    python examples/transformer_spikes.py
    python examples/transformer_spikes.py --sweep
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
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

VOCAB = 64  # token 0 is the separator, 1..63 the symbols
MARKOV = 20  # symbols drawn from the Markov chain at the start of each sequence
COPY = 11  # symbols copied after the separator
LENGTH = MARKOV + 1 + COPY  # tokens per sequence; the model reads LENGTH - 1 and predicts the next of each
CANDIDATES = 8  # symbols that may follow a given symbol
SUCCESSOR_WEIGHTS = (6, 3, 2, 1)  # integer weights of a pair's 4 successors: sampling stays exact integer arithmetic
VALID_SIZE = 512
UNIFORM_LOSS = math.log(VOCAB)  # the loss of guessing uniformly: a run that ends above it has diverged


# ---------------------------------------------------------------------------------------------- the language


@dataclasses.dataclass(frozen=True)
class Language:
    """The synthetic language: ``successors[a, b]`` are the symbols that may follow the pair ``(a, b)``, most likely
    first; they are drawn from the ``CANDIDATES`` symbols that may follow ``b``, so the previous symbol alone already
    narrows the next one down to a few (a bigram model gets part of the way, the pair gets the rest)."""

    successors: np.ndarray  # int64 (VOCAB, VOCAB, len(SUCCESSOR_WEIGHTS)); rows of the separator are unused

    @classmethod
    def from_seed(cls, seed: int) -> Language:
        rng = np.random.default_rng(seed)
        symbols = np.broadcast_to(np.arange(1, VOCAB), (VOCAB, VOCAB - 1))
        candidates = rng.permuted(symbols, axis=-1)[:, :CANDIDATES]  # candidates[b]: what may follow b
        order = rng.permuted(np.broadcast_to(np.arange(CANDIDATES), (VOCAB, VOCAB, CANDIDATES)), axis=-1)
        picked = order[..., : len(SUCCESSOR_WEIGHTS)]  # picked[a, b]: which of b's candidates follow (a, b)
        return cls(np.take_along_axis(candidates[None, :, :], picked, axis=-1))

    def sample(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """``batch`` sequences of ``LENGTH`` tokens, int32."""
        tokens = np.empty((batch, LENGTH), np.int64)
        tokens[:, :2] = rng.integers(1, VOCAB, size=(batch, 2))
        cumulative = np.cumsum(SUCCESSOR_WEIGHTS)
        choice = np.searchsorted(cumulative, rng.integers(0, cumulative[-1], size=(batch, MARKOV - 2)), side="right")
        for t in range(2, MARKOV):
            tokens[:, t] = self.successors[tokens[:, t - 2], tokens[:, t - 1], choice[:, t - 2]]
        tokens[:, MARKOV] = 0
        start = rng.integers(0, MARKOV - COPY + 1, size=batch)
        tokens[:, MARKOV + 1 :] = np.take_along_axis(tokens, start[:, None] + np.arange(COPY), axis=1)
        return tokens.astype(np.int32)

    def optimal_loss(self, tokens: np.ndarray) -> float:
        """The mean next-token cross-entropy (nats) of the true generating process on ``tokens``: the lowest loss
        any model can reach on them in expectation."""
        weights = np.asarray(SUCCESSOR_WEIGHTS, np.float64) / sum(SUCCESSOR_WEIGHTS)
        nll = np.zeros((len(tokens), LENGTH - 1))
        nll[:, 0] = math.log(VOCAB - 1)  # the second symbol is uniform
        for t in range(2, MARKOV):
            rank = np.argmax(self.successors[tokens[:, t - 2], tokens[:, t - 1]] == tokens[:, t, None], axis=1)
            nll[:, t - 1] = -np.log(weights[rank])
        # nll[:, MARKOV - 1] = 0: the separator always comes at the same place.
        prefix, copied = tokens[:, :MARKOV], tokens[:, MARKOV + 1 :]
        starts = np.arange(MARKOV - COPY + 1)
        consistent = np.ones((len(tokens), len(starts)), bool)  # the copy starts that fit the symbols seen so far
        for k in range(COPY):
            candidates = prefix[:, starts + k]  # the symbol each start predicts next
            hits = consistent & (candidates == copied[:, k, None])
            nll[:, MARKOV + k] = -np.log(hits.sum(axis=1) / consistent.sum(axis=1))
            consistent = hits
        return float(nll.mean())


# ------------------------------------------------------------------------------------------------- the model


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs) -> None:
        self.attn_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), mask=mask)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
    """Decoder-only: token and learned position embeddings, ``depth`` blocks, a final LayerNorm, a linear head."""

    def __init__(self, dim: int, depth: int, heads: int, *, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(VOCAB, dim, embedding_init=init, rngs=rngs)
        self.position = nnx.Param(init(rngs.params(), (LENGTH - 1, dim)))
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def parameter_count(model: nnx.Module) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def layer_of(path: Sequence[Any]) -> str:
    """The layer a parameter belongs to, for the per-layer norms: ``embed`` (tokens and positions), ``block<i>``,
    ``head`` (final LayerNorm and output)."""
    keys = [str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path]
    if keys[0] == "blocks":
        return f"block{keys[1]}"
    return "embed" if keys[0] in ("embed", "position") else "head"


def layer_depth(name: str) -> tuple[int, int, str]:
    """Where a layer sits from input to output, for the figure's order: the embeddings, the blocks by index, then
    the final norm and the head; for the script's names (``block0``) and the monitor's (``blocks/0``) alike."""
    index = name.removeprefix("blocks/").removeprefix("block")
    if index.isdigit():
        return (1, int(index), "")
    if name in ("embed", "position"):
        return (0, 0, name)
    return (2, name == "head", name)


def layer_grad_norms(grads: Any) -> dict[str, jax.Array]:
    """The 2-norm of the raw gradient of each layer (``layer_of``), as ``layer_norm/<layer>``. Computed here, in
    the jitted step and outside the optimizer, so that every method's runs log it alike (``--monitor`` adds
    ``optclip.monitor``'s per-layer norms from inside the chain)."""
    squares: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        squares.setdefault(layer_of(path), []).append(jnp.sum(jnp.square(leaf.astype(jnp.float32))))
    return {f"layer_norm/{layer}": jnp.sqrt(sum(parts)) for layer, parts in squares.items()}


def make_adamw(args: argparse.Namespace, lr: float) -> optax.GradientTransformation:
    """AdamW with linear warm-up, then cosine decay to lr / 10 or a constant rate; no weight decay on biases and
    LayerNorms."""
    if args.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, args.warmup, args.steps, end_value=lr / 10)
    else:
        schedule = optax.linear_schedule(0.0, lr, args.warmup)
    return optax.adamw(
        schedule,
        b1=0.9,
        b2=args.b2,
        eps=1e-8,
        weight_decay=args.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )


@nnx.jit
def _token_losses(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens[:, :-1]), tokens[:, 1:]).mean(axis=1)


def validation_loss(model: nnx.Module, tokens: np.ndarray, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy on ``tokens``, in float64 over the batches."""
    losses = [np.asarray(_token_losses(model, jnp.asarray(chunk))) for chunk in _common.batches(tokens, batch_size)]
    return float(np.mean(np.concatenate(losses).astype(np.float64)))


# -------------------------------------------------------------------------------------------- one run, spikes


def count_spikes(losses: Sequence[float], factor: float, window: int) -> int:
    """Loss spikes: maximal runs of consecutive steps whose loss exceeds ``factor`` times the median of the
    ``window`` losses before the step. A non-finite loss is not a spike: it is counted as divergence."""
    values = np.asarray(losses, dtype=float)
    spikes, inside = 0, False
    for t in range(window, len(values)):
        above = bool(values[t] > factor * np.nanmedian(values[t - window : t]))
        spikes += above and not inside
        inside = above
    return spikes


@dataclasses.dataclass
class RunResult:
    """One run (a learning rate, a method and a seed), as runs.jsonl records it."""

    lr: float
    method: str
    seed: int
    tracker: _common.Tracker
    spikes: int = 0  # loss spikes (count_spikes with --spike-factor)
    norm_spikes: int = 0  # gradient-norm spikes (count_spikes of the raw global norm with --norm-spike-factor)
    valid_loss: float = math.nan  # at the end of the run; NaN if it diverged to non-finite parameters
    evals: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.tracker.diverged_step is not None or not self.valid_loss <= UNIFORM_LOSS

    @property
    def regression(self) -> float:
        """How far the final validation loss is above the best one of the run: what an instability cost."""
        return self.valid_loss - min(loss for _, loss in self.evals) if self.evals else math.nan


@dataclasses.dataclass
class LayerCurve(_common.Curve):
    """A run's per-step loss and gradient norm, each layer's gradient norm, and the threshold the global norm was
    held to (a global clip's, or the guards' skip threshold; NaN where there is none), for the figure."""

    layers: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    threshold: list[float] = dataclasses.field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        super().add(record)
        # optclip.monitor's per-layer norms (``monitor/norm/<layer>``) where the chain has it, else the script's own.
        prefix = "monitor/norm/" if any(key.startswith("monitor/norm/") for key in record) else "layer_norm/"
        for key, value in record.items():
            if key.startswith(prefix):
                self.layers.setdefault(key[len(prefix) :], []).append(value)
        # A clip whose own norm is the global one (global, zclip, autoclip; not adagc's per-tensor largest norm).
        global_clip = record["threshold"] is not None and math.isclose(
            record["norm"], record["grad_norm"], rel_tol=1e-4
        )
        armed = record.get("skip_on_spike/armed")  # before it, the guards skip only non-finite steps
        threshold = record["threshold"] if global_clip else record.get("skip_on_spike/threshold") if armed else None
        self.threshold.append(math.nan if threshold is None else threshold)


def make_step(
    args: argparse.Namespace, tx: optax.GradientTransformation, seed: int
) -> tuple[Transformer, _common.StepFn]:
    """A model initialised from ``seed`` and its bound training step with ``tx``.

    Runs that share one ``tx`` object share one compiled step: nnx's jit cache compares the optimizer's
    transformation, and two calls of ``optax.adamw`` make two different ones."""
    model = Transformer(args.dim, args.depth, args.heads, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return model, _common.bind_step(model, optimizer, _common.cross_entropy_loss, layer_grad_norms)


def train_one(
    args: argparse.Namespace,
    language: Language,
    tx: optax.GradientTransformation,
    run: tuple[float, str, int],
    valid: np.ndarray,
    log: _common.JsonlWriter,
    run_id: str,
) -> tuple[RunResult, LayerCurve]:
    """Train one (learning rate, method, seed) for --steps steps, or until its parameters turn non-finite."""
    lr, method, seed = run
    model, step = make_step(args, tx, seed)
    data_rng = np.random.default_rng([seed, 1])  # the same batches for every method and learning rate
    result, curve = RunResult(lr, method, seed, _common.Tracker(args.steps)), LayerCurve()
    with _common.progress(args.steps, run_id, args.progress) as bar:
        for t in range(1, args.steps + 1):
            tokens = language.sample(data_rng, args.batch)
            record, stop = _common.run_step(step, model, tokens[:, :-1], tokens[:, 1:], result.tracker, log, run_id)
            curve.add(record)
            bar.update(1)
            if stop:
                break
            if t % args.eval_every == 0 or t == args.steps:
                result.evals.append((t, validation_loss(model, valid)))
                bar.set_postfix_str(f"valid loss {result.evals[-1][1]:.3g}")
    if result.tracker.diverged_step is None:
        result.valid_loss = validation_loss(model, valid)
    result.spikes = count_spikes(curve.loss, args.spike_factor, args.spike_window)
    result.norm_spikes = count_spikes(curve.grad_norm, args.norm_spike_factor, args.spike_window)
    return result, curve


def step_time_ratios(
    args: argparse.Namespace, language: Language, transforms: dict[str, optax.GradientTransformation]
) -> dict[str, list[float]]:
    """Per round, each method's step time divided by no clipping's in the same round.

    Every method gets a fresh model and optimizer (seed 0) with the transformation its runs used (so the step is
    already compiled); each round runs --timing-steps steps of every method in a shuffled order on one batch, so a
    change of load on the shared machine hits all methods alike."""
    tokens = language.sample(np.random.default_rng([0, 2]), args.batch)
    x, y = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    steps = {}
    for method, tx in transforms.items():
        step = make_step(args, tx, 0)[1]
        steps[method] = lambda step=step: step(x, y)
    times = _common.interleaved_times(steps, rounds=args.timing_rounds, calls=args.timing_steps)
    return {method: [t / base for t, base in zip(times[method], times["none"])] for method in steps}


# ------------------------------------------------------------------------------------------------ the tables

HEADERS = [
    "method",
    "final valid loss: median (min-max)",
    "final - best valid loss: median (max)",
    "runs with a loss spike",
    "loss spikes",
    "grad-norm spikes",
    "diverged",
    "steps clipped",
    "steps skipped",
    "largest grad norm",
]


def summary_row(method: str, runs: Sequence[RunResult]) -> list[str]:
    steps = max(sum(r.tracker.steps for r in runs), 1)
    regressions = [r.regression for r in runs if math.isfinite(r.regression)]
    return [
        method,
        _common.fmt_spread([r.valid_loss for r in runs]),
        f"{_common.fmt(float(np.median(regressions)), 2)} ({_common.fmt(max(regressions), 2)})" if regressions else "-",
        f"{sum(r.spikes > 0 for r in runs)}/{len(runs)}",
        str(sum(r.spikes for r in runs)),
        str(sum(r.norm_spikes for r in runs)),
        f"{sum(r.diverged for r in runs)}/{len(runs)}",
        f"{sum(r.tracker.clipped_steps for r in runs) / steps:.0%}",
        f"{sum(r.tracker.skipped_steps for r in runs) / steps:.1%}",
        _common.fmt(max(r.tracker.max_grad_norm for r in runs)),
    ]


def ratio_cell(ratios: Sequence[float]) -> str:
    return f"{_common.fmt(float(np.median(ratios)))} ({_common.fmt(min(ratios))}-{_common.fmt(max(ratios))})"


def plot_layers(
    path: Path, curves: dict[str, LayerCurve], evals: dict[str, list[tuple[int, float]]], title: str
) -> None:
    """One row per method: training loss with the validation points (left), each layer's gradient norm before
    any clip (right), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 2.6 * len(curves)), squeeze=False, sharex=True)
    for row, (method, curve) in enumerate(curves.items()):
        loss_ax, norm_ax = axes[row]
        steps = np.arange(1, len(curve.loss) + 1)
        loss_ax.plot(steps, np.asarray(curve.loss, float), lw=0.7, color="black", label="train")
        if evals[method]:
            at, values = zip(*evals[method])
            loss_ax.plot(at, values, "o-", ms=3, lw=1, color="tab:red", label="valid")
        loss_ax.set_yscale("log")
        loss_ax.set_title(f"{method}: loss", fontsize=10)
        loss_ax.legend(fontsize=8)
        # Input side to output side, dark to light.
        layers = sorted(curve.layers, key=layer_depth)
        colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(layers)))
        for layer, color in zip(layers, colors):
            norm_ax.plot(steps, np.asarray(curve.layers[layer], float), lw=0.7, color=color, label=layer)
        norm_ax.plot(steps, np.asarray(curve.grad_norm, float), lw=0.5, color="grey", alpha=0.6, label="global")
        if not np.all(np.isnan(np.asarray(curve.threshold, float))):
            label = "skip threshold" if method.endswith("guards") else "clip threshold"
            norm_ax.plot(steps, np.asarray(curve.threshold, float), "--", lw=0.9, color="tab:red", label=label)
        norm_ax.set_yscale("log")
        norm_ax.set_title(f"{method}: gradient norm per layer, before any clip", fontsize=10)
        norm_ax.legend(fontsize=7, ncol=4)
        for ax in (loss_ax, norm_ax):
            ax.grid(True, which="major", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- the CLI

DEFAULT_METHODS = ("none", "global", "zclip", "adagc", "autoclip", "guards")
# What --quick changes: fewer seeds and steps, a smaller timing phase; the model and the learning rate stay.
QUICK = {"seeds": 1, "steps": 300, "eval_every": 100, "timing_rounds": 10, "valid_size": 256}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=5e-2, help="peak AdamW learning rate (from the --sweep table)")
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate sweep instead of the comparison")
    parser.add_argument(
        "--sweep-lr",
        type=float,
        nargs="+",
        default=[1e-3, 3e-3, 1e-2, 3e-2, 5e-2, 1e-1],
        help="learning rates of --sweep",
    )
    parser.add_argument(
        "--sweep-methods", nargs="+", default=["none", "global"], metavar="METHOD", help="methods of --sweep"
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps (then --schedule)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch (32 predicted tokens each)")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument(
        "--schedule", choices=("cosine", "constant"), default="constant", help="after the warm-up: decay or not"
    )
    parser.add_argument("--b2", type=float, default=0.999, help="AdamW beta2")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (matrices)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    parser.add_argument("--valid-size", type=int, default=VALID_SIZE, help="validation sequences (fixed set)")
    parser.add_argument("--language-seed", type=int, default=0, help="seed of the language's successor table")
    parser.add_argument("--spike-factor", type=float, default=1.5, help="a spike: loss above this x running median")
    parser.add_argument(
        "--norm-spike-factor", type=float, default=5.0, help="a gradient-norm spike: norm above this x running median"
    )
    parser.add_argument("--spike-window", type=int, default=50, help="steps in the running median of a spike")
    parser.add_argument("--timing-rounds", type=int, default=30, help="interleaved rounds of the step-time phase")
    parser.add_argument("--timing-steps", type=int, default=5, help="steps of each method per timing round")
    _common.add_common_args(parser, script="transformer_spikes", methods=DEFAULT_METHODS)
    # Each method runs with optclip.monitor() first in its chain, as issue 15 asks: the figure's per-layer norms.
    parser.set_defaults(monitor=True)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = _common.parse_with_quick(build_parser(), argv, QUICK)
    unknown = sorted(set(args.sweep_methods) - set(_common.available_methods()))
    if unknown:
        build_parser().error(f"--sweep-methods: unknown {unknown}; choose from {_common.available_methods()}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train every (learning rate, method, seed); write the outputs; return the tables."""
    args = parse_args(argv)
    language = Language.from_seed(args.language_seed)
    valid = language.sample(np.random.default_rng([args.language_seed, 7]), args.valid_size)
    lrs, methods = (args.sweep_lr, args.sweep_methods) if args.sweep else ([args.lr], args.methods)
    title = "Transformer learning-rate sweep" if args.sweep else "Loss spikes in a transformer"
    report = _common.Report(args.out, title, __file__, argv)
    seeds = f"{args.seeds} seed" + "s" * (args.seeds != 1)
    params = parameter_count(Transformer(args.dim, args.depth, args.heads, rngs=nnx.Rngs(0)))
    notes = [
        f"model: {args.depth} pre-LN blocks, width {args.dim}, {args.heads} heads, {params:,} parameters; "
        f"AdamW b2 {args.b2}, weight decay {args.weight_decay}, {args.warmup} warm-up steps then "
        + ("cosine to lr/10" if args.schedule == "cosine" else "constant")
        + f"; batch {args.batch} x {LENGTH - 1} tokens, {args.steps} steps, {seeds}",
        f"validation: {args.valid_size} sequences; lowest possible loss {language.optimal_loss(valid):.3f}, "
        f"uniform guess {UNIFORM_LOSS:.3f}",
        f"spike: a step whose loss exceeds {args.spike_factor} x the median of the {args.spike_window} before it "
        f"(consecutive steps: one spike); a gradient-norm spike likewise with {args.norm_spike_factor} x; "
        f"diverged: non-finite, or final validation loss above {UNIFORM_LOSS:.3f}",
        f"thresholds: global norm {args.global_norm}; zclip(), adagc(), autoclip() and the guards with their defaults",
    ]
    results: list[RunResult] = []
    transforms: dict[str, optax.GradientTransformation] = {}  # of the last learning rate, for the timing
    curves: dict[str, LayerCurve] = {}
    evals: dict[str, list[tuple[int, float]]] = {}
    with (
        _common.StepLog(args.out / "steps.jsonl", args.tensorboard) as steps_log,
        _common.JsonlWriter(args.out / "runs.jsonl") as runs_log,
    ):
        for lr in lrs:
            for method in methods:
                transforms[method] = _common.make_transform(method, make_adamw(args, lr), args)
                for seed in range(args.seeds):
                    run_id = f"lr{lr:g}-{method}-s{seed}"
                    run = (lr, method, seed)
                    result, curve = train_one(args, language, transforms[method], run, valid, steps_log, run_id)
                    results.append(result)
                    record = {"run": run_id, **dataclasses.asdict(result), "diverged": result.diverged}
                    runs_log.write(record)
                    if seed == 0:
                        key = f"lr {lr:g}, {method}" if args.sweep else method
                        curves[key], evals[key] = curve, result.evals
    tables: dict[str, list[list[str]]] = {}
    if args.sweep:
        rows = [
            [f"{lr:g}", *summary_row(m, [r for r in results if r.lr == lr and r.method == m])[:8]]
            for lr in lrs
            for m in methods
        ]
        tables["sweep"] = rows
        report.add("Learning-rate sweep", _common.markdown_table(["lr", *HEADERS[:8]], rows))
        panels = {f"lr {lr:g}": {m: curves[f"lr {lr:g}, {m}"] for m in methods} for lr in lrs}
        _common.plot_curves(args.out / "sweep.png", panels, f"AdamW learning-rate sweep, seed 0 of {args.seeds}")
    else:
        baseline = {"none": transforms.get("none") or _common.make_transform("none", make_adamw(args, args.lr), args)}
        ratios = step_time_ratios(args, language, {**baseline, **transforms})
        rows = [
            [*summary_row(m, [r for r in results if r.method == m]), ratio_cell(ratios[m]) if m in ratios else "-"]
            for m in methods
        ]
        tables["methods"] = rows
        headers = [*HEADERS, "step time / none: median (min-max)"]
        report.add(f"AdamW lr {args.lr:g}, {seeds}", _common.markdown_table(headers, rows))
        plot_layers(
            args.out / "transformer.png",
            curves,
            evals,
            f"AdamW lr {args.lr:g}, {params:,} parameters, seed 0 of {args.seeds}",
        )
    report.finish(notes)
    return {"tables": tables, "results": results, "out": args.out}


if __name__ == "__main__":
    main()
