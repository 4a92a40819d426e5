"""Examples -> batch tensors: padded, packed (padding-free) or prefix-shared.

A batch holds S sequences, each `prompt_ids + completion_ids`. For preference pairs S = 2B:
the B chosen sequences first, then the B rejected ones, so sequence `s` and `s + B` belong to
pair `s`. How they are laid out in rows is a `Layout`:

- padded (`packing=False`): one row per sequence, right-padded, with a 2D attention mask.
- packed (`packing=True`): all sequences concatenated in one row, position ids restarting at 0
  for each; transformers derives the block-causal mask from the position ids.
- prefix sharing (`prefix_sharing=True`, pairs only): a pair is ONE unit
  `[prompt][chosen][rejected]`; rejected position ids restart after the prompt and a 4D mask
  hides chosen from rejected, so the prompt is computed once per pair, not twice. Padded:
  one row per pair; packed: one row for the whole batch.
- segment attention (`segment_attention=True`, packed only): instead of one masked T x T
  attention over the packed row, `batch["segments"]` lists the blocks each query range
  attends to and `dpolab.attention` runs one small attention per block (no work is spent on
  pairs of tokens that cannot see each other).

Every batch carries what the log-prob code needs to run the LM head only where a completion
token is predicted:

    input_ids      (N, L) long
    position_ids   (N, L) long   restart at 0 for every packed sequence (at the prompt's end
                                 for a prefix-shared rejected completion)
    attention_mask None (packed), (N, L) long (padded) or (N, 1, L, L) bool (prefix-shared:
                                 True where query t may attend key k)
    keep_mask      (N, L) bool   True at the P positions whose logits are needed
    targets        (K,)   long   the completion tokens, sequence by sequence (0..S-1)
    seq_index      (K,)   long   which of the S sequences each target belongs to
    lengths        (S,)   long   completion tokens per sequence
    target_rows    (K,)   long   optional: row of the (P, V) kept logits that predicts each
                                 target (prefix sharing: the prompt's last logit predicts the
                                 first token of both completions); absent means row k
    segments       tuple         optional (segment attention): (start, length, ctx_start,
                                 ctx_length) blocks tiling the packed row in order
    num_tokens     int           tokens that go through the model (padding excluded)

>>> b = collate([[5, 6], [7]], [[8, 9], [3]], pad_id=0, packing=True)
>>> b["input_ids"].tolist(), b["position_ids"].tolist()
([[5, 6, 8, 9, 7, 3]], [[0, 1, 2, 3, 0, 1]])
>>> b["keep_mask"].int().tolist(), b["targets"].tolist(), b["seq_index"].tolist()
([[0, 1, 1, 0, 1, 0]], [8, 9, 3], [0, 0, 1])
>>> s = collate_units([([5, 6], [[8, 9], [3]])], [[0, 1]], pad_id=0, layout=Layout(True, True, False))
>>> s["input_ids"].tolist(), s["position_ids"].tolist()
([[5, 6, 8, 9, 3]], [[0, 1, 2, 3, 2]])
>>> s["keep_mask"].int().tolist(), s["targets"].tolist(), s["target_rows"].tolist()
([[0, 1, 1, 0, 0]], [8, 9, 3], [0, 1, 0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT = 0  # branch id of prompt tokens; completion b of a unit has branch id b + 1


@dataclass(frozen=True)
class Layout:
    """How sequences are laid out in rows (see the module docstring)."""

    packing: bool = True
    prefix_sharing: bool = False
    segment_attention: bool = False

    @classmethod
    def of(cls, value) -> "Layout":
        """A Layout, or a bare bool meaning `packing` (the plain packed / padded layouts)."""
        return value if isinstance(value, Layout) else cls(packing=bool(value))

    @classmethod
    def from_config(cls, cfg) -> "Layout":
        return cls(cfg.packing, getattr(cfg, "prefix_sharing", False), getattr(cfg, "segment_attention", False))


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int, packing) -> dict:
    """Build one batch from S (prompt ids, completion ids) sequences; `packing` is a bool or a Layout."""
    assert len(prompts) == len(completions)
    layout = Layout.of(packing)
    units = [(p, [c]) for p, c in zip(prompts, completions)]
    return collate_units(units, [[s] for s in range(len(units))], pad_id, layout)


def collate_pairs(pairs, pad_id: int, packing) -> dict:
    """B TokenizedPairs -> batch of 2B sequences (chosen first, then rejected); `packing`: bool or Layout."""
    layout = Layout.of(packing)
    b = len(pairs)
    if layout.prefix_sharing:
        units = [(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs]
        seqs = [[i, b + i] for i in range(b)]
    else:
        units = [(p.prompt_ids, [p.chosen_ids]) for p in pairs] + [(p.prompt_ids, [p.rejected_ids]) for p in pairs]
        seqs = [[s] for s in range(2 * b)]
    batch = collate_units(units, seqs, pad_id, layout)
    batch["rows"] = torch.tensor([p.row for p in pairs])
    return batch


def collate_units(units, seqs: list[list[int]], pad_id: int, layout: Layout) -> dict:
    """Units `(prompt, [completion, ...])` -> batch; `seqs[u][j]` is the sequence number of completion j of unit u.

    A unit with one completion is a plain sequence; with two, a prefix-shared pair.
    """
    shared = any(len(comps) > 1 for _, comps in units)
    built = [_unit(p, comps) for p, comps in units]
    if layout.packing:
        rows = [list(range(len(units)))]
    else:
        rows = [[u] for u in range(len(units))]
    width = max(sum(len(built[u]["ids"]) for u in row) for row in rows)
    ids, pos, keep, doc, branch = [], [], [], [], []
    kept_rows: dict[int, list[int]] = {}
    targets: dict[int, list[int]] = {}
    n_kept = 0
    for row in rows:
        r_ids, r_pos, r_keep, r_doc, r_branch = [], [], [], [], []
        for u in row:
            unit = built[u]
            for j, comp_rows in enumerate(unit["kept_rows"]):
                kept_rows[seqs[u][j]] = [n_kept + k for k in comp_rows]
                targets[seqs[u][j]] = units[u][1][j]
            n_kept += sum(unit["keep"])
            r_ids += unit["ids"]
            r_pos += unit["pos"]
            r_keep += unit["keep"]
            r_doc += [u] * len(unit["ids"])
            r_branch += unit["branch"]
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + [0] * pad)
        keep.append(r_keep + [False] * pad)
        doc.append(r_doc + [-1] * pad)
        branch.append(r_branch + [PROMPT] * pad)
    batch = {"input_ids": torch.tensor(ids), "keep_mask": torch.tensor(keep)}
    batch["position_ids"] = torch.tensor(pos)
    batch["attention_mask"] = _attention(layout, shared, doc, branch, width)
    if layout.packing and layout.segment_attention:
        batch["segments"] = _segments(built)
    order = sorted(targets)
    batch["targets"] = torch.tensor([t for s in order for t in targets[s]], dtype=torch.long)
    batch["seq_index"] = torch.tensor([s for s in order for _ in targets[s]], dtype=torch.long)
    batch["lengths"] = torch.tensor([len(targets[s]) for s in order], dtype=torch.long)
    if shared:
        batch["target_rows"] = torch.tensor([k for s in order for k in kept_rows[s]], dtype=torch.long)
    batch["num_tokens"] = sum(len(u["ids"]) for u in built)
    return batch


def _unit(prompt: list[int], completions: list[list[int]]) -> dict:
    """Token ids, positions, branches and kept logits of one unit `[prompt][completion 1][completion 2]...`.

    The logit at t predicts token t+1 of the same branch; the prompt's last logit predicts the
    first token of every completion, so it is kept once and shared (`kept_rows`).
    """
    n = len(prompt)
    ids, pos, branch = list(prompt), list(range(n)), [PROMPT] * n
    keep = [False] * n
    if n and completions:
        keep[n - 1] = True
    kept_rows, n_kept = [], 1
    for b, comp in enumerate(completions):
        rows = [0]  # the prompt's last logit predicts comp[0]
        for j in range(len(comp)):
            last = j == len(comp) - 1
            keep.append(not last)
            if not last:
                rows.append(n_kept)
                n_kept += 1
        kept_rows.append(rows)
        ids += comp
        pos += range(n, n + len(comp))
        branch += [b + 1] * len(comp)
    return {"ids": ids, "pos": pos, "branch": branch, "keep": keep, "kept_rows": kept_rows,
            "prompt": n, "completions": [len(c) for c in completions]}


def _attention(layout: Layout, shared: bool, doc, branch, width: int):
    """The attention mask a layout needs: 2D padding mask, None (packed) or 4D (prefix sharing)."""
    if shared and not (layout.packing and layout.segment_attention):
        return unit_mask(torch.tensor(doc), torch.tensor(branch))
    if layout.packing:
        return None
    return torch.tensor([[int(d >= 0) for d in row] for row in doc])


def unit_mask(doc: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(N, L) unit ids (-1 = padding) and branch ids -> (N, 1, L, L) bool mask.

    Query t sees key k <= t of its own unit when k is a prompt token or in t's own branch.
    A padding token sees only itself, so no attention row is empty (an empty row gives NaN).
    """
    idx = torch.arange(doc.shape[1])
    causal = idx[None, :, None] >= idx[None, None, :]
    same_unit = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    visible = (branch[:, None, :] == PROMPT) | (branch[:, :, None] == branch[:, None, :])
    self_only = (doc[:, :, None] < 0) & (idx[None, :, None] == idx[None, None, :])
    return ((causal & same_unit & visible) | self_only)[:, None]


def _segments(built: list[dict]) -> tuple:
    """Blocks `(start, length, ctx_start, ctx_length)` tiling the packed row, in order.

    Queries [start, start+length) attend causally among themselves and fully to the context
    [ctx_start, ctx_start+ctx_length) (the shared prompt); ctx_length 0 = a plain causal block.
    """
    blocks, offset = [], 0
    for unit in built:
        n, comps = unit["prompt"], unit["completions"]
        blocks.append((offset, n + comps[0], 0, 0))  # prompt + first completion: plain causal
        start = offset + n + comps[0]
        for c in comps[1:]:
            blocks.append((start, c, offset, n))  # later completions see the prompt, not each other
            start += c
        offset = start
    return tuple(blocks)


def batch_tokens(batch: dict) -> int:
    """Tokens the model computes for this batch (padding excluded)."""
    return int(batch["num_tokens"])


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
