"""What gradient clipping costs inside a jit-compiled Adam step: optclip against optax, plain Adam and PyTorch.

For every parameter tree and every configuration this measures, in one process:

* the step time of ``jax.jit(step, donate_argnums=(0, 1))`` where ``step`` is ``tx.update`` plus
  ``optax.apply_updates`` and ``tx`` is ``chain(<clip>, adam)`` (or ``<guard>(adam)``, or plain ``adam``): the
  median of ``--repeats`` interleaved rounds after ``--warmup`` untimed ones, with min and max, and the ratio to
  plain Adam paired by round (see ``_timing.py``);
* the compile time, ``lower`` plus ``compile``;
* ``compiled.memory_analysis()``: temp bytes (scratch the step allocates) and output bytes;
* the number of fusions in the optimized HLO (a proxy for compile time) and the passes over the parameter bytes
  that its top-level instructions make (``_hlo.py``: a load-independent measure of a bandwidth-bound step);
* floors (``_floors.py``, on the target tree only): the same step with each clip's fewest operations, shown beside
  the clip's step targets;
* with PyTorch importable: ``torch.optim.Adam(foreach=True)`` alone and after ``clip_grad_norm_(foreach=True)`` or
  ``clip_grad_value_(foreach=True)`` on the same tree, same thread count, interleaved with the JAX rounds.

On the target tree every configuration is timed twice: with donated buffers (the usual training loop) and without.
``--compile`` measures compile time instead, each configuration that has a compile target (and its optax
equivalent) lowered and compiled in a fresh process, the order reversed every round, the median of the rounds: the
in-process compile times above depend on what the process compiled before.

It writes ``<out>/<tag>.json`` and ``<out>/<tag>.md`` and prints PASS/MISS for every target of the lean-core issue
(``TARGETS``; step and memory on the target tree, and again on ``MODEL_TREE`` where the run timed it). The device is
JAX's default one, so the same command measures a GPU where JAX has one.

    python benchmarks/run.py --quick        # the 1e7-parameter, 10-leaf tree only, donated and not
    python benchmarks/run.py                # the full grid (1e5/1e6/1e7 params x 10/100/1000 leaves, LSTM, transformer)
    python benchmarks/run.py --compile      # compile times on 1e6 params in 1000 leaves, fresh processes

Adding a configuration is one line in ``CONFIGS``; a target, one line in ``_targets``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _floors
import _hlo
import _timing
import _trees
import jax
import optax

import optclip

RESULTS = Path(__file__).resolve().parent / "results"
LEARNING_RATE = 1e-3
BASELINE = "adam"
TORCH_BASELINE = "torch.Adam"

# The targets of the lean-core issue (12): step and memory judged on TARGET_TREE, with donated buffers and without;
# compile time in fresh processes (``--compile``) on a tree of COMPILE_LEAVES leaves.
TARGET_TREE = "1e7/10"
# The step and memory targets are judged again on this tree wherever a run timed it (the full grid): a model's
# leaves mix shapes, and its units (AGC's) are many and of every size, where TARGET_TREE's are few and alike.
MODEL_TREE = "Transformer 4x256"
COMPILE_LEAVES = 1000
COMPILE_TREE = "1e6/1000"


class Thresholds(NamedTuple):
    """Thresholds that make each clip fire on the benchmark gradients (global norm ``_trees.GRAD_NORM``)."""

    value: float
    global_norm: float
    leaf_norm: float
    agc: float


def thresholds(tree: _trees.Tree) -> Thresholds:
    entry = _trees.GRAD_NORM / math.sqrt(tree.num_params)  # the typical gradient entry
    return Thresholds(
        value=2.0 * entry,  # about 5% of the entries are clamped
        global_norm=_trees.GRAD_NORM / 10,
        leaf_norm=_trees.GRAD_NORM / 10 / math.sqrt(tree.num_leaves),
        agc=0.01,
    )


def _adam() -> optax.GradientTransformation:
    return optax.adam(LEARNING_RATE)


def _chain(*clips: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(*clips, _adam())


def _safety_stack(t: Thresholds) -> optax.GradientTransformation:
    """The stack the guards guide recommends: skip spikes and non-finite steps around a z-score clip and Adam."""
    return optclip.skip_on_spike(optclip.skip_nonfinite(_chain(optclip.clip_by_global_norm(optclip.zscore()))))


@dataclasses.dataclass(frozen=True)
class Config:
    """One optimizer to time. ``make`` builds it from the tree's thresholds; ``needs``: the ``optclip`` attribute the
    row depends on (a row whose transform does not exist yet is left out)."""

    name: str
    make: Callable[[Thresholds], optax.GradientTransformation]
    needs: str | None = None

    @property
    def library(self) -> str:
        return self.name.split(".")[0]

    def available(self) -> bool:
        return self.needs is None or hasattr(optclip, self.needs)


# fmt: off
CONFIGS: list[Config] = [
    Config(BASELINE, lambda t: _adam()),
    Config("optax.clip", lambda t: _chain(optax.clip(t.value))),
    Config("optax.clip_by_block_rms", lambda t: _chain(optax.clip_by_block_rms(t.leaf_norm))),
    Config("optax.clip_by_global_norm", lambda t: _chain(optax.clip_by_global_norm(t.global_norm))),
    Config("optax.adaptive_grad_clip", lambda t: _chain(optax.adaptive_grad_clip(t.agc))),
    Config("optax.apply_if_finite", lambda t: optax.apply_if_finite(_adam(), max_consecutive_errors=5)),
    Config("optax.apply_if_finite(clip_by_global_norm)", lambda t: optax.apply_if_finite(
        _chain(optax.clip_by_global_norm(t.global_norm)), max_consecutive_errors=5)),
    Config("optclip.clip_by_value", lambda t: _chain(optclip.clip_by_value(t.value))),
    Config("optclip.clip_by_value(stats=none)", lambda t: _chain(optclip.clip_by_value(t.value, stats="none"))),
    Config("optclip.clip_by_value(stats=full)", lambda t: _chain(optclip.clip_by_value(t.value, stats="full"))),
    Config("optclip.clip_by_leaf_norm", lambda t: _chain(optclip.clip_by_leaf_norm(t.leaf_norm))),
    Config("optclip.clip_by_leaf_norm(stats=full)", lambda t: _chain(
        optclip.clip_by_leaf_norm(t.leaf_norm, stats="full"))),
    Config("optclip.clip_by_global_norm", lambda t: _chain(optclip.clip_by_global_norm(t.global_norm))),
    Config("optclip.clip_by_global_norm(stats=none)", lambda t: _chain(
        optclip.clip_by_global_norm(t.global_norm, stats="none"))),
    Config("optclip.adaptive_grad_clip", lambda t: _chain(optclip.adaptive_grad_clip(t.agc))),
    Config("optclip.clip_by_global_norm(percentile)", lambda t: _chain(optclip.clip_by_global_norm(
        optclip.percentile()))),
    Config("optclip.clip_by_global_norm(zscore)", lambda t: _chain(optclip.clip_by_global_norm(optclip.zscore()))),
    Config("optclip.clip_by_global_norm(quantile)", lambda t: _chain(optclip.clip_by_global_norm(
        optclip.quantile()))),
    Config("optclip.clip_by_leaf_norm(ema)", lambda t: _chain(optclip.clip_by_leaf_norm(optclip.ema()))),
    Config("optclip.adagc", lambda t: _chain(optclip.adagc())),
    Config("optclip.skip_nonfinite", lambda t: optclip.skip_nonfinite(_adam())),
    Config("optclip.skip_on_spike", lambda t: optclip.skip_on_spike(_adam())),
    Config("optclip.safety_stack", _safety_stack),
    Config("optclip.monitor+clip_by_global_norm", lambda t: _chain(
        optclip.monitor(), optclip.clip_by_global_norm(t.global_norm)), needs="monitor"),
    Config("floor.clip_by_value", lambda t: _chain(_floors.value_with_norm(t.value))),
    Config("floor.clip_by_global_norm", lambda t: _chain(_floors.global_norm(t.global_norm))),
    Config("floor.clip_by_leaf_norm", lambda t: _chain(_floors.leaf_norm(t.leaf_norm))),
    Config("floor.clip_by_leaf_norm(barrier)", lambda t: _chain(_floors.leaf_norm(t.leaf_norm, barrier=True))),
    Config("floor.adaptive_grad_clip", lambda t: _chain(_floors.unit_wise(t.agc))),
    Config("floor.adaptive_grad_clip(barrier)", lambda t: _chain(_floors.unit_wise(t.agc, barrier=True))),
    Config("floor.safety_stack", lambda t: _floors.guarded_global_norm(t.global_norm, _adam())),
]
# Each clip's floor (``_floors``), shown beside its step targets: how low the machine lets that clip's step go.
FLOORS = {f"optclip.{c.name.removeprefix('floor.')}": c.name for c in CONFIGS if c.library == "floor"}
# fmt: on


@dataclasses.dataclass(frozen=True)
class Target:
    """One target: ``measured(config) <= factor * measured(other) + add`` (``other`` None: ``<= add``).

    kind "step": step time / plain Adam (paired by round) on the target tree, judged with donated buffers and without;
    "temp": the step's scratch bytes beyond plain Adam's, per parameter byte; "compile": lower + compile seconds in a
    fresh process (``--compile``), median of the rounds.
    """

    kind: str
    config: str
    add: float
    other: str | None = None
    factor: float = 1.0

    def describe(self) -> str:
        unit = {"step": "step / adam", "temp": "extra temp / param bytes", "compile": "compile s"}[self.kind]
        if self.other is None:
            return f"{unit} <= {self.add:g}"
        scaled = "" if self.factor == 1 else f"{self.factor:g} x "
        return f"{unit} <= {scaled}{self.other}" + (f" + {self.add:g}" if self.add else "")


def _targets() -> list[Target]:
    targets = [
        Target("step", "optclip.clip_by_value", 1.05),
        Target("step", "optclip.clip_by_value", 0.05, "optax.clip"),
        Target("step", "optclip.clip_by_global_norm", 1.15),
        Target("step", "optclip.clip_by_global_norm", 0.0, "optax.clip_by_global_norm"),
        Target("step", "optclip.clip_by_leaf_norm", 1.15),
        Target("step", "optclip.clip_by_leaf_norm", 0.05, "optax.clip_by_block_rms"),
        Target("step", "optclip.adaptive_grad_clip", 0.0, "optax.adaptive_grad_clip"),
        Target("step", "optclip.safety_stack", 0.0, "optax.apply_if_finite(clip_by_global_norm)", 0.8),
        Target("step", "optclip.safety_stack", 1.5),
        Target("step", "optclip.monitor+clip_by_global_norm", 0.05, "optclip.clip_by_global_norm"),
    ]
    adaptive = {
        "optclip.clip_by_global_norm(percentile)": "optclip.clip_by_global_norm",
        "optclip.clip_by_global_norm(zscore)": "optclip.clip_by_global_norm",
        "optclip.clip_by_global_norm(quantile)": "optclip.clip_by_global_norm",
        "optclip.clip_by_leaf_norm(ema)": "optclip.clip_by_leaf_norm",
        "optclip.adagc": "optclip.clip_by_leaf_norm",
    }
    targets += [Target("step", rule, 0.03, fixed) for rule, fixed in adaptive.items()]
    compile_vs = {
        "optclip.clip_by_value": "optax.clip",
        "optclip.clip_by_global_norm": "optax.clip_by_global_norm",
        "optclip.clip_by_leaf_norm": "optax.clip_by_block_rms",
        "optclip.adaptive_grad_clip": "optax.adaptive_grad_clip",
        "optclip.skip_nonfinite": "optax.apply_if_finite",
    }
    targets += [Target("compile", mine, 0.0, theirs, 1.25) for mine, theirs in compile_vs.items()]
    guards = ("optclip.skip_nonfinite", "optclip.skip_on_spike", "optclip.safety_stack")
    for c in CONFIGS:
        if c.library == "optclip":
            targets.append(Target("temp", c.name, 1.0 if c.name in guards else 0.01))
    return targets


TARGETS = _targets()
# Each compile target's two configurations, its floor where it has one (what the clip's fewest operations cost to
# compile), and plain Adam.
COMPILE_CONFIGS = sorted(
    {t.config for t in TARGETS if t.kind == "compile"}
    | {t.other for t in TARGETS if t.kind == "compile" and t.other}
    | {FLOORS[t.config] for t in TARGETS if t.kind == "compile" and t.config in FLOORS}
    | {BASELINE}
)


# --------------------------------------------------------------------------------------------------------------------
# JAX


def _lower_compile(
    tx: optax.GradientTransformation, params: Any, state: Any, grads: Any, donate: bool = True
) -> tuple[Any, float, float]:
    # A fresh function object per call, so that no trace or executable cache can hide the cost.
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1) if donate else ()).lower(params, state, grads)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


class JaxStep:
    """One configuration's compiled step with its own (donated) parameters and optimizer state."""

    def __init__(self, tx: optax.GradientTransformation, tree: _trees.Tree, grads: Any, donate: bool = True):
        self.params = jax.device_put(tree.params)
        self.state = tx.init(self.params)
        self.grads = grads
        self.tx = tx
        self.donate = donate
        self.compiled, lower_s, compile_s = _lower_compile(tx, self.params, self.state, grads, donate)
        self.lower_times, self.compile_times = [lower_s], [compile_s]

    def recompile(self) -> None:
        _, lower_s, compile_s = _lower_compile(self.tx, self.params, self.state, self.grads, self.donate)
        self.lower_times.append(lower_s)
        self.compile_times.append(compile_s)

    def __call__(self) -> None:
        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready(self.params)

    def facts(self, param_bytes: int) -> dict[str, Any]:
        memory = self.compiled.memory_analysis()
        hlo = self.compiled.as_text() or ""
        traffic = _hlo.traffic(hlo)
        lower_s, compile_s = _timing.median(self.lower_times), _timing.median(self.compile_times)
        return {
            "lower_s": lower_s,
            "compile_s": compile_s,
            "lower_compile_s": lower_s + compile_s,
            "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
            "output_bytes": getattr(memory, "output_size_in_bytes", None),
            "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
            "alias_bytes": getattr(memory, "alias_size_in_bytes", None),
            "fusions": len(re.findall(r"\bfusion\(", hlo)),
            "passes": traffic.entry / param_bytes,
            "branch_passes": traffic.branches / param_bytes,
        }


