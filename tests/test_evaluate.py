"""dpolab eval: preference accuracy of a trained policy, the generation metrics, bad input."""

import json
import math
import statistics

import numpy as np
import pytest

from dpolab.cli import main
from dpolab.evaluate import accuracy_summary, evaluate, load_prompts, result_rows
from dpolab.sampling import sequence_kl
from dpolab.models import ModelError
from dpolab.pair import load_model_pair
from dpolab.stats import wilson_interval
from tests.conftest import build_tokenizer, write_toy_pairs
from tests.test_score import foreign_tokenizer_dir, hand_token_logps, load, other_model_dir  # noqa: F401 (fixtures)

PRAISE = ("great", "wonderful", "loved", "good", "fun")
COMPLAINT = ("awful", "terrible", "boring", "bad", "hated")


def praise_reward(prompts, completions):
    """A judge for the tests (`tests.test_evaluate:praise_reward`): praise words minus complaints."""
    return [sum(w in PRAISE for w in c.split()) - sum(w in COMPLAINT for w in c.split()) for c in completions]


def trained_run(tmp_path_factory, tiny_model_dir):
    """A tiny policy DPO-trained on the toy pairs (once per session) and a held-out file of the
    same distribution: {"run", "final", "heldout", "prompts"}."""
    from dpolab.train import train

    root = tmp_path_factory.getbasetemp() / "dpo-toy"
    files = {"run": root / "run", "final": root / "run" / "final", "heldout": root / "heldout.jsonl",
             "prompts": root / "prompts.jsonl"}
    if not files["final"].exists():
        root.mkdir(exist_ok=True)
        write_toy_pairs(root / "train.jsonl", 80, seed=1)
        write_toy_pairs(files["heldout"], 40, seed=2)
        prompts = [json.loads(x)["prompt"] for x in files["heldout"].read_text().splitlines()][:6]
        files["prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        train(model=str(tiny_model_dir), data=str(root / "train.jsonl"), output_dir=str(files["run"]), bf16="false",
              progress=False, lr=2e-3, max_steps=8, batch_size=8, warmup_ratio=0.0, eval_fraction=0.2, eval_every=4)
    return files


@pytest.fixture
def toy(tmp_path_factory, tiny_model_dir):
    return trained_run(tmp_path_factory, tiny_model_dir)


def test_trained_policy_beats_its_untrained_reference(toy, tiny_model_dir, tmp_path):
    # reference found automatically from the run's config.yaml (the initial model)
    result = evaluate(model=str(toy["final"]), data=str(toy["heldout"]), output_dir=str(tmp_path / "trained"))
    pref = result["preference"]
    assert result["reference"] == str(tiny_model_dir)
    assert pref["n"] == 40 and pref["accuracy"] > 0.9
    assert pref["ci"][0] < pref["accuracy"] <= pref["ci"][1] and pref["ci"][0] > 0.7
    assert pref["mean_margin"] > 0 and pref["mean_chosen_reward"] > pref["mean_rejected_reward"]
    assert json.loads((tmp_path / "trained" / "eval.json").read_text()) == result

    untrained = evaluate(model=str(tiny_model_dir), ref_model=str(tiny_model_dir), data=str(toy["heldout"]),
                         output_dir=str(tmp_path / "untrained"))["preference"]
    assert untrained["accuracy"] == 0.5 and untrained["ties"] == 40  # all ties, counted half
    assert untrained["mean_margin"] == 0.0
    assert untrained["ci"] == pytest.approx(list(wilson_interval(20, 40)))


