"""The likelihood-displacement guard on hand-made metric histories, in a run and in the report."""

import json

import pytest

from dpolab.displacement import detect

CONFIG = {"loss": "sigmoid", "lr": 1e-3, "beta": 0.1, "sft_weight": 0.0}


def history(chosen, margins):
    return [{"step": i + 1, "split": "train", "rewards/chosen": c, "rewards/margins": m, "logps/chosen": -10 + c}
            for i, (c, m) in enumerate(zip(chosen, margins))]


def test_margin_up_while_chosen_falls_below_reference_is_reported():
    recs = history([0.0, 0.01, 0.0, -0.02, -0.05, -0.1, -0.2, -0.3], [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    f = detect(recs, CONFIG)
    assert f is not None
    assert f["chosen_reward_end"] == pytest.approx(-0.25) and f["margin_end"] == pytest.approx(0.8)
    assert f["margin_start"] == pytest.approx(0.025)
    assert f["since_step"] == 4  # the rolling (2-step) chosen reward is negative from step 4 on
    assert any("--sft-weight" in o for o in f["counter_options"])
    assert any("--lr (now 0.001)" in o for o in f["counter_options"])
    assert any("--beta (now 0.1)" in o for o in f["counter_options"])


@pytest.mark.parametrize("chosen,margins", [
    ([0.0, 0.1, 0.2, 0.3], [0.0, 0.2, 0.4, 0.6]),      # chosen rises: healthy
    ([0.0, -0.1, -0.2, -0.3], [0.0, -0.1, -0.2, -0.3]),  # margin falls too: not learning, not displacement
])
def test_healthy_or_failing_runs_are_not_flagged(chosen, margins):
    assert detect(history(chosen, margins), CONFIG) is None


def test_reference_free_and_sft_runs_are_not_checked():
    recs = history([-1.0] * 8, [0.1 * i for i in range(8)])
    assert detect(recs, CONFIG) is not None
    assert detect(recs, {**CONFIG, "loss": "simpo"}) is None
    assert detect(recs, {"lr": 1e-5}) is None  # an SFT config has no loss


def test_report_shows_the_finding(tmp_path):
    from dpolab.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    recs = history([0.0, 0.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "config.yaml").write_text("loss: sigmoid\nlr: 0.001\nbeta: 0.1\n")
    page = build_report([run], tmp_path / "report.html").read_text()
    assert "Likelihood displacement: run" in page and "--sft-weight" in page


def test_a_training_run_reports_what_its_history_shows(tiny_model_dir, toy_data, tmp_path):
    import dataclasses

    from dpolab.config import TrainConfig
    from dpolab.train import train

    kw = dict(model=str(tiny_model_dir), data=str(toy_data), output_dir=str(tmp_path / "r"), bf16="false", progress=False,
              lr=3e-3, batch_size=4, max_steps=8, eval_fraction=0.0, warmup_ratio=0.0)
    result = train(**kw)
    expected = detect(result["history"], dataclasses.asdict(TrainConfig(**kw)))
    assert result.get("likelihood_displacement") == expected
