"""dpolab score: implicit rewards checked against log-probs computed by hand on tiny models."""

import json

import pytest
import torch

from dpolab.cli import main
from dpolab.data.files import DataError
from dpolab.models import ModelError
from dpolab.data.tokenize import encode
from dpolab.pair import load_model_pair
from dpolab.score import score
from tests.conftest import build_tiny_model, build_tokenizer

BETA = 0.5
ROWS = [
    {"prompt": "human : what was the movie like ? assistant :", "response": [" great fun", " awful boring plot", " good"]},
    {"prompt": "human : thanks ? assistant :", "response": " sure , very good acting"},
    {"prompt": [{"role": "user", "content": "how was it"}], "response": [" loved it", " hated it"]},
]


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """A second random tiny Llama with the same tokenizer (a stand-in reference)."""
    path = tmp_path_factory.mktemp("tiny-other")
    tokenizer = build_tokenizer()
    build_tiny_model(len(tokenizer), seed=1).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def foreign_tokenizer_dir(tmp_path_factory):
    """A tiny model whose tokenizer has one token more: not comparable with the others."""
    path = tmp_path_factory.mktemp("tiny-foreign")
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["zzzq"])
    build_tiny_model(len(tokenizer), seed=2).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def hand_token_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """log p(y_t | x, y_<t) of each completion token: one unpadded forward, full log-softmax."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return torch.stack([logp[n - 1 + t, tok] for t, tok in enumerate(completion_ids)])


def hand_ids(tokenizer, prompt, response):
    """Token ids as the trainer builds them: prompt with special tokens, response + EOS (text)
    or the chat template's rendering of the assistant turn (messages)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"], tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    return tokenizer(head)["input_ids"], tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def expected_records(policy, reference, tokenizer):
    out = []
    for n, row in enumerate(ROWS, start=1):
        cands = row["response"] if isinstance(row["response"], list) else [row["response"]]
        for i, resp in enumerate(cands):
            p, c = hand_ids(tokenizer, row["prompt"], resp)
            pol, ref = hand_token_logps(policy, p, c), hand_token_logps(reference, p, c)
            out.append({"row": n, "candidate": i, "policy": pol, "reference": ref, "ids": c})
    return out


def test_implicit_reward_equals_hand_computed(tiny_model_dir, other_model_dir, rows_file, tmp_path, capsys):
    records = score(model=str(tiny_model_dir), ref_model=str(other_model_dir), data=str(rows_file), beta=BETA,
                    output_dir=str(tmp_path / "out"), packing=True, batch_size=3)
    tokenizer = build_tokenizer()
    expected = expected_records(load(tiny_model_dir), load(other_model_dir), tokenizer)
    assert [(r["row"], r["candidate"]) for r in records] == [(e["row"], e["candidate"]) for e in expected]
    for r, e in zip(records, expected):
        reward = BETA * float(e["policy"].sum() - e["reference"].sum())
        assert r["policy_logps"] == pytest.approx(float(e["policy"].sum()), abs=1e-4)
        assert r["reference_logps"] == pytest.approx(float(e["reference"].sum()), abs=1e-4)
        assert r["reward"] == pytest.approx(reward, abs=1e-4)
        assert r["tokens"] == len(e["ids"])
        assert r["reward_per_token"] == pytest.approx(reward / len(e["ids"]), abs=1e-5)
        # per-token rewards: each equals the hand value, and they sum to the sequence reward
        assert r["token_rewards"] == pytest.approx((BETA * (e["policy"] - e["reference"])).tolist(), abs=1e-5)
        assert sum(r["token_rewards"]) == pytest.approx(r["reward"], abs=1e-9)
        assert "".join(r["token_texts"]) == tokenizer.decode(e["ids"])
    assert "implicit reward" in capsys.readouterr().out
    saved = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in saved] == [r["reward"] for r in records]


def test_padded_and_packed_batches_agree(tiny_model_dir, other_model_dir, rows_file, tmp_path):
    kw = dict(model=str(tiny_model_dir), ref_model=str(other_model_dir), data=str(rows_file), beta=BETA)
    packed = score(**kw, packing=True, output_dir=str(tmp_path / "a"))
    padded = score(**kw, packing=False, batch_size=2, output_dir=str(tmp_path / "b"))
    assert [r["reward"] for r in packed] == pytest.approx([r["reward"] for r in padded], abs=1e-4)


