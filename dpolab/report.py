"""`dpolab report`: one self-contained HTML file from one or more run directories.

What a run directory may hold, and what the report makes of it (files are looked for in the
directory and one level below, e.g. `run/eval/eval.json`):

    config.yaml     settings table (model, loss, beta, lr)
    metrics.jsonl   training curves: loss, reward margins, accuracies, chosen/rejected rewards and
                    log-probs, grad norm; train lines, eval points; runs overlaid for comparison
    eval.json       `dpolab eval` tables and sample examples
    rank.json       `dpolab rank` ranked table and win-matrix heat map
    tokens.jsonl    `dpolab score --per-token` reward attribution examples

Plots are matplotlib (Agg) PNGs embedded as base64, styles are inline: the file needs nothing
else to render and can be mailed or archived as is. `build_report` is the Python entry point;
other tools add their own sections through `extra_sections`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import yaml

from . import displacement
from .config import ReportConfig, names_list, resolve
from .data.files import json_lines
from .evaluate import result_rows
from .rank import RANK_COLUMNS, ranking_rows, win_matrix_png
from .score import ATTRIBUTION_CSS, attribution_html

CURVES = [  # (panel title, [(metric key, line style)])
    ("loss", [("loss", "-")]),
    ("reward margin (chosen - rejected)", [("rewards/margins", "-")]),
    ("preference accuracy", [("rewards/accuracies", "-")]),
    ("implicit reward: chosen -, rejected --", [("rewards/chosen", "-"), ("rewards/rejected", "--")]),
    ("log-prob: chosen -, rejected --", [("logps/chosen", "-"), ("logps/rejected", "--")]),
    ("grad norm", [("grad_norm", "-")]),
]
FOUND_IN_RUN = ("metrics.jsonl", "eval.json", "rank.json", "tokens.jsonl")


def report(cfg: ReportConfig | None = None, **overrides) -> Path:
    cfg = cfg or resolve(ReportConfig, **overrides)
    runs = names_list(cfg.runs)
    out = Path(cfg.output) if cfg.output else Path(runs[0]) / "report.html"
    path = build_report(runs, out, title=cfg.title, examples=cfg.examples)
    print(f"dpolab report: {path} ({path.stat().st_size // 1024} KiB, self-contained)")
    return path


def build_report(run_dirs, out_path, extra_sections=None, *, title: str = "dpolab report", examples: int = 5) -> Path:
    """Write the HTML report of `run_dirs` to `out_path`; returns the path.

    extra_sections: list of (title, html) pairs (or {"title", "html"} dicts) appended as their
    own sections; their HTML must be self-contained too (use `png_img` for figures).
    """
    runs = [load_run(Path(d)) for d in run_dirs]
    extras = [(s["title"], s["html"]) if isinstance(s, dict) else tuple(s) for s in (extra_sections or [])]
    if not runs and not extras:
        raise ValueError("nothing to report: no run directories and no extra sections")
    sections = [("Runs", runs_table(runs))] if runs else []
    if any(r["metrics"] for r in runs):
        sections.append(("Training curves", curves_section(runs)))
    for r in runs:
        sections += [(f"Evaluation: {r['name']}", eval_section(e)) for e in r["evals"]]
        sections += [(f"Ranking: {r['name']}", rank_section(k)) for k in r["ranks"]]
        if r["tokens"]:
            sections.append((f"Reward attribution: {r['name']}", attribution_section(r["tokens"], examples)))
        if (finding := displacement.detect(r["metrics"], r["config"])) is not None:
            sections.append((f"Likelihood displacement: {r['name']}", displacement.section_html(finding)))
    sections += extras
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(title, sections, [r["path"] for r in runs]), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- reading runs
def load_run(path: Path) -> dict:
    """Everything the report uses from one run directory."""
    if not path.is_dir():
        raise ValueError(f"{path}: run directory not found")
    found = {name: sorted(path.glob(name)) + sorted(path.glob(f"*/{name}")) for name in FOUND_IN_RUN}
    if not any(found.values()):
        raise ValueError(f"{path}: nothing to report (no {', '.join(FOUND_IN_RUN)} here or one level down)")
    config = {}
    if (path / "config.yaml").exists():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    tokens = [rec for f in found["tokens.jsonl"] for rec in read_jsonl(f)]
    return {
        "name": path.resolve().name, "path": str(path), "config": config,
        "metrics": read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else [],
        "evals": [json.loads(f.read_text()) for f in found["eval.json"]],
        "ranks": [json.loads(f.read_text()) for f in found["rank.json"]],
        "tokens": tokens,
    }


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON Lines file; an unreadable line (a run killed mid-write) is skipped."""
    out = []
    for line in json_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


