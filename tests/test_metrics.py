"""Progress of long passes off a terminal: plain lines with counts, rate and ETA."""

import re

import dpolab.metrics
from dpolab.metrics import ItemProgress


def test_plain_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(dpolab.metrics, "PLAIN_EVERY", 0.0)  # a line per batch instead of every 10 s
    with ItemProgress("eval", 10, "pair") as bar:
        for n in (4, 4, 2):
            bar.advance(n)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["eval: 4/10 pairs", "eval: 8/10 pairs", "eval: 10/10 pairs"]
    assert re.fullmatch(r"eval: 4/10 pairs, [\d.e+]+ pairs/s, eta \d+:\d\d:\d\d", lines[0])
    assert "eta" not in lines[-1]


def test_the_end_of_a_reported_pass_is_told_once(capsys, monkeypatch):
    monkeypatch.setattr(dpolab.metrics, "PLAIN_EVERY", 0.0)
    with ItemProgress("eval", 10, "pair") as bar:
        bar.advance(4)
        monkeypatch.setattr(dpolab.metrics, "PLAIN_EVERY", 1e9)  # the last batch comes before the next line is due
        bar.advance(6)
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == ["eval: 4/10 pairs", "eval: 10/10 pairs"]


def test_quiet_when_disabled_or_short(capsys, monkeypatch):
    with ItemProgress("eval", 10, "pair") as bar:  # under PLAIN_EVERY (10 s): nothing to report
        bar.advance(10)
    monkeypatch.setattr(dpolab.metrics, "PLAIN_EVERY", 0.0)
    with ItemProgress("eval", 10, "pair", enabled=False) as bar:
        bar.advance(10)
    assert capsys.readouterr().err == ""


def test_counts_take_the_noun_in_the_right_number():
    from dpolab.metrics import counted

    assert [counted(n, "pair") for n in (0, 1, 2)] == ["0 pairs", "1 pair", "2 pairs"]
    assert counted(1, "entry", "entries") == "1 entry" and counted(3, "entry", "entries") == "3 entries"
