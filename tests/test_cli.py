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


# ----------------------------------------------------------------------------- a new user's first hour (issue 11)
import os  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from tests.conftest import REPO, write_toy_pairs  # noqa: E402


def _train_args(model, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--bf16", "false",
            "--device", "cpu", "--batch-size", "2", "--no-progress", *map(str, extra)]


def _records(out: Path, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_max_length_alone_derives_the_prompt_limit(tmp_path, tiny_model_dir, toy_data, capsys):
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-length", "64", "--max-steps", "1")) == 0
    # the run records the limit in force, and what was asked for
    line = next(x for x in (out / "config.yaml").read_text().splitlines() if x.startswith("max_prompt_length:"))
    assert line == "max_prompt_length: 32  # requested 0 (half of max_length)"
    code = main(_train_args(tiny_model_dir, toy_data, tmp_path / "bad", "--max-length", "64", "--max-prompt-length", "64"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("dpolab train: error: max_prompt_length must be < max_length (64)")


def test_prompt_limit_is_half_of_max_length_when_unset():
    from dpolab.config import TrainConfig, prompt_limit

    assert prompt_limit(TrainConfig(max_length=128)) == 64
    assert prompt_limit(TrainConfig(max_length=128, max_prompt_length=100)) == 100


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--los", "ipo"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("dpolab train: error: unknown option '--los' (did you mean --loss?); "
                                       "see `dpolab train --help`\n")


@pytest.mark.parametrize("argv, line", [
    (["trian", "--data", "x"], "dpolab: error: unknown command 'trian' (did you mean train?); commands: train, "),
    (["train", "--max-step", "2"], "dpolab train: error: unknown option '--max-step' (did you mean --max-steps?)"),
    (["eval", "--batch-size", "two"], "dpolab eval: error: argument --batch-size: invalid int value: 'two'"),
    (["score", "stray"], "dpolab score: error: unexpected argument 'stray'"),
    ([], "dpolab: error: no command given; commands: train, "),
])
def test_command_line_mistakes_are_one_line(argv, line, capsys):
    """No usage block: one line naming the command, the mistake, the closest spelling, where --help is."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(line) and "--help`" in err, err


def test_misspelt_loss_name_gets_a_suggestion(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "x.jsonl"), "--loss", "sigmiod"]) == 2
    assert "unknown loss 'sigmiod' (did you mean sigmoid?); choose one of: sigmoid," in capsys.readouterr().err


def test_python_dash_m_dpolab_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "dpolab", "train", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "--max-prompt-length" in proc.stdout and "--limit" in proc.stdout


def test_no_import_circles_between_shared_pieces():
    """safety <-> train (TrainingError) and evaluate <-> generate (prompts): neither imports the other back."""
    code = ("import sys, dpolab.safety, dpolab.prompts, dpolab.generate; "
            "assert 'dpolab.train' not in sys.modules and 'dpolab.evaluate' not in sys.modules, sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-1000:]
    for module, forbidden in (("safety", ".train"), ("generate", ".evaluate"), ("prompts", ".evaluate"), ("prompts", ".generate")):
        assert f"from {forbidden} import" not in (REPO / "dpolab" / f"{module}.py").read_text()


def test_run_directory_resolves_to_final_else_newest_checkpoint(tmp_path, capsys):
    from dpolab.models import ModelError, resolve_model_path

    run = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-7"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    assert resolve_model_path(str(run)) == str(run / "checkpoint-10")  # numeric, not alphabetical
    (run / "final").mkdir()
    (run / "final" / "adapter_config.json").write_text("{}")
    assert resolve_model_path(str(run)) == str(run / "final")
    err = capsys.readouterr().err
    assert f"{run} is a run directory: using {run / 'final'}" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a dpolab run directory"):
        resolve_model_path(str(tmp_path / "empty"))


def test_run_directory_works_for_eval_and_continued_training(tmp_path, tiny_model_dir, toy_data, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "1")) == 0
    assert main(["eval", "--model", str(out), "--data", str(toy_data), "--limit", "4", "--output-dir", str(tmp_path / "ev"),
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["preference"]["n"] == 4
    assert f"{out} is a run directory: using {out / 'final'}" in capsys.readouterr().err
    # continue from the run: the model is out/final, the reference of a fresh run is that model
    assert main(_train_args(out, toy_data, tmp_path / "more", "--max-steps", "1")) == 0
    assert yaml.safe_load((tmp_path / "more" / "config.yaml").read_text())["model"] == str(out)


def test_lr_logged_is_the_rate_the_step_used(tmp_path, tiny_model_dir, toy_data):
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "2", "--lr", "1e-6", "--warmup-ratio", "0")) == 0
    assert [r["lr"] for r in _records(out)] == pytest.approx([1e-6, 5e-7])


def test_config_records_what_bf16_resolved_to(tmp_path, tiny_model_dir, toy_data):
    from dpolab.models import bf16_default

    import torch

    out = tmp_path / "r"
    args = [a for a in _train_args(tiny_model_dir, toy_data, out, "--max-steps", "1") if a not in ("--bf16", "false")]
    assert main(args) == 0
    line = next(x for x in (out / "config.yaml").read_text().splitlines() if x.startswith("bf16:"))
    assert line == f"bf16: '{str(bf16_default(torch.device('cpu'))).lower()}'  # requested auto"


def test_resume_reads_the_runs_own_config_and_a_failed_start_changes_nothing(tmp_path, tiny_model_dir, toy_data, capsys):
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "2", "--beta", "0.3", "--final-checkpoint")) == 0
    before = (out / "config.yaml").read_text()
    # a failed start (here: a data file that does not exist) leaves the run as it was
    assert main(["train", "--output-dir", str(out), "--resume", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert (out / "config.yaml").read_text() == before
    capsys.readouterr()
    # the README form: only the run directory and --resume (a flag still overrides: 3 steps)
    assert main(["train", "--output-dir", str(out), "--resume", "--max-steps", "3"]) == 0
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["beta"] == 0.3 and saved["max_steps"] == 3 and saved["data"] == str(toy_data)


def test_resume_of_a_finished_run_without_checkpoint_is_refused_not_retrained(tmp_path, tiny_model_dir, toy_data, capsys):
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "1")) == 0
    before = (out / "final" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a finished run with no checkpoint to continue from" in err[0] and f"--model {out}" in err[0]
    assert (out / "final" / "model.safetensors").read_bytes() == before


def test_resume_of_a_finished_run_with_an_older_checkpoint_is_refused_not_redone(tmp_path, tiny_model_dir, toy_data, capsys):
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "3", "--save-every", "2")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()} | {"metrics": (out / "metrics.jsonl").read_bytes()}
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished at step 3, but its newest checkpoint is step 2" in err[0] and "would redo step 3:" in err[0]
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} | {"metrics": (out / "metrics.jsonl").read_bytes()} == before


def test_resume_of_a_run_finished_with_its_checkpoint_does_nothing_until_asked_for_more(tmp_path, tiny_model_dir, toy_data, capsys):
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "2", "--final-checkpoint")) == 0
    before = (out / "final" / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert "already finished at step 2 of 2: nothing to do" in capsys.readouterr().out
    assert ((out / "final" / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_bytes()) == before
    assert main(["train", "--output-dir", str(out), "--resume", "--max-steps", "3"]) == 0  # more steps: it continues
    assert [r["step"] for r in _records(out)] == [1, 2, 3]


def test_limit_trains_on_the_first_n_pairs_and_the_data_line_says_so(tmp_path, tiny_model_dir, toy_data, capsys):
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--limit", "4", "--eval-fraction", "0", "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    assert f"data {toy_data}: 24 rows, 24 kept, dropped: none, 0 truncated; first 4 used: 4 train / 0 eval pairs" in printed
    assert [r["step"] for r in _records(out)] == [1, 2]  # 4 pairs / batch 2
    # the held-out split comes out of the same first N pairs: a trial run evaluates few pairs too
    assert main(_train_args(tiny_model_dir, toy_data, tmp_path / "r2", "--limit", "10", "--eval-fraction", "0.2",
                            "--max-steps", "1")) == 0
    assert "first 10 used: 8 train / 2 eval pairs" in capsys.readouterr().out


def test_default_run_keeps_only_the_final_model_and_files_are_readable(tmp_path, tiny_model_dir, toy_data):
    out = tmp_path / "r"
    old = os.umask(0o022)
    try:
        assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "2")) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["final", "tensorboard"]  # no training state
    for f in ("data_report.json", "config.yaml", "metrics.jsonl", "final/model.safetensors", "final/config.json"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o644, f
    assert stat.S_IMODE((out / "final").stat().st_mode) == 0o755


def test_plain_progress_lines_when_not_on_a_terminal(tmp_path, tiny_model_dir, toy_data):
    out = tmp_path / "r"
    args = [a for a in _train_args(tiny_model_dir, toy_data, out, "--max-steps", "3") if a != "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "dpolab", *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("[train] step")]
    assert [x.split()[2] for x in lines] == ["1/3", "2/3", "3/3"]
    assert "loss=" in lines[0] and "pairs/s=" in lines[0] and " eta 0:" in lines[0]
    assert "data " in proc.stdout and "kept" in proc.stdout


@pytest.mark.slow
def test_signal_during_final_evaluation_stops_it_and_saves_the_weights(tmp_path, tiny_model_dir):
    """A real SIGTERM while the end-of-run evaluation runs (thousands of batches of 1): the
    process ends within seconds with final/ and a checkpoint, and no eval row is logged."""
    train_data = write_toy_pairs(tmp_path / "train.jsonl", 8)
    eval_data = write_toy_pairs(tmp_path / "eval.jsonl", 4000, seed=1)
    out = tmp_path / "r"
    args = _train_args(tiny_model_dir, train_data, out, "--eval-data", eval_data, "--eval-batch-size", "1", "--max-steps", "2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dpolab", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # inside the evaluation now (4000 forwards take far longer)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - sent < 20, "the evaluation did not stop within seconds"
    assert proc.returncode == 130, stderr[-2000:]
    assert "SIGTERM: stopped after step 2" in stderr
    assert "dpolab: interrupted" not in stderr  # one message, the one naming the checkpoint
    assert (out / "final" / "model.safetensors").exists() and (out / "checkpoint-2" / "training_state.pt").exists()
    assert not _records(out, "eval")


def test_dpolab_train_is_callable_after_the_module_was_imported(tmp_path, tiny_model_dir, toy_data):
    """`import dpolab.train` (the CLI does it) makes the attribute the module; the README's
    `dpolab.train(...)` must still train."""
    import dpolab
    import dpolab.train  # noqa: F401

    result = dpolab.train(model=str(tiny_model_dir), data=str(toy_data), output_dir=str(tmp_path / "r"), max_steps=1,
                          bf16="false", progress=False)
    assert result["steps"] == 1
    with pytest.raises(ValueError, match=r"unknown loss 'dpo' \(did you mean sigmoid\?\); choose one of: sigmoid"):
        dpolab.train(model=str(tiny_model_dir), data=str(toy_data), loss="dpo")  # checked before anything loads


def test_training_accuracy_counts_ties_half_like_eval(tmp_path, tiny_model_dir, toy_data):
    """Step 1 is measured before any update: policy == reference, every margin 0, all ties."""
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "1")) == 0
    first = _records(out)[0]
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0.5


def test_eval_takes_beta_from_the_run_and_accepts_a_reward_pattern(tmp_path, tiny_model_dir, toy_data):
    out = tmp_path / "r"
    assert main(_train_args(tiny_model_dir, toy_data, out, "--max-steps", "1", "--beta", "0.3")) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("human : the film ? assistant :\nhuman : a show ? assistant :\n")
    ev = tmp_path / "ev"
    assert main(["eval", "--model", str(out), "--data", str(toy_data), "--limit", "4", "--prompts", str(prompts),
                 "--reward", "regex", "--reward-pattern", "great|good", "--num-samples", "2", "--max-new-tokens", "4",
                 "--output-dir", str(ev), "--device", "cpu"]) == 0
    result = json.loads((ev / "eval.json").read_text())
    assert result["beta"] == 0.3 and result["generation"]["prompts"] == 2
    assert main(["eval", "--model", str(out), "--data", str(toy_data), "--limit", "4", "--beta", "0.05",
                 "--output-dir", str(ev), "--device", "cpu"]) == 0
    assert json.loads((ev / "eval.json").read_text())["beta"] == 0.05  # a flag still wins


# ------------------------------------------------------------------ malloc settings of the command

def test_malloc_env_adds_the_tunables_once_and_only_on_glibc_linux():
    from dpolab.cli import MALLOC_TUNABLES, malloc_env

    env = malloc_env({"PATH": "/bin"}, "Linux", "glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": MALLOC_TUNABLES}
    assert malloc_env(env, "Linux", "glibc") is None  # the restarted process does not restart again
    kept = malloc_env({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"}, "Linux", "glibc")["GLIBC_TUNABLES"]
    assert kept == "glibc.cpu.hwcaps=-AVX:" + MALLOC_TUNABLES  # the user's own tunables stay
    assert malloc_env({}, "Darwin", "") is None and malloc_env({}, "Linux", "") is None  # musl: no glibc
    assert malloc_env({"DPOLAB_SYSTEM_MALLOC": "1"}, "Linux", "glibc") is None


def test_the_command_restarts_itself_with_the_tunables(tmp_path):
    """`python -m dpolab` replaces its process by one with MALLOC_TUNABLES: a sitecustomize on the
    path records GLIBC_TUNABLES in every interpreter that starts (the first and the restarted one)."""
    import os
    import platform

    from dpolab.cli import MALLOC_TUNABLES

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return  # nothing to restart for: malloc_env's test covers the decision
    seen = tmp_path / "seen.txt"
    (tmp_path / "sitecustomize.py").write_text(
        "import os\nwith open(os.environ['SEEN'], 'a') as f:\n    f.write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DPOLAB_SYSTEM_MALLOC")}
    env.update(SEEN=str(seen), PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "dpolab", "train", "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "--max-grad-norm" in out.stdout
    assert seen.read_text().splitlines() == ["-", MALLOC_TUNABLES]
    seen.unlink()
    out = subprocess.run([sys.executable, "-m", "dpolab", "train", "--help"], env={**env, "DPOLAB_SYSTEM_MALLOC": "1"},
                         capture_output=True, text=True)
    assert out.returncode == 0 and seen.read_text().splitlines() == ["-"]


def test_version_names_dpolab_and_the_libraries_results_depend_on():
    """`dpolab --version`, as bug reports need it, read from package metadata without importing torch."""
    from importlib import metadata

    proc = subprocess.run([sys.executable, "-c", "import sys\nfrom dpolab.cli import main\ntry: main(['--version'])\n"
                           "except SystemExit as e: print('exit', e.code, 'torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    line, end = proc.stdout.strip().splitlines()
    assert end == "exit 0 False"  # argparse's version action exits 0, and no torch was imported
    assert line.startswith(f"dpolab {metadata.version('dpolab')} (torch {metadata.version('torch')}, "
                           f"transformers {metadata.version('transformers')}, "), line