# ----------------------------------------------------------------------------- sections
def png_img(png: bytes, alt: str) -> str:
    """An <img> whose PNG is embedded as a base64 data URI (no file next to the report needed)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    # in a scrolling box: a wide table on a phone scrolls sideways instead of being cut off
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'



def _last(records: list[dict], split: str, key: str) -> str:
    values = [r[key] for r in records if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return f"{values[-1]:.4g}" if values else "-"


def runs_table(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        c, m = r["config"], r["metrics"]
        steps = max((rec.get("step", 0) for rec in m), default=0)
        rows.append([r["name"], c.get("model", "-"), c.get("loss", "sft" if c and "loss" not in c else "-"),
                     c.get("beta", "-"), c.get("lr", "-"), steps, _last(m, "train", "loss"), _last(m, "eval", "loss"),
                     _last(m, "eval", "rewards/accuracies")])
    return table(["run", "model", "loss", "beta", "lr", "steps", "train loss", "eval loss", "eval accuracy"], rows)


def curve_pngs(runs: list[dict]) -> list[tuple[str, bytes]]:
    """One PNG per panel (the page lays them out: three across on a desktop, one on a phone)."""
    plt = pyplot()

    out = []
    for n, (title, keys) in enumerate(_panels(runs)):
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        _draw_panel(ax, runs, title, keys)
        if n == 0 or len(runs) > 1:  # every panel names the runs when there are several
            ax.legend(fontsize=8)
        fig.tight_layout()
        out.append((title, savefig(fig)))
    return out


def _panels(runs: list[dict]) -> list:
    return [(t, keys) for t, keys in CURVES if any(k in rec for r in runs for rec in r["metrics"] for k, _ in keys)]


def _draw_panel(ax, runs: list[dict], title: str, keys) -> None:
    plt = pyplot()

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(runs):
        colour = colours[i % len(colours)]
        for key, style in keys:
            for split, marker in (("train", None), ("eval", "o")):
                pts = [(rec["step"], rec[key]) for rec in r["metrics"] if rec.get("split") == split and key in rec]
                if pts:
                    xs, ys = zip(*pts)
                    label = f"{r['name']} {split}" if key == keys[0][0] else None
                    ax.plot(xs, ys, linestyle=style if marker is None else "none", marker=marker, color=colour,
                            label=label, linewidth=1.4, markersize=5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.grid(alpha=0.3)


def pyplot():
    """matplotlib's pyplot on the Agg backend (PNG bytes, no display)."""
    import matplotlib  # why: chosen here, not at import: importing dpolab must not switch a notebook's backend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # why: after use("Agg")

    return plt


def savefig(fig) -> bytes:
    plt = pyplot()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def curves_section(runs: list[dict]) -> str:
    note = "<p>Lines: training steps; dots: evaluation on held-out pairs. Runs share colours across panels.</p>"
    pngs = curve_pngs([r for r in runs if r["metrics"]])
    return note + '<div class="panels">' + "".join(png_img(png, title) for title, png in pngs) + "</div>"


def eval_section(result: dict) -> str:
    out = table(["metric", "value"], [list(r) for r in result_rows(result)])
    examples = (result.get("generation") or {}).get("examples") or []
    if examples:
        rows = [[e["prompt"][-200:], e["policy"], f"{e['policy_reward']:.3f}", e.get("baseline", "-"),
                 f"{e['baseline_reward']:.3f}" if "baseline_reward" in e else "-"] for e in examples]
        out += "<h3>Samples</h3>" + table(["prompt (end)", "policy", "reward", "baseline", "reward"], rows)
    return out


def rank_section(result: dict) -> str:
    intro = (f"<p>{result.get('mode', '')} mode on {html.escape(str(result.get('source', '')))}: {result['items']} items, "
             f"score = {html.escape(str(result.get('measure', '')))}.</p>")
    return intro + table(RANK_COLUMNS, ranking_rows(result)) + png_img(win_matrix_png(result), "win matrix")


def attribution_section(records: list[dict], examples: int) -> str:
    beta = records[0].get("beta", "?")
    intro = (f"<p>Tokens shaded by beta*(log pi(y_t) - log pi_ref(y_t)) with beta = {beta}: green = raised by training, "
             f"red = lowered. First {min(examples, len(records))} of {len(records)} responses; hover (or tap) a token for its value.</p>")
    return intro + attribution_html(records, examples)


# ----------------------------------------------------------------------------- page
CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 0 auto; padding: 24px; max-width: 1400px; color: #222; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #eee; padding-bottom: 4px; margin-top: 36px; }
.meta { color: #666; font-size: 13px; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; max-width: 480px; }
th { background: #f4f6f8; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; display: block; margin: 8px 0; }
.scroll { overflow-x: auto; max-width: 100%; }
td { overflow-wrap: break-word; }  /* long paths wrap; short words never split */
.panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 4px 12px; }
@media (max-width: 600px) { body { padding: 12px; } th, td { padding: 3px 6px; } }
nav a { margin-right: 14px; font-size: 14px; }
"""


def page(title: str, sections: list[tuple[str, str]], run_paths: list[str]) -> str:
    anchors = [f"s{i}" for i in range(len(sections))]
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, (t, _) in zip(anchors, sections))
    body = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>{content}</section>'
                   for a, (t, content) in zip(anchors, sections))
    meta = f"generated {time.strftime('%Y-%m-%d %H:%M')} from {html.escape(', '.join(run_paths) or 'no run directory')}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{CSS}{ATTRIBUTION_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class='meta'>{meta}</div><nav>{nav}</nav>{body}</body></html>")
