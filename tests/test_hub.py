"""A hub id that cannot be loaded fails within seconds with one line (no network in these tests)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], env: dict, cwd) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dpolab", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    return done, time.monotonic() - start


# HF_ENDPOINT: a local port nothing listens on (connection refused), set before huggingface_hub is imported
@pytest.mark.parametrize("env, why", [({"HF_HUB_OFFLINE": "1"}, "hub access is off (HF_HUB_OFFLINE)"),
                                      ({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}, "hub is unreachable")])
def test_unloadable_hub_id_fails_fast_in_one_line(tmp_path, env, why):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    done, seconds = run_cli(["eval", "--model", "someone/some-model", "--ref-model", "someone/some-model",
                             "--data", str(data), "--output-dir", str(tmp_path / "out")],
                            {**env, "HF_HOME": str(tmp_path / "hf")}, tmp_path)
    assert done.returncode == 2 and seconds < 15, (done.returncode, seconds, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("dpolab eval: error: someone/some-model: not a local folder and not in the hub cache")
    assert why in lines[0] and "pass a local checkpoint folder" in lines[0]
    assert not (tmp_path / "out").exists()


def test_model_info_errors_are_told_apart(monkeypatch):
    """The hub's own answers map to their lines: unknown id vs gated vs unreachable."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    import dpolab.hub
    from dpolab.hub import check_hub_id
    from dpolab.models import ModelError

    def hub_error(cls, text):  # the hub's error types want an HTTP response; only the type matters here
        error = cls.__new__(cls)
        Exception.__init__(error, text)
        return error

    for error, words in ((hub_error(RepositoryNotFoundError, "404 repo"), "the hub has no model with this id"),
                         (hub_error(GatedRepoError, "403 gated"), "gated"),
                         (ConnectionError("refused"), r"hub is unreachable \(refused\)")):
        def fail(*_, error=error, **__):
            raise error
        monkeypatch.setattr(dpolab.hub, "model_info", fail)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(ModelError, match=words):
            check_hub_id("someone/not-cached-model")


def test_unloadable_hub_dataset_fails_fast_in_one_line(tmp_path, tiny_model_dir):
    done, seconds = run_cli(["train", "--model", str(tiny_model_dir), "--data", "someone/some-prefs",
                             "--output-dir", str(tmp_path / "out")],
                            {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf")},
                            tmp_path)
    assert done.returncode == 2 and seconds < 15, (done.returncode, seconds, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        "dpolab train: error: someone/some-prefs: not a file or folder, and not a loadable hub dataset: "
        "the hub is unreachable"), done.stderr
