"""float64 gradients (``jax_enable_x64``): norms accumulate and scale in float64 in every scope.

x64 is a process-wide switch read at start-up, so the checks run in a subprocess of their own.
"""

import json
import subprocess
import sys
import textwrap

CHECKS = textwrap.dedent(
    """
    import json, math
    import jax, jax.numpy as jnp, numpy as np, optclip

    assert jax.config.jax_enable_x64
    # 1 + 1e-9 is 1 in float32: a float32 norm or scale cannot tell these gradients from [1, 0].
    g = {"w": jnp.array([[1.0, 3.0], [1e-9, 4.0]], jnp.float64), "b": jnp.array([2.0, 1e-12], jnp.float64)}
    params = {"w": jnp.ones((2, 2), jnp.float64), "b": jnp.ones(2, jnp.float64)}
    out = {}
    for name, tx in {
        "global": optclip.clip_by_global_norm(1.0),
        "leaf": optclip.clip_by_leaf_norm(1.0),
        "unit": optclip.adaptive_grad_clip(0.5, eps=1e-3),
    }.items():
        updates, state = jax.jit(tx.update)(g, tx.init(params), params)
        out[name] = {
            "dtypes": sorted({str(u.dtype) for u in jax.tree.leaves(updates)}),
            "w": np.asarray(updates["w"]).tolist(),
            "b": np.asarray(updates["b"]).tolist(),
        }
    out["norm"] = float(optclip.global_norm(g))
    print(json.dumps(out))
    """
)


def _run() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHECKS],
        capture_output=True,
        text=True,
        check=False,
        env={"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu", "PATH": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_float64_gradients_are_measured_and_clipped_in_float64():
    import numpy as np

    w = np.array([[1.0, 3.0], [1e-9, 4.0]])
    b = np.array([2.0, 1e-12])
    got = _run()
    np.testing.assert_allclose(got["norm"], np.sqrt(np.sum(w**2) + np.sum(b**2)), rtol=1e-15)
    for name in ("global", "leaf", "unit"):
        assert got[name]["dtypes"] == ["float64"], name
    total = np.sqrt(np.sum(w**2) + np.sum(b**2))
    np.testing.assert_allclose(got["global"]["w"], w / total, rtol=1e-14)
    np.testing.assert_allclose(got["global"]["b"], b / total, rtol=1e-14)
    np.testing.assert_allclose(got["leaf"]["w"], w / np.linalg.norm(w), rtol=1e-14)
    units = np.linalg.norm(w, axis=0)  # AGC: columns of the (in, out) kernel, weight norms sqrt(2)
    expected_w = w * np.minimum(1.0, 0.5 * np.sqrt(2.0) / units)
    np.testing.assert_allclose(got["unit"]["w"], expected_w, rtol=1e-14)
