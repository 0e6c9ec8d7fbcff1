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
* with PyTorch importable: ``torch.optim.Adam(foreach=True)`` alone and after ``clip_grad_norm_(foreach=True)`` or
  ``clip_grad_value_(foreach=True)`` on the same tree, same thread count, interleaved with the JAX rounds.

It writes ``<out>/<tag>.json`` and ``<out>/<tag>.md`` and prints PASS/MISS for every target of the benchmarks issue.
The device is JAX's default one, so the same command measures a GPU where JAX has one.

    python benchmarks/run.py --quick        # ~1 minute on a quiet 2-core CPU: the 1e7-parameter, 10-leaf tree only
    python benchmarks/run.py                # the full grid (1e5/1e6/1e7 params x 10/100/1000 leaves, LSTM, transformer)

Adding a configuration is one line in ``CONFIGS``.
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

# The targets of the benchmarks issue: ratios measured on TARGET_TREE, compile times on trees of COMPILE_LEAVES leaves.
TARGET_TREE = "1e7/10"
COMPILE_LEAVES = 1000
VS_OPTAX_STEP = 1.02
VS_OPTAX_COMPILE = 1.10
ADAPTIVE_SLACK = 0.02
TEMP_SLACK = 0.01  # extra temp bytes over plain Adam's, as a fraction of the parameter bytes (one buffer = 1.0)


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


def _chain(clip: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(clip, _adam())


@dataclasses.dataclass(frozen=True)
class Config:
    """One optimizer to time. ``make`` builds it from the tree's thresholds.

    needs: the ``optclip`` attribute the row depends on; a row whose transform does not exist yet is left out.
    max_ratio: target on step time / plain Adam's. vs: the optax equivalent (step time <= 1.02x, compile time at
    1000 leaves <= 1.1x). fixed: for an adaptive rule, its fixed-threshold clip (ratio <= that one's + 0.02).
    """

    name: str
    make: Callable[[Thresholds], optax.GradientTransformation]
    needs: str | None = None
    max_ratio: float | None = None
    vs: str | None = None
    fixed: str | None = None

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
    Config("optclip.clip_by_value", lambda t: _chain(optclip.clip_by_value(t.value)), max_ratio=1.03, vs="optax.clip"),
    Config("optclip.clip_by_leaf_norm", lambda t: _chain(optclip.clip_by_leaf_norm(t.leaf_norm)), max_ratio=1.15,
           vs="optax.clip_by_block_rms"),
    Config("optclip.clip_by_global_norm", lambda t: _chain(optclip.clip_by_global_norm(t.global_norm)),
           max_ratio=1.15, vs="optax.clip_by_global_norm"),
    Config("optclip.adaptive_grad_clip", lambda t: _chain(optclip.adaptive_grad_clip(t.agc)),
           vs="optax.adaptive_grad_clip"),
    Config("optclip.clip_by_global_norm(percentile)", lambda t: _chain(optclip.clip_by_global_norm(
        optclip.percentile())), needs="percentile", fixed="optclip.clip_by_global_norm"),
    Config("optclip.clip_by_global_norm(zscore)", lambda t: _chain(optclip.clip_by_global_norm(optclip.zscore())),
           needs="zscore", fixed="optclip.clip_by_global_norm"),
    Config("optclip.clip_by_global_norm(quantile)", lambda t: _chain(optclip.clip_by_global_norm(
        optclip.quantile())), needs="quantile", fixed="optclip.clip_by_global_norm"),
    Config("optclip.clip_by_leaf_norm(ema)", lambda t: _chain(optclip.clip_by_leaf_norm(optclip.ema())),
           needs="ema", fixed="optclip.clip_by_leaf_norm"),
    Config("optclip.adagc", lambda t: _chain(optclip.adagc()), needs="adagc", fixed="optclip.clip_by_leaf_norm"),
    Config("optclip.skip_nonfinite", lambda t: optclip.skip_nonfinite(_adam()), needs="skip_nonfinite",
           max_ratio=1.05, vs="optax.apply_if_finite"),
    Config("optclip.skip_on_spike", lambda t: optclip.skip_on_spike(_adam()), needs="skip_on_spike", max_ratio=1.05),
]
# fmt: on