def test_eval_takes_the_runs_lengths_and_beta_unless_given(toy, tmp_path):
    """A run trained with max_length 10 (prompt 4) and beta 0.3 is evaluated on pairs cut as its
    training cut them, with its beta: the same result as passing those flags; a flag given wins."""
    import shutil

    import yaml

    run = tmp_path / "short-run"
    shutil.copytree(toy["run"] / "final", run / "final")
    recorded = yaml.safe_load((toy["run"] / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**recorded, "beta": 0.3, "max_length": 10, "max_prompt_length": 4}))
    common = dict(model=str(run), data=str(toy["heldout"]), limit=12)
    own = evaluate(**common, output_dir=str(tmp_path / "own"))
    assert (own["beta"], own["max_length"], own["max_prompt_length"]) == (0.3, 10, 4)
    assert ("max length (prompt)", "10 (4)") in result_rows(own)
    flags = evaluate(**common, beta=0.3, max_length=10, max_prompt_length=4, output_dir=str(tmp_path / "flags"))
    assert flags["preference"] == own["preference"]
    given = evaluate(**common, max_length=256, output_dir=str(tmp_path / "given"))
    assert (given["beta"], given["max_length"], given["max_prompt_length"]) == (0.3, 256, 128)
    assert given["preference"]["mean_margin"] != pytest.approx(own["preference"]["mean_margin"])  # pairs cut otherwise


