"""optclip: gradient clipping as composable ``optax`` transformations.

Every clip is an ``optax.GradientTransformation``: chain it before an optimizer, jit the step, and read what it did
with ``optclip.stats(state)``.
"""

from optclip._adagc import adagc
from optclip._adaptive import autoclip, ema, percentile, quantile, zclip, zscore
from optclip._clipping import ClipState, adaptive_grad_clip, clip_by_global_norm, clip_by_leaf_norm, clip_by_value
from optclip._guards import skip_nonfinite, skip_on_spike
from optclip._monitor import MonitorState, monitor, suggest_threshold
from optclip._norms import global_norm
from optclip._per_example import clip_per_example
from optclip._rules import Constant, FromSchedule, ThresholdRule
from optclip._stats import ClipStats, Culprit, host_stats, stats

__version__ = "0.1.0"

__all__ = [
    "ClipState",
    "ClipStats",
    "Constant",
    "Culprit",
    "FromSchedule",
    "MonitorState",
    "ThresholdRule",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "clip_per_example",
    "ema",
    "global_norm",
    "host_stats",
    "monitor",
    "percentile",
    "quantile",
    "skip_nonfinite",
    "skip_on_spike",
    "stats",
    "suggest_threshold",
    "zclip",
    "zscore",
]
