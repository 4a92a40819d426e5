"""`dpolab experiment` (name: sentiment) and `dpolab sweep`: the DPO paper's controlled-sentiment
experiment on dpolab's own parts, ending in a reward-vs-KL frontier.

    prompts (built-in movie-review openings, or --prompts) split into train and held-out sets
    (optional SFT on --sft-data: its result becomes the reference)
    reference samples K completions per train prompt, the true reward labels them -> pairs
    DPO at each beta, and the baselines (Preferred-FT = SFT on the chosen completions,
    Unlikelihood, IPO, cDPO)
    online RL (RLOO with the KL-penalised true reward, dpolab.online) at each KL coefficient
    every policy sampled on the held-out prompts: mean reward, KL to the reference, win rate
    best-of-N from the reference with the true reward (N = 4, 16) at its analytic KL bound
    --rounds R: iterative on-policy DPO from the latest policy, the reference kept fixed
    -> frontier.png, results.json, report.html (with which of the paper's claims held on this
       run, dpolab.experiments.claims), and a table in the terminal

Stages are cached under `stages_dir` by a hash of everything that decides them (model,
prompts, sampling settings, reward), and finished training runs are reused when their
settings match, so a rerun or a sweep only computes what changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import time
import typing
from pathlib import Path

import yaml

from ..config import ExperimentConfig, SweepConfig, _parse_bool, best_of, betas, kl_coefs, names_list, resolve
from ..data import load_pairs
from ..data.files import json_lines
from ..generate import GenerateConfig, as_messages, generate, read_prompts, reward_from_config
from ..metrics import print_table
from ..models import bf16_default, pick_device, resolve_model_path
from ..online import OnlineConfig, rloo
from ..reference import model_identity
from ..report import build_report, table
from ..pair import load_frozen, load_reference
from ..train import sft, train
from ..unlikelihood import UnlikelihoodConfig, train_unlikelihood
from .claims import CLAIM_COLUMNS, claim_rows, paper_claims
from .frontier import examples_section, frontier_png, frontier_section, print_summary, results_section
from .measure import (
    best_of_n_points,
    draw,
    held_out_pairs,
    measure_policy,
    model_pair,
    prompt_margins,
    reference_point,
)


# ----------------------------------------------------------------------------- entry points
def run(cfg: ExperimentConfig | None = None, **overrides) -> dict:
    """Run the whole experiment; returns the results (also in <output_dir>/results.json)."""
    cfg = cfg or resolve(ExperimentConfig, **overrides)
    start = time.perf_counter()
    ctx = pipeline(cfg)
    return finish(cfg, ctx, ctx["points"], start, f"dpolab experiment {cfg.name}")


def sweep(cfg: SweepConfig | None = None, **overrides) -> dict:
    """The pipeline once per value of `field`; shared stages are computed once."""
    cfg = cfg or resolve(SweepConfig, **overrides)
    start = time.perf_counter()
    values = sweep_values(cfg)
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ExperimentConfig)}
    stages = cfg.stages_dir or str(Path(cfg.output_dir) / "stages")
    if cfg.field == "beta":  # one pipeline: pairs and reference shared, one DPO run per beta
        ctx = pipeline(ExperimentConfig(**{**base, "betas": ",".join(map(str, values)), "stages_dir": stages}))
        points = [{**p, "kind": "sweep", "value": f"β={p['beta']:g}"} if p["kind"] == "dpo" else p for p in ctx["points"]]
        return finish(cfg, ctx, points, start, f"dpolab sweep beta ({len(values)} values)")
    points, ctx = [], None
    for value in values:
        sub = ExperimentConfig(**{**base, cfg.field: value, "stages_dir": stages,
                                  "output_dir": str(Path(cfg.output_dir) / f"{cfg.field}-{value}")})
        sub_ctx = pipeline(sub)
        if ctx is None:
            ctx, points = sub_ctx, [p for p in sub_ctx["points"] if p["kind"] in ("reference", "best-of-n")]
        else:
            ctx["run_dirs"] += sub_ctx["run_dirs"]
        for p in sub_ctx["points"]:
            if p["kind"] == "dpo":
                points.append({**p, "kind": "sweep", "name": f"{cfg.field}={value} ({p['name']})", "value": f"{value}"})
            elif p["kind"] not in ("reference", "best-of-n"):
                points.append({**p, "name": f"{cfg.field}={value}: {p['name']}"})
    return finish(cfg, ctx, points, start, f"dpolab sweep {cfg.field} ({len(values)} values)")


def sweep_values(cfg: SweepConfig) -> list:
    """The sweep's values, parsed with the type of the swept field."""
    excluded = {"name", "output_dir", "stages_dir", "progress", "device", "betas"}
    hints = typing.get_type_hints(ExperimentConfig)
    names = sorted(set(hints) - excluded)
    if cfg.field != "beta" and cfg.field not in names:
        raise ValueError(f"cannot sweep {cfg.field!r}: use beta or one of {', '.join(names)}")
    kind = float if cfg.field == "beta" else hints[cfg.field]
    parse = _parse_bool if kind is bool else kind
    try:
        values = [parse(v.strip()) for v in str(cfg.values).split(",") if v.strip()]
    except (ValueError, TypeError) as e:
        raise ValueError(f"sweep values {cfg.values!r} are not all {kind.__name__} ({e})") from None
    if not values:
        raise ValueError("sweep needs at least one value: --values V1,V2,...")
    return values


