"""The parameter trees the benchmark runs on: synthetic float32 trees of a given size and leaf count, and the
parameter trees of a Flax LSTM language model and of a small Flax transformer.

Every tree comes with a gradient tree of the same structure whose global 2-norm is ``GRAD_NORM``, so that the
thresholds in ``run.py`` make every norm clip actually clip (the step costs the same either way: a clip always
multiplies by its scale, but a clip that never fires would make the benchmark look like it tests nothing).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

GRAD_NORM = 10.0
PARAM_STD = 0.02


class Tree(NamedTuple):
    """A named parameter tree (NumPy float32 leaves: each configuration makes its own device copy)."""

    name: str
    params: dict[str, Any]
    grads: dict[str, Any]

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    @property
    def num_leaves(self) -> int:
        return len(jax.tree.leaves(self.params))

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.params))


def _matrix_shape(size: int) -> tuple[int, int]:
    """A 2-D shape of exactly ``size`` entries, as square as the divisors allow: a kernel with output units for AGC."""
    rows = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    return size // rows, rows


def _filled(shapes: Any, seed: int) -> tuple[Any, Any]:
    """Random parameters and gradients (global norm ``GRAD_NORM``) for a tree of shapes."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (PARAM_STD * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    grads = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: (g * np.float32(GRAD_NORM / norm)).astype(np.float32), grads)
    return params, grads


def synthetic(num_params: int, num_leaves: int, seed: int = 0) -> Tree:
    """``num_leaves`` 2-D float32 leaves of ``num_params // num_leaves`` entries each."""
    if num_leaves < 1 or num_params < num_leaves:
        raise ValueError(f"need 1 <= num_leaves <= num_params, got num_params={num_params}, num_leaves={num_leaves}")
    shape = _matrix_shape(num_params // num_leaves)
    width = len(str(num_leaves - 1))
    shapes = {f"layer_{i:0{width}d}": jax.ShapeDtypeStruct(shape, np.float32) for i in range(num_leaves)}
    params, grads = _filled(shapes, seed)
    return Tree(f"{_short(num_params)}/{num_leaves}", params, grads)


def named(name: str, seed: int = 0) -> Tree:
    """A tree by name: ``"<params>/<leaves>"`` (``synthetic``, e.g. ``1e6/1000``), ``"transformer<depth>"`` (e.g.
    ``transformer12``: 198 leaves of mixed shapes, as a model has them) or ``"lstm"``."""
    if name.startswith("transformer"):
        return transformer(depth=int(name.removeprefix("transformer") or 4), seed=seed)
    if name == "lstm":
        return lstm(seed=seed)
    if name.count("/") != 1:
        raise ValueError(f"tree name {name!r}: expected <params>/<leaves> (1e6/1000), transformer<depth> or lstm")
    params, leaves = name.split("/")
    return synthetic(int(float(params)), int(leaves), seed)


def _short(n: int) -> str:
    exponent = round(math.log10(n)) if n > 0 else 0
    return f"1e{exponent}" if n == 10**exponent else str(n)


def _model_tree(name: str, module: Any, example: Any, seed: int) -> Tree:
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), example)["params"]
    params, grads = _filled(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), shapes), seed)
    return Tree(name, params, grads)


def lstm(vocab: int = 10_000, embed: int = 256, hidden: int = 512, layers: int = 2, seed: int = 0) -> Tree:
    """A word-level LSTM language model (embedding, stacked ``OptimizedLSTMCell`` layers, softmax head)."""
    import flax.linen as nn

    class LSTMLanguageModel(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(vocab, embed)(tokens)
            for _ in range(layers):
                x = nn.RNN(nn.OptimizedLSTMCell(hidden))(x)
            return nn.Dense(vocab)(x)

    example = jax.ShapeDtypeStruct((1, 8), np.int32)
    return _model_tree(f"LSTM {layers}x{hidden}", LSTMLanguageModel(), example, seed)


def transformer(
    vocab: int = 8192, width: int = 256, depth: int = 4, heads: int = 4, mlp: int = 1024, seq: int = 128, seed: int = 0
) -> Tree:
    """A small pre-norm decoder-style transformer (learned positions, attention + GELU MLP blocks, untied head)."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=heads)(y, y)
            y = nn.Dense(mlp)(nn.LayerNorm()(x))
            return x + nn.Dense(width)(nn.gelu(y))

    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(vocab, width)(tokens) + self.param("positions", nn.initializers.normal(0.02), (seq, width))
            for _ in range(depth):
                x = Block()(x)
            return nn.Dense(vocab)(nn.LayerNorm()(x))

    example = jax.ShapeDtypeStruct((1, seq), np.int32)
    return _model_tree(f"Transformer {depth}x{width}", Transformer(), example, seed)
