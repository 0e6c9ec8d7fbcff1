"""Shared test settings: hypothesis profiles sized for CI's two cores."""

import os

from hypothesis import HealthCheck, settings

# Each example compiles the transforms for a new tree shape (about half a second): 25 keep the suite within its budget.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
