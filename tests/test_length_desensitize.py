"""LD-DPO log-probs, checked by hand on a collated batch."""

import pytest
import torch

from dpolab.data.collate import collate_pairs
from dpolab.data.tokenize import TokenizedPair
from dpolab.length_desensitize import desensitized_logps, pair_fn
from dpolab.logprobs import pair_logps


@pytest.mark.parametrize("packing", [True, False])
def test_tail_beyond_the_shorter_completion_is_scaled(packing):
    pairs = [TokenizedPair(1, [1, 2], [3, 4, 5], [6]), TokenizedPair(2, [7], [8], [9, 10, 11, 12])]
    batch = collate_pairs(pairs, 0, packing)
    # per-token log-probs: sequence order chosen0 (3), chosen1 (1), rejected0 (1), rejected1 (4)
    token = torch.tensor([-1.0, -2.0, -4.0, -8.0, -16.0, -32.0, -64.0, -128.0, -256.0])
    out = desensitized_logps(token, batch, 0.5)
    # shared lengths: pair 0 min(3, 1) = 1, pair 1 min(1, 4) = 1
    expected = [-1.0 + 0.5 * (-2.0 - 4.0), -8.0, -16.0, -32.0 + 0.5 * (-64.0 - 128.0 - 256.0)]
    assert out.tolist() == pytest.approx(expected)
    assert desensitized_logps(token, batch, 1.0).tolist() == pytest.approx([-7.0, -8.0, -16.0, -480.0])


def test_alpha_one_is_the_plain_function():
    assert pair_fn(1.0) is pair_logps
