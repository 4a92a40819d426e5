"""Outputs of an experiment: the reward-vs-KL frontier plot (the DPO paper's Figure 2, left),
the results table, example completions, the HTML sections and the terminal summary."""

from __future__ import annotations

import html

from ..metrics import print_table
from ..report import png_img, pyplot, savefig, table

STYLE = {  # kind -> (colour, marker, legend label)
    "dpo": ("#d62728", "o", "DPO"),
    "rloo": ("#17becf", "h", "RLOO (online RL, KL-penalised reward)"),
    "dpo-round": ("#9467bd", "D", "iterative DPO"),
    "ipo": ("#2ca02c", "^", "IPO"),
    "cdpo": ("#ff7f0e", "v", "cDPO"),
    "preferred-ft": ("#8c564b", "s", "Preferred-FT"),
    "unlikelihood": ("#7f7f7f", "X", "Unlikelihood"),
    "best-of-n": ("#1f77b4", "P", "best-of-N (KL bound)"),
    "reference": ("#000000", "*", "reference"),
    "sweep": ("#d62728", "o", "sweep"),
}
CURVES = ("dpo", "rloo", "sweep", "best-of-n")  # swept methods: drawn as connected curves
COLUMNS = ["policy", "beta", "reward", "KL to ref", "win vs ref", "pref. acc."]


def frontier_png(points: list[dict], title: str, reward_name: str = "reward") -> bytes:
    """Reward (y) against sequence KL to the reference (x), one marker per policy, error bars = 1 SE."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9.5, 5.4))
    for kind, (colour, marker, label) in STYLE.items():
        group = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["kl"])
        if not group:
            continue
        xs, ys = [p["kl"] for p in group], [p["reward"] for p in group]
        ax.errorbar(xs, ys, xerr=[p["kl_se"] for p in group], yerr=[p["reward_se"] for p in group], fmt=marker,
                    color=colour, label=label, markersize=9 if kind == "reference" else 7, capsize=2,
                    linestyle="-" if kind in CURVES and len(group) > 1 else "none",
                    linewidth=1, alpha=0.9, markerfacecolor="none" if kind == "best-of-n" else colour)
        for k, p in enumerate(group):
            tag = point_tag(p)
            if tag:  # alternate above / below so neighbouring labels do not overprint
                ax.annotate(tag, (p["kl"], p["reward"]), textcoords="offset points", xytext=(5, 6 if k % 2 == 0 else -13),
                            fontsize=8, color=colour)
    ref = next((p for p in points if p["kind"] == "reference"), None)
    if ref:
        ax.axhline(ref["reward"], color="#888888", linestyle=":", linewidth=1)
    ax.margins(x=0.12, y=0.1)  # room for the labels next to the outermost markers
    ax.set_xlabel("KL(pi || pi_ref), nats per completion")
    ax.set_ylabel(f"mean {reward_name} reward (held-out prompts)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a marker
    fig.tight_layout()
    return savefig(fig)


def point_tag(p: dict) -> str:
    if p["kind"] == "best-of-n":
        return f"N={p.get('n')}"
    if p["kind"] == "sweep":
        return str(p.get("value"))
    if p["kind"] == "rloo":
        return f"kl={p['beta']:g}"
    if p["kind"] in ("dpo", "dpo-round") and p.get("beta") is not None:  # baselines: named in the legend
        return f"β={p['beta']:g}" + (f" r{p['round']}" if p.get("round", 0) > 1 else "")
    return ""


def table_rows(points: list[dict]) -> list[list[str]]:
    rows = []
    for p in points:
        kl = (f"{p['kl']:.3f} (bound)" if p["kl_from"] == "bound" else
              "0 (definition)" if p["kl_from"] == "definition" else f"{p['kl']:.3f} ± {p['kl_se']:.3f}")
        acc = "-" if p.get("accuracy") is None else f"{p['accuracy']:.3f}"
        win = "-" if p.get("win_rate") is None else f"{p['win_rate']:.3f}"
        beta = "-" if p.get("beta") is None else f"{p['beta']:g}"
        rows.append([p["name"], beta, f"{p['reward']:+.3f} ± {p['reward_se']:.3f}", kl, win, acc])
    return rows


def results_section(points: list[dict], meta: dict) -> str:
    intro = (f"<p>{meta['eval_prompts']} held-out prompts; policies: {meta['eval_samples']} samples per prompt, the "
             f"reference {meta['reference_samples']}. Reward: {html.escape(meta['reward'])} (mean ± SE). KL: mean ± SE of "
             "log pi(y|x) - log pi_ref(y|x) over the policy's own samples; best-of-N at its analytic bound "
             "log N - (N-1)/N. Win rate: against the reference's sample for the same prompt and seed, ties half. "
             "Preference accuracy: held-out pairs (best vs worst reference sample by the true reward) ordered "
             "by the implicit reward.</p>")
    return intro + table(COLUMNS, table_rows(points))


def frontier_section(png: bytes) -> str:
    note = ("<p>Each marker is one policy; error bars are one standard error. Up and to the left is better: more "
            "reward for less divergence from the reference (dotted line: the reference's reward).</p>")
    return note + png_img(png, "reward vs KL frontier")


def examples_section(prompts: list, points: list[dict], count: int = 6) -> str:
    """The same held-out prompts completed by the reference and by each trained policy."""
    shown = [p for p in points if p.get("examples")]
    parts = []
    for i in range(min(count, len(prompts))):
        prompt = prompts[i] if isinstance(prompts[i], str) else prompts[i][-1].get("content", "")
        rows = "".join(
            f"<tr><td>{html.escape(p['name'])}</td><td>{p['example_rewards'][i]:+.3f}</td>"
            f"<td><span class='prompt'>{html.escape(prompt)}</span>{html.escape(p['examples'][i])}</td></tr>"
            for p in shown)
        parts.append(f"<table><thead><tr><th>policy</th><th>reward</th><th>prompt + completion</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    style = "<style>.prompt { color: #888; }</style>"
    return style + "<p>Grey: the prompt; black: the sampled completion (first sample, same seed for every policy).</p>" + "".join(parts)


def print_summary(points: list[dict], title: str, footer: str) -> None:
    print_table(title, COLUMNS, table_rows(points), footer=footer)
