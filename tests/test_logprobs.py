"""Every fast path (packing, prefix sharing, segment attention) gives the plain path's log-probs, losses and gradients.

The plain path is computed independently of dpolab's collate and log-prob code: each sequence
alone through the model (no padding, no mask), full logits, `log_softmax`, gather.
"""

from __future__ import annotations

import random

import pytest
import torch

from dpolab import attention, logprobs
from dpolab.data.collate import Layout, collate, collate_pairs
from dpolab.data.formats import DataReport, PreferenceExample
from dpolab.data.tokenize import TokenizedPair, tokenize_examples
from dpolab.logprobs import forward_logps, pair_logps, split_tokens, token_logps_from_logits
from dpolab.losses import LossParams, PairLogps, compute_loss
from tests.conftest import WORDS, build_tiny_model, build_tokenizer

FAST = [
    Layout(packing=True),
    Layout(packing=False, prefix_sharing=True),
    Layout(packing=True, prefix_sharing=True),
    Layout(packing=True, segment_attention=True),
    Layout(packing=True, prefix_sharing=True, segment_attention=True),
]
FAST_IDS = ["packed", "shared-padded", "shared-packed", "segments", "shared-segments"]
PLAIN = Layout(packing=False)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny(vocab, seed=0, impl="sdpa"):
    model = build_tiny_model(vocab, seed)
    model.config._attn_implementation = impl
    return model.eval()


def multi_turn_pairs(tokenizer, n, seed, max_length, max_prompt_length):
    """Conversational pairs with 1-3 prior turns, rendered by the chat template and truncated."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    examples = []
    for row in range(1, n + 1):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": text(rng.randint(1, 12))},
                      {"role": "assistant", "content": text(rng.randint(1, 8))}]
        prompt = turns[:-1]
        chosen = [{"role": "assistant", "content": text(rng.randint(1, 10))}]
        rejected = [{"role": "assistant", "content": text(rng.randint(1, 10))}]
        examples.append(PreferenceExample(row, prompt, chosen, rejected))
    return tokenize_examples(examples, tokenizer, DataReport(source="test"), max_length, max_prompt_length)


def edge_pairs():
    """1-token completions, a 1-token prompt, and a prompt exactly max_prompt_length (=8) long."""
    return [
        TokenizedPair(1, [11], [12], [13]),
        TokenizedPair(2, list(range(20, 28)), [30], [31, 32, 33]),
        TokenizedPair(3, list(range(40, 48)), [50, 51], [52]),
        TokenizedPair(4, [60, 61, 62], [63, 64, 65, 66], [67, 68, 69, 70, 71]),
    ]


def plain_token_logps(model, prompt, completion):
    """log p(completion_j | prompt, completion_<j), (len,) fp32, one sequence alone, full log_softmax."""
    ids = torch.tensor([prompt + completion])
    logps = model(input_ids=ids).logits[0].float().log_softmax(-1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logps[rows, torch.tensor(completion)]


def plain_pair_logps(model, pairs):
    chosen = torch.stack([plain_token_logps(model, p.prompt_ids, p.chosen_ids).sum() for p in pairs])
    rejected = torch.stack([plain_token_logps(model, p.prompt_ids, p.rejected_ids).sum() for p in pairs])
    return chosen, rejected


def truncated_pairs(tokenizer):
    """Multi-turn pairs whose prompts were cut to exactly max_prompt_length: completions cut to 8 and to 1 token."""
    return (multi_turn_pairs(tokenizer, 4, 5, max_length=16, max_prompt_length=8)
            + multi_turn_pairs(tokenizer, 3, 6, max_length=9, max_prompt_length=8))


def test_truncation_edge_cases_are_present(tokenizer):
    pairs = truncated_pairs(tokenizer)
    assert all(len(p.prompt_ids) == 8 for p in pairs)
    assert any(len(p.chosen_ids) == len(p.rejected_ids) == 1 for p in pairs)
    assert any(len(p.chosen_ids) == 8 for p in pairs)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", [PLAIN] + FAST, ids=["padded"] + FAST_IDS)
@pytest.mark.parametrize("source", ["random", "multi_turn", "truncated", "edges"])
def test_token_logps_match_plain_path(tokenizer, layout, impl, source):
    model = tiny(len(tokenizer), impl=impl)
    if source == "edges":
        pairs = edge_pairs()
    elif source == "truncated":
        pairs = truncated_pairs(tokenizer)
    else:
        long = source == "random"
        pairs = multi_turn_pairs(tokenizer, 6, 1 if long else 2, max_length=200 if long else 96, max_prompt_length=64)
    with torch.no_grad():
        batch = collate_pairs(pairs, tokenizer.pad_token_id, layout)
        got = split_tokens(forward_logps(model, batch), batch)
        expected = [plain_token_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs]
        expected += [plain_token_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-5)


def _slice_before_5_21(hidden_states, logits_to_keep):
    """How transformers before 5.21 picked the kept positions (a 2D boolean mask fails there)."""
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, keep, :]


@pytest.mark.parametrize("layout", [PLAIN] + FAST, ids=["padded"] + FAST_IDS)
def test_same_logps_with_transformers_before_boolean_logits_to_keep(tokenizer, layout, monkeypatch):
    """pyproject allows transformers >= 4.56: one-row batches hand it positions, several rows
    the union of their positions, and each row's own logits are picked afterwards."""
    from transformers.models.llama import modeling_llama

    model = tiny(len(tokenizer))
    batch = collate_pairs(multi_turn_pairs(tokenizer, 6, 2, max_length=96, max_prompt_length=64), tokenizer.pad_token_id, layout)
    with torch.no_grad():
        want = forward_logps(model, batch)
        monkeypatch.setattr(modeling_llama, "slice_logits_to_keep", _slice_before_5_21, raising=False)  # absent before 5.21
        monkeypatch.setattr(logprobs, "BOOL_LOGITS_TO_KEEP", False)
        got = forward_logps(model, batch)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", FAST, ids=FAST_IDS)
