"""Sampling, pairing, label noise and the `dpolab generate` command, on the tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from dpolab.generate import (
    GenerateConfig, GumbelSampler, encode_prompt, generate, make_pairs, noisy_label, pair_rows, read_prompts, stop_token_ids,
    review_prefix, sample, sample_ids,
)
from tests.conftest import SHARED_DATA, build_tiny_model, build_tokenizer

PROMPTS = ["the movie was", "i liked the", "a", "this film is not very good and the actor"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_tiny_model(len(tokenizer)).eval(), tokenizer


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_deterministic_under_a_seed_whatever_the_batch(tiny):
    model, tokenizer = tiny
    kw = dict(num_samples=3, max_new_tokens=10, seed=7)
    a = sample(model, tokenizer, PROMPTS, batch_size=5, **kw)
    assert a == sample(model, tokenizer, PROMPTS, batch_size=5, **kw)
    assert a == sample(model, tokenizer, PROMPTS, batch_size=1, **kw)
    assert a == sample(model, tokenizer, PROMPTS, batch_size=12, **kw)
    assert a != sample(model, tokenizer, PROMPTS, batch_size=5, **{**kw, "seed": 8})
    assert len({c for row in a for c in row}) == 12  # distinct noise per sample
    # a prompt's samples depend on its index, not on the other prompts it is batched with
    assert sample(model, tokenizer, PROMPTS[2:3], prompt_indices=[2], **kw) == a[2:3]


def test_greedy_matches_a_hand_written_decode_loop(tiny):
    model, tokenizer = tiny
    got = sample_ids(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0, batch_size=4)
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    for prompt, (ids,) in zip(PROMPTS, got):
        seq = tokenizer(prompt)["input_ids"]
        expected = []
        with torch.no_grad():  # one unpadded sequence, no cache: the plain definition of greedy decoding
            for _ in range(6):
                token = int(model(torch.tensor([seq + expected])).logits[0, -1].argmax())
                if token in stops:
                    break
                expected.append(token)
        assert ids == expected


def test_gumbel_sampler_draws_from_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    n, temperature = 20000, 0.7
    sampler = GumbelSampler(list(range(n)), temperature, 1.0)
    picks = sampler(None, logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).float() / n
    expected = (logits / temperature).softmax(-1)
    # each frequency within 5 standard errors of its probability
    assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-4)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    picks = GumbelSampler(list(range(n)), 1.0, 0.7)(None, probs.log().expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert freq[2] == 0 and freq[3] == 0  # 0.5 + 0.3 reaches 0.7: the tail is cut
    assert abs(float(freq[0]) - 0.5 / 0.8) < 0.02


def test_generation_stops_at_the_end_of_turn_token(tiny):
    _, tokenizer = tiny
    model = build_tiny_model(len(tokenizer))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make <|im_end|> the overwhelming next token everywhere
        model.lm_head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        model.lm_head.bias.zero_()
        model.lm_head.bias[eos] = 100.0
    assert sample_ids(model.eval(), tokenizer, PROMPTS[:2], num_samples=2, max_new_tokens=5) == [[[], []], [[], []]]


def test_chat_prompts_use_the_template(tiny):
    _, tokenizer = tiny
    messages = [{"role": "user", "content": "the movie was"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert encode_prompt(messages, tokenizer) == tokenizer(rendered)["input_ids"]
    assert encode_prompt("the movie was", tokenizer, chat=True) == encode_prompt(messages, tokenizer)
    assert encode_prompt("the movie was", tokenizer) == tokenizer("the movie was")["input_ids"]


def test_bad_sampling_settings(tiny):
    model, tokenizer = tiny
    for kw, message in [({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"), ({"num_samples": 0}, "num_samples")]:
        with pytest.raises(ValueError, match=message):
            sample(model, tokenizer, PROMPTS, **kw)


# ----------------------------------------------------------------------------- pairs
def test_best_vs_worst():
    assert make_pairs([0.1, 0.9, -0.5, 0.3], "best-vs-worst") == ([(1, 2)], {"ties": 0, "below_gap": 0})
    assert make_pairs([0.2, 0.9, 0.9, -0.1, -0.1], "best-vs-worst")[0] == [(1, 3)]  # first of equals
    assert make_pairs([0.2, 0.2, 0.2], "best-vs-worst") == ([], {"ties": 1, "below_gap": 0})
    assert make_pairs([0.0, 0.1, 0.3], "best-vs-worst", min_gap=0.5) == ([], {"ties": 0, "below_gap": 1})


def test_all_pairs_above_min_gap():
    pairs, dropped = make_pairs([1.0, 2.0, 2.0, 0.0], "all")
    assert sorted(pairs) == sorted([(1, 0), (2, 0), (0, 3), (1, 3), (2, 3)])
    assert dropped == {"ties": 1, "below_gap": 0}
    pairs, dropped = make_pairs([1.0, 2.0, 2.0, 0.0], "all", min_gap=1.5)
    assert sorted(pairs) == [(1, 3), (2, 3)] and dropped == {"ties": 1, "below_gap": 3}


def test_random_pair_covers_every_pair_with_the_higher_first():
    scores = [0.5, -1.0, 2.0]
    seen = {}
    for s in range(600):
        (pair,), _ = make_pairs(scores, "random", rng=random.Random(s))
        assert scores[pair[0]] > scores[pair[1]]
        seen[pair] = seen.get(pair, 0) + 1
    assert set(seen) == {(0, 1), (2, 0), (2, 1)} and min(seen.values()) > 150
    assert make_pairs([1.0, 1.0], "random", rng=random.Random(0)) == ([], {"ties": 1, "below_gap": 0})


def test_unknown_strategy():
    with pytest.raises(ValueError, match="pair_strategy"):
        make_pairs([1.0, 0.0], "best-of-both")


# ----------------------------------------------------------------------------- label noise
N_NOISE = 20000


def _swap_rate(**kw) -> float:
    rng = random.Random(0)
    return sum(noisy_label(1.0, 0.0, rng, **kw) for _ in range(N_NOISE)) / N_NOISE


def _close(rate: float, p: float) -> bool:
    return abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / N_NOISE)  # 5 standard errors


def test_flip_rate_is_the_fraction_asked():
    assert _swap_rate() == 0.0
    assert _close(_swap_rate(flip_rate=0.3), 0.3)
    assert _swap_rate(flip_rate=1.0) == 1.0


def test_bradley_terry_labels():
    # gap 1, T = 0.5: the higher-scored completion stays chosen with probability sigmoid(2)
    keep = 1 / (1 + math.exp(-2.0))
    assert _close(_swap_rate(bt_temperature=0.5), 1 - keep)
    # both: the Bradley-Terry outcome, then flipped with probability 0.2
    assert _close(_swap_rate(bt_temperature=0.5, flip_rate=0.2), (1 - keep) * 0.8 + keep * 0.2)


def test_flipped_rows_swap_chosen_and_rejected():
    cfg = GenerateConfig(pair_strategy="best-vs-worst", flip_rate=1.0)
    rows, _ = pair_rows("p", 3, ["good", "bad", "meh"], [1.0, -1.0, 0.0], cfg, chat=False)
    assert rows == [{"prompt": "p", "chosen": "bad", "rejected": "good", "chosen_score": -1.0, "rejected_score": 1.0,
                     "prompt_index": 3, "chosen_sample": 1, "rejected_sample": 0, "flipped": True}]


# ----------------------------------------------------------------------------- prompts
def test_review_prefixes_from_a_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('review,sentiment\n"First line.<br /><br />Second line goes on and on here",positive\n'
                    '"Short one",negative\n')
    assert read_prompts(str(path), prefix_words=5) == ["First line. Second line goes", "Short one"]
    assert review_prefix("a<br />b c", 2) == "a b"


@pytest.mark.skipif(not (SHARED_DATA / "imdb-reviews-999.csv.gz").exists(), reason="shared IMDb file not present")
def test_imdb_prefixes():
    prompts = read_prompts(str(SHARED_DATA / "imdb-reviews-999.csv.gz"), prefix_words=8, limit=50)
    assert len(prompts) == 50 and all(1 <= len(p.split()) <= 8 and "<br" not in p for p in prompts)


def test_builtin_prompts():
    prompts = read_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)


# ----------------------------------------------------------------------------- the command
def _generate(tiny_model_dir, tmp_path, **kw):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + ["the plot", "wonderful acting and"]) + "\n")
    base = dict(model=str(tiny_model_dir), prompts=str(prompts), output=str(tmp_path / "pairs.jsonl"), reward="length",
                reward_target_length=4, num_samples=4, max_new_tokens=8, batch_size=8, progress=False, device="cpu")
    return generate(GenerateConfig(**{**base, **kw}))


def test_generate_writes_explicit_pairs_that_train_reads(tiny_model_dir, tmp_path):
    from dpolab.data import load_pairs
    from dpolab.models import load_tokenizer

    totals = _generate(tiny_model_dir, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert totals["pairs"] == len(rows) and totals["pairs"] + totals["ties"] == 6
    for r in rows:
        assert r["chosen_score"] > r["rejected_score"] and r["flipped"] is False
        assert r["chosen_score"] == -abs(len(r["chosen"].split()) - 4) / 4  # the length reward, recomputed
    pairs, _ = load_pairs(str(tmp_path / "pairs.jsonl"), load_tokenizer(str(tiny_model_dir)), max_length=128,
                          max_prompt_length=64)
    assert len(pairs) == len(rows)


def test_generate_resumes_and_skips_finished_prompts(tiny_model_dir, tmp_path):
    (tmp_path / "full").mkdir()
    _generate(tiny_model_dir, tmp_path / "full")
    full = (tmp_path / "full" / "pairs.jsonl").read_text()
    # an interrupted run: the settings line and two prompts marked done, rows of all six written
    out = tmp_path / "pairs.jsonl"
    _generate(tiny_model_dir, tmp_path)
    log = out.with_name("pairs.jsonl.progress.jsonl")
    log.write_text("\n".join(log.read_text().splitlines()[:3]) + "\n")
    totals = _generate(tiny_model_dir, tmp_path)
    assert totals["skipped"] == 2
    assert sorted(out.read_text().splitlines()) == sorted(full.splitlines())
    assert _generate(tiny_model_dir, tmp_path)["skipped"] == 6  # nothing left to do


def test_generate_refuses_to_mix_settings(tiny_model_dir, tmp_path):
    _generate(tiny_model_dir, tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(seed\).*--overwrite"):
        _generate(tiny_model_dir, tmp_path, seed=1)
    assert _generate(tiny_model_dir, tmp_path, seed=1, overwrite=True)["skipped"] == 0


def test_generate_never_overwrites_a_foreign_file(tiny_model_dir, tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(ValueError, match="no pairs.jsonl.progress.jsonl to resume from"):
        _generate(tiny_model_dir, tmp_path)
    assert (tmp_path / "pairs.jsonl").read_text() == '{"mine": 1}\n'


def test_generate_chat_pairs_are_conversational(tiny_model_dir, tmp_path):
    _generate(tiny_model_dir, tmp_path, chat=True, reward="regex", reward_pattern="a")
    for line in (tmp_path / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"


def test_generate_cli_bad_reward_is_one_line(tiny_model_dir, tmp_path, capsys):
    from dpolab.cli import main

    code = main(["generate", "--model", str(tiny_model_dir), "--reward", "happiness", "--output", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "unknown reward 'happiness'" in err


@pytest.mark.slow
def test_default_model_continues_review_openings():
    """The real default model: seeded sampling is batch-independent and VADER tells its continuations apart."""
    from dpolab.models import load_model, load_tokenizer
    from dpolab.rewards import load_reward

    model, tokenizer = load_model("default").eval(), load_tokenizer("default")
    prompts = read_prompts(limit=4)
    a = sample(model, tokenizer, prompts, num_samples=4, max_new_tokens=12, seed=3, batch_size=16)
    assert a == sample(model, tokenizer, prompts, num_samples=4, max_new_tokens=12, seed=3, batch_size=5)
    scores = load_reward("sentiment")([p for p in prompts for _ in range(4)], [c for row in a for c in row])
    assert len(set(scores)) > 2 and all(-1 <= s <= 1 for s in scores)


@pytest.mark.parametrize("chat", [False, True])
def test_training_sees_exactly_the_sampled_tokens(tiny_model_dir, tmp_path, chat):
    """Training sees exactly the sampled ids: the prompt ids sampled from, each completion's ids with
    the stop token where the sampler drew one and none where max_new_tokens cut it, even where
    decoding and re-tokenising the text would give other ids."""
    from dpolab.data import load_pairs
    from dpolab.data.sampled import NOTE_OTHER_TOKENIZER
    from dpolab.sampling import sample_ids
    from dpolab.models import load_model, load_tokenizer

    _generate(tiny_model_dir, tmp_path, chat=chat, max_new_tokens=6, temperature=2.0)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = GenerateConfig(model=str(tiny_model_dir), chat=chat, max_new_tokens=6, temperature=2.0, num_samples=4, batch_size=8)
    prompts = read_prompts(str(tmp_path / "prompts.txt"))
    sampled = sample_ids(load_model(str(tiny_model_dir)).eval(), tokenizer, prompts, num_samples=4, max_new_tokens=6,
                         temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, batch_size=8, chat=chat,
                         keep_stop=True)
    pairs, report = load_pairs(str(tmp_path / "pairs.jsonl"), tokenizer, max_length=256, max_prompt_length=128)
    assert len(pairs) == len(rows) > 0 and NOTE_OTHER_TOKENIZER not in report.notes
    stops = set(stop_token_ids(tokenizer))
    cut = whole = not_round_trip = 0
    for row, pair in zip(rows, pairs):
        assert pair.prompt_ids == encode_prompt(prompts[row["prompt_index"]], tokenizer, chat)
        for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            drawn = sampled[row["prompt_index"]][row[f"{side}_sample"]]
            assert ids == drawn  # exactly the sampled tokens
            text = row[side] if isinstance(row[side], str) else row[side][-1]["content"]
            not_round_trip += tokenizer(text, add_special_tokens=False)["input_ids"] != [t for t in drawn if t not in stops]
            assert row[f"{side}_truncated"] == (drawn[-1] not in stops)
            if row[f"{side}_truncated"]:  # no stop token the model never sampled
                cut += 1
                assert len(drawn) == 6 and not stops & set(ids), (side, ids)
            else:
                whole += 1
                assert ids[-1] in stops  # it stopped: training learns to stop there
    assert not_round_trip >= 1  # the text route would have trained on other ids for these
    assert cut >= 2


def test_summary_line_counts_in_the_right_number(tiny_model_dir, tmp_path, capsys):
    totals = _generate(tiny_model_dir, tmp_path, limit=1, num_samples=2, max_new_tokens=4)
    out = capsys.readouterr().out
    prompt_word = "1 prompt ->"
    assert prompt_word in out and f"{totals['pairs']} pair{'' if totals['pairs'] == 1 else 's'} from" in out
    assert "0 prompts already done" in out and " prompts ->" not in out


def test_resume_keeps_a_row_whose_text_holds_a_unicode_line_separator(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028 raw; str.splitlines() would split the row in
    # two and the resume would fail to parse it (the demo's sampler produced one such completion)
    from dpolab.data.files import json_lines
    from dpolab.generate import progress_path, resume_state

    out = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "a\u2028b", "rejected": "c", "prompt_index": 0},
            {"prompt": "q", "chosen": "d", "rejected": "e\u0085f", "prompt_index": 1}]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    progress_path(out).write_text(json.dumps({"settings": {"seed": 0}}) + "\n" + json.dumps({"prompt_index": 0}) + "\n")
    assert len(json_lines(out)) == 2
    assert resume_state(out, {"seed": 0}, overwrite=False) == {0}
    assert [json.loads(line) for line in json_lines(out)] == rows[:1]  # prompt 1 was not marked done