# --------------------------------------------------------------------------------------------------------------------
# JAX


def _lower_compile(tx: optax.GradientTransformation, params: Any, state: Any, grads: Any) -> tuple[Any, float, float]:
    # A fresh function object per call, so that no trace or executable cache can hide the cost.
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


class JaxStep:
    """One configuration's compiled step with its own (donated) parameters and optimizer state."""

    def __init__(self, tx: optax.GradientTransformation, tree: _trees.Tree, grads: Any):
        self.params = jax.device_put(tree.params)
        self.state = tx.init(self.params)
        self.grads = grads
        self.tx = tx
        self.compiled, lower_s, compile_s = _lower_compile(tx, self.params, self.state, grads)
        self.lower_times, self.compile_times = [lower_s], [compile_s]

    def recompile(self) -> None:
        _, lower_s, compile_s = _lower_compile(self.tx, self.params, self.state, self.grads)
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
    tree: _trees.Tree, configs: Sequence[Config], args: argparse.Namespace, torch_device: str | None, threads: int
) -> list[dict[str, Any]]:
    """Compile every configuration for ``tree``, time them all interleaved, and return one row per configuration."""
    th = thresholds(tree)
    grads = jax.device_put(tree.grads)
    steps: dict[str, JaxStep] = {}
    failed: list[dict[str, Any]] = []
    for config in configs:
        try:
            steps[config.name] = JaxStep(config.make(th), tree, grads)
        except Exception as error:  # one broken transform must not lose an hour-long run: record it, go on
            _log(f"  {tree.name:>18s}  {config.name:42s} FAILED: {type(error).__name__}: {error}")
            failed.append({"tree": tree.name, "config": config.name, "error": f"{type(error).__name__}: {error}"})
            continue
        _log(f"  {tree.name:>18s}  {config.name:42s} compiled in {steps[config.name].compile_times[0]:7.2f} s")
    for _ in range(args.compile_repeats - 1):
        for step in steps.values():
            step.recompile()
    runners: dict[str, Callable[[], None]] = dict(steps)
    if torch_device is not None:
        runners.update(torch_steps(tree, th, torch_device, threads))
    load = os.getloadavg()[0]
    samples = _timing.interleaved(runners, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    rows = failed
    for name, times in samples.items():
        summary = _timing.summarize(times)
        baseline = TORCH_BASELINE if name.startswith("torch.") else BASELINE
        row = {
            "tree": tree.name,
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


def _target(what: str, tree: str, config: str, measured: float | None, limit: float | None) -> dict[str, Any]:
    passed = None if measured is None or limit is None else bool(measured <= limit)
    return {"target": what, "tree": tree, "config": config, "measured": measured, "limit": limit, "passed": passed}


def _compile_total(rows: list[dict[str, Any]], config: str, leaves: int) -> float | None:
    """Lower + compile seconds of ``config`` summed over the trees of ``leaves`` leaves (None if there are none)."""
    times = [r["lower_compile_s"] for r in rows if r["config"] == config and r["leaves"] == leaves]
    return sum(times) if times else None


def evaluate_targets(
    rows: list[dict[str, Any]], configs: Sequence[Config], tt: str = TARGET_TREE, leaves: int = COMPILE_LEAVES
) -> list[dict[str, Any]]:
    """Every target of the issue, judged on tree ``tt`` (step, memory) and on the trees of ``leaves`` leaves
    (compile time); a target this run's trees cannot judge has ``passed = None``.
    """
    rows = [r for r in rows if "error" not in r]
    at = {(r["tree"], r["config"]): r for r in rows}
    targets = []
    for c in configs:
        row = at.get((tt, c.name))
        if c.library != "optclip":
            continue
        ratio = row["ratio"] if row else None
        if c.max_ratio is not None:
            targets.append(_target("step time / adam", tt, c.name, ratio, c.max_ratio))
        if c.fixed is not None:
            fixed = at.get((tt, c.fixed))
            limit = fixed["ratio"] + ADAPTIVE_SLACK if fixed else None
            targets.append(_target(f"step time / adam <= ({c.fixed}) + {ADAPTIVE_SLACK}", tt, c.name, ratio, limit))
        if c.vs is not None:
            other = at.get((tt, c.vs))
            vs_ratio = ratio / other["ratio"] if row and other else None
            targets.append(_target(f"step time / {c.vs}", tt, c.name, vs_ratio, VS_OPTAX_STEP))
            mine, theirs = _compile_total(rows, c.name, leaves), _compile_total(rows, c.vs, leaves)
            compile_ratio = mine / theirs if mine is not None and theirs else None
            where = f"{leaves} leaves"
            targets.append(_target(f"compile time / {c.vs}", where, c.name, compile_ratio, VS_OPTAX_COMPILE))
        base = at.get((tt, BASELINE))
        extra = None
        if row and base and row.get("temp_bytes") is not None and base.get("temp_bytes") is not None:
            extra = (row["temp_bytes"] - base["temp_bytes"]) / row["param_bytes"]
        targets.append(_target("extra temp bytes / param bytes", tt, c.name, extra, TEMP_SLACK))
    return targets


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


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _grid(title: str, at: dict, trees: list[str], configs: list[str], key: str, spec: str = ".2f") -> list[str]:
    """A markdown table of ``row[key]``: one line per config, one column per tree."""
    lines = ["", f"## {title}", "", "| config | " + " | ".join(trees) + " |", "|---|" + "---:|" * len(trees)]
    for c in configs:
        lines.append(f"| {c} | " + " | ".join(_fmt(at.get((t, c), {}).get(key), spec) for t in trees) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    meta, targets = result["meta"], result["targets"]
    rows = [r for r in result["rows"] if "error" not in r]
    errors = [r for r in result["rows"] if "error" in r]
    trees = list(dict.fromkeys(r["tree"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    at = {(r["tree"], r["config"]): r for r in rows}
    lines = [
        f"# optclip benchmark: {meta['tag']}",
        "",
        f"{meta['when']} on {meta['device']} ({meta['machine']}), {meta['threads']} threads, "
        f"load {meta['load_before'][0]:.2f} before / {meta['load_after'][0]:.2f} after (1-min average). "
        f"Median of {meta['repeats']} interleaved rounds after {meta['warmup']} warm-up. "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        f"Command: `{meta['command']}` (source {meta.get('source')}).",
        "",
        "## Targets",
        "",
        "| target | tree | config | measured | limit | |",
        "|---|---|---|---:|---:|---|",
    ]
    for t in targets:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["passed"]]
        lines.append(
            f"| {t['target']} | {t['tree']} | {t['config']} | {_fmt(t['measured'])} | {_fmt(t['limit'])} | {verdict} |"
        )
    lines += _grid(
        "Step time / plain adam (median of paired ratios; torch rows: / torch.Adam)", at, trees, configs, "ratio"
    )
    jax_configs = [c for c in configs if not c.startswith("torch.")]
    lines += _grid("Compile time, lower + compile (s)", at, trees, jax_configs, "lower_compile_s", ".1f")
    if any(c == "torch.clip_grad_norm_" for c in configs):
        lines += [
            "",
            "## Clip by global norm: torch (/ torch.Adam) against optclip and optax (/ adam)",
            "",
            "| tree | torch.clip_grad_norm_ | optclip.clip_by_global_norm | optax.clip_by_global_norm |",
            "|---|---:|---:|---:|",
        ]
        for t in trees:
            names = ("torch.clip_grad_norm_", "optclip.clip_by_global_norm", "optax.clip_by_global_norm")
            lines.append(f"| {t} | " + " | ".join(_fmt(at.get((t, c), {}).get("ratio"), ".2f") for c in names) + " |")
    for tree in trees:
        first = at[(tree, configs[0])]
        lines += [
            "",
            f"## {tree}: {first['params']:,} params in {first['leaves']} leaves ({_mb(first['param_bytes'])} MiB)",
            "",
            "| config | median ms | min | max | ratio | lower+compile s | temp MiB | output MiB | fusions | passes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in configs:
            r = at.get((tree, c))
            if r is None:
                continue
            lines.append(
                f"| {c} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['max_ms']:.2f} | {r['ratio']:.3f} | "
                f"{_fmt(r.get('lower_compile_s'), '.2f')} | {_mb(r.get('temp_bytes'))} | {_mb(r.get('output_bytes'))} "
                f"| {r.get('fusions', '-')} | {_fmt(r.get('passes'), '.1f')} |"
            )
    if errors:
        lines += ["", "## Failures", ""] + [f"- {r['tree']}, {r['config']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the target tree only (1e7 params, 10 leaves): ~1 min")
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="parameter counts of the synthetic trees")
    parser.add_argument("--leaves", default="10,100,1000", help="leaf counts of the synthetic trees")
    parser.add_argument("--no-models", action="store_true", help="leave out the Flax LSTM and transformer trees")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch even if it is importable")
    parser.add_argument("--only", default=None, help="regex: time only the matching configs (and the baseline)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--compile-repeats", type=int, default=1, help="compiles per config (the median is reported)")
    parser.add_argument("--target-tree", default=TARGET_TREE, help="the tree the step and memory targets are judged on")
    parser.add_argument("--compile-leaves", type=int, default=COMPILE_LEAVES, help="leaf count of the compile target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and markdown go")
    parser.add_argument("--tag", default=None, help="file name stem (default: quick-<backend> or full-<backend>)")
    parser.add_argument(
        "--report", type=Path, default=None, help="rewrite the markdown of this JSON result, run nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.leaves, args.no_models = "1e7", "10", True
    if args.repeats < 1 or args.warmup < 0 or args.compile_repeats < 1:
        parser.error("need --repeats >= 1, --warmup >= 0, --compile-repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report is not None:  # only rewrite the markdown of an earlier run
        result = json.loads(args.report.read_text())
        args.report.with_suffix(".md").write_text(markdown(result))
        return result
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    configs = [c for c in CONFIGS if c.available()]
    if args.only:
        configs = [c for c in configs if c.name == BASELINE or re.search(args.only, c.name)]
    missing = [c.name for c in CONFIGS if not c.available()]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch_device = None if args.no_torch else _torch_device()
    device = jax.devices()[0]
    tag = args.tag or f"{'quick' if args.quick else 'full'}-{jax.default_backend()}"
    meta = {
        "tag": tag,
        "command": command,
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
        "left_out": missing,
    }
    trees = [(n, leaves) for n in _parse_sizes(args.sizes) for leaves in _parse_sizes(args.leaves)]
    builders: list[Callable[[], _trees.Tree]] = [lambda n=n, k=k: _trees.synthetic(n, k, args.seed) for n, k in trees]
    if not args.no_models:
        builders += [_trees.lstm, _trees.transformer]
    _log(f"optclip benchmark on {meta['device']}, {threads} threads, torch: {torch_device}; left out: {missing}")
    rows: list[dict[str, Any]] = []
    for build in builders:
        tree = build()
        _log(f"{tree.name}: {tree.num_params:,} params in {tree.num_leaves} leaves")
        rows += bench_tree(tree, configs, args, torch_device, threads)
        gc.collect()
    meta["load_after"] = list(os.getloadavg())
    targets = evaluate_targets(rows, configs, args.target_tree, args.compile_leaves)
    result = {"meta": meta, "rows": rows, "targets": targets}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{tag}.md").write_text(markdown(result))
    for t in result["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[t["passed"]]
        print(f"{verdict}  {t['config']:42s} {t['target']:58s} {_fmt(t['measured'])} (limit {_fmt(t['limit'])})")
    print(f"wrote {args.out / tag}.json and .md")
    return result


if __name__ == "__main__":
    main()