# ----------------------------------------------------------------------------- the pipeline
def pipeline(cfg: ExperimentConfig) -> dict:
    """Every stage of one experiment; returns the frontier points and what the outputs need."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock = Clock(timings, cpu)
    train_prompts, eval_prompts = split_prompts(cfg)
    reward_fn = reward_from_config(cfg)
    with clock("sft"):
        reference_name = sft_stage(cfg, out)
    ref = load_reference(reference_name, cfg.device)
    with clock("reference samples"):
        ref_draw = reference_draw(cfg, ref, eval_prompts, reward_fn)
    points = [reference_point(ref_draw, cfg.eval_samples)] + best_of_n_points(ref_draw, best_of(cfg), cfg.eval_samples)
    eval_pairs = tokenized_pairs(held_out_pairs(eval_prompts, ref_draw, cfg.eval_samples, out / "heldout_pairs.jsonl",
                                                cfg.chat), ref.tokenizer)
    with clock("pairs"):
        pairs = generate_pairs(cfg, reference_name, train_prompts, list(range(len(train_prompts))), cfg.num_samples, 1)
    run_dirs = []
    for spec in training_specs(cfg):
        with clock(f"train {spec['name']}"):
            if spec["objective"] == "rloo":
                run_dir = train_online(spec, reference_name, train_prompts, reward_fn, cfg, out / spec["dir"])
            else:
                run_dir = train_policy(spec, reference_name, "", pairs, cfg, out / spec["dir"])
        with clock(f"measure {spec['name']}"):
            points.append(measure_run(spec, run_dir, ref, eval_prompts, ref_draw, reward_fn, cfg, eval_pairs))
        run_dirs.append(run_dir)
        if spec["kind"] == "dpo" and cfg.rounds > 1:
            more_points, more_dirs = iterate(cfg, spec, run_dir, pairs, train_prompts, ref, eval_prompts, ref_draw,
                                             reward_fn, eval_pairs, out, clock)
            points += more_points
            run_dirs += more_dirs
    return {"points": points, "run_dirs": run_dirs, "eval_prompts": eval_prompts, "timings": timings, "cpu_seconds": cpu,
            "reference": reference_name, "train_pairs": count_lines(pairs), "heldout_pairs": len(eval_pairs),
            "reference_samples": len(ref_draw["samples"][0])}


class Clock:
    """`with clock("stage"):` adds the stage's wall time (seconds) to `timings` and its CPU time
    (all threads of this process) to `cpu`: CPU seconds do not depend on what else the machine
    runs, so they size a run for another machine (wall ≈ CPU seconds / cores used)."""

    def __init__(self, timings: dict, cpu: dict | None = None):
        self.timings, self.cpu = timings, cpu if cpu is not None else {}

    def __call__(self, name: str):
        @contextlib.contextmanager
        def timed():
            start, cpu = time.perf_counter(), time.process_time()
            yield
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 1)
            self.cpu[name] = round(self.cpu.get(name, 0.0) + time.process_time() - cpu, 1)

        return timed()


# ----------------------------------------------------------------------------- stages
def split_prompts(cfg: ExperimentConfig) -> tuple[list, list]:
    """Held-out and training prompts: a fixed shuffle (independent of --seed, so every seed is
    measured on the same held-out prompts); held-out first, then training."""
    prompts = read_prompts(cfg.prompts, cfg.prompt_column, 0, cfg.prefix_words)
    need = cfg.train_prompts + cfg.eval_prompts
    if len(prompts) < need:
        raise ValueError(f"{cfg.prompts or 'built-in prompts'}: {len(prompts)} prompts, fewer than train_prompts + "
                         f"eval_prompts = {need}")
    order = list(range(len(prompts)))
    random.Random(1234).shuffle(order)
    held = [prompts[i] for i in order[: cfg.eval_prompts]]
    train = [prompts[i] for i in order[cfg.eval_prompts : need]]
    return train, held


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_key(name: str) -> str:
    return model_identity(resolve_model_path(name))


def stages_dir(cfg: ExperimentConfig) -> Path:
    path = Path(cfg.stages_dir or Path(cfg.output_dir) / "stages")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sampling(cfg: ExperimentConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "chat", "reward", "reward_model",
                                         "reward_pattern", "reward_absent", "reward_target_length")}


def sft_stage(cfg: ExperimentConfig, out: Path) -> str:
    """The reference: the starting model, or the result of SFT on `sft_data`."""
    if not cfg.sft_data:
        return cfg.model
    spec = {"name": "SFT", "kind": "sft", "dir": "sft", "objective": "sft", "data": cfg.sft_data}
    return str(train_policy(spec, cfg.model, "", cfg.sft_data, cfg, out / "sft", steps=cfg.sft_steps) / "final")


def reference_draw(cfg: ExperimentConfig, ref, eval_prompts: list, reward_fn) -> dict:
    """The reference's samples on the held-out prompts (cached): eval_samples + max(N) per prompt."""
    n = cfg.eval_samples + max(best_of(cfg) or [2])
    path = stages_dir(cfg) / f"reference-{key(model_key(ref.names[1]), eval_prompts, n, sampling(cfg), cfg.seed)}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    drawn = draw(ref.reference, ref, eval_prompts, n, cfg, reward_fn)
    drawn.pop("ids")  # the reference's KL to itself is 0: its token ids are not needed
    path.write_text(json.dumps(drawn, ensure_ascii=False), encoding="utf-8")
    return drawn


