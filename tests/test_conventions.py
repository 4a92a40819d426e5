"""TRL conventions that differ: each is named by a warning, once."""

import warnings

import pytest

from dpolab.config import TrainConfig, resolve
from dpolab.conventions import ConventionWarning, convention_notes, warn_trl_conventions


def test_defaults_warn_about_nothing():
    assert convention_notes(TrainConfig()) == []


def test_ipo_summed_is_named_and_the_option_silences_it():
    (note,) = convention_notes(TrainConfig(loss="ipo", beta=0.5))
    assert "--ipo-average-logps" in note and "1 nats per sequence" in note
    assert convention_notes(TrainConfig(loss="ipo", ipo_average_logps=True)) == []


@pytest.mark.parametrize("cfg", [TrainConfig(sft_weight=0.5), TrainConfig(loss="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1")])
def test_pair_weighted_sft_is_named(cfg):
    (note,) = convention_notes(cfg)
    assert "--sft-token-weighted" in note


def test_alpha_divergence_coefficient_is_translated():
    (note,) = convention_notes(TrainConfig(f_divergence="alpha_divergence", f_alpha=0.2))
    assert "f_alpha_divergence_coef for the same loss is 0.8" in note
    assert convention_notes(TrainConfig(f_divergence="alpha_divergence")) == []


def test_warned_once_per_process():
    cfg = TrainConfig(loss="ipo")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            warn_trl_conventions(cfg)
    assert [w.category for w in seen] == [ConventionWarning]


def test_bad_loss_weights_are_refused():
    with pytest.raises(ValueError, match="loss_weights"):
        resolve(TrainConfig, loss="sigmoid,sft", loss_weights="1,x")
