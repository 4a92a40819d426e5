"""The label-noise study, end to end on the tiny model (length reward), and its flip rule."""

import json

import pytest

from dpolab.experiments.label_noise import flip, run


def rows(n):
    return [{"chosen": f"c{i}", "rejected": f"r{i}", "chosen_score": 1.0, "rejected_score": 0.0, "flipped": False}
            for i in range(n)]


def test_flips_are_exact_in_count_and_nested_across_rates():
    base = rows(20)
    at = {r: {i for i, x in enumerate(flip(base, r, 0)) if x["flipped"]} for r in (0.0, 0.1, 0.2, 0.3)}
    assert [len(at[r]) for r in (0.0, 0.1, 0.2, 0.3)] == [0, 2, 4, 6]
    assert at[0.1] <= at[0.2] <= at[0.3]
    i = next(iter(at[0.1]))
    swapped = flip(base, 0.1, 0)[i]
    assert (swapped["chosen"], swapped["rejected"], swapped["chosen_score"]) == (f"r{i}", f"c{i}", 0.0)
    assert base[i]["chosen"] == f"c{i}"  # the input is not modified


def test_study_writes_table_plot_and_timings(tiny_model_dir, tmp_path):
    out = tmp_path / "study"
    result = run(model=str(tiny_model_dir), output_dir=str(out), reward="length", train_prompts=8, eval_prompts=4,
                 num_samples=3, max_new_tokens=6, flip_rates="0,0.3", losses="sigmoid,robust", lr=1e-3, batch_size=4,
                 eval_samples=1)
    assert len(result["points"]) == 4
    for p in result["points"]:
        assert 0 <= p["accuracy"] <= 1 and p["eval_pairs"] == result["eval_pairs"] > 0
        assert p["label_smoothing"] == (p["flip_rate"] if p["loss"] == "robust" else 0.0)
    assert set(result["seconds"]) == {"generate pairs", "train + measure", "total"}
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3 and "flip 0.3" in table  # header + 2 losses
    assert (out / "label_noise.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((out / "runs").glob("*/final"))  # models deleted after measuring
    noisy = [json.loads(x) for x in (out / "train_flip0.3.jsonl").read_text().splitlines()]
    assert sum(r["flipped"] for r in noisy) == round(0.3 * len(noisy))


def test_help():
    """The documented `python -m dpolab.experiments.label_noise --help` lists the study's settings."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "dpolab.experiments.label_noise", "--help"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--flip-rates" in proc.stdout and "--losses" in proc.stdout