# --------------------------------------------------------------------------------------------------------------------
# PyTorch


def _torch_device() -> str | None:
    """PyTorch's device matching JAX's: CPU with CPU, CUDA with a GPU; None when there is no match (or no torch)."""
    try:
        import torch
    except ImportError:
        return None
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return "cuda"
    return None


def torch_steps(tree: _trees.Tree, th: Thresholds, device: str, threads: int) -> dict[str, Callable[[], None]]:
    import torch

    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def make(clip: Callable[[list[Any]], Any] | None) -> Callable[[], None]:
        params = [torch.nn.Parameter(torch.tensor(x, device=device)) for x in jax.tree.leaves(tree.params)]
        for p, g in zip(params, jax.tree.leaves(tree.grads)):
            p.grad = torch.tensor(g, device=device)
        opt = torch.optim.Adam(params, lr=LEARNING_RATE, foreach=True)

        def run() -> None:
            if clip is not None:
                clip(params)  # in place: after the first step the norm is at the threshold, the work is the same
            opt.step()
            sync()

        return run

    utils = torch.nn.utils
    return {
        TORCH_BASELINE: make(None),
        "torch.clip_grad_norm_": make(lambda ps: utils.clip_grad_norm_(ps, th.global_norm, foreach=True)),
        "torch.clip_grad_value_": make(lambda ps: utils.clip_grad_value_(ps, th.value, foreach=True)),
    }


