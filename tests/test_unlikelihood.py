"""The Unlikelihood baseline: the loss by hand, and training through dpolab's loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpolab.unlikelihood import UnlikelihoodConfig, log1m_exp, train_unlikelihood, unlikelihood_loss


def test_loss_by_hand():
    # pair 1: chosen tokens p = 0.5, 0.25; rejected tokens p = 0.5, 0.9, 0.1
    # pair 2: chosen token p = 0.8; rejected token p = 0.2
    chosen = [torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.8]))]
    rejected = [torch.log(torch.tensor([0.5, 0.9, 0.1])), torch.log(torch.tensor([0.2]))]
    alpha = 0.5
    first = (-(math.log(0.5) + math.log(0.25)) / 2
             - alpha * (math.log(1 - 0.5) + math.log(1 - 0.9) + math.log(1 - 0.1)) / 3)
    second = -math.log(0.8) - alpha * math.log(1 - 0.2)
    assert unlikelihood_loss(chosen, rejected, alpha).tolist() == pytest.approx([first, second], rel=1e-6)


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.log(torch.tensor([0.3, 0.6])).requires_grad_()
    rejected = torch.log(torch.tensor([0.4, 0.7])).requires_grad_()
    unlikelihood_loss([chosen], [rejected]).sum().backward()
    assert (chosen.grad < 0).all()  # descending the loss raises log p(y_w)
    assert (rejected.grad > 0).all()  # and lowers log p(y_l)
    # d/dl [-log(1 - e^l)] = p / (1 - p), per token, divided by |y_l| = 2
    assert rejected.grad.tolist() == pytest.approx([0.4 / 0.6 / 2, 0.7 / 0.3 / 2], rel=1e-5)


def test_certain_rejected_token_is_finite():
    assert torch.isfinite(log1m_exp(torch.tensor([0.0, -1e-12, -50.0]))).all()
    assert log1m_exp(torch.tensor([-50.0])).item() == pytest.approx(-math.exp(-50.0), rel=1e-6)


def test_training_raises_chosen_and_lowers_rejected(tiny_model_dir, toy_data, tmp_path):
    out = train_unlikelihood(UnlikelihoodConfig(
        model=str(tiny_model_dir), data=str(toy_data), output_dir=str(tmp_path / "ul"), max_steps=6, batch_size=4,
        lr=3e-3, eval_fraction=0.0, progress=False, device="cpu", alpha=1.0))
    lines = [json.loads(line) for line in (tmp_path / "ul" / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["split"] == "train"]
    assert out["steps"] == 6 and (tmp_path / "ul" / "final").exists()
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["logps/chosen"] > train[0]["logps/chosen"]
