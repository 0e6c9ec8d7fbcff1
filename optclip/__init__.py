"""optclip: gradient clipping as composable ``optax`` transformations.

Every clip is an ``optax.GradientTransformation``: chain it before an optimizer, jit the step, and read what it did
with ``optclip.stats(state)``.
"""

from optclip._clipping import ClipState, adaptive_grad_clip, clip_by_global_norm, clip_by_leaf_norm, clip_by_value
from optclip._norms import global_norm
from optclip._rules import Constant, FromSchedule, ThresholdRule
from optclip._stats import ClipStats, stats

__version__ = "0.1.0"

__all__ = [
    "ClipState",
    "ClipStats",
    "Constant",
    "FromSchedule",
    "ThresholdRule",
    "adaptive_grad_clip",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "global_norm",
    "stats",
]
