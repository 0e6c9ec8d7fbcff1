"""The smallest optclip run: a linear model whose data has a few exploding batches, clipped by global norm.

Every step prints the clip statistics that ``optclip.stats`` reads from the optimizer state.

    python examples/quickstart.py --steps 20
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import optclip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--max-norm", type=float, default=1.0, help="global-norm threshold")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for the data")
    args = parser.parse_args()

    key_w, key_x = jax.random.split(jax.random.PRNGKey(args.seed))
    true_w = jax.random.normal(key_w, (8,))
    xs = jax.random.normal(key_x, (args.steps, 32, 8))
    xs = xs.at[::5].multiply(100.0)  # every fifth batch is an outlier: its gradient is 1e4 times larger

    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    tx = optax.chain(optclip.clip_by_global_norm(args.max_norm), optax.sgd(0.1))
    opt_state = tx.init(params)

    def loss_fn(p, x):
        return jnp.mean((x @ p["w"] + p["b"] - x @ true_w) ** 2)

    @jax.jit
    def step(p, state, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    print(f"{'step':>4} {'loss':>12} {'norm':>12} {'threshold':>9} {'scale':>9} {'clipped':>7}")
    for t in range(args.steps):
        params, opt_state, loss = step(params, opt_state, xs[t])
        s = optclip.stats(opt_state)
        print(
            f"{t:4d} {float(loss):12.4g} {float(s['clip_by_global_norm/norm']):12.4g} "
            f"{float(s['clip_by_global_norm/threshold']):9.3g} {float(s['clip_by_global_norm/scale']):9.3g} "
            f"{int(s['clip_by_global_norm/clipped']):7d}"
        )
    print(f"weight error |w - w*| = {float(jnp.linalg.norm(params['w'] - true_w)):.4f}")


if __name__ == "__main__":
    main()
