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

import contextlib
import html
import json
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .config import ScoreConfig, resolve

ADAPTER = "adapter"  # reference = the policy with its LoRA adapter disabled


# ----------------------------------------------------------------------------- models
def reference_path(model: str, ref_model: str = "") -> str:
    """The reference of `model`: `ref_model`, ADAPTER for a LoRA adapter, or the run config's model."""
    import yaml

    from .models import ModelError, resolve_model_path

    if ref_model:
        return ref_model
    path = Path(resolve_model_path(model))
    if (path / "adapter_config.json").exists():
        return ADAPTER
    run_config = path.parent / "config.yaml"
    if run_config.exists():
        recorded = yaml.safe_load(run_config.read_text()) or {}
        if recorded.get("ref_model") or recorded.get("model"):
            return recorded.get("ref_model") or recorded["model"]
    raise ModelError(f"{model}: no reference model known: pass --ref-model "
                     "(automatic only for a LoRA adapter or a checkpoint inside a dpolab run)")


@dataclass
class ModelPair:
    """A policy and its reference, ready to give log-probs of the same token ids."""

    policy: object
    reference: object  # a model, or ADAPTER
    tokenizer: object
    device: object
    bf16: bool
    names: tuple[str, str]

    def autocast(self):
        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def reference_model(self):
        """The reference as a model (for generation); for an adapter, the base while inside."""
        if self.reference is ADAPTER:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.reference

    def token_logps(self, items, batch_size: int, packing: bool = True):
        """items [(prompt_ids, completion_ids)] -> (policy per-token logps, reference per-token logps),
        each a list of (len_i,) fp32 CPU tensors."""
        with self.reference_model() as reference:
            reference_token_logps = batched_token_logps(reference, items, self, batch_size, packing)
        if self.reference is self.policy:  # one model asked to be its own reference: rewards are 0
            return reference_token_logps, reference_token_logps
        policy_token_logps = batched_token_logps(self.policy, items, self, batch_size, packing)
        return policy_token_logps, reference_token_logps

    def pair_token_logps(self, pairs, batch_size: int, packing: bool = True):
        """TokenizedPairs -> (policy, reference) per-token logps of [every chosen..., every rejected...],
        the training fast path: each prompt computed once for both completions (prefix sharing)."""
        with self.reference_model() as reference:
            reference_token_logps = batched_pair_token_logps(reference, pairs, self, batch_size, packing)
        if self.reference is self.policy:
            return reference_token_logps, reference_token_logps
        return batched_pair_token_logps(self.policy, pairs, self, batch_size, packing), reference_token_logps


def load_frozen(name: str, device, trust_remote_code: bool = False):
    from .models import load_model

    model = load_model(name, trust_remote_code=trust_remote_code).to(device).eval()
    model.requires_grad_(False)
    return model


def load_model_pair(model: str, ref_model: str = "", *, device: str = "auto", bf16: str = "false",
                    trust_remote_code: bool = False) -> ModelPair:
    """Load the policy and its reference; different tokenizers stop here with one clear line."""
    from .models import ModelError, bf16_default, load_tokenizer, pick_device, resolve_model_path, same_tokenizer

    if bf16 not in ("auto", "true", "false"):
        raise ValueError("bf16 must be auto, true or false")
    ref = reference_path(model, ref_model)
    tokenizer = load_tokenizer(model, trust_remote_code)
    same = ref != ADAPTER and Path(resolve_model_path(ref)).resolve() == Path(resolve_model_path(model)).resolve()
    if ref != ADAPTER and not same and not same_tokenizer(tokenizer, load_tokenizer(ref, trust_remote_code)):
        raise ModelError(f"model {model} and reference {ref} use different tokenizers: "
                         "the implicit reward compares log-probs of the same token ids")
    dev = pick_device(device)
    policy = load_frozen(model, dev, trust_remote_code)
    reference = ADAPTER if ref == ADAPTER else policy if same else load_frozen(ref, dev, trust_remote_code)
    use_bf16 = bf16 == "true" or (bf16 == "auto" and bf16_default(dev))
    if ref == ADAPTER:
        base = json.loads(Path(resolve_model_path(model), "adapter_config.json").read_text()).get("base_model_name_or_path")
        ref = f"{base} (the adapter's base)"
    return ModelPair(policy, reference, tokenizer, dev, use_bf16, (model, ref))