# --------------------------------------------------------------------------------------------------------------------
# one tree


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_tree(
    tree: _trees.Tree,
    configs: Sequence[Config],
    args: argparse.Namespace,
    torch_device: str | None,
    threads: int,
    donate: bool = True,
) -> list[dict[str, Any]]:
    """Compile every configuration for ``tree``, time them all interleaved, and return one row per configuration.

    ``donate``: the step donates its parameters and optimizer state (the usual training loop); without it, XLA
    cannot update them in place and every configuration writes fresh buffers.
    """
    th = thresholds(tree)
    grads = jax.device_put(tree.grads)
    steps: dict[str, JaxStep] = {}
    failed: list[dict[str, Any]] = []
    for config in configs:
        try:
            steps[config.name] = JaxStep(config.make(th), tree, grads, donate)
        except Exception as error:  # one broken transform must not lose an hour-long run: record it, go on
            _log(f"  {tree.name:>18s}  {config.name:42s} FAILED: {type(error).__name__}: {error}")
            failed.append(
                {
                    "tree": tree.name,
                    "config": config.name,
                    "donated": donate,
                    "error": f"{type(error).__name__}: {error}",
                }
            )
            continue
        _log(f"  {tree.name:>18s}  {config.name:42s} compiled in {steps[config.name].compile_times[0]:7.2f} s")
    for _ in range(args.compile_repeats - 1):
        for step in steps.values():
            step.recompile()
    runners: dict[str, Callable[[], None]] = dict(steps)
    if torch_device is not None and donate:
        runners.update(torch_steps(tree, th, torch_device, threads))
    load = os.getloadavg()[0]
    samples = _timing.interleaved(runners, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    rows = failed
    for name, times in samples.items():
        summary = _timing.summarize(times)
        baseline = TORCH_BASELINE if name.startswith("torch.") else BASELINE
        row = {
            "tree": tree.name,
            "donated": donate,
            "params": tree.num_params,
            "leaves": tree.num_leaves,
            "param_bytes": tree.nbytes,
            "config": name,
            "library": name.split(".")[0],
            "median_ms": 1e3 * summary.median,
            "min_ms": 1e3 * summary.min,
            "max_ms": 1e3 * summary.max,
            "repeats": summary.repeats,
            "baseline": baseline,
            "ratio": _timing.paired_ratio(times, samples[baseline]),
            "load_1min": load,
        }
        if name in steps:
            row.update(steps[name].facts(tree.nbytes))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# targets


def judge(
    targets: Sequence[Target],
    rows: list[dict[str, Any]],
    compile_rows: list[dict[str, Any]] | None = None,
    tree: str = TARGET_TREE,
) -> list[dict[str, Any]]:
    """Every target this run can judge: step targets on ``tree`` in each donation mode it was timed in, memory with
    donated buffers, compile targets from ``compile_rows`` (``--compile``); a target whose rows are missing has
    ``passed = None``."""
    rows = [r for r in rows if "error" not in r]
    step = {(r["config"], r.get("donated", True)): r for r in rows if r["tree"] == tree}
    compiled = {r["config"]: r["median_s"] for r in compile_rows or []}
    modes = sorted({donated for _, donated in step}, reverse=True) or [True]
    verdicts = []

    def verdict(
        t: Target, where: str, measured: float | None, other: float | None, floor: float | None = None
    ) -> dict[str, Any]:
        limit = None if (t.other is not None and other is None) else t.factor * (other or 0.0) + t.add
        passed = None if measured is None or limit is None else bool(measured <= limit)
        return {"target": t.describe(), "kind": t.kind, "where": where, "config": t.config, "measured": measured,
                "limit": limit, "passed": passed, "floor": floor}  # fmt: skip

    for t in targets:
        if t.kind == "step":
            for donated in modes:
                mine, other = step.get((t.config, donated)), step.get((t.other, donated))
                floor = step.get((FLOORS.get(t.config), donated))
                where = f"{tree}, {'donated' if donated else 'not donated'}"
                verdicts.append(verdict(t, where, mine and mine["ratio"], other and other["ratio"],
                                        floor and floor["ratio"]))  # fmt: skip
        elif t.kind == "temp":
            mine, base = step.get((t.config, True)), step.get((BASELINE, True))
            extra = None
            if mine and base and mine.get("temp_bytes") is not None and base.get("temp_bytes") is not None:
                extra = (mine["temp_bytes"] - base["temp_bytes"]) / mine["param_bytes"]
            verdicts.append(verdict(t, f"{tree}, donated", extra, None))
        else:
            where = compile_rows[0]["tree"] if compile_rows else COMPILE_TREE
            floor = compiled.get(FLOORS.get(t.config))
            verdicts.append(
                verdict(t, f"{where}, fresh processes", compiled.get(t.config), compiled.get(t.other), floor)
            )
    return verdicts


# --------------------------------------------------------------------------------------------------------------------
# compile time, each configuration in a fresh process


def compile_once(config: str, tree_name: str, seed: int = 0) -> dict[str, float]:
    """Lower + compile ``config``'s donated step on ``tree_name`` (``_trees.named``) in this process."""
    tree = _trees.named(tree_name, seed)
    make = next(c.make for c in CONFIGS if c.name == config)
    tx = make(thresholds(tree))
    state_params = jax.device_put(tree.params)
    _, lower_s, compile_s = _lower_compile(tx, state_params, tx.init(state_params), jax.device_put(tree.grads))
    return {"lower_s": lower_s, "compile_s": compile_s}


def compile_in_fresh_processes(configs: Sequence[str], tree_name: str, rounds: int) -> list[dict[str, Any]]:
    """Lower + compile seconds of each configuration, each in a fresh process, the order reversed every round (so a
    drift of load hits first and last alike); the median over rounds."""
    times: dict[str, list[float]] = {c: [] for c in configs}
    order = list(configs)
    for r in range(rounds):
        for config in order:
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--compile-one", config, "--compile-tree", tree_name],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            times[config].append(measured["lower_s"] + measured["compile_s"])
            _log(f"  round {r + 1}/{rounds}  {config:42s} {times[config][-1]:7.2f} s")
        order.reverse()
    return [
        {"config": c, "tree": tree_name, "seconds": ts, "median_s": _timing.median(ts), "rounds": rounds}
        for c, ts in times.items()
    ]


# --------------------------------------------------------------------------------------------------------------------
# reports


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for module in ("jax", "jaxlib", "optax", "flax", "numpy", "torch", "optclip"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            continue
    return versions


def _source_version() -> str | None:
    """The commit the measured code comes from (``-dirty``: with uncommitted changes), if this is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=RESULTS.parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _fmt_measured(measured: float | None, limit: float | None) -> str:
    """The measured value, with the digits that tell it from its limit (a MISS by 1e-5 must not print as equal)."""
    close = measured is not None and limit is not None and measured != limit and _fmt(measured) == _fmt(limit)
    return _fmt(measured, ".6f" if close else ".3f")


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _grid(title: str, at: dict, trees: list[str], configs: list[str], key: str, spec: str = ".2f") -> list[str]:
    """A markdown table of ``row[key]``: one line per config, one column per tree."""
    lines = ["", f"## {title}", "", "| config | " + " | ".join(trees) + " |", "|---|" + "---:|" * len(trees)]
    for c in configs:
        lines.append(f"| {c} | " + " | ".join(_fmt(at.get((t, c), {}).get(key), spec) for t in trees) + " |")
    return lines


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "floor: the same step with the clip's fewest operations (`benchmarks/_floors.py`), in the same run.",
        "",
        "| config | target | where | measured | limit | floor | |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for t in targets:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["passed"]]
        lines.append(
            f"| {t['config']} | {t['target']} | {t['where']} | {_fmt_measured(t['measured'], t['limit'])} | "
            f"{_fmt(t['limit'])} | {_fmt(t.get('floor'))} | {verdict} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    meta, targets = result["meta"], result["targets"]
    lines = [
        f"# optclip benchmark: {meta['tag']}",
        "",
        f"{meta['when']} on {meta['device']} ({meta['machine']}), {meta['threads']} threads, "
        f"load {meta['load_before'][0]:.2f} before / {meta['load_after'][0]:.2f} after (1-min average). "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        f"Command: `{meta['command']}` (source {meta.get('source')}).",
        "",
    ]
    lines += _targets_table(targets)
    if result.get("compile_rows"):
        rows = result["compile_rows"]
        lines += [
            "",
            f"## Compile time, lower + compile, each in a fresh process ({rows[0]['tree']}, {rows[0]['rounds']} rounds,"
            " order reversed every round)",
            "",
            "| config | median s | every round |",
            "|---|---:|---|",
        ]
        lines += [
            f"| {r['config']} | {r['median_s']:.1f} | {', '.join(f'{x:.1f}' for x in r['seconds'])} |" for r in rows
        ]
    rows = [r for r in result["rows"] if "error" not in r]
    errors = [r for r in result["rows"] if "error" in r]
    if rows:
        lines += ["", f"Step times: median of {meta['repeats']} interleaved rounds after {meta['warmup']} warm-up."]
    for donated in (True, False):
        chosen = [r for r in rows if r.get("donated", True) == donated]
        if not chosen:
            continue
        trees = list(dict.fromkeys(r["tree"] for r in chosen))
        configs = list(dict.fromkeys(r["config"] for r in chosen))
        at = {(r["tree"], r["config"]): r for r in chosen}
        mode = "donated buffers" if donated else "no buffer donation"
        title = f"Step time / plain adam, {mode} (median of paired ratios; torch rows: / torch.Adam)"
        lines += _grid(title, at, trees, configs, "ratio")
        if donated:
            jax_configs = [c for c in configs if not c.startswith("torch.")]
            lines += _grid("Compile time in the timing process, lower + compile (s)", at, trees, jax_configs,
                           "lower_compile_s", ".1f")  # fmt: skip
        for tree in trees:
            first = at[(tree, configs[0])]
            lines += [
                "",
                f"## {tree}, {mode}: {first['params']:,} params in {first['leaves']} leaves "
                f"({_mb(first['param_bytes'])} MiB)",
                "",
                "| config | median ms | min | max | ratio | lower+compile s | temp MiB | output MiB | fusions "
                "| passes |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for c in configs:
                r = at.get((tree, c))
                if r is None:
                    continue
                lines.append(
                    f"| {c} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['max_ms']:.2f} | {r['ratio']:.3f} | "
                    f"{_fmt(r.get('lower_compile_s'), '.2f')} | {_mb(r.get('temp_bytes'))} | "
                    f"{_mb(r.get('output_bytes'))} | {r.get('fusions', '-')} | {_fmt(r.get('passes'), '.1f')} |"
                )
    if errors:
        lines += ["", "## Failures", ""] + [f"- {r['tree']}, {r['config']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the target tree only (1e7 params, 10 leaves): ~2 min")
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="parameter counts of the synthetic trees")
    parser.add_argument("--leaves", default="10,100,1000", help="leaf counts of the synthetic trees")
    parser.add_argument("--no-models", action="store_true", help="leave out the Flax LSTM and transformer trees")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch even if it is importable")
    parser.add_argument("--only", default=None, help="regex: time only the matching configs (and the baseline)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--compile-repeats", type=int, default=1, help="compiles per config in the timing process")
    parser.add_argument("--target-tree", default=TARGET_TREE, help="the tree the step and memory targets are judged on")
    parser.add_argument(
        "--compile", action="store_true",
        help="measure compile time instead: every config with a compile target (and its optax equivalent) in fresh "
        "processes on --compile-tree, order reversed every round, median of --compile-rounds",
    )  # fmt: skip
    parser.add_argument(
        "--compile-tree",
        default=COMPILE_TREE,
        help="the tree of the --compile measurement: <params>/<leaves>, transformer<depth> or lstm",
    )
    parser.add_argument("--compile-rounds", type=int, default=3, help="rounds of --compile")
    parser.add_argument("--compile-one", default=None, help=argparse.SUPPRESS)  # one fresh-process measurement
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and markdown go")
    parser.add_argument("--tag", default=None, help="file name stem (default: quick-, full- or compile-<backend>)")
    parser.add_argument(
        "--report", type=Path, default=None, help="rewrite the markdown of this JSON result, run nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.leaves, args.no_models = "1e7", "10", True
    if args.repeats < 1 or args.warmup < 0 or args.compile_repeats < 1 or args.compile_rounds < 1:
        parser.error("need --repeats >= 1, --warmup >= 0, --compile-repeats >= 1, --compile-rounds >= 1")
    return args


def _meta(args: argparse.Namespace, argv: Sequence[str] | None, tag: str, threads: int, torch_device: str | None):
    device = jax.devices()[0]
    return {
        "tag": tag,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, {os.cpu_count()} CPUs",
        "platform": platform.platform(),
        "device": f"{device.platform}: {device.device_kind}",
        "backend": jax.default_backend(),
        "threads": threads,
        "torch_device": torch_device,
        "versions": _versions(),
        "source": _source_version(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compile_repeats": args.compile_repeats,
        "load_before": list(os.getloadavg()),
        "left_out": [c.name for c in CONFIGS if not c.available()],
    }


def _write(result: dict[str, Any], out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{tag}.md").write_text(markdown(result))
    for t in result["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[t["passed"]]
        measured = _fmt_measured(t["measured"], t["limit"])
        limit = _fmt(t["limit"]) + (f", floor {_fmt(t['floor'])}" if t.get("floor") is not None else "")
        print(f"{verdict}  {t['config']:42s} {t['target']:62s} {t['where']:24s} {measured} (limit {limit})")
    print(f"wrote {out / tag}.json and .md")


def judged_targets(rows: list[dict[str, Any]], target_tree: str) -> list[dict[str, Any]]:
    """The step and memory verdicts on ``target_tree``, then on ``MODEL_TREE`` where ``rows`` hold it."""
    kinds = [t for t in TARGETS if t.kind != "compile"]
    found = judge(kinds, rows, None, target_tree)
    if target_tree != MODEL_TREE and any(r["tree"] == MODEL_TREE for r in rows):
        found += judge(kinds, rows, None, MODEL_TREE)
    return found


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.compile_one is not None:
        measured = compile_once(args.compile_one, args.compile_tree, args.seed)
        print(json.dumps(measured))
        return measured
    if args.report is not None:  # only rewrite the markdown of an earlier run
        result = json.loads(args.report.read_text())
        args.report.with_suffix(".md").write_text(markdown(result))
        return result
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mode = "compile" if args.compile else "quick" if args.quick else "full"
    tag = args.tag or f"{mode}-{jax.default_backend()}"
    if args.compile:
        meta = _meta(args, argv, tag, threads, None)
        names = [c for c in COMPILE_CONFIGS if next(x for x in CONFIGS if x.name == c).available()]
        if args.only:
            names = [c for c in names if c == BASELINE or re.search(args.only, c)]
        _log(f"optclip compile benchmark: {len(names)} configs x {args.compile_rounds} rounds on {args.compile_tree}")
        compile_rows = compile_in_fresh_processes(names, args.compile_tree, args.compile_rounds)
        meta["load_after"] = list(os.getloadavg())
        targets = judge([t for t in TARGETS if t.kind == "compile"], [], compile_rows)
        result = {"meta": meta, "rows": [], "compile_rows": compile_rows, "targets": targets}
        _write(result, args.out, tag)
        return result
    configs = [c for c in CONFIGS if c.available()]
    if args.only:
        configs = [c for c in configs if c.name == BASELINE or re.search(args.only, c.name)]
    torch_device = None if args.no_torch else _torch_device()
    meta = _meta(args, argv, tag, threads, torch_device)
    trees = [(n, leaves) for n in _parse_sizes(args.sizes) for leaves in _parse_sizes(args.leaves)]
    builders: list[Callable[[], _trees.Tree]] = [lambda n=n, k=k: _trees.synthetic(n, k, args.seed) for n, k in trees]
    if not args.no_models:
        builders += [_trees.lstm, _trees.transformer]
    _log(
        f"optclip benchmark on {meta['device']}, {threads} threads, torch: {torch_device}; left out: {meta['left_out']}"
    )
    rows: list[dict[str, Any]] = []
    for build in builders:
        tree = build()
        _log(f"{tree.name}: {tree.num_params:,} params in {tree.num_leaves} leaves")
        # Floors serve the targets, judged on the target tree alone (and a barrier floor of 1000 small leaves takes
        # XLA:CPU many minutes to compile).
        here = configs if tree.name == args.target_tree else [c for c in configs if c.library != "floor"]
        rows += bench_tree(tree, here, args, torch_device, threads)
        if tree.name == args.target_tree:  # the step targets hold without buffer donation too
            rows += bench_tree(tree, here, args, None, threads, donate=False)
        gc.collect()
    meta["load_after"] = list(os.getloadavg())
    result = {"meta": meta, "rows": rows, "targets": judged_targets(rows, args.target_tree)}
    _write(result, args.out, tag)
    return result


if __name__ == "__main__":
    main()
