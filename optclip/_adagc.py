"""AdaGC (Wang et al. 2025): a global clip during warm-up, then every tensor clipped to its own EMA.

Two scopes in one transform: the warm-up clips the global norm, afterwards each leaf has its own threshold from
``optclip.ema``. The global norm comes from the per-leaf norms, so the gradients are read once.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import optax

from optclip import _norms
from optclip._adaptive import EMA
from optclip._clipping import (
    ClipState,
    Slots,
    apply,
    capped_ratio,
    check_float_leaves,
    clip_by_leaf_norm,
    leafwise_rule_metrics,
    leafwise_rule_update,
    multipliers_per_leaf,
    next_count,
    norms_for_ord,
)
from optclip._rules import non_negative
from optclip._stats import make_stats


def adagc(
    factor: float = 1.05,
    decay: float = 0.98,
    warmup: int = 100,
    warmup_max_norm: float | None = 1.0,
    *,
    ord: float = 2,
    stats: str = "basic",
    name: str = "adagc",
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGC as in the paper: a global clip during warm-up, then every tensor clipped to its own EMA.

    For the first ``warmup`` steps with a finite gradient the whole gradient is clipped to the global norm
    ``warmup_max_norm`` (the paper's :math:`\lambda_{abs}`), and each tensor :math:`i` tracks
    :math:`\gamma_i = \min(\gamma_i, \|\tilde g_i\|)`, the norm of its gradient after that global clip (from
    :math:`\gamma_i = \infty`). Afterwards, per tensor, with :math:`\lambda` = ``factor`` and :math:`\beta` = ``decay``:

    .. math:: g_i \leftarrow \min\Big(1, \frac{\lambda\gamma_i}{\|g_i\|}\Big) g_i, \qquad
              \gamma_i \leftarrow \beta\gamma_i + (1 - \beta)\,\|g_i\|_{\text{clipped}}

    (Wang et al. 2025, "AdaGC: Improving Training Stability for Large Language Model Pretraining",
    arXiv:2502.11034, Algorithm 1). Each tensor is one leaf of the gradient tree. The per-tensor rule is
    ``optclip.ema``, whose docstring explains the zero-norm guard; a tensor still in its own warm-up when the global
    one ends (it has not seen a positive norm yet) is clipped to ``warmup_max_norm`` on its own until it leaves it.

    A step whose global norm is not finite passes through unchanged during warm-up and neither counts towards it
    nor moves any :math:`\gamma` (every tensor sees it as non-finite, so all tensors leave warm-up together);
    afterwards a tensor with a NaN or Inf keeps its :math:`\gamma` and passes through unchanged, as in
    ``clip_by_leaf_norm``.

    Args:
      factor: :math:`\lambda \ge 0` (the paper's :math:`\lambda_{rel}`).
      decay: :math:`\beta`, in (0, 1).
      warmup: the number of warm-up steps with a finite gradient, >= 0.
      warmup_max_norm: the global threshold during warm-up, >= 0, or ``None`` for none.
      ord: the norm, 1, 2 or ``inf``.
      stats: ``"basic"`` (default): those of the global clip during warm-up and of ``clip_by_leaf_norm``
        afterwards (largest leaf ``norm``, smallest ``threshold``, fraction ``clipped``), plus ``gamma``, the mean of
        the :math:`\gamma_i` (``inf`` while a tensor has not seen a positive norm); ``"none"`` records nothing.
      name: the prefix of its statistics in ``optclip.stats``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with the state of ``clip_by_leaf_norm``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.adagc(warmup=1)
      >>> state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
      >>> _, state = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, state)  # global clip to 1
      >>> updates, state = tx.update({"a": jnp.array([30.0]), "b": jnp.array([4.0])}, state)
      >>> print(round(float(updates["a"][0]), 4), round(float(updates["b"][0]), 4))  # gammas 0.6, 0.8 after the clip
      0.63 0.84
    """
    rule = EMA(factor, decay, warmup, warmup_max_norm)
    if stats == "full":
        raise ValueError(f"adagc takes stats='basic' or 'none', got {stats!r}")
    per_leaf_clip = clip_by_leaf_norm(rule, ord=ord, stats=stats, name=name)  # validates; its state is adagc's
    cap = non_negative(jnp.asarray(jnp.inf if warmup_max_norm is None else warmup_max_norm, jnp.float32))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, optax.OptState]:
        state = cast(ClipState, state)
        del params
        check_float_leaves(updates, name)
        slots = Slots.of(updates)
        leaves = [slots.values[i] for i in slots.present]

        def measure(o: float) -> tuple[_norms.NormParts, _norms.NormParts]:
            measured = _norms.leaf_norms_of(leaves, o, extra_args)
            return measured.flat(), measured.total()

        parts, whole = norms_for_ord(ord, measure)
        size = len(slots.values)
        present = jnp.asarray(slots.present, jnp.int32)
        # The global warm-up lasts while any tensor's rule is in its warm-up: they all count the same finite steps.
        warming = jnp.any(jax.vmap(rule.in_warmup)(state.rule_state)) if size else jnp.bool_(False)
        global_scale = capped_ratio(whole, cap)
        # During warm-up the rule sees each tensor's norm after the global clip, or NaN for all on a non-finite step.
        seen_norm = jnp.where(warming, jnp.where(jnp.isfinite(whole.value()), global_scale.value, jnp.nan), 1.0)
        leaf_values = parts.value()
        norms = jnp.full((size,), jnp.nan, jnp.float32).at[present].set(leaf_values)
        thresholds, rule_state = leafwise_rule_update(rule, norms * seen_norm, state.rule_state, state.count)

        # The formula once, over the vector of leaves; each leaf reads its row.
        present_thresholds = thresholds[present]
        leaf_scale = capped_ratio(parts, present_thresholds)
        multipliers = jnp.where(warming, global_scale.multipliers()[:, None], leaf_scale.multipliers())
        rows = multipliers_per_leaf(multipliers, state.count, [()] * len(leaves))
        clipped = [apply(x, row) for x, row in zip(leaves, rows)]

        def pick(global_value: Any, leaf_value: Any) -> Any:
            return jnp.where(warming, global_value, leaf_value)

        leaf_after = jnp.where(leaf_scale.clipped, present_thresholds, leaf_values)
        metrics = {
            "norm": pick(whole.value(), jnp.max(leaf_values, initial=0.0)),
            "threshold": pick(cap, jnp.min(present_thresholds, initial=jnp.inf)),
            "scale": pick(global_scale.value, jnp.min(leaf_scale.value, initial=1.0)),
            "norm_after": pick(jnp.where(global_scale.clipped, cap, whole.value()), jnp.max(leaf_after, initial=0.0)),
            "clipped": pick(global_scale.clipped, jnp.mean(leaf_scale.clipped) if leaves else 0.0),
            **leafwise_rule_metrics(rule, rule_state, size),
        }
        new_state = ClipState(next_count(state.count), rule_state, make_stats(name, metrics, stats))
        return slots.rebuilt(clipped), new_state

    return optax.GradientTransformationExtraArgs(per_leaf_clip.init, update_fn)
