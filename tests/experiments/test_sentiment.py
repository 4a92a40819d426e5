"""The experiment pipeline end to end on the tiny model: report, frontier, iterative rounds, sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpolab.config import ExperimentConfig, SweepConfig, best_of, betas, kl_coefs
from dpolab.experiments.sentiment import run, split_prompts, sweep, sweep_values

# The tiny random model writes gibberish, so VADER would score nearly everything 0 (all ties):
# the length reward gives these tests a reward that varies.
TINY = dict(train_prompts=12, eval_prompts=3, num_samples=4, max_new_tokens=8, steps=2, batch_size=4, lr=1e-3,
            sft_lr=1e-3, best_of="4", eval_samples=2, reward="length", reward_target_length=3, progress=False,
            gen_batch_size=32, device="cpu")
TINY_NO_BON = {k: v for k, v in TINY.items() if k != "best_of"}
# online RL at two KL coefficients and every trained baseline, on the tiny model
FULL = dict(betas="0.1,0.5", rounds=2, active=True, active_fraction=0.5, sft_steps=1, online_kl_coefs="0.05,0.5",
            online_steps=2, online_prompts_per_step=2, online_samples=2, online_lr=1e-3,
            baselines="preferred-ft,unlikelihood,ipo,cdpo")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def experiment(tiny_model_dir, tmp_path_factory):
    from tests.conftest import write_toy_pairs

    out = tmp_path_factory.mktemp("experiment")
    sft_data = write_toy_pairs(out / "sft.jsonl", 8)
    results = run(model=str(tiny_model_dir), output_dir=str(out), sft_data=str(sft_data), **FULL, **TINY)
    return out, results


def test_experiment_writes_report_frontier_and_results(experiment):
    out, results = experiment
    assert (out / "frontier.png").read_bytes().startswith(PNG)
    html = (out / "report.html").read_text()
    for text in ("Reward vs KL frontier", "data:image/png;base64,", "Examples: held-out prompts", "Preferred-FT",
                 "best-of-4", "Training curves", "The paper&#x27;s claims on this run", "RLOO kl=0.05", "Unlikelihood",
                 "CPU seconds"):
        assert text in html
    on_disk = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in on_disk["points"]] == [p["name"] for p in results["points"]]


def test_every_policy_and_baseline_is_a_point(experiment):
    _, results = experiment
    kinds = {}
    for p in results["points"]:
        kinds.setdefault(p["kind"], []).append(p)
        assert math.isfinite(p["reward"]) and math.isfinite(p["kl"])
    assert sorted(kinds) == ["best-of-n", "cdpo", "dpo", "dpo-round", "ipo", "preferred-ft", "reference", "rloo",
                             "unlikelihood"]
    assert sorted(p["beta"] for p in kinds["rloo"]) == [0.05, 0.5]
    assert sorted(p["beta"] for p in kinds["dpo"]) == [0.1, 0.5]
    (bon,) = kinds["best-of-n"]
    assert bon["kl"] == pytest.approx(math.log(4) - 3 / 4) and bon["kl_from"] == "bound"
    (ref,) = kinds["reference"]
    assert ref["kl"] == 0 and ref["win_rate"] == 0.5
    for p in kinds["dpo"] + kinds["ipo"] + kinds["cdpo"] + kinds["rloo"]:
        assert p["kl_from"] == "samples" and 0 <= p["accuracy"] <= 1 and 0 <= p["win_rate"] <= 1


def test_best_of_n_beats_the_reference_on_the_true_reward(experiment):
    _, results = experiment
    ref = next(p for p in results["points"] if p["kind"] == "reference")
    bon = next(p for p in results["points"] if p["kind"] == "best-of-n")
    assert bon["reward"] >= ref["reward"] and bon["win_rate"] >= 0.5


def test_iterative_rounds_keep_the_reference_and_sample_actively(experiment):
    import yaml

    out, results = experiment
    rounds = [p for p in results["points"] if p["kind"] == "dpo-round"]
    assert [p["round"] for p in rounds] == [2, 2]  # one second round per beta
    for p in rounds:
        # --active: half the 12 prompts, with K / 0.5 = 8 samples each
        assert p["sampled_prompts"] == 6 and p["samples_per_prompt"] == 8
        config = yaml.safe_load((out / f"dpo-beta{p['beta']:g}-round2" / "config.yaml").read_text())
        assert config["model"].endswith(f"dpo-beta{p['beta']:g}/final")  # trained from the latest policy
        assert config["ref_model"] == results["reference"]  # against the original reference


def test_optional_sft_stage_becomes_the_reference(experiment):
    out, results = experiment
    assert results["reference"] == str(out / "sft" / "final")
    for p in results["points"]:
        if p.get("run_dir") and p["kind"] != "dpo-round":
            import yaml

            assert yaml.safe_load((Path(p["run_dir"]) / "config.yaml").read_text())["model"] == results["reference"]


def test_rerun_reuses_finished_stages(experiment, tiny_model_dir):
    out, first = experiment
    again = run(model=str(tiny_model_dir), output_dir=str(out), sft_data=str(out / "sft.jsonl"), **FULL, **TINY)
    assert [p["reward"] for p in again["points"]] == [p["reward"] for p in first["points"]]
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run(model=str(tiny_model_dir), output_dir=str(out), betas="0.1", sft_data=str(out / "sft.jsonl"), sft_steps=1,
            **{**TINY, "steps": 3})


def test_sweep_over_beta_and_over_another_field(tiny_model_dir, tmp_path):
    results = sweep(SweepConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "b"), values="0.1,1", **TINY))
    assert sorted(p["value"] for p in results["points"] if p["kind"] == "sweep") == ["β=0.1", "β=1"]
    assert (tmp_path / "b" / "frontier.png").read_bytes().startswith(PNG)
    results = sweep(SweepConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "s"), field="steps", values="1,2",
                                best_of="", **TINY_NO_BON))
    assert [p["name"].split(" ")[0] for p in results["points"] if p["kind"] == "sweep"] == ["steps=1", "steps=2"]
    # the pairs were generated once for both values: one pairs file in the shared stages
    assert len([f for f in (tmp_path / "s" / "stages").glob("pairs-*.jsonl") if ".progress" not in f.name]) == 1


def test_bad_settings_fail_clearly(tiny_model_dir):
    for overrides, message in [({"name": "summaries"}, "unknown experiment"), ({"baselines": "ppo"}, "unknown baseline"),
                               ({"betas": "0.1,x"}, "betas must be"), ({"best_of": "1"}, "best_of")]:
        with pytest.raises(ValueError, match=message):
            ExperimentConfig(**overrides)  # checked at construction
    with pytest.raises(ValueError, match="fewer than train_prompts"):
        split_prompts(ExperimentConfig(train_prompts=1000))
    with pytest.raises(ValueError, match="cannot sweep 'colour'"):
        sweep_values(SweepConfig(field="colour"))
    with pytest.raises(ValueError, match="not all int"):
        sweep_values(SweepConfig(field="steps", values="1,two"))


def test_held_out_prompts_do_not_depend_on_the_seed():
    train, held = split_prompts(ExperimentConfig(train_prompts=50, eval_prompts=10))
    assert not set(train) & set(held) and len(train) == 50 and len(held) == 10
    assert split_prompts(ExperimentConfig(train_prompts=50, eval_prompts=10, seed=5))[1] == held


def test_demo_config_parses():
    from dpolab.config import resolve
    from tests.conftest import REPO

    for name in ("demo.yaml", "paper.yaml"):
        cfg = resolve(ExperimentConfig, config=str(REPO / "examples" / name))  # validated
        assert cfg.model == "default" and cfg.name == "sentiment"
        assert min(len(betas(cfg)), len(kl_coefs(cfg)), len(best_of(cfg))) >= 3  # three curves of >= 3 points


@pytest.mark.slow
def test_demo_config_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    """examples/demo.yaml with only its sizes shrunk: every curve of the figure has >= 3 points,
    the terminal shows the results table and the claims table, results.json records both."""
    from dpolab.config import resolve
    from dpolab.experiments.claims import CLAIM_COLUMNS
    from dpolab.experiments.frontier import COLUMNS
    from tests.conftest import REPO

    sizes = {k: v for k, v in TINY.items() if k != "best_of"}
    cfg = resolve(ExperimentConfig, config=str(REPO / "examples" / "demo.yaml"), **{
        **sizes, "model": str(tiny_model_dir), "output_dir": str(tmp_path), "online_steps": 2,
        "online_prompts_per_step": 2, "online_samples": 2, "min_gap": 0.0})
    results = run(cfg)
    shown = capsys.readouterr().out
    curves = {}
    for p in results["points"]:
        curves.setdefault(p["kind"], []).append(p)
    for kind in ("dpo", "rloo", "best-of-n"):
        assert len(curves[kind]) >= 3, kind
    assert {"reference", "preferred-ft"} <= set(curves)
    for column in COLUMNS + CLAIM_COLUMNS:
        assert column in shown
    for p in results["points"]:
        assert p["name"] in shown
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [c["claim"] for c in on_disk["claims"]][:2] == [
        "DPO reaches more reward than online RL (RLOO) at equal KL",
        "DPO beta: a smaller coefficient gives more KL and more reward"]
    for claim in on_disk["claims"]:
        assert claim["verdict"] in ("held", "did not hold", "inconclusive")
        for comparison in claim["comparisons"]:
            low, high = comparison["ci"]
            assert low <= comparison["difference"] <= high
    assert on_disk["config"]["seed"] == cfg.seed and on_disk["cpu_seconds"]
    assert (tmp_path / "frontier.png").read_bytes().startswith(PNG)