def test_dpo_loss_and_gradients_match_plain_path(tokenizer, layout):
    """Policy != reference so the loss is not ln 2; gradients of the loss agree parameter by parameter."""
    pairs = multi_turn_pairs(tokenizer, 5, 3, max_length=80, max_prompt_length=48)
    reference = tiny(len(tokenizer), seed=1)
    params = LossParams(beta=0.1)

    def loss_and_grads(model, chosen, rejected, ref_chosen, ref_rejected):
        lengths = torch.tensor([float(len(p.chosen_ids)) for p in pairs]), torch.tensor([float(len(p.rejected_ids)) for p in pairs])
        out = compute_loss("sigmoid", PairLogps(chosen, rejected, ref_chosen, ref_rejected, *lengths), params)
        model.zero_grad(set_to_none=True)
        out.losses.mean().backward()
        return out.losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with torch.no_grad():
        ref_chosen, ref_rejected = plain_pair_logps(reference, pairs)
    plain_model = tiny(len(tokenizer)).train()
    want_loss, want_grads = loss_and_grads(plain_model, *plain_pair_logps(plain_model, pairs), ref_chosen, ref_rejected)
    fast_model = tiny(len(tokenizer)).train()
    batch = collate_pairs(pairs, tokenizer.pad_token_id, layout)
    with torch.no_grad():
        fast_ref = pair_logps(tiny(len(tokenizer), seed=1), batch)
    torch.testing.assert_close(fast_ref, (ref_chosen, ref_rejected), atol=1e-4, rtol=1e-5)
    got_loss, got_grads = loss_and_grads(fast_model, *pair_logps(fast_model, batch), *fast_ref)
    assert abs(float(want_loss.mean()) - 0.693147) > 1e-3  # a real, non-trivial loss
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", [Layout(False, True), Layout(True, True, True)], ids=["shared-padded", "shared-segments"])
def test_bf16_autocast_within_bf16_noise(tokenizer, layout):
    """Under bf16 autocast the fast path stays as close to the plain path as bf16 allows."""
    pairs = multi_turn_pairs(tokenizer, 4, 4, max_length=96, max_prompt_length=64)
    model = tiny(len(tokenizer))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = pair_logps(model, collate_pairs(pairs, tokenizer.pad_token_id, PLAIN))
        fast = pair_logps(model, collate_pairs(pairs, tokenizer.pad_token_id, layout))
    with torch.no_grad():
        exact = plain_pair_logps(model, pairs)
    for f, p, e in zip(fast, plain, exact):
        tolerance = 0.02 * e.abs() + 0.05  # bf16 has 8 mantissa bits
        assert ((f - e).abs() <= tolerance).all() and ((p - e).abs() <= tolerance).all()