def test_candidates_are_ranked_best_first(tiny_model_dir, other_model_dir, rows_file, tmp_path):
    records = score(model=str(tiny_model_dir), ref_model=str(other_model_dir), data=str(rows_file), beta=BETA,
                    output_dir=str(tmp_path / "out"))
    for row in (1, 2, 3):
        group = [r for r in records if r["row"] == row]
        by_rank = sorted(group, key=lambda r: r["rank"])
        assert [r["rank"] for r in by_rank] == list(range(1, len(group) + 1))
        assert [r["reward"] for r in by_rank] == sorted((r["reward"] for r in group), reverse=True)
        assert [r["best"] for r in by_rank] == [True] + [False] * (len(group) - 1)


def test_per_token_outputs(tiny_model_dir, other_model_dir, rows_file, tmp_path, capsys):
    out = tmp_path / "out"
    records = score(model=str(tiny_model_dir), ref_model=str(other_model_dir), data=str(rows_file), beta=BETA,
                    output_dir=str(out), per_token=True, show=10)
    lines = [json.loads(x) for x in (out / "tokens.jsonl").read_text().splitlines()]
    assert len(lines) == len(records)
    assert all(len(x["token_texts"]) == len(x["token_rewards"]) for x in lines)
    assert lines[0]["beta"] == BETA
    page = (out / "tokens.html").read_text()
    total_tokens = sum(r["tokens"] for r in records)
    assert page.count('<span tabindex="0" style="background:rgb') == total_tokens  # focusable: a tap shows the value
    assert page.count('<span style="background:rgb') == 5  # the legend swatches
    assert "&lt;|im_end|&gt;" in page and "<|im_end|>" not in page  # special tokens shown, escaped
    assert "http://" not in page and "https://" not in page  # self-contained
    shown = capsys.readouterr().out
    assert "cand 0 (reward" in shown


def test_preference_pairs_are_scored_as_two_candidates(tiny_model_dir, other_model_dir, tmp_path):
    from tests.conftest import write_toy_pairs

    data = write_toy_pairs(tmp_path / "pairs.jsonl", 5)
    records = score(model=str(tiny_model_dir), ref_model=str(other_model_dir), data=str(data), limit=3,
                    output_dir=str(tmp_path / "out"))
    assert [(r["row"], r["candidate"]) for r in records] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    first = json.loads(data.read_text().splitlines()[0])
    assert records[0]["response"] == first["chosen"] and records[1]["response"] == first["rejected"]


