"""Online RL (TRL's RLOO behind dpolab.online): the KL-regularised optimum on a toy bandit,
dpolab's run layout, and the settings it refuses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpolab.online import OnlineConfig, check, metric_values, rloo, trl_args

PROMPT = "the movie was"


def letter_e(prompts, completions):
    """A bandit reward over single tokens: 1 when the token's text holds an 'e', else 0."""
    return [1.0 if "e" in c else 0.0 for c in completions]


def next_token_dist(model_dir, prompt: str = PROMPT) -> tuple[torch.Tensor, list[float]]:
    """The model's exact next-token distribution after `prompt` and the bandit reward of every token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].float(), -1)
    texts = [tokenizer.decode([i], skip_special_tokens=True) for i in range(probs.shape[0])]
    return probs, letter_e([prompt] * len(texts), texts)


def kl_optimum(ref_probs: torch.Tensor, rewards: list[float], beta: float) -> torch.Tensor:
    """pi*(y) ∝ pi_ref(y) exp(r(y) / beta): the maximiser of E[r] - beta KL(pi || pi_ref)."""
    weights = ref_probs * torch.exp(torch.tensor(rewards) / beta)
    return weights / weights.sum()


def test_closed_form_optimum_maximises_the_kl_regularised_reward():
    # The helper above is the thing the bandit test compares with: check it against perturbations.
    ref = torch.tensor([0.5, 0.3, 0.2])
    r, beta = [1.0, 0.0, 0.5], 0.5
    star = kl_optimum(ref, r, beta)
    z = 0.5 * math.e ** 2 + 0.3 + 0.2 * math.e  # exp(1 / 0.5) = e^2, exp(0.5 / 0.5) = e
    assert star.tolist() == pytest.approx([0.5 * math.e ** 2 / z, 0.3 / z, 0.2 * math.e / z])

    def objective(p):
        return float((p * torch.tensor(r)).sum() - beta * (p * (p / ref).log()).sum())

    for delta in ([0.02, -0.01, -0.01], [-0.02, 0.01, 0.01], [0.0, 0.02, -0.02]):
        assert objective(star) > objective(star + torch.tensor(delta))


@pytest.mark.slow
def test_rloo_approaches_the_kl_regularised_optimum_on_a_bandit(tiny_model_dir, tmp_path):
    """One prompt, one-token completions, reward 1 for tokens with an 'e': the exact optimum of
    the KL-penalised objective is known; trained policies move from the reference to it, and a
    larger KL coefficient stops closer to the reference."""
    ref_probs, rewards = next_token_dist(tiny_model_dir)
    r = torch.tensor(rewards)
    ref_reward = float((ref_probs * r).sum())
    results = {}
    for beta in (0.25, 0.5):
        target = float((kl_optimum(ref_probs, rewards, beta) * r).sum())
        cfg = OnlineConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / f"kl{beta}"), kl_coef=beta, steps=25,
                           prompts_per_step=4, num_samples=8, max_new_tokens=1, lr=3e-2, seed=0, device="cpu",
                           progress=False)
        run_dir = rloo(cfg, [PROMPT] * 8, letter_e)
        probs, _ = next_token_dist(run_dir / "final")
        results[beta] = (float((probs * r).sum()), target)
    (low_reward, low_target), (high_reward, high_target) = results[0.25], results[0.5]
    assert ref_reward < high_target < low_target  # the optima themselves: sanity of the set-up
    for reward, target in results.values():
        # moved most of the way from the reference's expected reward to the optimum's
        assert abs(reward - target) < 0.4 * (target - ref_reward), (results, ref_reward)
    assert low_reward > high_reward


def test_rloo_writes_dpolab_run_layout(tiny_model_dir, tmp_path, capsys):
    cfg = OnlineConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), kl_coef=0.1, steps=2,
                       prompts_per_step=2, num_samples=2, max_new_tokens=4, lr=1e-3, device="cpu", progress=False)
    run_dir = rloo(cfg, ["the movie was", "i watched it and", "this film is"], letter_e)
    # dpolab's plain step lines (not a terminal here), not TRL's printed dicts
    err = capsys.readouterr().err
    assert "[train] step 1/2 loss=" in err and " reward=" in err and "{'loss'" not in err
    assert (run_dir / "tensorboard").is_dir()
    assert (run_dir / "final" / "config.json").exists() and (run_dir / "final" / "tokenizer.json").exists()
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["kl_coef"] == 0.1
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["split"] == "train" and "reward" in line and "kl" in line for line in lines)


def test_trl_settings_keep_the_paper_objective():
    args = trl_args(OnlineConfig(kl_coef=0.3, prompts_per_step=3, num_samples=4, steps=5), use_cpu=True)
    # one generation batch of prompts_per_step x K per optimizer step, KL in the reward, no rescaling
    assert args.per_device_train_batch_size == 12 and args.num_generations == 4 and args.max_steps == 5
    assert args.beta == 0.3 and args.num_iterations == 1 and args.normalize_advantages is False
    assert args.temperature == 1.0 and args.top_p == 1.0 and not args.top_k
    checkpointing = getattr(args, "activation_checkpointing", None)  # transformers 5.24's name
    assert (args.gradient_checkpointing if checkpointing is None else checkpointing) is False and args.bf16 is False


def test_trl_logs_become_dpolab_metrics():
    entry = {"loss": 0.1, "reward": 0.5, "kl": 0.01, "learning_rate": 1e-5, "completions/mean_length": 16.0, "epoch": 0.1}
    assert metric_values(entry) == {"loss": 0.1, "reward": 0.5, "kl": 0.01, "lr": 1e-5, "completion_length": 16.0}


@pytest.mark.parametrize("field, value, message", [
    ("kl_coef", 0.0, "kl_coef must be > 0"),
    ("num_samples", 1, "num_samples must be >= 2"),
    ("temperature", 0.0, "temperature must be > 0"),
    ("prompts_per_step", 5, "3 prompts, fewer than prompts_per_step 5"),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        check(OnlineConfig(**{field: value}), ["a", "b", "c"])


def test_shared_fields_come_from_the_option_groups():
    """OnlineConfig writes no shared field again: model, device, sampling, optimizer and progress
    fields are config.py's (help and checks), with its own defaults where RLOO needs them; the
    recorded config (a finished run is reused when it matches) keeps its keys and defaults."""
    import dataclasses

    from dpolab import config

    fields = {f.name: f for f in dataclasses.fields(OnlineConfig)}
    for group, name in [(config.Runtime, "device"), (config.Sampling, "max_new_tokens"), (config.Optimizer, "max_grad_norm")]:
        assert fields[name].metadata == group.__dataclass_fields__[name].metadata, name
    assert dataclasses.asdict(OnlineConfig()) == {
        "model": "default", "output_dir": "runs/rloo", "kl_coef": 0.1, "steps": 16, "prompts_per_step": 4, "num_samples": 4,
        "max_new_tokens": 16, "temperature": 1.0, "lr": 1e-5, "max_grad_norm": 1.0, "seed": 0, "device": "auto",
        "progress": True}
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):  # the groups' checks, at construction
        OnlineConfig(max_new_tokens=0)