def test_segments_with_gradient_checkpointing_and_lora(tokenizer):
    """The segment spec reaches attention through PEFT and through recomputation in backward."""
    from peft import LoraConfig, get_peft_model

    pairs = multi_turn_pairs(tokenizer, 4, 6, max_length=64, max_prompt_length=40)
    grads = []
    for layout in (PLAIN, Layout(True, True, True)):
        torch.manual_seed(0)
        model = tiny(len(tokenizer)).train()
        if hasattr(model, "activation_checkpointing_enable"):  # its name in transformers 5.24; 5.22 and older: gradient_checkpointing_enable
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        chosen, rejected = pair_logps(model, collate_pairs(pairs, tokenizer.pad_token_id, layout))
        (chosen - rejected).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_segment_model_is_plain_sdpa_without_segments(tokenizer):
    """After enable(), a call without segments (e.g. generation, a padded batch) is unchanged."""
    model = tiny(len(tokenizer))
    ids = torch.randint(3, len(tokenizer), (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        attention.enable(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == attention.NAME
    torch.testing.assert_close(after, before)


def test_single_sequence_batches_for_scoring(tokenizer):
    """collate() (SFT / scoring) with segment attention matches the plain path too."""
    pairs = multi_turn_pairs(tokenizer, 5, 8, max_length=80, max_prompt_length=48)
    model = tiny(len(tokenizer))
    prompts, completions = [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs]
    with torch.no_grad():
        batch = collate(prompts, completions, tokenizer.pad_token_id, Layout(True, segment_attention=True))
        got = split_tokens(forward_logps(model, batch), batch)
        for g, p, c in zip(got, prompts, completions):
            torch.testing.assert_close(g, plain_token_logps(model, p, c), atol=2e-5, rtol=1e-5)


def test_token_logps_from_logits_with_shared_rows():
    torch.manual_seed(0)
    logits = torch.randn(5, 11, dtype=torch.bfloat16)
    rows = torch.tensor([0, 1, 2, 0, 3, 4])
    targets = torch.tensor([3, 1, 10, 7, 0, 5])
    expected = logits.float().log_softmax(-1)[rows, targets]
    torch.testing.assert_close(token_logps_from_logits(logits, targets, rows), expected)
    torch.testing.assert_close(token_logps_from_logits(logits, targets[:5]), logits.float().log_softmax(-1)[torch.arange(5), targets[:5]])


def test_flash_attention_models_refuse_prefix_sharing(tokenizer):
    model = tiny(len(tokenizer))
    model.config._attn_implementation = "flash_attention_2"
    batch = collate_pairs(edge_pairs(), 0, Layout(True, True, True))
    with pytest.raises(ValueError, match="no-prefix-sharing"):
        pair_logps(model, batch)


def test_sliding_window_models_refuse_long_custom_layouts():
    model = tiny(400)
    model.config.sliding_window = 4  # a Mistral-style local window: our masks are full causal
    pairs = edge_pairs()
    with pytest.raises(ValueError, match="sliding attention window"):
        pair_logps(model, collate_pairs(pairs, 0, Layout(True, True, True)))
    with torch.no_grad():  # the plain layouts leave windows to transformers
        pair_logps(model, collate_pairs(pairs, 0, PLAIN))


def test_attention_that_drops_segments_is_an_error():
    class DropsExtraArguments(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, dpolab_segments=None, **kwargs):
            return self.inner(**kwargs)

    model = DropsExtraArguments(tiny(400))
    with pytest.raises(ValueError, match="no-segment-attention"):
        pair_logps(model, collate_pairs(edge_pairs(), 0, Layout(True, True, True)))


def test_flushing_denormals_changes_nothing_above_them():
    """A confident softmax over a large vocab: its backward is full of denormal floats (slow on
    x86); flushing changes nothing above them (the speed is measured in benchmarks/)."""
    torch.manual_seed(0)
    logits = torch.randn(16, 5000) * 3
    logits[:, 7] += 110.0  # p(other tokens) ~ e^-110 < 1.2e-38: denormal or zero
    targets = torch.full((16,), 7)
    results = {}
    try:
        for on in (False, True):
            torch.set_flush_denormal(on)
            x = logits.clone().requires_grad_()
            logps = token_logps_from_logits(x, targets)
            logps.sum().backward()
            results[on] = (logps.detach(), x.grad)
    finally:
        torch.set_flush_denormal(False)
    tiny = torch.finfo(torch.float32).tiny
    (lp_off, g_off), (lp_on, g_on) = results[False], results[True]
    denormal_off = (g_off != 0) & (g_off.abs() < tiny)
    assert denormal_off.sum() > 1000  # the slow case is real
    assert torch.equal(lp_on, lp_off)
    assert torch.equal(g_on[~denormal_off], g_off[~denormal_off])
    assert (g_on[denormal_off].abs() < tiny).all()  # zero, or a denormal that later arithmetic reads as zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_gradient_matches_autograd_of_log_softmax(dtype, monkeypatch):
    """The hand-written backward (rows shared by two targets, a row predicting nothing, chunked)
    against autograd through log_softmax and indexing."""
    monkeypatch.setattr(logprobs, "CHUNK", 3)  # several chunks, the last one short
    torch.manual_seed(0)
    base = (torch.randn(7, 13) * 4).to(dtype)
    rows = torch.tensor([0, 1, 2, 0, 3, 5, 6, 6])  # row 4 predicts nothing, rows 0 and 6 twice
    targets = torch.tensor([3, 1, 12, 3, 0, 5, 2, 9])
    weights = torch.randn(8)
    got_x, want_x = base.clone().requires_grad_(), base.clone().requires_grad_()
    got = token_logps_from_logits(got_x, targets, rows)
    (got * weights).sum().backward()
    want = want_x.float().log_softmax(-1)[rows, targets]
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    assert got_x.grad.dtype == dtype and torch.all(got_x.grad[4] == 0)  # a row that predicts nothing
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_x.grad, want_x.grad, **tolerance)