def batched_token_logps(model, items, pair: ModelPair, batch_size: int, packing: bool = True) -> list:
    """Per-token completion log-probs of every (prompt_ids, completion_ids) item, batch by batch."""
    import torch

    from .data.collate import collate, to_device
    from .logprobs import forward_logps, split_tokens

    from rich.console import Console
    from rich.progress import Progress

    out = []
    pad_id = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    # a transient bar on a terminal only: long evaluations show progress, logs and tests stay clean
    with torch.inference_mode(), Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("log-probs", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = collate([p for p, _ in chunk], [c for _, c in chunk], pad_id, packing)
            batch = to_device(batch, pair.device)
            with pair.autocast():
                token_logps = forward_logps(model, batch)
            out += [t.float().cpu() for t in split_tokens(token_logps, batch)]
            bar.advance(task, len(chunk))
    return out


def batched_pair_token_logps(model, pairs, pair: ModelPair, batch_size: int, packing: bool = True) -> list:
    """Per-token log-probs of every chosen then every rejected completion, `batch_size // 2` pairs
    (batch_size sequences) per forward: packed, prefix-shared, segment attention, as in training."""
    import torch

    from .data.collate import Layout, collate_pairs, to_device
    from .logprobs import forward_logps, split_tokens

    layout = Layout(packing=True, prefix_sharing=True, segment_attention=True) if packing else Layout(packing=False)
    pad_id = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    step = max(1, batch_size // 2)
    chosen, rejected = [], []
    with torch.inference_mode():
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            batch = to_device(collate_pairs(chunk, pad_id, layout), pair.device)
            with pair.autocast():
                tokens = [t.float().cpu() for t in split_tokens(forward_logps(model, batch), batch)]
            chosen += tokens[: len(chunk)]
            rejected += tokens[len(chunk):]
    return chosen + rejected


# ----------------------------------------------------------------------------- text -> ids
def encode(prompt, completion: str, tokenizer, max_length: int = 1024, max_prompt_length: int = 512,
           full_response: bool = True) -> tuple[list[int], list[int]] | None:
    """(prompt_ids, completion_ids) the way training tokenises a pair; None if nothing fits.

    prompt: text, or messages (rendered with the chat template and its generation prompt).
    full_response: the completion is a whole response, so it ends with EOS (text) or the
    template's end of turn (messages); False for sampled text scored as it was generated.
    """
    from .data.files import DataError
    from .data.tokenize import truncate

    messages = not isinstance(prompt, str)
    if messages and not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational prompts need a tokenizer with a chat template")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if messages else prompt
    completion_text = completion
    if messages and full_response:
        full = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": completion}], tokenize=False)
        if full.startswith(prompt_text):
            completion_text = full[len(prompt_text):]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and prompt_ids[:2] == [bos, bos]:  # the chat template wrote BOS too
        prompt_ids = prompt_ids[1:]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    if full_response and not messages and eos is not None and completion_ids[-1:] != [eos]:
        completion_ids = completion_ids + [eos]
    if not prompt_ids or not completion_ids:
        return None
    keep_first = bos is not None and prompt_ids[:1] == [bos]
    cut = truncate(prompt_ids, completion_ids, completion_ids, max_length, max_prompt_length, keep_first)
    return None if cut is None else (cut[0], cut[1])


def token_texts(ids: list[int], tokenizer) -> list[str]:
    """Display text of each token (special tokens kept, so an EOS shows up as itself)."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


# ----------------------------------------------------------------------------- rows
def load_candidates(source: str, prompt_column: str = "prompt", response_column: str = "response",
                    limit: int = 0) -> list[tuple[int, object, list[str]]]:
    """[(row, prompt, candidate responses)] from a file of responses or of preference pairs."""
    import itertools

    from .data.files import DataError, read_rows
    from .data.formats import normalise

    rows = list(itertools.islice(read_rows(source), limit or None))
    if not rows:
        raise DataError(f"{source}: no rows to score")
    first = rows[0][1]
    if response_column in first:
        return [_candidate_row(source, n, raw, prompt_column, response_column) for n, raw in rows]
    if "completion" in first and "label" in first and "chosen" not in first:  # unpaired (KTO) rows
        from .data.unpaired import normalise_unpaired

        examples, _ = normalise_unpaired(rows, source, prompt_column)
        return [(e.row, e.prompt, [_text(e.completion)]) for e in examples]
    if "chosen" in first and "rejected" in first:
        examples, _ = normalise(rows, source, prompt_column)
        return [(e.row, e.prompt, [_text(e.chosen), _text(e.rejected)]) for e in examples]
    raise DataError(f"{source}: row {rows[0][0]}: no '{response_column}' column and no chosen/rejected pair to score")


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _candidate_row(source, n, raw, prompt_column, response_column):
    from .data.files import DataError

    prompt, value = raw.get(prompt_column), raw.get(response_column)
    if not isinstance(prompt, (str, list)) or not prompt:
        raise DataError(f"{source}: row {n}: field '{prompt_column}': expected a prompt text or messages")
    candidates = [value] if isinstance(value, str) else value
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
        raise DataError(f"{source}: row {n}: field '{response_column}': expected a text or a list of texts")
    return n, prompt, candidates


# ----------------------------------------------------------------------------- scoring
def implicit_rewards(pair: ModelPair, prompts: list, responses: list[str], beta: float, *, batch_size: int = 8,
                     max_length: int = 1024, max_prompt_length: int = 512, packing: bool = True) -> list[dict | None]:
    """One record per (prompt, response): reward, length-normalised reward, per-token rewards.

    Record: policy_logps, reference_logps (summed over the response tokens), reward =
    beta * (policy_logps - reference_logps), tokens, reward_per_token = reward / tokens,
    token_ids, token_rewards (tokens,). None where the prompt leaves no room for the response.
    """
    encoded = [encode(p, r, pair.tokenizer, max_length, max_prompt_length) for p, r in zip(prompts, responses)]
    kept = [e for e in encoded if e is not None]
    policy_token_logps, reference_token_logps = pair.token_logps(kept, batch_size, packing)
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
    from .models import trained_beta

    cfg = dataclasses.replace(cfg, beta=trained_beta(cfg.model, cfg.beta))  # the run's beta unless given
    if not cfg.data:
        raise ValueError("nothing to score: pass --data FILE")
    rows = load_candidates(cfg.data, cfg.prompt_column, cfg.response_column, cfg.limit)
    pair = load_model_pair(cfg.model, cfg.ref_model, device=cfg.device, bf16=cfg.bf16,
                           trust_remote_code=cfg.trust_remote_code)
    flat = [(n, i, prompt, resp) for n, prompt, cands in rows for i, resp in enumerate(cands)]
    scored = implicit_rewards(pair, [f[2] for f in flat], [f[3] for f in flat], cfg.beta, batch_size=cfg.batch_size,
                              max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, packing=cfg.packing)
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
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

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
    console.print(f"{len(records)} responses of {len({r['row'] for r in records})} prompts -> {cfg.output_dir}/scores.jsonl{extra}")


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
