"""Shared test settings, sized for CI's two cores: hypothesis profiles and a compilation cache per run."""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

# Each example compiles the transforms for a new tree shape (about half a second): 25 keep the suite within its budget.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    # Many tests compile the same small programs (a fresh jit of the same transform on the same tree): a compilation
    # cache shared by this run's xdist workers compiles each once. It lives in this run's temporary directory (the
    # workers' common parent), so no run reads another's entries; pytest removes it a few runs later.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    jax.config.update("jax_compilation_cache_dir", str(shared / "jax-compilation-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
