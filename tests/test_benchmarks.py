"""The benchmark script stays runnable: dpolab's runs on a tiny random model (TRL is an optional extra)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dpo.py"


@pytest.mark.slow
def test_every_run_kind_runs_on_a_tiny_model(tmp_path):
    """Every run bench_dpo.py knows, each in a fresh process (the docs' comparisons run as
    `--dry-run` in tests/test_docs.py, so this is where each kind of run really runs): figures,
    a first loss of ln 2, and the same per-step losses where two runs do the same computation."""
    from tests.conftest import HH_PATH, import_benchmark

    if not HH_PATH.is_file():
        pytest.skip(f"shared data not found: {HH_PATH}")
    pytest.importorskip("trl")
    RUNS = import_benchmark("bench_dpo").RUNS
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "random:tiny", "--runs", ",".join(RUNS),
                           "--pairs", "8", "--out", str(out)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert saved["bf16_units"] in ("none", "unknown") or "bf16" in saved["bf16_units"]
    assert "bf16 units:" in proc.stdout
    results = {r["name"]: r for r in saved["results"]}
    assert list(results) == list(RUNS)
    liger = results.pop("trl-bf16-liger")  # documented to fail cleanly where liger-kernel cannot run (no GPU)
    assert "error" not in liger or "liger" in liger["error"].lower(), liger["error"]
    for name, r in results.items():
        assert "error" not in r, (name, r["error"])
        assert r["steps"] == 2 and r["pairs/s"] > 0 and r["peak_rss_gb"] > 0
        assert len(r["step_s"]) == 2 and r["steady pairs/s"] == pytest.approx(4 / r["step_s"][1])
        # the whole process includes loading, start-up and saving the trained model
        assert r["process_s"] > r["ref_s"] + r["train_s"] + r["save_s"] and r["save_s"] > 0
        assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-3 if "bf16" in name else 1e-5), name
        if name.startswith("dpolab"):  # the eval path, timed in a process of its own afterwards
            assert r["eval_s"] > 0 and r["eval/train"] > 0
    # the same computation: with and without flush-to-zero, malloc settings, attention kernels
    for a, b, tol in (("dpolab-fp32", "dpolab-fp32-noftz", 1e-6), ("dpolab-fp32", "dpolab-fp32-loop", 1e-5),
                      ("dpolab-fp32", "dpolab-fp32-dense", 1e-5), ("dpolab-bf16", "dpolab-bf16-sysmalloc", 1e-6),
                      ("trl-fp32-pre", "trl-fp32-pre-ftz", 1e-6), ("trl-bf16-pre", "trl-bf16-pre-malloc", 1e-6),
                      ("dpolab-fp32", "trl-fp32-pre", 1e-4), ("trl-fp32-pre", "trl-default-fp32", 1e-4)):
        assert results[a]["losses"] == pytest.approx(results[b]["losses"], abs=tol), (a, b)
    assert "| standard | dpolab-fp32 |" in proc.stdout


@pytest.mark.slow
def test_gpu_script_runs_on_cpu_with_a_tiny_model_as_on_the_device(tmp_path):
    """benchmarks/gpu.sh, minus CUDA, in the form the device runs it: from benchmarks/gpu_kit.sh's
    .gpu/ (a config and tokenizer without weights, a copy of the HH file), never touching the
    default model or ../shared. Both cases, dpolab and TRL, fresh processes, one table."""
    from tests.conftest import HH_PATH, import_benchmark

    if not HH_PATH.is_file():
        pytest.skip(f"shared data not found: {HH_PATH}")
    pytest.importorskip("trl")
    tiny = import_benchmark("bench_dpo").prepare_model("random:tiny", tmp_path)
    base = {**os.environ, "PYTHON": sys.executable}
    kit = subprocess.run(["bash", str(BENCH.parent / "gpu_kit.sh")], capture_output=True, text=True, timeout=300,
                         env={**base, "KIT": str(tmp_path), "WHEELS": "0", "MODEL": tiny})
    assert kit.returncode == 0, kit.stderr[-2000:]
    assert "STD_MODEL=random:.gpu/model" in kit.stdout and not (tmp_path / ".gpu" / "model" / "model.safetensors").exists()
    gpu, cache = tmp_path / ".gpu", tmp_path / "cache"
    env = {**base, "STD_MODEL": f"random:{gpu / 'model'}", "TOKENIZER": str(gpu / "model"), "DATA": str(gpu / "hh.jsonl.gz"),
           "BIG_MODEL": "random:tiny", "PAIRS": "16", "TIMEOUT": "900", "RUNS": "dpolab-bf16,trl-bf16-pre",
           "OUT": str(tmp_path / "gpu"), "DPOLAB_CACHE": str(cache)}
    proc = subprocess.run(["bash", str(BENCH.parent / "gpu.sh")], capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (cache / "SmolLM2-135M-Instruct").exists()  # the default model was never needed
    table = proc.stdout.split("=== one table ===")[1]
    for case in ("standard", "long"):
        saved = json.loads((tmp_path / f"gpu-{case}.json").read_text())
        assert [r["name"] for r in saved["results"]] == ["dpolab-bf16", "trl-bf16-pre"]
        assert all("error" not in r for r in saved["results"]), saved["results"]
        assert f"| {case} | dpolab-bf16 |" in table and f"| {case} | gpu-{case}:0 | dpolab-bf16 | trl-bf16-pre |" in table
        if case == "standard":  # 4 steps: a figure after start-up (the long case has one step of 16 pairs here)
            assert all(r["steady pairs/s"] > 0 for r in saved["results"])
    long = json.loads((tmp_path / "gpu-long.json").read_text())["results"][0]
    assert long["batch_size"] == 16 and long["data"]["real_tokens"] / 16 > 2 * 600  # joined conversations: long pairs


@pytest.mark.slow
def test_bench_emulates_a_cpu_without_bf16_units(tmp_path):
    """--no-bf16-units: the table is labelled as emulated and bf16 matmuls run slower than fp32,
    as on CPUs without AMX / AVX512-BF16 (on those CPUs too: the limit only removes instructions)."""
    from tests.conftest import HH_PATH

    if not HH_PATH.is_file():
        pytest.skip(f"shared data not found: {HH_PATH}")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "random:tiny", "--runs", "dpolab-bf16", "--pairs", "8",
                           "--threads", "1", "--no-bf16-units", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert saved["bf16_units"].startswith("none (emulated")
    assert "bf16 units: none (emulated" in proc.stdout
    assert saved["peaks"]["bf16"] < saved["peaks"]["fp32"]
    assert saved["results"][0]["steps"] == 2 and "error" not in saved["results"][0]
