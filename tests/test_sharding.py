"""Sharded parameters and gradients on 8 simulated CPU devices give what one device gives.

JAX fixes the number of host devices when it starts, and the rest of the suite runs with one, so the checks run in
one subprocess (tests/sharding_checks.py, which documents them); this test reads its JSON report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import catalog

SCRIPT = Path(__file__).with_name("sharding_checks.py")
LAYOUTS = ("replicated", "fsdp", "tensor_parallel")


def test_every_transform_agrees_with_one_device_under_every_layout():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the script sets its own
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])

    expected = {f"{layout}/{name}" for layout in LAYOUTS for name in catalog.SHARDING}
    expected |= {f"batch_over_data/{name}" for name in catalog.PER_EXAMPLE}
    expected |= {f"global_norm_once/{layout}" for layout in LAYOUTS}
    expected |= {"shard_map/pmean_then_clip", "shard_map/pmean_loss_then_clip"}
    assert set(results) == expected, f"missing {expected - set(results)}, unexpected {set(results) - expected}"
    failures = {check: result["detail"] for check, result in results.items() if not result["ok"]}
    assert failures == {}
