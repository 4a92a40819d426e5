"""Reward functions: built-ins against hand-computed values, user callables, reward models, bad specs."""

from __future__ import annotations

import sys

import pytest
import torch

from dpolab.rewards import load_reward


def test_sentiment_scores_the_completion_only():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    reward = load_reward("sentiment")
    completions = [" a wonderful, moving film; I loved every minute.", " dull, ugly and far too long. I hated it.", " it is a film."]
    scores = reward(["This movie", "This movie", "This movie"], completions)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    assert scores == [SentimentIntensityAnalyzer().polarity_scores(c)["compound"] for c in completions]
    # a hostile prompt does not change the score of the same completion
    assert reward(["The worst, most awful garbage:"], completions[:1]) == scores[:1]


def test_length_reward_is_zero_at_the_target():
    reward = load_reward("length", target_length=4)
    assert reward(["", "", ""], ["one two three four", "one", "a b c d e f g h"]) == [0.0, -0.75, -1.0]


def test_regex_present_and_absent():
    texts = ["I am sorry, I cannot", "Sure, here it is"]
    assert load_reward("regex", pattern=r"\bsorry\b")(["", ""], texts) == [1.0, 0.0]
    assert load_reward("regex", pattern=r"\bsorry\b", absent=True)(["", ""], texts) == [0.0, 1.0]


def test_callable_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    code = "def score(prompts, completions):\n    return [len(p) + 10 * c.count('!') for p, c in zip(prompts, completions)]\n"
    (tmp_path / "my_judge.py").write_text(code)
    from_file = load_reward(f"{tmp_path / 'my_judge.py'}:score")
    assert from_file(["ab", "abc"], ["wow!!", "ok"]) == [22.0, 3.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_judge", raising=False)
    assert load_reward("my_judge:score")(["x"], ["!"]) == [11.0]


def test_callable_with_a_wrong_result_fails_clearly(tmp_path):
    (tmp_path / "bad.py").write_text("def short(p, c):\n    return [1.0]\ndef words(p, c):\n    return ['x' for _ in c]\n")
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        load_reward(f"{tmp_path / 'bad.py'}:short")(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="list of numbers"):
        load_reward(f"{tmp_path / 'bad.py'}:words")(["a"], ["c"])


@pytest.mark.parametrize("spec, options, message", [
    ("", {}, "no reward given"),
    ("happiness", {}, "unknown reward 'happiness'"),
    ("dpolab_no_such_module_xyz:score", {}, "cannot import module"),
    ("os.path:no_such_function", {}, "has no attribute"),
    ("os:sep", {}, "is not callable"),
    ("missing_file.py:score", {}, "not found"),
    ("regex", {}, "needs a pattern"),
    ("regex", {"pattern": "(unclosed"}, "bad pattern"),
    ("length", {"target_length": 0}, "positive integer"),
    ("sentiment", {"pattern": "x"}, "takes no option"),
])
def test_bad_specs_fail_with_one_clear_line(spec, options, message):
    with pytest.raises(ValueError, match=message) as err:
        load_reward(spec, **options)
    assert "\n" not in str(err.value)


def test_broken_user_file_fails_with_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("import dpolab_no_such_dependency\n")
    with pytest.raises(ValueError, match="importing .* failed: ModuleNotFoundError") as err:
        load_reward(f"{tmp_path / 'broken.py'}:score")
    assert "\n" not in str(err.value)


def _classifier(tmp_path, num_labels: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    labels = {0: "NEGATIVE", 1: "POSITIVE"} if num_labels == 2 else {0: "LABEL_0"}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, id2label=labels,
                         label2id={v: k for k, v in labels.items()}, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path / f"rm{num_labels}"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@pytest.mark.parametrize("num_labels", [1, 2])
def test_sequence_classifier_reward(tmp_path, num_labels):
    path, model, tokenizer = _classifier(tmp_path, num_labels)
    prompts, completions = ["the movie was", "i"], [" great fun", " hated the plot and the acting"]
    expected = []
    with torch.no_grad():  # one text at a time: no padding involved in the expected values
        for text in [p + c for p, c in zip(prompts, completions)]:
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
            expected.append(float(logits[0]) if num_labels == 1 else float(logits[1] - logits[0]))
    got = load_reward(str(path), device="cpu")(prompts, completions)
    assert got == pytest.approx(expected, abs=1e-5)
    only_completion = load_reward(str(path), device="cpu", with_prompt=False)(prompts, completions)
    assert only_completion != pytest.approx(got)


def test_reward_model_label_errors(tmp_path):
    path, _, _ = _classifier(tmp_path, 2)
    with pytest.raises(ValueError, match="no label 'joy'"):
        load_reward(str(path), label="joy")
    with pytest.raises(ValueError, match="out of range"):
        load_reward(str(path), label=5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .safetensors weights"):
        load_reward(str(empty))