def generate_pairs(cfg: ExperimentConfig, model: str, prompts: list, indices: list[int], k: int, round_: int) -> Path:
    """Pairs from `model` on `prompts` labelled by the true reward (`dpolab generate`, resumable)."""
    stages = stages_dir(cfg)
    seed = cfg.seed + 1000 * (round_ - 1)  # fresh noise every round
    name = key(model_key(model), prompts, k, sampling(cfg), cfg.pair_strategy, cfg.min_gap, seed)
    prompt_file = stages / f"prompts-{name}.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "train_index": i}, ensure_ascii=False) + "\n"
                                   for p, i in zip(prompts, indices)), encoding="utf-8")
    output = stages / f"pairs-{name}.jsonl"
    generate(GenerateConfig(
        model=model, prompts=str(prompt_file), output=str(output), num_samples=k, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, seed=seed, batch_size=cfg.gen_batch_size, chat=cfg.chat,
        pair_strategy=cfg.pair_strategy, min_gap=cfg.min_gap, reward=cfg.reward, reward_model=cfg.reward_model,
        reward_pattern=cfg.reward_pattern, reward_absent=cfg.reward_absent,
        reward_target_length=cfg.reward_target_length, device=cfg.device, progress=cfg.progress))
    if count_lines(output) == 0:
        raise ValueError(f"no training pairs: every prompt's {k} samples tied on the reward ({output})")
    return output


def count_lines(path: Path) -> int:
    return len(json_lines(path))


def tokenized_pairs(path: Path, tokenizer) -> list:
    return load_pairs(str(path), tokenizer, max_length=1024, max_prompt_length=512)[0] if count_lines(path) else []


# ----------------------------------------------------------------------------- training
def training_specs(cfg: ExperimentConfig) -> list[dict]:
    """One spec per trained policy: DPO at every beta, online RL at every KL coefficient, then
    the trained baselines."""
    specs = [{"name": f"DPO β={b:g}", "kind": "dpo", "dir": f"dpo-beta{b:g}", "objective": "dpo", "loss": "sigmoid",
              "beta": b} for b in betas(cfg)]
    # RLOO's implicit reward is kl_coef * log(pi / pi_ref) (the same optimum as DPO's): "beta" = kl_coef
    specs += [{"name": f"RLOO kl={c:g}", "kind": "rloo", "dir": f"rloo-kl{c:g}", "objective": "rloo", "beta": c}
              for c in kl_coefs(cfg)]
    chosen = names_list(cfg.baselines)
    if "preferred-ft" in chosen:
        specs.append({"name": "Preferred-FT", "kind": "preferred-ft", "dir": "preferred-ft", "objective": "sft"})
    if "unlikelihood" in chosen:
        specs.append({"name": "Unlikelihood", "kind": "unlikelihood", "dir": "unlikelihood", "objective": "unlikelihood"})
    if "ipo" in chosen:
        specs.append({"name": f"IPO β={cfg.ipo_beta:g}", "kind": "ipo", "dir": f"ipo-beta{cfg.ipo_beta:g}",
                      "objective": "dpo", "loss": "ipo", "beta": cfg.ipo_beta})
    if "cdpo" in chosen:
        specs.append({"name": f"cDPO β={cfg.cdpo_beta:g} ε={cfg.label_smoothing:g}", "kind": "cdpo",
                      "dir": f"cdpo-beta{cfg.cdpo_beta:g}", "objective": "dpo", "loss": "cdpo", "beta": cfg.cdpo_beta,
                      "label_smoothing": cfg.label_smoothing})
    return specs


