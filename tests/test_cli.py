"""The command line: user errors are one line on stderr with exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

from dpolab.cli import main


def test_missing_data_file_is_one_line(tmp_path, tiny_model_dir, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl"),
                 "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "nope.jsonl" in err and "Traceback" not in err


def test_malformed_row_names_file_row_and_field(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": 7, "rejected": "c"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "bad.jsonl" in err and "row 2" in err and "chosen" in err


def test_missing_model_dir_is_one_line(tmp_path, toy_data, capsys):
    code = main(["train", "--model", str(tmp_path / "no-model"), "--data", str(toy_data), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no-model" in err and len(err.splitlines()) == 1


def test_cli_trains_and_stores_resolved_config(tmp_path, tiny_model_dir, toy_data):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dpolab.cli", "train", "--model", str(tiny_model_dir), "--data", str(toy_data),
         "--output-dir", str(out), "--max-steps", "2", "--bf16", "false", "--beta", "0.2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rewards/accuracies" in proc.stdout + proc.stderr  # the summary table
    text = (out / "config.yaml").read_text()
    assert "beta: 0.2" in text and "max_steps: 2" in text
    assert (out / "final" / "model.safetensors").exists()
