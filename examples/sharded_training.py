"""Clipped, guarded training with sharded parameters: FSDP and tensor parallelism on a (data, model) mesh.

On a machine without accelerators this simulates the devices on the CPU (``--devices``, 8 by default): JAX's own
sharding does all the communication, and optclip's global norm over sharded gradients is the norm of the whole
model, each shard counted once. The same script runs unchanged on GPUs/TPUs, and on several hosts with
``--multi-host`` (one process per host, started by your cluster launcher, which ``jax.distributed.initialize``
reads).

    python examples/sharded_training.py --quick
    python examples/sharded_training.py --layout tensor_parallel --steps 300

Each step: a global batch split over "data", gradients as sharded as the parameters, then
``skip_nonfinite(chain(clip_by_global_norm, adamw))``. Every tenth step prints the loss and the clip statistics.
"""

from __future__ import annotations

import argparse
import itertools
import os


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--devices", type=int, default=8, help="simulated CPU devices, a power of two (ignored with accelerators)"
    )
    parser.add_argument(
        "--layout", choices=["fsdp", "tensor_parallel", "fsdp_tp", "replicated"], default="fsdp_tp", help="sharding"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--max-norm", type=float, default=1.0, help="global-norm threshold")
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--quick", action="store_true", help="20 steps: a smoke run")
    parser.add_argument("--multi-host", action="store_true", help="call jax.distributed.initialize() first")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must happen before JAX starts: the number of host devices is fixed then. Only the CPU platform reads it.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optclip  # noqa: E402

SIZES = (64, 256, 256, 8)


def layer_specs(layout: str) -> dict[str, P]:
    """How each kernel and bias is split: FSDP over "data" on the input dim, tensor parallel over "model"."""
    return {
        "replicated": {"w": P(), "b": P()},
        "fsdp": {"w": P("data", None), "b": P("data")},
        "tensor_parallel": {"w": P(None, "model"), "b": P("model")},
        "fsdp_tp": {"w": P("data", "model"), "b": P("model")},
    }[layout]


def init_params(key: jax.Array, mesh: Mesh, layout: str) -> list[dict[str, jax.Array]]:
    specs = layer_specs(layout)
    params = []
    for k, (m, n) in zip(jax.random.split(key, len(SIZES) - 1), itertools.pairwise(SIZES)):
        layer = {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        params.append({name: jax.device_put(x, NamedSharding(mesh, specs[name])) for name, x in layer.items()})
    return params


def loss_fn(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
    return jnp.mean((x @ params[-1]["w"] + params[-1]["b"] - y) ** 2)


def local_batch(rng: np.random.Generator, teacher: np.ndarray, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's share of the global batch (all of it on one host)."""
    size = global_batch // jax.process_count()
    x = rng.normal(size=(size, SIZES[0])).astype(np.float32)
    y = np.tanh(x @ teacher).astype(np.float32)
    if rng.random() < 0.05:  # an occasional outlier batch: its gradient is much larger, and gets clipped
        x *= 30.0
    return x, y


def main(args: argparse.Namespace) -> None:
    if args.multi_host:
        jax.distributed.initialize()  # coordinator address, process count and id come from the cluster's env
    steps = 20 if args.quick else args.steps
    devices = np.asarray(jax.devices())
    model_axis = 2 if devices.size % 2 == 0 and devices.size > 1 else 1
    mesh = Mesh(devices.reshape(devices.size // model_axis, model_axis), ("data", "model"))
    batch_sharding = NamedSharding(mesh, P("data"))

    params = init_params(jax.random.PRNGKey(args.seed), mesh, args.layout)
    tx = optclip.skip_nonfinite(optax.chain(optclip.clip_by_global_norm(args.max_norm), optax.adamw(1e-3)))
    opt_state = tx.init(params)  # Adam's moments follow the parameters' sharding

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)  # grads come out sharded like params
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    if jax.process_index() == 0:
        print(f"{devices.size} devices ({devices[0].platform}), mesh {dict(mesh.shape)}, layout {args.layout}")
        for name, spec in layer_specs(args.layout).items():
            print(f"  {name}: {spec}, e.g. shard of layer 0: {params[0][name].addressable_shards[0].data.shape}")
        print(f"{'step':>5} {'loss':>10} {'norm':>10} {'clipped':>8} {'skipped':>8}")

    rng = np.random.default_rng(args.seed + jax.process_index())
    teacher = np.random.default_rng(args.seed).normal(size=(SIZES[0], SIZES[-1])) / np.sqrt(SIZES[0])
    for t in range(steps):
        x, y = (
            jax.make_array_from_process_local_data(batch_sharding, a) for a in local_batch(rng, teacher, args.batch)
        )
        params, opt_state, loss = train_step(params, opt_state, x, y)
        if (t % 10 == 0 or t == steps - 1) and jax.process_index() == 0:
            s = optclip.stats(opt_state)
            print(
                f"{t:5d} {float(loss):10.4f} {float(s['clip_by_global_norm/norm']):10.3f} "
                f"{int(s['clip_by_global_norm/clipped']):8d} {int(s['skip_nonfinite/total_skipped']):8d}"
            )
    specs = layer_specs(args.layout)
    kept = all(
        layer[name].sharding.is_equivalent_to(NamedSharding(mesh, specs[name]), layer[name].ndim)
        for layer in params
        for name in specs
    )
    if jax.process_index() == 0:
        print(f"parameters kept their sharding: {kept}")


if __name__ == "__main__":
    main(ARGS)
