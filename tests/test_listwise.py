"""Plackett-Luce DPO: the loss by hand, its K = 2 case, the shared-prompt batch, training."""

import json
import math
import random

import pytest
import torch

from dpolab.data.collate import Layout
from dpolab.data.listwise import TokenizedList
from dpolab.listwise import collate, plackett_luce_loss
from dpolab.logprobs import forward_logps, sequence_logps


def lse(*xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def test_full_ranking_by_hand():
    pol = torch.tensor([-1.0, -2.0, -4.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -1.0, -3.0], dtype=torch.float64)  # log-ratios 1, -1, -1
    loss, z = plackett_luce_loss(pol, ref, ranked=2, beta=0.5)  # z = 0.5, -0.5, -0.5
    expected = -(0.5 - lse(0.5, -0.5, -0.5)) - (-0.5 - lse(-0.5, -0.5))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert z.tolist() == [0.5, -0.5, -0.5]
    top1, _ = plackett_luce_loss(pol, ref, ranked=1, beta=0.5)
    assert top1.item() == pytest.approx(-(0.5 - lse(0.5, -0.5, -0.5)), rel=1e-12)


def test_two_responses_is_dpo():
    pol, ref = torch.tensor([-3.0, -5.0], dtype=torch.float64), torch.tensor([-4.0, -4.0], dtype=torch.float64)
    loss, _ = plackett_luce_loss(pol, ref, ranked=1, beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)  # DPO at h = 2, beta 0.5


@pytest.mark.parametrize("layout", [Layout(True, True, True), Layout(True, True, False), Layout(False, True, False),
                                    Layout(True, False, False)])
def test_shared_prompt_batch_gives_the_same_logps_as_separate_sequences(tiny_model_dir, layout):
    from dpolab.models import load_model

    model = load_model(str(tiny_model_dir)).eval()
    lists = [TokenizedList(1, [5, 6, 7], [[8, 9], [10], [11, 12, 13]], 2), TokenizedList(2, [14], [[15], [16, 17]], 1)]
    shared = collate(lists, 0, layout)
    plain = collate(lists, 0, Layout(False, False, False))
    with torch.no_grad():
        a = sequence_logps(forward_logps(model, shared), shared)
        b = sequence_logps(forward_logps(model, plain), plain)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert shared["group_sizes"].tolist() == [3, 2] and shared["lengths"].tolist() == [2, 1, 3, 1, 2]
    if layout.prefix_sharing:  # each prompt once
        assert shared["num_tokens"] == 3 + 6 + 1 + 3


def test_plackett_luce_trains_on_ranked_lists(tiny_model_dir, tmp_path):
    from dpolab.train import train

    rng = random.Random(0)
    rows = []
    for _ in range(24):
        prompt = "human : " + " ".join(rng.choice(["cat", "dog", "sun"]) for _ in range(3)) + " ? assistant :"
        responses = [" great fun", " good", " bad", " awful terrible"]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"prompt": prompt, "responses": [responses[i] for i in order], "ranking": [i + 1 for i in order]})
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "pl"), loss="plackett_luce",
                   bf16="false", progress=False, lr=2e-3, batch_size=4, max_steps=6, eval_fraction=0.0, warmup_ratio=0.0)
    losses = [r["loss"] for r in result["history"] if r["split"] == "train"]
    # step 0, all z equal: sum_k log(K - k + 1) over k = 1..3 for K = 4 = log 4 + log 3 + log 2
    assert losses[0] == pytest.approx(math.log(24), abs=1e-5)
    assert losses[-1] < losses[0]
    assert json.loads((tmp_path / "pl" / "data_report.json").read_text())["format"] == "listwise (responses-ranking)"