def test_lora_adapter_reference_is_its_base(tiny_model_dir, rows_file, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load(tiny_model_dir)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(0)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a fresh adapter is the identity; make it change the model
    adapter_dir = tmp_path / "adapter"
    adapted.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    assert load_model_pair(str(adapter_dir)).names[1] == f"{tiny_model_dir} (the adapter's base)"
    records = score(model=str(adapter_dir), data=str(rows_file), beta=BETA, output_dir=str(tmp_path / "out"))
    policy = PeftModel.from_pretrained(load(tiny_model_dir), adapter_dir).eval()
    expected = expected_records(policy, load(tiny_model_dir), build_tokenizer())
    for r, e in zip(records, expected, strict=True):
        assert r["reward"] == pytest.approx(BETA * float(e["policy"].sum() - e["reference"].sum()), abs=1e-4)
    assert max(abs(r["reward"]) for r in records) > 1e-3


def test_reference_from_the_run_config(tiny_model_dir, other_model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in other_model_dir.iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\nref_model: ''\nbeta: 0.1\n")
    pair = load_model_pair(str(run / "final"))
    assert pair.names[1] == str(tiny_model_dir) and pair.reference is not pair.policy


def test_lengths_and_beta_come_from_the_run_unless_given(tiny_model_dir, other_model_dir, tmp_path):
    """--max-length / --max-prompt-length / --beta default to 0 = the run's own (its config.yaml),
    so a long row is cut where training cut it; a flag given wins; a bare model gets 512 / 0.1."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in other_model_dir.iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\nbeta: 0.3\nmax_length: 20\nmax_prompt_length: 6\n")
    rows = tmp_path / "long.jsonl"
    prompt, response = "the movie was " * 8, " great fun" * 20
    rows.write_text(json.dumps({"prompt": prompt, "response": response}) + "\n")
    tokenizer = build_tokenizer()

    def tokens(max_length, max_prompt_length):
        return len(encode(prompt, response, tokenizer, max_length, max_prompt_length)[1])

    own = score(model=str(run), data=str(rows), output_dir=str(tmp_path / "own"))[0]
    assert own["tokens"] == tokens(20, 6) and own["reward"] == pytest.approx(0.3 * (own["policy_logps"] - own["reference_logps"]))
    given = score(model=str(run), data=str(rows), max_length=40, beta=0.5, output_dir=str(tmp_path / "given"))[0]
    assert given["tokens"] == tokens(40, 20) > own["tokens"]  # the flag wins; its prompt limit is half of it
    assert given["reward"] == pytest.approx(0.5 * (given["policy_logps"] - given["reference_logps"]))
    bare = score(model=str(other_model_dir), ref_model=str(tiny_model_dir), data=str(rows), output_dir=str(tmp_path / "bare"))[0]
    assert bare["tokens"] == tokens(512, 256)


def test_same_path_shares_one_model_and_gives_zero_rewards(tiny_model_dir, rows_file, tmp_path):
    pair = load_model_pair(str(tiny_model_dir), str(tiny_model_dir))
    assert pair.reference is pair.policy
    records = score(model=str(tiny_model_dir), ref_model=str(tiny_model_dir), data=str(rows_file),
                    output_dir=str(tmp_path / "out"))
    assert all(r["reward"] == 0.0 for r in records)


def test_encode_truncates_long_rows(tiny_model_dir):
    tokenizer = build_tokenizer()
    prompt, completion = encode("the movie " * 20, " great" * 30, tokenizer, max_length=24, max_prompt_length=8)
    assert len(prompt) == 8 and len(prompt) + len(completion) == 24
    assert encode("a", "", tokenizer, full_response=False) is None  # nothing to score


@pytest.mark.parametrize("case, error, message", [
    ("foreign", ModelError, "different tokenizers"),
    ("missing", ModelError, "not found"),
    ("no-reference", ModelError, "no reference model"),
    ("no-data", ValueError, "nothing to score"),
    ("bad-row", DataError, "expected a text or a list of texts"),
    ("empty", DataError, "no rows"),
])
def test_bad_input_stops_with_a_clear_error(case, error, message, tiny_model_dir, other_model_dir,
                                            foreign_tokenizer_dir, rows_file, tmp_path):
    kw = dict(model=str(tiny_model_dir), ref_model=str(other_model_dir), data=str(rows_file), output_dir=str(tmp_path))
    if case == "foreign":
        kw["ref_model"] = str(foreign_tokenizer_dir)
    elif case == "missing":
        kw["model"] = str(tmp_path / "no-such-checkpoint")
    elif case == "no-reference":
        kw["ref_model"] = ""
    elif case == "no-data":
        kw["data"] = ""
    elif case == "bad-row":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "hi", "response": 3}) + "\n")
        kw["data"] = str(tmp_path / "bad.jsonl")
    else:
        (tmp_path / "empty.jsonl").write_text("")
        kw["data"] = str(tmp_path / "empty.jsonl")
    with pytest.raises(error, match=message):
        score(**kw)


def test_cli_prints_one_line_errors(tiny_model_dir, foreign_tokenizer_dir, rows_file, capsys):
    code = main(["score", "--model", str(tiny_model_dir), "--ref-model", str(foreign_tokenizer_dir), "--data", str(rows_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "different tokenizers" in err and "Traceback" not in err


def test_cli_scores(tiny_model_dir, other_model_dir, rows_file, tmp_path, capsys):
    code = main(["score", "--model", str(tiny_model_dir), "--ref-model", str(other_model_dir), "--data", str(rows_file),
                 "--per-token", "--output-dir", str(tmp_path / "cli"), "--beta", "0.2"])
    assert code == 0
    assert (tmp_path / "cli" / "tokens.html").exists()
    assert "beta=0.2" in capsys.readouterr().out
