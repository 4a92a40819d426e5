"""Examples -> batch tensors, padded or packed (padding-free).

A batch is a flat list of S sequences, each `prompt_ids + completion_ids`. For preference
pairs S = 2B: the B chosen sequences first, then the B rejected ones, so sequence `s`
and `s + B` belong to pair `s`.

Every batch carries what the log-prob code needs to run the LM head only where a
completion token is predicted:

    input_ids      (N, L) long
    position_ids   (N, L) long   restart at 0 for every packed sequence
    attention_mask (N, L) long   padded batches only; None when packed
    keep_mask      (N, L) bool   True at position t when token t+1 is a completion token
    targets        (K,)   long   the completion tokens, in keep_mask order (K = keep_mask.sum())
    seq_index      (K,)   long   which of the S sequences each kept position belongs to
    lengths        (S,)   long   completion tokens per sequence

Packed: N = 1 and the sequences are concatenated; transformers derives the block-causal
mask from position ids that restart at 0, so no padding token is ever computed.

>>> b = collate([[5, 6], [7]], [[8, 9], [3]], pad_id=0, packing=True)
>>> b["input_ids"].tolist(), b["position_ids"].tolist()
([[5, 6, 8, 9, 7, 3]], [[0, 1, 2, 3, 0, 1]])
>>> b["keep_mask"].int().tolist(), b["targets"].tolist(), b["seq_index"].tolist()
([[0, 1, 1, 0, 1, 0]], [8, 9, 3], [0, 0, 1])
"""

from __future__ import annotations

import torch


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int, packing: bool) -> dict:
    """Build one batch from S (prompt ids, completion ids) sequences; see the module docstring."""
    assert len(prompts) == len(completions)
    if packing:
        return _packed(prompts, completions)
    return _padded(prompts, completions, pad_id)


def collate_pairs(pairs, pad_id: int, packing: bool) -> dict:
    """B TokenizedPairs -> batch of 2B sequences (chosen first, then rejected)."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    batch = collate(prompts, completions, pad_id, packing)
    batch["rows"] = torch.tensor([p.row for p in pairs])
    return batch


def _keep(prompt_len: int, total: int) -> list[bool]:
    # The logit at t predicts token t+1, so it is kept when t+1 lies in the completion.
    return [prompt_len - 1 <= t < total - 1 for t in range(total)]


def _packed(prompts, completions) -> dict:
    ids, pos, keep, seq = [], [], [], []
    for s, (p, c) in enumerate(zip(prompts, completions)):
        ids += p + c
        pos += range(len(p) + len(c))
        keep += _keep(len(p), len(p) + len(c))
        seq += [s] * len(c)
    batch = {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "attention_mask": None,
        "keep_mask": torch.tensor([keep]),
    }
    return _finish(batch, completions, seq)


def _padded(prompts, completions, pad_id: int) -> dict:
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids, mask, keep, seq = [], [], [], []
    for s, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids.append(p + c + [pad_id] * (width - n))
        mask.append([1] * n + [0] * (width - n))
        keep.append(_keep(len(p), n) + [False] * (width - n))
        seq += [s] * len(c)
    batch = {
        "input_ids": torch.tensor(ids),
        "position_ids": torch.arange(width).expand(len(ids), width).clone(),
        "attention_mask": torch.tensor(mask),
        "keep_mask": torch.tensor(keep),
    }
    return _finish(batch, completions, seq)


def _finish(batch: dict, completions, seq: list[int]) -> dict:
    batch["targets"] = torch.tensor([t for c in completions for t in c], dtype=torch.long)
    batch["seq_index"] = torch.tensor(seq, dtype=torch.long)
    batch["lengths"] = torch.tensor([len(c) for c in completions], dtype=torch.long)
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
