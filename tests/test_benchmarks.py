"""The benchmark script stays runnable: dpolab's runs on a tiny random model (TRL is an optional extra)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dpo.py"


@pytest.mark.slow
def test_bench_runs_dpolab_with_and_without_flush_to_zero(tmp_path):
    from tests.conftest import HH_PATH

    if not HH_PATH.is_file():
        pytest.skip(f"shared data not found: {HH_PATH}")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "random:tiny", "--runs", "dpolab-fp32,dpolab-fp32-noftz",
                           "--pairs", "8", "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(out.read_text())
    results = saved["results"]
    assert saved["bf16_units"] in ("none", "unknown") or "bf16" in saved["bf16_units"]
    assert "bf16 units:" in proc.stdout
    assert [r["name"] for r in results] == ["dpolab-fp32", "dpolab-fp32-noftz"]
    for r in results:
        assert r["steps"] == 2 and r["pairs/s"] > 0 and r["peak_rss_gb"] > 0
        assert len(r["step_s"]) == 2 and r["steady pairs/s"] == pytest.approx(4 / r["step_s"][1])
        # the whole process includes loading and start-up; the eval path ran a forward over every pair
        assert r["process_s"] > r["ref_s"] + r["train_s"] and r["eval_s"] > 0 and r["eval/train"] > 0
        assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    # the same computation with and without flushing denormals
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)
    assert "| standard | dpolab-fp32 |" in proc.stdout