@pytest.mark.parametrize("command", ["eval", "score", "rank"])
def test_a_model_that_cannot_load_says_so_before_its_reference(command, tmp_path, monkeypatch):
    """A hub id with no network and no --ref-model: the user sees why the model does not load,
    not that its reference is unknown (which follows from the first)."""
    import huggingface_hub

    from dpolab.rank import rank
    from dpolab.score import score

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = write_toy_pairs(tmp_path / "pairs.jsonl", 2)
    run = {"eval": lambda: evaluate(model="someone/some-model", data=str(data), output_dir=str(tmp_path / "out")),
           "score": lambda: score(model="someone/some-model", data=str(data), output_dir=str(tmp_path / "out")),
           "rank": lambda: rank(models="someone/some-model,someone/other", data=str(data), output_dir=str(tmp_path / "out"))}
    with pytest.raises(ModelError) as error:
        run[command]()
    message = str(error.value)
    assert message.startswith("someone/some-model: not a local folder") and "reference" not in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_eval_and_rank_print_progress_lines_off_a_terminal(toy, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """In a log file (no terminal) the forward passes report plain lines; --progress false silences them."""
    import dpolab.metrics
    from dpolab.rank import rank

    monkeypatch.setattr(dpolab.metrics, "PLAIN_EVERY", 0.0)  # a line per batch instead of every 10 s
    evaluate(model=str(toy["final"]), data=str(toy["heldout"]), limit=8, batch_size=4, output_dir=str(tmp_path / "e"))
    err = capsys.readouterr().err
    assert "eval (reference): 2/8 pairs, " in err and "eval (policy): 8/8 pairs, " in err and " pairs/s" in err
    rank(models=f"{tiny_model_dir},{toy['final']}", names="base,dpo", ref_model=str(tiny_model_dir), data=str(toy["heldout"]),
         limit=4, batch_size=4, n_boot=10, output_dir=str(tmp_path / "r"))
    err = capsys.readouterr().err
    assert "rank base: 2/4 pairs" in err and "rank dpo (policy): 4/4 pairs" in err  # base is its own reference: one pass
    evaluate(model=str(toy["final"]), data=str(toy["heldout"]), limit=8, progress=False, output_dir=str(tmp_path / "q"))
    assert "pairs/s" not in capsys.readouterr().err


def test_a_reward_model_alone_is_a_reward(tiny_model_dir, tmp_path):
    """--reward-model without --reward is accepted, as the config says (a second, run-time check
    refused it with "needs --reward"): the run goes on to the reward model itself."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\n")
    with pytest.raises(ValueError, match="reward model .*missing: directory not found"):
        evaluate(model=str(tiny_model_dir), ref_model=str(tiny_model_dir), prompts=str(prompts),
                 reward_model=str(tmp_path / "missing"), output_dir=str(tmp_path / "out"))


def test_accuracy_matches_hand_computed_rewards(tiny_model_dir, other_model_dir, tmp_path):
    data = write_toy_pairs(tmp_path / "pairs.jsonl", 12, seed=5)
    beta = 0.3
    result = evaluate(model=str(tiny_model_dir), ref_model=str(other_model_dir), data=str(data), beta=beta,
                      limit=10, output_dir=str(tmp_path / "out"), ci="bootstrap", n_boot=500)["preference"]
    tokenizer, policy, reference = build_tokenizer(), load(tiny_model_dir), load(other_model_dir)
    margins = []
    for line in data.read_text().splitlines()[:10]:
        row = json.loads(line)
        p = tokenizer(row["prompt"])["input_ids"]
        rewards = []
        for completion in (row["chosen"], row["rejected"]):
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rewards.append(beta * float(hand_token_logps(policy, p, c).sum() - hand_token_logps(reference, p, c).sum()))
        margins.append(rewards[0] - rewards[1])
    assert result["n"] == 10
    assert result["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 10)
    assert result["mean_margin"] == pytest.approx(statistics.mean(margins), abs=1e-5)
    assert result["margin_se"] == pytest.approx(statistics.stdev(margins) / math.sqrt(10), abs=1e-5)
    assert result["ci_method"] == "bootstrap" and result["ci"][0] <= result["accuracy"] <= result["ci"][1]


def test_accuracy_summary_constructed():
    s = accuracy_summary(np.array([1.0, 2.0, 0.0, 5.0]), np.array([0.0, 3.0, 0.0, 1.0]))
    # right, wrong, tie, right -> (2 + 0.5) / 4; margins 1, -1, 0, 4
    assert (s["accuracy"], s["correct"], s["ties"], s["wrong"]) == (0.625, 2, 1, 1)
    assert s["mean_margin"] == 1.0
    assert s["margin_se"] == pytest.approx(math.sqrt(14 / 3) / 2)
    assert s["ci"] == pytest.approx(list(wilson_interval(2.5, 4)))


def test_sequence_kl_matches_hand_computation(tiny_model_dir, other_model_dir):
    pair = load_model_pair(str(tiny_model_dir), str(other_model_dir))
    tokenizer, policy, reference = build_tokenizer(), load(tiny_model_dir), load(other_model_dir)
    prompts = [tokenizer(t)["input_ids"] for t in ("human : how was it ? assistant :", "<|im_start|>user\nhi<|im_end|>\n", "a")]
    samples = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" great fun", " it was boring", " thanks")]
    got = sequence_kl(pair, prompts + [prompts[0]], samples + [[]], batch_size=2)  # + an empty sample (ratio 0)
    ratios = [float(hand_token_logps(policy, p, c).sum() - hand_token_logps(reference, p, c).sum())
              for p, c in zip(prompts, samples)] + [0.0]
    assert got["n"] == 4 and got["empty_samples"] == 1
    assert got["mean"] == pytest.approx(statistics.mean(ratios), abs=1e-4)
    assert got["se"] == pytest.approx(statistics.stdev(ratios) / math.sqrt(4), abs=1e-4)


def test_generation_eval_policy_equal_to_reference(tiny_model_dir, toy, tmp_path):
    """Known answers: the same model with the same seed gives the same samples, so every
    comparison is a tie (win rate exactly 1/2) and the KL estimate is exactly 0."""
    gen = evaluate(model=str(tiny_model_dir), ref_model=str(tiny_model_dir), prompts=str(toy["prompts"]),
                   reward="tests.test_evaluate:praise_reward", num_samples=2, max_new_tokens=8, seed=3,
                   output_dir=str(tmp_path))["generation"]
    assert gen["prompts"] == 6 and gen["kl"]["n"] == 12
    assert gen["kl"]["mean"] == 0.0 and gen["kl"]["se"] == 0.0
    assert gen["win_rate"]["win_rate"] == 0.5 and gen["win_rate"]["ties"] == 12
    assert gen["policy_reward"] == gen["baseline_reward"]


def test_generation_eval_trained_policy(toy, tmp_path, capsys):
    result = evaluate(model=str(toy["final"]), data=str(toy["heldout"]), prompts=str(toy["prompts"]), limit=4,
                      reward="tests.test_evaluate:praise_reward", num_samples=2, max_new_tokens=8, ci="bootstrap",
                      n_boot=300, output_dir=str(tmp_path))
    gen, pref = result["generation"], result["preference"]
    assert pref["n"] == 4 and gen["prompts"] == 4 and gen["kl"]["n"] == 8
    w = gen["win_rate"]
    assert w["wins"] + w["ties"] + w["losses"] == 8
    assert w["win_rate"] == pytest.approx((w["wins"] + 0.5 * w["ties"]) / 8)
    assert w["ci"][0] <= w["win_rate"] <= w["ci"][1]
    assert math.isfinite(gen["kl"]["mean"]) and gen["kl"]["se"] >= 0
    assert len(gen["examples"]) == 4 and {"policy", "baseline", "policy_reward"} <= set(gen["examples"][0])  # 1 per prompt
    out = capsys.readouterr().out
    assert "win rate vs baseline" in out and "sequence KL" in out and "preference accuracy" in out


def test_load_prompts_from_a_prompt_column_or_from_pairs(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a", [{"role": "user", "content": "b"}]]
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad"} for i in range(3)]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(str(tmp_path / "hh.jsonl"), limit=2) == ["\n\nHuman: q0\n\nAssistant:", "\n\nHuman: q1\n\nAssistant:"]
    bad = write_toy_pairs(tmp_path / "toy.jsonl", 3, fmt="implicit")  # no "Assistant:" marker: every pair dropped
    with pytest.raises(ValueError, match="empty prompt set"):
        load_prompts(str(bad))


@pytest.mark.parametrize("case, error, message", [
    ("empty-prompts", ValueError, "empty prompt set"),
    ("blank-prompt", ValueError, "expected a non-empty prompt"),
    ("missing", ModelError, "not found"),
    ("foreign", ModelError, "different tokenizers"),
    ("nothing", ValueError, "nothing to evaluate"),
    ("no-judge", ValueError, "needs --reward"),
])
def test_bad_input(case, error, message, tiny_model_dir, other_model_dir, foreign_tokenizer_dir, tmp_path):
    kw = dict(model=str(tiny_model_dir), ref_model=str(other_model_dir), data="", output_dir=str(tmp_path),
              prompts=str(tmp_path / "prompts.jsonl"), reward="length")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n')
    if case == "empty-prompts":
        (tmp_path / "prompts.jsonl").write_text("")
    elif case == "blank-prompt":
        (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "  "}\n')
    elif case == "missing":
        kw["model"] = str(tmp_path / "gone" / "final")
    elif case == "foreign":
        kw["ref_model"] = str(foreign_tokenizer_dir)
    elif case == "nothing":
        kw["prompts"] = ""
    else:
        kw["reward"] = ""
    with pytest.raises(error, match=message):
        evaluate(**kw)


def test_cli_eval(toy, tmp_path, capsys):
    code = main(["eval", "--model", str(toy["final"]), "--data", str(toy["heldout"]), "--limit", "8",
                 "--output-dir", str(tmp_path / "cli")])
    assert code == 0 and json.loads((tmp_path / "cli" / "eval.json").read_text())["preference"]["n"] == 8
    assert "preference accuracy" in capsys.readouterr().out
    code = main(["eval", "--model", str(tmp_path / "missing"), "--data", str(toy["heldout"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not found" in err


@pytest.mark.slow
def test_documented_hh_example_on_the_default_model(tmp_path):
    """The docs' example (default model vs itself on HH-RLHF), cut to 2 pairs: all ties."""
    from tests.conftest import HH_PATH

    result = evaluate(model="default", ref_model="default", data=str(HH_PATH), limit=2, output_dir=str(tmp_path))
    assert result["preference"]["n"] == 2 and result["preference"]["ties"] == 2
    assert result["preference"]["accuracy"] == 0.5
