"""reference.kind: the one map of the training-side reference values."""

import pytest
import torch

from dpolab import pair, reference


def test_kind_names_every_training_reference():
    assert reference.kind(None) == "none"
    assert reference.kind(reference.ADAPTER) == "adapter" and reference.ADAPTER is pair.ADAPTER  # one marker
    assert reference.kind(reference.INITIAL) == "initial"
    assert reference.kind(torch.zeros(4, 2)) == "cached"
    assert reference.kind(torch.nn.Linear(2, 2)) == "model"
    with pytest.raises(ValueError, match="unknown reference marker 'base'"):
        reference.kind("base")


@pytest.mark.parametrize("value", [None, reference.INITIAL])
def test_reference_logps_refuses_what_has_no_log_probs(value):
    batch = {"index": torch.tensor([0]), "input_ids": torch.zeros(1, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match="reference log-probs need"):
        reference.reference_logps(None, value, batch, lambda: torch.autocast("cpu", enabled=False))


def test_cached_reference_is_indexed_by_the_batch():
    cached = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    batch = {"index": torch.tensor([2, 0]), "input_ids": torch.zeros(2, 3, dtype=torch.long)}
    chosen, rejected = reference.reference_logps(None, cached, batch, None)
    assert chosen.tolist() == [5.0, 1.0] and rejected.tolist() == [6.0, 2.0]
