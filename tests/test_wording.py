from dpolab.train import data_summary
from dpolab.wording import plural


def test_plural_counts_read_as_english():
    assert [plural(n, "pair") for n in (0, 1, 2)] == ["0 pairs", "1 pair", "2 pairs"]
    assert plural(3, "entry", "entries") == "3 entries"


def test_data_line_of_a_one_row_file_says_row_and_pair():
    class Report:
        rows_read, kept, truncated, dropped, notes = 1, 1, 0, {}, {}

    assert data_summary("x.jsonl", Report(), 0, 1).endswith("x.jsonl: 1 row, 1 kept, dropped: none, 0 truncated; 0 train / 1 eval pair")
