"""dpolab rank: Bradley-Terry ranking of synthetic models with known strengths, and of real
tiny checkpoints on pairs and on prompts."""

import io
import json

import numpy as np
import pytest

from dpolab.models import ModelError
from dpolab.rank import rank, ranking, win_matrix_png
from tests.test_evaluate import trained_run


@pytest.fixture
def toy(tmp_path_factory, tiny_model_dir):
    return trained_run(tmp_path_factory, tiny_model_dir)


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def test_ranking_recovers_three_models_with_known_strengths():
    # strength + Gumbel noise per item: pairwise outcomes follow Bradley-Terry exactly
    strengths = {"weak": -1.0, "strong": 1.0, "mid": 0.2}
    names = list(strengths)
    rng = np.random.default_rng(7)
    scores = np.array([s + rng.gumbel(size=1000) for s in strengths.values()])
    result = ranking(scores, names, n_boot=200, seed=0)
    assert result["order"] == ["strong", "mid", "weak"]
    by_name = {m["name"]: m for m in result["models"]}
    assert [by_name[n]["rank"] for n in ("strong", "mid", "weak")] == [1, 2, 3]
    gap = by_name["strong"]["theta"] - by_name["weak"]["theta"]
    assert gap == pytest.approx(2.0, abs=0.25)  # true log-strength difference
    for m in result["models"]:
        assert m["elo_ci"][0] <= m["elo"] <= m["elo_ci"][1]
    frac = np.array([[np.nan if v is None else v for v in row] for row in result["win_fraction"]])
    off = ~np.eye(3, dtype=bool)
    assert (frac + frac.T)[off] == pytest.approx(1.0)
    # P(strong beats weak) = sigmoid(2) = 0.881
    assert frac[names.index("strong"), names.index("weak")] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=0.04)
    assert png_size(win_matrix_png(result))[0] > 200


def test_rank_checkpoints_on_pairs(toy, tiny_model_dir, tmp_path, capsys):
    result = rank(models=f"{tiny_model_dir},{toy['final']}", names="untrained,dpo", ref_model=str(tiny_model_dir),
                  data=str(toy["heldout"]), n_boot=200, output_dir=str(tmp_path))
    assert result["order"] == ["dpo", "untrained"] and result["items"] == 40
    untrained, dpo = result["models"]
    assert untrained["mean_score"] == 0.5  # policy == reference: every pair a tie
    assert dpo["mean_score"] > 0.9
    # dpo beats untrained (score 0.5) exactly where it is right, ties where it ties: wins = 40 * accuracy
    assert result["wins"][1][0] == pytest.approx(40 * dpo["mean_score"])
    assert result["wins"][0][1] == pytest.approx(40 - 40 * dpo["mean_score"])
    saved = json.loads((tmp_path / "rank.json").read_text())
    assert saved["order"] == result["order"] and saved["mode"] == "pairs"
    assert png_size((tmp_path / "win_matrix.png").read_bytes())[0] > 200
    assert "Bradley-Terry" in capsys.readouterr().out


def test_rank_takes_each_runs_beta_unless_given(toy, tiny_model_dir, tmp_path):
    """Like eval and score: each model's implicit reward uses the beta of the run it comes from
    (its config.yaml), --beta overrides it for every model, and a bare model gets 0.1."""
    import shutil

    import yaml

    other = tmp_path / "other-run"
    shutil.copytree(toy["run"] / "final", other / "final")
    recorded = yaml.safe_load((toy["run"] / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**recorded, "beta": 0.25, "max_length": 48, "max_prompt_length": 0}))
    models = f"{tiny_model_dir},{toy['final']},{other / 'final'}"
    common = dict(models=models, names="base,dpo,dpo-b", ref_model=str(tiny_model_dir), data=str(toy["heldout"]),
                  n_boot=20, limit=8)
    own = rank(**common, output_dir=str(tmp_path / "own"))
    assert [m["beta"] for m in own["models"]] == [0.1, recorded["beta"], 0.25]
    assert json.loads((tmp_path / "own" / "rank.json").read_text())["models"][2]["beta"] == 0.25
    given = rank(**common, beta=0.5, output_dir=str(tmp_path / "given"))
    assert [m["beta"] for m in given["models"]] == [0.5, 0.5, 0.5]
    # lengths too: each run's own (48 recorded with prompt limit 0 = half), 512 for the bare model, a flag for all
    assert [(m["max_length"], m["max_prompt_length"]) for m in own["models"]] == \
        [(512, 256), (recorded["max_length"], recorded["max_prompt_length"] or recorded["max_length"] // 2), (48, 24)]
    flagged = rank(**common, max_length=64, output_dir=str(tmp_path / "flagged"))
    assert [(m["max_length"], m["max_prompt_length"]) for m in flagged["models"]] == [(64, 32)] * 3
    assert own["models"][1]["mean_score"] == own["models"][2]["mean_score"]  # same weights, other beta


def test_rank_on_prompts_identical_models_tie(tiny_model_dir, toy, tmp_path):
    result = rank(models=f"{tiny_model_dir},{tiny_model_dir}", names="a,b", prompts=str(toy["prompts"]), limit=3,
                  reward="tests.test_evaluate:praise_reward", num_samples=2, max_new_tokens=6, n_boot=50,
                  output_dir=str(tmp_path))
    assert result["items"] == 6 and result["mode"] == "prompts"
    assert result["win_fraction"][0][1] == 0.5 and result["models"][0]["theta"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kw, error, message", [
    (dict(models="A"), ValueError, "at least two models"),
    (dict(models="A,B", names="x"), ValueError, "distinct names"),
    (dict(models="A,B", prompts="p.jsonl", reward="length"), ValueError, "not both"),
    (dict(models="A,B", data="", prompts="p.jsonl"), ValueError, "needs a judge"),
    (dict(models="A,/no/such/model"), ModelError, "not found"),
])
def test_bad_input(kw, error, message, tiny_model_dir, toy, tmp_path):
    args = {"data": str(toy["heldout"]), "ref_model": str(tiny_model_dir), "output_dir": str(tmp_path), **kw}
    args["models"] = args["models"].replace("A", str(tiny_model_dir)).replace("B", str(toy["final"]))
    with pytest.raises(error, match=message):
        rank(**args)


def test_runs_sharing_a_reference_compute_it_once(toy, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import dpolab.metrics

    monkeypatch.setattr(dpolab.metrics, "PLAIN_EVERY", 0.0)  # a progress line per batch
    twin = tmp_path / "twin"
    shutil.copytree(toy["final"], twin)
    result = rank(models=f"{toy['final']},{twin}", names="dpo,twin", ref_model=str(tiny_model_dir),
                  data=str(toy["heldout"]), n_boot=20, limit=8, output_dir=str(tmp_path / "r"))
    err = capsys.readouterr().err
    assert "rank dpo (reference)" in err and "rank twin (reference)" not in err  # reused for the twin
    assert "rank dpo (policy)" in err and "rank twin (policy)" in err
    dpo, twin_result = result["models"]
    assert twin_result["mean_score"] == dpo["mean_score"] and result["wins"][0][1] == result["wins"][1][0]
