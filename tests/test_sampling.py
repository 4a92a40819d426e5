"""The one sampler: generate, eval/rank and the experiment draw the same completions for the same seed."""

import types

import torch

from dpolab import sampling
from dpolab.experiments import measure
from dpolab.pair import ModelPair
from tests.conftest import build_tiny_model, build_tokenizer

PROMPTS = ["the movie was", [{"role": "user", "content": "hello there"}], "i think that this film"]


def test_every_caller_gets_the_same_samples_for_the_same_seed():
    tok = build_tokenizer()
    model = build_tiny_model(len(tok), seed=0).eval()
    kw = dict(num_samples=2, max_new_tokens=6, temperature=1.3, top_p=0.9, seed=4, chat=True)
    drawn = sampling.draw(model, tok, PROMPTS, batch_size=5, **kw)
    assert drawn.by_prompt(drawn.completion_ids) == sampling.sample_ids(model, tok, PROMPTS, batch_size=2, **kw)
    assert drawn.by_prompt(drawn.texts) == sampling.sample(model, tok, PROMPTS, batch_size=1, **kw)
    assert drawn.texts == [tok.decode(c, skip_special_tokens=True) for c in drawn.completion_ids]
    assert len(set(map(tuple, drawn.completion_ids))) > 1  # really sampled, not one repeated answer
    # eval / rank settings of a config
    cfg = types.SimpleNamespace(num_samples=2, max_new_tokens=6, temperature=1.3, top_p=0.9, seed=4, batch_size=3)
    assert sampling.draw(model, tok, PROMPTS, **sampling.settings(cfg), chat=True).completion_ids == drawn.completion_ids
    # the experiment samples with seed + 1 (its reference and policies share that noise)
    ref = ModelPair(model, model, tok, torch.device("cpu"), False, ("ref", "ref"))
    exp_cfg = types.SimpleNamespace(max_new_tokens=6, temperature=1.3, top_p=0.9, seed=3, gen_batch_size=4, chat=True,
                                    progress=False)
    out = measure.draw(model, ref, PROMPTS, 2, exp_cfg, lambda prompts, texts: [float(len(t)) for t in texts])
    assert [[c for _, c in row] for row in out["ids"]] == drawn.by_prompt(drawn.completion_ids)
    assert out["rewards"] == [[float(len(t)) for t in row] for row in drawn.by_prompt(drawn.texts)]


def test_sequence_kl_of_a_model_against_itself_is_zero():
    tok = build_tokenizer()
    model = build_tiny_model(len(tok), seed=0).eval()
    other = build_tiny_model(len(tok), seed=1).eval()
    drawn = sampling.draw(model, tok, PROMPTS[:1], num_samples=3, max_new_tokens=5, seed=1)
    same = ModelPair(model, model, tok, torch.device("cpu"), False, ("a", "a"))
    assert sampling.sequence_kl(same, drawn.prompt_ids, drawn.completion_ids)["mean"] == 0.0
    kl = sampling.sequence_kl(same.with_policy(other, "b"), drawn.prompt_ids, drawn.completion_ids)
    assert kl["n"] == 3 and kl["mean"] != 0.0
