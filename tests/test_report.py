"""python -m optclip.report (optclip/report.py): a run's clip rate, percentiles, spikes and suggested threshold."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from optclip import report

PNG = b"\x89PNG\r\n\x1a\n"


def _steps(run, norms, clipped=None, layers=None):
    records = []
    for step, norm in enumerate(norms, start=1):
        record = {"run": run, "step": step, "loss": 1.0, "grad_norm": norm, "norm": norm, "threshold": None}
        record["clipped"] = 0.0 if clipped is None else float(clipped[step - 1])
        for layer, values in (layers or {}).items():
            record[f"monitor/norm/{layer}"] = values[step - 1]
        records.append(record)
    return records


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_cli_reports_a_small_jsonl_end_to_end(tmp_path):
    norms = [1.0 + 0.01 * i for i in range(60)] + [40.0, 35.0] + [1.5] * 17 + [None]  # a spike at 61, a NaN
    clipped = [n is not None and n > 1.5 for n in norms]
    layers = {"blocks/0": [0.5] * 80, "head": [0.1] * 80}
    records = _steps("a", norms, clipped, layers) + _steps("b", [2.0] * 10)
    path = _write_jsonl(tmp_path / "steps.jsonl", records)
    done = subprocess.run(
        [sys.executable, "-m", "optclip.report", str(path), "--run", "^a$", "--clip-rate", "0.1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    finite = np.asarray([n for n in norms if n is not None])
    assert "run a: 80 steps, 79 with a finite grad_norm" in out
    assert "run b" not in out  # --run selects
    assert f"clip rate of the run's own clip: {np.mean(clipped):.1%} of steps" in out
    assert "spikes (grad_norm above 5 x the median of the 50 steps before): 1, at steps 61" in out
    assert f"suggested fixed threshold: {np.quantile(finite, 0.9):.4g} " in out
    whole = [f"{np.percentile(finite, p):.4g}" for p in (50, 90, 99, 100)]
    assert next(line for line in out.splitlines() if "whole run" in line).split()[2:] == whole
    last = next(line for line in out.splitlines() if "last 25%" in line).split()[2:]
    tail = np.asarray([n for n in norms[-20:] if n is not None])
    assert last == [f"{np.percentile(tail, p):.4g}" for p in (50, 90, 99, 100)]
    png = tmp_path / "steps_report.png"
    assert f"wrote {png}" in out
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5_000


def test_histories_from_npy_json_and_text_and_every_run_of_a_jsonl(tmp_path):
    norms = np.linspace(1.0, 2.0, 21)
    np.save(tmp_path / "n.npy", norms)
    (tmp_path / "n.json").write_text(json.dumps(norms.tolist()))
    (tmp_path / "n.txt").write_text("\n".join(map(str, norms)))
    for name in ("n.npy", "n.json", "n.txt"):
        (found,) = report.main([str(tmp_path / name), "--no-png", "--clip-rate", "0.25"])
        assert found.steps == 21 and found.clip_rate is None
        assert found.threshold == pytest.approx(np.quantile(norms, 0.75))
    path = _write_jsonl(tmp_path / "s.jsonl", _steps("x", [1.0, 2.0]) + _steps("y", [3.0]))
    found = report.main([str(path), "--no-png"])
    assert [r.run for r in found] == ["x", "y"] and [r.steps for r in found] == [2, 1]
    assert not (tmp_path / "s_report.png").exists()
    found = report.main([str(path), "--field", "norm", "--png", str(tmp_path / "f.png")])
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clip-rate", "2"], "--clip-rate must be in"),
        (["--last", "0"], "--last must be in"),
        (["--field", "bogus"], "no field 'bogus'"),
        (["--run", "nothing"], "no run matches"),
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, argv, message):
    path = _write_jsonl(tmp_path / "s.jsonl", _steps("x", [1.0, 2.0]))
    with pytest.raises(SystemExit):
        report.main([str(path), "--no-png", *argv])
    assert message in capsys.readouterr().err


def test_spike_steps_follow_the_examples_definition():
    norms = [1.0] * 10 + [9.0, 8.0] + [1.0] * 5 + [7.0] + [float("nan")] + [1.0]
    assert report.spike_steps(norms, factor=5.0, window=5) == [10, 17]
    assert report.spike_steps(norms, factor=10.0, window=5) == []
    assert report.spike_steps([1.0, 100.0], window=5) == []  # no full window yet
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        report.spike_steps(norms, window=0)
