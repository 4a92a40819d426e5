"""KTO: the loss by hand, the batch layout, training and eval on unpaired data."""

import json
import math
import random

import pytest
import torch

from dpolab.data.unpaired import TokenizedCompletion
from dpolab.kto import collate, kto_loss
from dpolab.unpaired_eval import label_summary


def sig(z):
    return 1 / (1 + math.exp(-z))


def test_kto_loss_by_hand():
    # r = [1.0, -2.0, 0.5]; KL pairs: policy - reference = [0.3, -0.1, 0.4] -> z0 = 0.2
    pol, ref = torch.tensor([-3.0, -6.0, -1.5]), torch.tensor([-4.0, -4.0, -2.0])
    kl_pol, kl_ref = torch.tensor([-5.0, -5.1, -4.6]), torch.tensor([-5.3, -5.0, -5.0])
    labels = torch.tensor([True, False, True])
    losses, rewards, z0 = kto_loss(pol, ref, kl_pol, kl_ref, labels, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    assert z0.item() == pytest.approx(0.2, abs=1e-6)
    expected = [1 - sig(0.5 * (1.0 - 0.2)), 1.5 * (1 - sig(0.5 * (0.2 + 2.0))), 1 - sig(0.5 * (0.5 - 0.2))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -1.0, 0.25])


def test_kl_estimate_is_clipped_at_zero_and_detached():
    pol = torch.tensor([-3.0], requires_grad=True)
    kl_pol = torch.tensor([-9.0], requires_grad=True)
    losses, _, z0 = kto_loss(pol, torch.tensor([-3.0]), kl_pol, torch.tensor([-5.0]), torch.tensor([True]), 0.1)
    assert z0.item() == 0.0
    assert losses.item() == pytest.approx(0.5)
    losses.sum().backward()
    assert kl_pol.grad is None or kl_pol.grad.abs().sum() == 0


def test_batch_pairs_each_prompt_with_the_previous_completion():
    ex = [TokenizedCompletion(1, [1, 2], [3, 4], True), TokenizedCompletion(2, [5], [6, 7, 8], False)]
    batch = collate(ex, 0, False, max_length=3)
    # sequences: own completions first, then mismatched: prompt 0 + completion 1 cut to 3 - 2 = 1 token
    assert batch["lengths"].tolist() == [2, 3, 1, 2]
    assert batch["targets"].tolist() == [3, 4, 6, 7, 8, 6, 3, 4]
    assert batch["labels"].tolist() == [True, False]


def test_label_summary_by_hand():
    out = label_summary([1.0, -0.5, 0.0, 2.0], [True, True, False, False])
    # signs right: 1.0 (desirable) yes, -0.5 no, 0.0 tie (half), 2.0 (undesirable) no -> 1.5 / 4
    assert out["label_accuracy"] == pytest.approx(0.375)
    # pairs (d, u): (1, 0) win, (1, 2) loss, (-0.5, 0) loss, (-0.5, 2) loss -> 1/4
    assert out["pairwise_accuracy"] == pytest.approx(0.25)
    assert out["desirable"] == 2 and out["mean_undesirable_reward"] == pytest.approx(1.0)


def write_unpaired(path, n, seed):
    rng = random.Random(seed)
    words = ["cat", "dog", "tree", "house", "river", "sun"]
    rows = []
    for i in range(n):
        prompt = "human : " + " ".join(rng.choice(words) for _ in range(3)) + " ? assistant :"
        good = i % 2 == 0
        pool = ["great", "wonderful", "good", "fun"] if good else ["awful", "terrible", "bad", "boring"]
        rows.append({"prompt": prompt, "completion": " " + " ".join(rng.choice(pool) for _ in range(3)), "label": good})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_trains_on_unpaired_data_and_eval_and_score_read_it(tiny_model_dir, tmp_path):
    from dpolab.evaluate import evaluate
    from dpolab.score import score
    from dpolab.train import train

    data = write_unpaired(tmp_path / "u.jsonl", 32, 0)
    out = tmp_path / "kto"
    result = train(model=str(tiny_model_dir), data=str(data), output_dir=str(out), loss="kto", bf16="false",
                   progress=False, lr=2e-3, batch_size=4, max_steps=8, eval_fraction=0.0, warmup_ratio=0.0,
                   undesirable_weight=1.2)
    losses = [r["loss"] for r in result["history"] if r["split"] == "train"]
    # step 0: policy == reference, z0 = 0: every example's loss is lambda_y * (1 - s(0))
    assert losses[0] == pytest.approx((0.5 * 1.0 + 0.5 * 1.2) * 0.5, abs=0.06)
    assert losses[-1] < losses[0]
    report = json.loads((out / "data_report.json").read_text())
    assert report["format"] == "unpaired" and report["kept"] == 32
    held = write_unpaired(tmp_path / "held.jsonl", 16, 1)
    ev = evaluate(model=str(out / "final"), ref_model=str(tiny_model_dir), data=str(held), output_dir=str(tmp_path / "ev"))
    assert ev["preference"]["n"] == 16 and ev["preference"]["pairwise_accuracy"] > 0.5
    records = score(model=str(out / "final"), ref_model=str(tiny_model_dir), data=str(held), output_dir=str(tmp_path / "sc"))
    assert len(records) == 16 and all(math.isfinite(r["reward"]) for r in records)
