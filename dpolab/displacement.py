"""Likelihood-displacement guard: the margin grows while the chosen answers get LESS likely.

DPO only needs log pi(y_w) - log pi(y_l) to grow relative to the reference; it is satisfied by
pushing the rejected answer down faster than the chosen one, which can leave the chosen answer
less likely than under the reference (Razin et al. 2024, "Unintentional Unalignment:
Likelihood Displacement in Direct Preference Optimization"; Pal et al. 2024, "Smaug", DPOP).
It is the most common complaint in the trackers of TRL, LLaMA-Factory and axolotl.

From the logged training metrics: over the last quarter of the logged steps the mean implicit
chosen reward beta (log pi(y_w) - log pi_ref(y_w)) is below 0 (chosen log-probs under the
reference) while the mean margin is above 0 and above that of the first quarter. Reference-free
losses (no reference to fall below) are not checked. The run prints the finding, returns it
(`result["likelihood_displacement"]`) and `dpolab report` shows it, with the options that
counter it.
"""

from __future__ import annotations

import dataclasses
import html

from .losses import needs_reference


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def detect(records: list[dict], config: dict | None = None) -> dict | None:
    """The finding (a dict) when the train records of metrics.jsonl show displacement, else None."""
    loss = (config or {}).get("loss")
    if config is not None and (not loss or not needs_reference(str(loss))):
        return None  # an SFT run, or a reference-free loss
    train = [r for r in records if r.get("split", "train") == "train" and "rewards/chosen" in r and "rewards/margins" in r]
    if len(train) < 4:
        return None
    k = max(1, len(train) // 4)
    first, last = train[:k], train[-k:]
    chosen_end, margin_start, margin_end = _mean(last, "rewards/chosen"), _mean(first, "rewards/margins"), _mean(last, "rewards/margins")
    if not (chosen_end < 0 and margin_end > 0 and margin_end > margin_start):
        return None
    since = train[0]["step"]
    for i in range(len(train)):  # the last window start whose rolling chosen reward was still >= 0
        window = train[max(0, i - k + 1): i + 1]
        if _mean(window, "rewards/chosen") >= 0:
            since = train[min(i + 1, len(train) - 1)]["step"]
    finding = {
        "since_step": since, "chosen_reward_end": chosen_end, "margin_start": margin_start, "margin_end": margin_end,
        "message": (f"likelihood displacement: the reward margin rose ({margin_start:+.3g} -> {margin_end:+.3g}) while the "
                    f"chosen answers fell below the reference (mean chosen reward {chosen_end:+.3g} over the last "
                    f"{k} logged steps, since step {since})"),
        "counter_options": counter_options(config or {}),
    }
    if "logps/chosen" in train[0]:
        finding["chosen_logps_start"], finding["chosen_logps_end"] = _mean(first, "logps/chosen"), _mean(last, "logps/chosen")
    return finding


def counter_options(config: dict) -> list[str]:
    lr, beta, sft = config.get("lr"), config.get("beta"), config.get("sft_weight", 0) or 0
    return [
        f"--sft-weight (now {sft}): an NLL term on the chosen answers (RPO) keeps their likelihood up; try 0.1 to 1",
        f"a lower --lr (now {lr}): displacement grows with the step size",
        f"a larger --beta (now {beta}): a stronger pull towards the reference",
        "a loss that rewards the chosen answer on its own: nca_pair, apo_zero, sppo_hard",
    ]


def report_run(result: dict, cfg, accelerator) -> dict | None:
    """After a train run: print the finding once and add it to the result."""
    finding = detect(result["history"], dataclasses.asdict(cfg))
    if finding is not None:
        result["likelihood_displacement"] = finding
        accelerator.print("warning: " + finding["message"] + ". Counter it with: " + "; ".join(finding["counter_options"]))
    return finding


def section_html(finding: dict) -> str:
    """The report section of a finding."""
    items = "".join(f"<li>{html.escape(o)}</li>" for o in finding["counter_options"])
    return f"<p><strong>{html.escape(finding['message'])}</strong></p><p>Options that counter it:</p><ul>{items}</ul>"
