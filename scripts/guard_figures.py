"""The figures issue 4 reports for the guards: false skips of skip_on_spike on clean runs, and what each guard costs.

    python scripts/guard_figures.py                 # both, 5 seeds of 2,000 clean steps
    python scripts/guard_figures.py --quick         # 1 seed, 500 steps, fewer timing repeats

False skips: an MLP classifier (32 -> 64 -> 10, tanh, Adam 1e-3, batch 64, fresh synthetic batches every step)
trained for 2,000 steps with ``skip_on_spike`` at its defaults (k=6, window=128, warmup=64), watching the gradient
norm and, separately, the loss; nothing is injected, so every skip is a false one. A second pass injects gradients
x1e3 at 20 random steps and counts how many are caught.

Cost: the median time of one jitted step (after warm-up) of Adam alone and of each guard around it, on whatever
device JAX picks, for a 1M-parameter MLP.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip


def _mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)} for k, m, n in zip(keys, sizes, sizes[1:])
    ]


def _mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _loss(params, x, y):
    logits = _mlp_apply(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def spike_run(seed: int, steps: int, *, watch_loss: bool, spikes: int = 0) -> dict:
    """Train with skip_on_spike (defaults); return the skipped steps and the injected ones."""
    key = jax.random.PRNGKey(seed)
    k_init, k_teacher, k_data = jax.random.split(key, 3)
    params = _mlp_init(k_init, [32, 64, 10])
    teacher = jax.random.normal(k_teacher, (32, 10))
    tx = optclip.skip_on_spike(optax.adam(1e-3))
    rng = np.random.default_rng(seed)
    injected = np.sort(rng.choice(np.arange(200, steps), spikes, replace=False)) if spikes else np.array([], int)
    factors = np.ones(steps, np.float32)
    factors[injected] = 1e3

    def step(carry, inputs):
        params, state = carry
        key, factor = inputs
        x = jax.random.normal(key, (64, 32))
        y = jnp.argmax(x @ teacher + 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (64, 10)), axis=-1)
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        grads = jax.tree.map(lambda g: g * factor, grads)
        extra = {"loss": loss * factor} if watch_loss else {}
        updates, state = tx.update(grads, state, params, **extra)
        stats = optclip.stats(state)
        return (optax.apply_updates(params, updates), state), (stats["skip_on_spike/skipped"], loss)

    keys = jax.random.split(k_data, steps)
    run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), (keys, jnp.asarray(factors)))[1])
    skipped, losses = run(params)
    skipped_steps = np.flatnonzero(np.asarray(skipped))
    return {
        "skipped": skipped_steps.tolist(),
        "false_skips": sorted(set(skipped_steps.tolist()) - set(injected.tolist())),
        "injected": injected.tolist(),
        "caught": sorted(set(injected.tolist()) & set(skipped_steps.tolist())),
        "first_loss": float(losses[0]),
        "last_loss": float(np.mean(np.asarray(losses)[-100:])),
    }


def _median_step_time(tx, params, grads, repeats):
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=jnp.float32(1.0)))
    for _ in range(3):
        jax.block_until_ready(step(grads, state, params))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        updates, state = step(grads, state, params)
        jax.block_until_ready((updates, state))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def guard_costs(repeats: int) -> dict:
    params = _mlp_init(jax.random.PRNGKey(0), [512, 1024, 512, 10])  # about 1.05M parameters
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    inner = optax.adam(1e-3)
    guards = {
        "adam": optax.with_extra_args_support(inner),
        "skip_nonfinite(skip)": optclip.skip_nonfinite(inner),
        "skip_nonfinite(zero)": optclip.skip_nonfinite(inner, policy="zero"),
        "skip_nonfinite(raise)": optclip.skip_nonfinite(inner, policy="raise"),
        "skip_on_spike": optclip.skip_on_spike(inner),
    }
    times = {name: _median_step_time(tx, params, grads, repeats) for name, tx in guards.items()}
    base = times["adam"]
    return {
        "device": str(jax.devices()[0]),
        "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
        "median_step_us": {name: round(t * 1e6, 1) for name, t in times.items()},
        "overhead_vs_adam": {name: round(t / base - 1, 3) for name, t in times.items() if name != "adam"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed of 500 steps, fewer timing repeats")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = parser.parse_args()
    steps, seeds, repeats = (500, 1, 20) if args.quick else (args.steps, args.seeds, 200)

    figures = {"steps": steps, "seeds": seeds, "false_skips": {}, "spikes_caught": {}}
    for watch in ("grad_norm", "loss"):
        clean = [spike_run(s, steps, watch_loss=watch == "loss") for s in range(seeds)]
        spiked = [spike_run(s, steps, watch_loss=watch == "loss", spikes=20) for s in range(seeds)]
        figures["false_skips"][watch] = [len(r["false_skips"]) for r in clean]
        figures["false_skip_steps"] = {**figures.get("false_skip_steps", {}), watch: [r["false_skips"] for r in clean]}
        figures["spikes_caught"][watch] = [f"{len(r['caught'])}/{len(r['injected'])}" for r in spiked]
        figures.setdefault("loss_first_last", [(round(r["first_loss"], 3), round(r["last_loss"], 3)) for r in clean])
    figures["cost"] = guard_costs(repeats)
    print(json.dumps(figures, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
