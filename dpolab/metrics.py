"""Where metrics go: metrics.jsonl, TensorBoard, a live progress bar, a summary table.

Only the main process writes or draws; other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .data.files import json_lines
from .perms import atomic_path

SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "reward", "kl", "pairs/s")  # reward, kl: online RL


class MetricsLogger:
    """Appends one JSON object per logging step and mirrors it to TensorBoard."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.history: list[dict] = []
        self.progress = None
        self.total, self.start_step, self.started = total_steps, start_step, time.monotonic()
        if not enabled:
            return
        path = output_dir / "metrics.jsonl"
        if start_step > 0 and path.exists():
            _drop_after(path, start_step)  # steps after the resumed checkpoint are redone
        self.file = open(path, "a")
        from torch.utils.tensorboard import SummaryWriter  # why: ~1 s to import; print_table's users (report, experiments) log nothing

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        # A live bar only on a terminal: in a log file (nohup, a cluster job) it would print
        # nothing until the end, so plain lines are written instead (`plain_line`).
        if progress and self.console.is_terminal:
            self.progress, self.task = live_bar(self.console, "step", total_steps, completed=start_step)

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": round(time.time(), 3), **values}
        self.history.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        if self.progress is not None and prefix == "train":
            info = "  ".join(f"{k.split('/')[-1]} {values[k]:.3f}" for k in SHOWN if k in values)
            self.progress.update(self.task, completed=step, info=info)
        elif self.progress is None:
            print(self.plain_line(step, values, prefix), file=self.console.file, flush=True)

    def plain_line(self, step: int, values: dict, prefix: str = "train") -> str:
        """`[train] step 12/200 loss=0.6931 ... pairs/s=0.71 eta 4:25:00`: one line per logged step."""
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k in SHOWN or prefix == "eval")
        line = f"[{prefix}] step {step}/{self.total} {shown}"
        done = step - self.start_step
        if prefix == "train" and done > 0:
            left = (time.monotonic() - self.started) / done * (self.total - step)
            line += f" eta {_clock(left)}"
        return line

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        self.writer.close()
        self.file.close()

    def summary(self, title: str) -> Table:
        """First vs last logged values of the key training metrics, and the last eval."""
        table = Table(title=title)
        for col in ("metric", "first", "last"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        train = [r for r in self.history if r["split"] == "train"]
        evals = [r for r in self.history if r["split"] == "eval"]
        if train:
            for key in (k for k in train[-1] if k not in ("step", "split", "time")):
                first = train[0].get(key)
                table.add_row(key, f"{first:.4g}" if first is not None else "-", f"{train[-1][key]:.4g}")
        if evals:
            for key in (k for k in evals[-1] if k not in ("step", "split", "time")):
                first = evals[0].get(key)
                table.add_row(f"eval/{key}", f"{first:.4g}" if first is not None else "-", f"{evals[-1][key]:.4g}")
        if self.enabled:
            self.console.print(table)
        return table


def counted(n: int, noun: str, plural: str = "") -> str:
    """`1 pair`, `2 pairs`, `0 pairs`: a count with its noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def live_bar(console: Console, label: str, total: int, completed: int = 0, transient: bool = False):
    """The live bar every long pass draws on a terminal (started): `label n/total bar elapsed eta info`.
    Returns (rich Progress, task id); `info` is the task field for a rate or metrics."""
    bar = Progress(TextColumn(f"[bold]{label}"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                   console=console, transient=transient)
    task = bar.add_task(label, total=total, completed=completed, info="")
    bar.start()
    return bar, task


PLAIN_EVERY = 10.0  # seconds between plain progress lines when stderr is not a terminal


class ItemProgress:
    """Progress of a long pass over items (the log-probs of eval, score and rank; sampling): train's
    live bar on a terminal; elsewhere (a log file, a cluster job) a plain line
    `eval: 64/311 pairs, 12.3 pairs/s, eta 0:00:21` every PLAIN_EVERY seconds, and a last one when
    a pass that printed any ends. Nothing when not `enabled`. `advance(n)` after each batch.
    `unit`: what is counted, singular (`pair`, `sample`)."""

    def __init__(self, label: str, total: int, unit: str = "pair", enabled: bool = True, transient: bool = True):
        self.label, self.total, self.unit, self.enabled, self.transient = label, total, unit, enabled, transient
        self.done, self.bar, self.shown = 0, None, None  # shown: the count of the last plain line

    def __enter__(self):
        self.console = Console(stderr=True)
        self.start = self.last = time.monotonic()
        if self.enabled and self.console.is_terminal:
            self.bar, self.task = live_bar(self.console, self.label, self.total, transient=self.transient)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n, info=f"{self.rate():.2f} {self.unit}s/s")
        elif self.enabled and time.monotonic() - self.last >= PLAIN_EVERY:
            self._line()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def plain_line(self) -> str:
        rate = self.rate()
        line = f"{self.label}: {self.done}/{counted(self.total, self.unit)}, {rate:.3g} {self.unit}s/s"
        return line + (f", eta {_clock((self.total - self.done) / rate)}" if 0 < self.done < self.total else "")

    def _line(self) -> None:
        print(self.plain_line(), file=self.console.file, flush=True)
        self.last, self.shown = time.monotonic(), self.done

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        elif self.shown is not None and self.shown != self.done and exc[0] is None:  # a reported pass's end, once
            self._line()
        return False


def print_table(title: str, columns, rows, footer: str = "", left: str | None = None) -> None:
    """A rich table on the terminal: the `left` column (default: the first) left-aligned, the rest right."""
    left = left or columns[0]
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == left else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file: do not wrap cells at rich's default 80 columns
        console = Console(width=160)
    console.print(table)
    if footer:
        console.print(footer)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, minutes = divmod(minutes, 60)
    return f"{h}:{minutes:02d}:{s:02d}"


def _drop_after(path: Path, step: int) -> None:
    """Keep only records up to `step` (atomically), so a resumed run logs each step once."""
    kept = [line for line in json_lines(path) if json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
