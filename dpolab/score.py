"""`dpolab score`: the implicit reward of a DPO policy, per response and per token.

After DPO the policy and its reference together are a reward model (Rafailov et al. 2023):

    r_hat(x, y)   = beta * (log pi(y|x) - log pi_ref(y|x))            per response
    r_hat(x, y_t) = beta * (log pi(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t))  per token; sums to r_hat(x, y)

The reward ranks responses to the same prompt (best-of-N selection); it is not calibrated
across prompts. The per-token view is reward attribution: which tokens training favoured.

Reference: `--ref-model`, else the base of a LoRA adapter (the same weights with the adapter
switched off), else the `model` recorded in the run's config.yaml next to a checkpoint.
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .config import ScoreConfig, from_run, resolve
from .data.files import DataError, read_rows
from .data.formats import normalise
from .data.tokenize import encode
from .data.unpaired import normalise_unpaired
from .metrics import counted
from .models import run_config
from .pair import ModelPair, load_model_pair


# ----------------------------------------------------------------------------- ids -> text
def token_texts(ids: list[int], tokenizer) -> list[str]:
    """Display text of each token (special tokens kept, so an EOS shows up as itself)."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


# ----------------------------------------------------------------------------- rows
def load_candidates(source: str, prompt_column: str = "prompt", response_column: str = "response",
                    limit: int = 0) -> list[tuple[int, object, list[str]]]:
    """[(row, prompt, candidate responses)] from a file of responses or of preference pairs."""
    rows = list(itertools.islice(read_rows(source), limit or None))
    if not rows:
        raise DataError(f"{source}: no rows to score")
    first = rows[0][1]
    if response_column in first:
        return [_candidate_row(source, n, raw, prompt_column, response_column) for n, raw in rows]
    if "completion" in first and "label" in first and "chosen" not in first:  # unpaired (KTO) rows
        examples, _ = normalise_unpaired(rows, source, prompt_column)
        return [(e.row, e.prompt, [_text(e.completion)]) for e in examples]
    if "chosen" in first and "rejected" in first:
        examples, _ = normalise(rows, source, prompt_column)
        return [(e.row, e.prompt, [_text(e.chosen), _text(e.rejected)]) for e in examples]
    raise DataError(f"{source}: row {rows[0][0]}: no '{response_column}' column and no chosen/rejected pair to score")


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _candidate_row(source, n, raw, prompt_column, response_column):
    prompt, value = raw.get(prompt_column), raw.get(response_column)
    if not isinstance(prompt, (str, list)) or not prompt:
        raise DataError(f"{source}: row {n}: field '{prompt_column}': expected a prompt text or messages")
    candidates = [value] if isinstance(value, str) else value
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
        raise DataError(f"{source}: row {n}: field '{response_column}': expected a text or a list of texts")
    return n, prompt, candidates


# ----------------------------------------------------------------------------- scoring
def implicit_rewards(pair: ModelPair, prompts: list, responses: list[str], beta: float, *, batch_size: int = 8,
                     max_length: int = 1024, max_prompt_length: int = 512, packing: bool = True,
                     label: str = "") -> list[dict | None]:
    """One record per (prompt, response): reward, length-normalised reward, per-token rewards.

    Record: policy_logps, reference_logps (summed over the response tokens), reward =
    beta * (policy_logps - reference_logps), tokens, reward_per_token = reward / tokens,
    token_ids, token_rewards (tokens,). None where the prompt leaves no room for the response.
    """
    encoded = [encode(p, r, pair.tokenizer, max_length, max_prompt_length) for p, r in zip(prompts, responses)]
    kept = [e for e in encoded if e is not None]
    policy_token_logps, reference_token_logps = pair.token_logps(kept, batch_size, packing, label)
    results, k = [], 0
    for e in encoded:
        if e is None:
            results.append(None)
            continue
        pol, ref = policy_token_logps[k].double(), reference_token_logps[k].double()
        k += 1
        reward = beta * float(pol.sum() - ref.sum())
        results.append({
            "policy_logps": float(pol.sum()), "reference_logps": float(ref.sum()), "reward": reward,
            "tokens": len(e[1]), "reward_per_token": reward / len(e[1]), "token_ids": list(e[1]),
            "token_rewards": (beta * (pol - ref)).tolist(),
        })
    return results


