"""Float64 NumPy references the tests compare optclip against (written from the formulas, not from optclip)."""

from __future__ import annotations

import numpy as np

INF = np.inf


def as64(x) -> np.ndarray:
    """Any float array (bf16 included, through ml_dtypes) as float64."""
    return np.asarray(x, np.float64)


def leaves64(tree) -> list[np.ndarray]:
    import jax

    return [as64(x) for x in jax.tree.leaves(tree)]


def norm64(arrays, ord=2, axis=None) -> np.ndarray:
    """The norm over ``axis`` of every array together (``axis=None``: all entries), in float64."""
    if ord == INF:
        return np.max([np.max(np.abs(a), axis=axis, initial=0.0) for a in arrays], axis=0)
    total = sum(np.sum(np.abs(a) ** ord, axis=axis) for a in arrays)
    return total ** (1.0 / ord)


def scale64(norm, threshold) -> np.ndarray:
    """``min(1, threshold / norm)``, 1 at a zero norm, 0 for a zero threshold."""
    norm = np.asarray(norm, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm > threshold, threshold / np.where(norm > 0, norm, 1.0), 1.0)


def clip_global64(arrays, threshold, ord=2) -> list[np.ndarray]:
    scale = scale64(norm64(arrays, ord), threshold)
    return [a * scale for a in arrays]


def clip_leaf64(arrays, threshold, ord=2) -> list[np.ndarray]:
    return [a * scale64(norm64([a], ord), threshold) for a in arrays]


def unit_axes(rank: int) -> tuple[int, ...] | None:
    """AGC's units (references/algorithms.md): rank 0-1 whole; 2-3 reduce axis 0; 4-5 all axes but the last."""
    return None if rank <= 1 else (0,) if rank <= 3 else tuple(range(rank - 1))


def agc64(grads, params, clipping, eps=1e-3) -> list[np.ndarray]:
    out = []
    for g, p in zip(grads, params):
        axis = unit_axes(g.ndim)
        g_norm = np.sqrt(np.sum(g * g, axis=axis, keepdims=True))
        p_norm = np.sqrt(np.sum(p * p, axis=axis, keepdims=True))
        out.append(g * scale64(g_norm, clipping * np.maximum(p_norm, eps)))
    return out


def factories() -> dict:
    """The four transforms by name (imported late: this module is also the reference for optclip's own tests).

    ``clip_by_value`` records all five clip statistics only at ``stats="full"`` (its default keeps the norm and the
    bound); the shared tests check all five, so they get that level.
    """
    import functools

    import optclip

    return {
        "clip_by_global_norm": optclip.clip_by_global_norm,
        "clip_by_leaf_norm": optclip.clip_by_leaf_norm,
        "clip_by_value": functools.wraps(optclip.clip_by_value)(functools.partial(optclip.clip_by_value, stats="full")),
        "adaptive_grad_clip": optclip.adaptive_grad_clip,
    }


def expected64(kind: str, grads, threshold, params=None) -> list[np.ndarray]:
    """Each transform's float64 formula, in the tree's leaf order; AGC's ``params`` default to ones."""
    leaves = leaves64(grads)
    if kind == "clip_by_global_norm":
        return clip_global64(leaves, threshold)
    if kind == "clip_by_leaf_norm":
        return clip_leaf64(leaves, threshold)
    if kind == "clip_by_value":
        return [np.clip(x, -threshold, threshold) for x in leaves]
    params = leaves64(params) if params is not None else [np.ones_like(x) for x in leaves]
    return agc64(leaves, params, threshold)
