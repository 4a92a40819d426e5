"""collate: every layout puts each completion token behind exactly its own prompt and completion prefix.

The checks use an independent description of a batch: a token belongs to a set of sequences
(a shared prompt token belongs to both the chosen and the rejected sequence of its pair); a
query may see a key iff the key comes no later and belongs to every sequence the query does.
"""

import doctest
import random

import pytest
import torch

import dpolab.data.collate as collate_module
from dpolab.data.collate import Layout, collate, collate_pairs, unit_mask
from dpolab.data.tokenize import TokenizedPair

LAYOUTS = [
    Layout(packing=False),
    Layout(packing=True),
    Layout(packing=False, prefix_sharing=True),
    Layout(packing=True, prefix_sharing=True),
    Layout(packing=True, segment_attention=True),
    Layout(packing=True, prefix_sharing=True, segment_attention=True),
]
IDS = ["padded", "packed", "shared-padded", "shared-packed", "segments", "shared-segments"]


def random_pairs(n, seed, max_prompt=12, max_completion=6):
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(3, 400) for _ in range(k)]

    return [TokenizedPair(i + 1, ids(rng.randint(1, max_prompt)), ids(rng.randint(1, max_completion)),
                          ids(rng.randint(1, max_completion))) for i in range(n)]


def test_docstring_examples():
    assert doctest.testmod(collate_module).failed == 0


def test_bool_means_plain_packing():
    assert Layout.of(True) == Layout(packing=True) and Layout.of(False) == Layout(packing=False)
    a = collate([[5, 6]], [[7]], 0, True)
    b = collate([[5, 6]], [[7]], 0, Layout(packing=True))
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "position_ids", "keep_mask", "targets"))


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_targets_lengths_and_order(layout, seed):
    pairs = random_pairs(5, seed)
    b = collate_pairs(pairs, 0, layout)
    expected = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    assert b["targets"].tolist() == [t for c in expected for t in c]
    assert b["lengths"].tolist() == [len(c) for c in expected]
    assert b["seq_index"].tolist() == [s for s, c in enumerate(expected) for _ in c]
    assert b["rows"].tolist() == [p.row for p in pairs]
    prompts = sum(len(p.prompt_ids) for p in pairs)
    completions = sum(len(c) for c in expected)
    assert b["num_tokens"] == completions + (prompts if layout.prefix_sharing else 2 * prompts)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 3])
def test_each_target_is_predicted_from_its_own_context(layout, seed):
    """The kept position for target j of sequence s holds token prompt+completion[P-1+j] at position P-1+j."""
    pairs = random_pairs(4, seed)
    b = collate_pairs(pairs, 0, layout)
    kept = b["keep_mask"].nonzero().tolist()  # row-major, the order of the (P, V) logits
    rows = b.get("target_rows", torch.arange(len(kept))).tolist()
    assert len(set(rows)) == len(kept)  # every kept logit is used
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    k = 0
    for prompt, completion in seqs:
        full = prompt + completion
        for j in range(len(completion)):
            r, t = kept[rows[k]]
            assert b["input_ids"][r, t] == full[len(prompt) - 1 + j]
            assert b["position_ids"][r, t] == len(prompt) - 1 + j
            k += 1


def membership(pairs, layout):
    """Per token of the batch: the set of sequences it belongs to (empty for padding), as rows."""
    b = len(pairs)
    if layout.prefix_sharing:
        units = [[(p.prompt_ids, {i, b + i}), (p.chosen_ids, {i}), (p.rejected_ids, {b + i})] for i, p in enumerate(pairs)]
    else:
        units = [[(p.prompt_ids, {i}), (p.chosen_ids, {i})] for i, p in enumerate(pairs)]
        units += [[(p.prompt_ids, {b + i}), (p.rejected_ids, {b + i})] for i, p in enumerate(pairs)]
    flat = [[s for ids, s in unit for _ in ids] for unit in units]
    rows = [sum(flat, [])] if layout.packing else flat
    width = max(len(r) for r in rows)
    return [r + [set()] * (width - len(r)) for r in rows]


def expected_visibility(row):
    n = len(row)
    return torch.tensor([[k == q if not row[q] else (k <= q and row[q] <= row[k]) for k in range(n)] for q in range(n)])


@pytest.mark.parametrize("layout", [LAYOUTS[2], LAYOUTS[3]], ids=["shared-padded", "shared-packed"])
def test_prefix_mask_hides_chosen_from_rejected(layout):
    pairs = random_pairs(4, 7)
    b = collate_pairs(pairs, 0, layout)
    mask = b["attention_mask"]
    assert mask.dtype == torch.bool and mask.dim() == 4
    for r, row in enumerate(membership(pairs, layout)):
        assert torch.equal(mask[r, 0], expected_visibility(row))


def test_plain_layouts_keep_transformers_masks():
    pairs = random_pairs(3, 4)
    padded = collate_pairs(pairs, 0, Layout(packing=False))
    lengths = [len(p.prompt_ids) + len(c) for p in pairs for c in [p.chosen_ids]]
    lengths += [len(p.prompt_ids) + len(p.rejected_ids) for p in pairs]
    assert padded["attention_mask"].sum(1).tolist() == lengths
    assert collate_pairs(pairs, 0, Layout(packing=True))["attention_mask"] is None


@pytest.mark.parametrize("shared", [False, True])
def test_segments_tile_the_row_and_match_the_mask(shared):
    pairs = random_pairs(5, 11)
    layout = Layout(packing=True, prefix_sharing=shared, segment_attention=True)
    b = collate_pairs(pairs, 0, layout)
    assert b["attention_mask"] is None
    n = b["input_ids"].shape[1]
    seen = torch.zeros(n, n, dtype=torch.bool)
    end = 0
    for start, length, ctx_start, ctx_length in b["segments"]:
        assert start == end
        end = start + length
        for q in range(start, end):
            seen[q, start : q + 1] = True
            seen[q, ctx_start : ctx_start + ctx_length] = True
    assert end == n
    assert torch.equal(seen, expected_visibility(membership(pairs, layout)[0]))


def test_padding_sees_only_itself():
    doc = torch.tensor([[0, 0, 1, -1, -1]])
    branch = torch.tensor([[0, 1, 0, 0, 0]])
    mask = unit_mask(doc, branch)[0, 0]
    assert mask[3].tolist() == [False, False, False, True, False]
    assert mask[4].tolist() == [False, False, False, False, True]
    assert not mask[:3, 3:].any()


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_one_token_completions_and_prompts(layout):
    pairs = [TokenizedPair(1, [9], [4], [5]), TokenizedPair(2, [7, 8], [6], [3, 2])]
    b = collate_pairs(pairs, 0, layout)
    assert b["targets"].tolist() == [4, 6, 5, 3, 2]
    kept = b["keep_mask"].nonzero().tolist()
    rows = b.get("target_rows", torch.arange(len(kept))).tolist()
    first_of_pair0 = {tuple(kept[rows[0]]), tuple(kept[rows[2]])}  # chosen and rejected of pair 0
    tokens = {int(b["input_ids"][r, t]) for r, t in first_of_pair0}
    assert tokens == {9}  # both are predicted from the one prompt token