def train_policy(spec: dict, model: str, ref_model: str, data, cfg: ExperimentConfig, run_dir: Path,
                 steps: int | None = None) -> Path:
    """Train (or reuse a finished run with the same settings) and return the run directory."""
    kw = dict(model=model, data=str(data), output_dir=str(run_dir), max_steps=cfg.steps if steps is None else steps,
              batch_size=cfg.batch_size, eval_fraction=0.0, seed=cfg.seed, bf16=cfg.bf16, device=cfg.device,
              progress=cfg.progress, resume=True, final_checkpoint=False)  # final/ is all the experiment reads
    if spec["objective"] == "sft":
        kw["lr"] = cfg.sft_lr
    elif spec["objective"] == "unlikelihood":
        kw.update(lr=cfg.sft_lr, alpha=cfg.unlikelihood_alpha)
    else:
        kw.update(lr=cfg.lr, loss=spec["loss"], beta=spec["beta"], label_smoothing=spec.get("label_smoothing", 0.0),
                  ref_model=ref_model, precompute_ref=True)
    if reusable(run_dir, kw):
        return run_dir
    if spec["objective"] == "unlikelihood":
        train_unlikelihood(UnlikelihoodConfig(**kw))
    else:
        (sft if spec["objective"] == "sft" else train)(**kw)
    return run_dir


