"""Bad arguments fail at construction with a ValueError naming the argument and the value (optclip/_validation.py)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optclip
from optclip import _validation

THRESHOLDS = [
    (optclip.clip_by_global_norm, "max_norm"),
    (optclip.clip_by_leaf_norm, "max_norm"),
    (optclip.clip_by_value, "max_value"),
    (optclip.adaptive_grad_clip, "clipping"),
]


def _raises(arg, value):
    """``pytest.raises(ValueError)`` whose message names ``arg`` and shows ``value``."""
    return pytest.raises(ValueError, match=rf"{arg}\b.*{re.escape(repr(value))}")


@pytest.mark.parametrize("value", [-1.0, -1e-30, math.nan, -math.inf, np.float32(-2.0), jnp.float32(math.nan)])
@pytest.mark.parametrize(("factory", "arg"), THRESHOLDS)
def test_negative_or_nan_threshold(factory, arg, value):
    with _raises(arg, value):
        factory(value)


@pytest.mark.parametrize("value", ["1.0", b"1", True, None, [1.0], jnp.ones(2)])
@pytest.mark.parametrize(("factory", "arg"), THRESHOLDS)
def test_threshold_that_is_not_a_number(factory, arg, value):
    with pytest.raises(ValueError, match=rf"{arg}\b"):
        factory(value)


@pytest.mark.parametrize("value", [0.0, 0, 1e-30, 1.5, math.inf, np.float32(2.0), jnp.float32(2.0), jnp.array(3)])
@pytest.mark.parametrize(("factory", "arg"), THRESHOLDS)
def test_valid_thresholds_including_zero(factory, arg, value):
    tx = factory(value)
    grads = {"w": jnp.array([3.0, -4.0])}
    updates, _ = tx.update(grads, tx.init(grads), grads)
    assert updates["w"].shape == (2,)
    if value == 0:
        np.testing.assert_array_equal(updates["w"], 0.0)  # 0 is valid: the update becomes zero


def test_min_value_above_max_value():
    with pytest.raises(ValueError, match=r"min_value.*max_value.*min_value=2\.0 > max_value=1\.0"):
        optclip.clip_by_value(1.0, min_value=2.0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "0"])
def test_non_finite_min_value(value):
    with _raises("min_value", value):
        optclip.clip_by_value(1.0, min_value=value)


def test_asymmetric_bounds_may_both_be_negative():
    tx = optclip.clip_by_value(-1.0, min_value=-2.0)
    updates, _ = tx.update({"w": jnp.array([-5.0, 0.0])}, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_array_equal(updates["w"], [-2.0, -1.0])


@pytest.mark.parametrize("ord", [0, 3, -1, 2.5, -math.inf, math.nan, "fro", "2", None, True])
@pytest.mark.parametrize("factory", [optclip.clip_by_global_norm, optclip.clip_by_leaf_norm])
def test_ord_outside_1_2_inf(factory, ord):
    with _raises("ord", ord):
        factory(1.0, ord=ord)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 1.0, 2.0, np.float32(np.inf), jnp.array(2)])
def test_ord_1_2_inf_in_any_numeric_type(ord):
    _validation.check_ord(ord)
    optclip.clip_by_global_norm(1.0, ord=ord)


def test_a_traced_ord_passes_construction():
    # optax.inject_hyperparams hands ord over as a tracer under jit; it cannot be checked there.
    jax.jit(lambda o: _validation.check_ord(o))(jnp.float32(2.0))


@pytest.mark.parametrize("eps", [-1e-3, math.nan, -math.inf, "1e-3"])
def test_negative_or_nan_eps(eps):
    with _raises("eps", eps):
        optclip.adaptive_grad_clip(0.01, eps=eps)


def test_agc_refuses_an_adaptive_rule():
    class Rule:
        def init(self):
            return ()

        def update(self, norm, state, count):
            return norm, state

        def stats(self, state):
            return {}

    with pytest.raises(ValueError, match="clipping must be a number or a schedule"):
        optclip.adaptive_grad_clip(Rule())


@pytest.mark.parametrize("name", ["", "a/b", "with space", "ümlaut", 3, None, ("a",)])
@pytest.mark.parametrize("factory", [f for f, _ in THRESHOLDS])
def test_bad_name(factory, name):
    with _raises("name", name):
        factory(1.0, name=name)


@pytest.mark.parametrize("name", ["clip", "enc.layer_0-grad", "A1"])
def test_good_names(name):
    _validation.check_name(name)


def test_schedules_are_not_checked_at_construction():
    # A schedule's values are known only at run time: they cannot raise, a negative one acts as 0 (test_clipping).
    for factory, _ in THRESHOLDS:
        factory(lambda count: -1.0)