def rank_candidates(records: list[dict]) -> None:
    """Set `rank` (1 = highest implicit reward among the same row's candidates) and `best`."""
    by_row: dict[int, list[dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r)
    for group in by_row.values():
        for rank, r in enumerate(sorted(group, key=lambda r: -r["reward"]), start=1):
            r["rank"], r["best"] = rank, rank == 1


def score(cfg: ScoreConfig | None = None, **overrides) -> list[dict]:
    """Score every candidate response; returns the records written to scores.jsonl."""
    cfg = cfg or resolve(ScoreConfig, **overrides)
    cfg = from_run(cfg, run_config(cfg.model))  # beta and lengths: the run's unless given
    rows = load_candidates(cfg.data, cfg.prompt_column, cfg.response_column, cfg.limit)
    pair = load_model_pair(cfg.model, cfg.ref_model, device=cfg.device, bf16=cfg.bf16,
                           trust_remote_code=cfg.trust_remote_code)
    flat = [(n, i, prompt, resp) for n, prompt, cands in rows for i, resp in enumerate(cands)]
    scored = implicit_rewards(pair, [f[2] for f in flat], [f[3] for f in flat], cfg.beta, batch_size=cfg.batch_size,
                              max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, packing=cfg.packing,
                              label="score" if cfg.progress else "")
    records = []
    for (n, i, prompt, resp), s in zip(flat, scored):
        if s is not None:
            s["token_texts"] = token_texts(s.pop("token_ids"), pair.tokenizer)
            records.append({"row": n, "candidate": i, "prompt": prompt, "response": resp, **s})
    if not records:
        raise ValueError(f"{cfg.data}: no row fits in max_length {cfg.max_length}")
    rank_candidates(records)
    write_outputs(records, cfg)
    print_scores(records, cfg)
    return records


def write_outputs(records: list[dict], cfg: ScoreConfig) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_token_keys = ("token_texts", "token_rewards")
    with open(out / "scores.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k not in per_token_keys}) + "\n")
    if cfg.per_token:
        with open(out / "tokens.jsonl", "w") as f:
            for r in records:
                keep = ("row", "candidate", "response", "reward", "reward_per_token", "rank", *per_token_keys)
                f.write(json.dumps({k: r[k] for k in keep} | {"beta": cfg.beta}) + "\n")
        title = f"Per-token implicit reward: {cfg.model} vs {cfg.ref_model or 'its reference'}"
        (out / "tokens.html").write_text(attribution_page(records, title))


# ----------------------------------------------------------------------------- display
def shade(value: float, scale: float) -> tuple[int, int, int]:
    """Background colour of a token: white at 0, green for positive, red for negative reward."""
    t = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    target = (90, 200, 90) if value > 0 else (235, 95, 95)
    return tuple(round(255 + t * (c - 255)) for c in target)


def _scale(records: list[dict]) -> float:
    return max((abs(v) for r in records for v in r["token_rewards"]), default=0.0)


def print_scores(records: list[dict], cfg: ScoreConfig) -> None:
    console = Console()
    rows = sorted({r["row"] for r in records})[: max(cfg.show, 0)]
    shown = [r for r in records if r["row"] in rows]
    table = Table(title=f"implicit reward beta*(log pi - log pi_ref), beta={cfg.beta}")
    for col in ("row", "cand", "rank", "reward", "reward/token", "tokens", "response"):
        table.add_column(col, justify="left" if col == "response" else "right")
    for r in shown:
        preview = r["response"].replace("\n", " ")
        table.add_row(str(r["row"]), str(r["candidate"]), str(r["rank"]), f"{r['reward']:+.4f}",
                      f"{r['reward_per_token']:+.4f}", str(r["tokens"]), preview[:60] + ("..." if len(preview) > 60 else ""))
    console.print(table)
    if cfg.per_token:
        scale = _scale(shown)
        for r in shown:
            text = Text(f"row {r['row']} cand {r['candidate']} (reward {r['reward']:+.4f}): ")
            for tok, v in zip(r["token_texts"], r["token_rewards"]):
                text.append(tok, style="black on rgb({},{},{})".format(*shade(v, scale)))
            console.print(text)
    extra = " (+ tokens.jsonl, tokens.html: open it in a browser)" if cfg.per_token else ""
    console.print(f"{counted(len(records), 'response')} of {counted(len({r['row'] for r in records}), 'prompt')} "
                  f"-> {cfg.output_dir}/scores.jsonl{extra}")


ATTRIBUTION_CSS = """
.attr { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px; line-height: 1.9;
        white-space: pre-wrap; border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; margin: 6px 0 14px; }
.attr span { border-radius: 3px; padding: 1px 0; color: #111; }
.attr span:focus { outline: 2px solid #333; }
.attr span:focus::after { content: " " attr(title) " "; background: #333; color: #fff; border-radius: 3px; font-size: 12px; }
.attr-prompt { color: #666; }
.attr-head { font-family: sans-serif; font-size: 13px; color: #333; margin-top: 10px; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 4px; border-radius: 3px; font-family: sans-serif; font-size: 12px; }
"""


def attribution_html(records: list[dict], limit: int | None = None) -> str:
    """HTML blocks (no page around them): each response with tokens shaded by per-token reward."""
    shown = records[:limit] if limit else records
    scale = _scale(shown)
    legend = "".join(
        f'<span style="background:rgb{shade(v, 1.0)}">{v:+.1f} x max</span>' for v in (-1.0, -0.5, 0.0, 0.5, 1.0))
    parts = [f'<div class="legend">{legend} &nbsp; max |reward| per token = {scale:.4g}</div>']
    for r in shown:
        head = (f"row {r['row']}, candidate {r['candidate']} (rank {r.get('rank', '-')}): reward {r['reward']:+.4f}, "
                f"per token {r['reward_per_token']:+.4f}")
        prompt = r.get("prompt", "")
        prompt = str(prompt[-1].get("content", "")) if isinstance(prompt, list) and prompt else str(prompt)
        prompt = ("..." + prompt[-120:]) if len(prompt) > 120 else prompt
        # tabindex: a tap (phones have no hover) focuses a token and shows its value
        spans = "".join(
            f'<span tabindex="0" style="background:rgb{shade(v, scale)}" title="{v:+.5f}">{html.escape(tok)}</span>'
            for tok, v in zip(r["token_texts"], r["token_rewards"]))
        parts.append(f'<div class="attr-head">{html.escape(head)}<br><span class="attr-prompt">prompt: '
                     f'{html.escape(prompt)}</span></div><div class="attr">{spans}</div>')
    return "\n".join(parts)


def attribution_page(records: list[dict], title: str) -> str:
    """A self-contained HTML page of the per-token rewards (no external resources)."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>body{{font-family:sans-serif;margin:24px auto;padding:0 12px;max-width:1000px}}{ATTRIBUTION_CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>Each token is shaded by beta*(log pi(y_t) - log pi_ref(y_t)): "
            f"green = the policy raised its probability, red = lowered. Hover (or tap) a token for its value.</p>"
            f"{attribution_html(records)}</body></html>")