def train_online(spec: dict, model: str, prompts: list, reward_fn, cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Online RL (RLOO) on the training prompts with the true reward (reused when finished)."""
    prompts = [as_messages(p) if cfg.chat and isinstance(p, str) else p for p in prompts]
    online = OnlineConfig(model=model, output_dir=str(run_dir), kl_coef=spec["beta"], steps=cfg.online_steps,
                          prompts_per_step=cfg.online_prompts_per_step, num_samples=cfg.online_samples,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, lr=cfg.online_lr,
                          seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    if reusable(run_dir, dataclasses.asdict(online)):
        return run_dir
    return rloo(online, prompts, reward_fn)


def reusable(run_dir: Path, kw: dict) -> bool:
    """A finished run with the same settings is reused; one with other settings is an error."""
    config = run_dir / "config.yaml"
    if not config.exists():
        return False
    recorded = yaml.safe_load(config.read_text()) or {}
    if kw.get("bf16") == "auto":  # a run's config.yaml records bf16 as it resolved (train.save_run_config)
        kw = {**kw, "bf16": str(bf16_default(pick_device(kw.get("device", "auto")))).lower()}
    differ = sorted(k for k, v in kw.items() if k not in ("progress", "resume", "final_checkpoint") and recorded.get(k) != v)
    if differ:
        raise ValueError(f"{run_dir} holds a run with other settings ({', '.join(differ)}): "
                         "choose another --output-dir or remove it")
    return (run_dir / "final").exists()


def measure_run(spec: dict, run_dir: Path, ref, eval_prompts, ref_draw, reward_fn, cfg, eval_pairs, **extra) -> dict:
    policy = load_frozen(str(run_dir / "final"), ref.device)
    try:
        return measure_policy(spec["name"], spec["kind"], policy, ref, eval_prompts, ref_draw, reward_fn, cfg,
                              spec.get("beta"), eval_pairs, run_dir=str(run_dir), round=spec.get("round", 1), **extra)
    finally:
        del policy


# ----------------------------------------------------------------------------- iterative DPO
def iterate(cfg, spec, run_dir, pairs, train_prompts, ref, eval_prompts, ref_draw, reward_fn, eval_pairs, out, clock):
    """Rounds 2..R: sample from the latest policy, relabel with the reward, train from it (reference fixed)."""
    points, dirs = [], []
    indices = list(range(len(train_prompts)))
    for r in range(2, cfg.rounds + 1):
        policy = str(run_dir / "final")
        prompts, k = train_prompts, cfg.num_samples
        if cfg.active:
            indices = active_prompts(cfg, spec["beta"], policy, ref, pairs, indices, len(train_prompts))
            prompts, k = [train_prompts[i] for i in indices], max(2, round(cfg.num_samples / cfg.active_fraction))
        with clock(f"pairs round {r}"):
            pairs = generate_pairs(cfg, policy, prompts, indices, k, r)
        round_spec = {**spec, "name": f"{spec['name']} round {r}", "kind": "dpo-round", "dir": f"{spec['dir']}-round{r}",
                      "round": r}
        with clock(f"train {round_spec['name']}"):
            run_dir = train_policy(round_spec, policy, ref.names[1], pairs, cfg, out / round_spec["dir"])
        with clock(f"measure {round_spec['name']}"):
            points.append(measure_run(round_spec, run_dir, ref, eval_prompts, ref_draw, reward_fn, cfg, eval_pairs,
                                      active=cfg.active, sampled_prompts=len(prompts), samples_per_prompt=k))
        dirs.append(run_dir)
    return points, dirs


def active_prompts(cfg, beta: float, policy: str, ref, pairs: Path, indices: list[int], total: int) -> list[int]:
    """Training-prompt indices with the smallest implicit-reward margins under `policy` on the last
    round's pairs; prompts that gave no pair (ties) count as margin 0, not yet decided."""
    rows = [json.loads(line) for line in json_lines(pairs)]
    tokenized = tokenized_pairs(pairs, ref.tokenizer)
    by_line = {n + 1: row for n, row in enumerate(rows)}
    prompt_of = [indices[by_line[p.row]["prompt_index"]] for p in tokenized]
    model = load_frozen(policy, ref.device)
    margins = prompt_margins(model_pair(model, ref, policy), tokenized, prompt_of, beta, cfg.eval_batch_size)
    count = max(1, math.ceil(total * cfg.active_fraction))
    return sorted(sorted(range(total), key=lambda i: (margins.get(i, 0.0), i))[:count])


# ----------------------------------------------------------------------------- outputs
def finish(cfg, ctx: dict, points: list[dict], start: float, title: str) -> dict:
    """results.json, frontier.png, report.html and the terminal summary."""
    out = Path(cfg.output_dir)
    seconds = time.perf_counter() - start
    reward_name = cfg.reward_model or cfg.reward
    png = frontier_png(points, f"{title}: reward vs KL", reward_name)
    (out / "frontier.png").write_bytes(png)
    meta = {"eval_prompts": len(ctx["eval_prompts"]), "eval_samples": cfg.eval_samples, "reward": reward_name,
            "reference_samples": ctx["reference_samples"]}
    settings = [[k, str(v)] for k, v in dataclasses.asdict(cfg).items()]
    cpu = ctx.get("cpu_seconds", {})
    timing_rows = [[k, f"{v:.1f}", f"{cpu.get(k, 0.0):.1f}"] for k, v in ctx["timings"].items()]
    timing_rows.append(["total", f"{seconds:.1f}", f"{time.process_time():.1f} (process)"])
    claims = paper_claims(points)
    claims_html = ("<p>Fixed before the run (dpolab/experiments/claims.py): DPO's curve interpolated at the other "
                   "policy's KL; 95% intervals of reward differences from the two points' SEs.</p>"
                   + table(CLAIM_COLUMNS, claim_rows(claims)))
    sections = [
        ("Reward vs KL frontier", frontier_section(png)),
        ("The paper's claims on this run", claims_html),
        ("Results", results_section(points, meta)),
        ("Examples: held-out prompts before and after", examples_section(ctx["eval_prompts"], points)),
        ("Settings and timings", table(["option", "value"], settings) + table(["stage", "wall seconds", "CPU seconds"], timing_rows)),
    ]
    report = build_report([str(d) for d in ctx["run_dirs"]], out / "report.html", sections, title=title)
    results = {"title": title, "seconds": round(seconds, 1), "reference": ctx["reference"], "train_pairs": ctx["train_pairs"],
               "heldout_pairs": ctx["heldout_pairs"], "timings": ctx["timings"], "cpu_seconds": cpu,
               "process_cpu_seconds": round(time.process_time(), 1), "claims": claims, "points": points,
               "config": dataclasses.asdict(cfg), "report": str(report), "frontier": str(out / "frontier.png")}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_summary(points, f"{title}: {ctx['train_pairs']} training pairs, {meta['eval_prompts']} held-out prompts",
                  f"report: {report}\nfrontier: {out / 'frontier.png'}\ntotal time: {seconds / 60:.1f} min")
    if claims:
        print_table("The DPO paper's claims on this run", CLAIM_COLUMNS, claim_rows(claims))
    return results
