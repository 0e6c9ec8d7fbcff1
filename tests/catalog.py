"""Every optclip transform and rule, plain, chained and wrapped: what the sharding and checkpoint checks run over.

Each entry builds a fresh ``optax.GradientTransformation`` that takes gradients shaped like ``PARAMS`` (and needs
``params`` in ``update``, for AGC). Thresholds are small so that the clips act on ``grads(step)``; warm-ups are short
so that the adaptive rules leave them within a few steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip

SHAPES = {"b": (8,), "w": (16, 8)}


def params() -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def grads(step: int) -> dict[str, jax.Array]:
    """Gradients whose scale changes from step to step (and spikes at step 5), so that adaptive rules move."""
    rng = np.random.default_rng(100 + step)
    scale = 30.0 if step == 5 else 1.0 + 0.3 * math.sin(step)
    return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in SHAPES.items()}


TRANSFORMS = {
    "clip_by_value": lambda: optclip.clip_by_value(0.5),
    "clip_by_value_bounds": lambda: optclip.clip_by_value(0.5, min_value=-0.2),
    "clip_by_leaf_norm": lambda: optclip.clip_by_leaf_norm(1.0),
    "clip_by_leaf_norm_ord1": lambda: optclip.clip_by_leaf_norm(3.0, ord=1),
    "clip_by_global_norm": lambda: optclip.clip_by_global_norm(4.0),
    "clip_by_global_norm_inf": lambda: optclip.clip_by_global_norm(1.0, ord=math.inf),
    "clip_by_global_norm_schedule": lambda: optclip.clip_by_global_norm(optax.linear_schedule(8.0, 2.0, 6)),
    "adaptive_grad_clip": lambda: optclip.adaptive_grad_clip(0.2),
    "percentile": lambda: optclip.clip_by_global_norm(optclip.percentile(50.0, history=8)),
    "zscore": lambda: optclip.clip_by_global_norm(optclip.zscore(z_thresh=1.0, warmup=3)),
    "ema_per_leaf": lambda: optclip.clip_by_leaf_norm(optclip.ema(warmup=2)),
    "quantile": lambda: optclip.clip_by_global_norm(optclip.quantile()),
    "autoclip": lambda: optclip.autoclip(history=8),
    "zclip": lambda: optclip.zclip(warmup=3),
    "adagc": lambda: optclip.adagc(warmup=2),
    "skip_nonfinite": lambda: optclip.skip_nonfinite(optax.sgd(0.1, momentum=0.9), max_consecutive=3),
    "skip_on_spike": lambda: optclip.skip_on_spike(optax.sgd(0.1, momentum=0.9), window=4),
    "chain": lambda: optax.chain(
        optclip.clip_by_leaf_norm(optclip.ema(warmup=2), name="leaf"),
        optclip.clip_by_global_norm(optclip.zscore(warmup=2), name="global"),
        optclip.adaptive_grad_clip(0.5),
        optax.adamw(1e-2),
    ),
    "wrapped": lambda: optclip.skip_nonfinite(
        optclip.skip_on_spike(optax.chain(optclip.autoclip(history=8), optax.sgd(0.1, momentum=0.9)), window=4)
    ),
    "multi_steps": lambda: optax.MultiSteps(
        optax.chain(optclip.clip_by_global_norm(optclip.percentile(history=4)), optax.adam(1e-2)), every_k_schedule=2
    ),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optclip.clip_by_global_norm)(max_norm=3.0),
}


def per_example_grads(step: int, batch: int = 16) -> dict[str, jax.Array]:
    """Per-example gradients (batch axis first) with example norms spread over two orders of magnitude."""
    rng = np.random.default_rng(200 + step)
    scales = np.exp(rng.normal(size=batch) * 1.5)
    return {
        k: jnp.asarray(rng.normal(size=(batch, *s)) * scales.reshape((batch,) + (1,) * len(s)), jnp.float32)
        for k, s in SHAPES.items()
    }


# One of each public transform, each rule inside one of them, for the sharding checks. Compiling every variant for
# every layout would cost minutes; the variants differ in scalar arithmetic, not in how they meet a sharded array.
SHARDING = (
    "clip_by_value",
    "ema_per_leaf",  # clip_by_leaf_norm with a per-leaf rule
    "quantile",  # clip_by_global_norm with a rule
    "adaptive_grad_clip",
    "autoclip",
    "zclip",
    "adagc",
    "skip_nonfinite",
    "skip_on_spike",
)

PER_EXAMPLE = {
    "clip_per_example_per_leaf": lambda: optclip.clip_per_example(2.0, mode="per_leaf", noise_multiplier=1.0),
    "clip_per_example_quantile": lambda: optclip.clip_per_example(optclip.quantile(), noise_multiplier=0.5, seed=3),
}
