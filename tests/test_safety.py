"""Numerical faults, disk checks, pruning, signals, and loading nothing that could run code."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dpolab.train as train_module
from dpolab import checkpoint, safety
from dpolab.cli import main as cli_main
from dpolab.config import SFTConfig, TrainConfig, load_yaml
from dpolab.models import ModelError, load_model, load_tokenizer
from dpolab.train import TrainingError, train
from tests.conftest import write_toy_pairs

N_PAIRS = 24


def _kw(tiny_model_dir, data, out, **overrides) -> dict:
    kw = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(out), bf16="false", device="cpu",
              batch_size=2, eval_fraction=0.0, lr=1e-3, warmup_ratio=0.0, progress=False,
              keep_last=0, final_checkpoint=True)  # the defaults these tests were written for
    return {**kw, **overrides}


def _cli_errors(capsys) -> list[str]:
    """The CLI's own stderr lines (progress bars and step logs from the run also go to stderr)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpolab")]


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A 5-step run with a checkpoint every step and --keep-last 2."""
    root = tmp_path_factory.mktemp("finished")
    data = write_toy_pairs(root / "toy.jsonl", N_PAIRS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOLAB_CACHE", str(root / "cache"))
        result = train(**_kw(tiny_model_dir, data, root / "run", max_steps=5, save_every=1, keep_last=2))
    return root / "run", data, result


class Poison:
    """Wraps the real DPO objective and makes the loss NaN on chosen calls (one per step here)."""

    def __init__(self, real, calls):
        self.real, self.calls, self.count, self.poisoned_indices = real, calls, 0, []

    def __call__(self, loss_name, params, model, reference, batch, run):
        self.count += 1
        losses, stats = self.real(loss_name, params, model, reference, batch, run)
        if self.count in self.calls:
            self.poisoned_indices.append(sorted(batch["index"].tolist()))
            losses = losses * float("nan")  # keeps the graph: backward gives NaN gradients too
            stats["loss"] = losses.detach()
        return losses, stats


# ----------------------------------------------------------------------------- numerical faults
def test_nonfinite_loss_step_is_skipped_and_counted(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = write_toy_pairs(tmp_path / "toy.jsonl", N_PAIRS)
    poison = Poison(train_module.dpo_objective, calls={3})
    monkeypatch.setattr(train_module, "dpo_objective", poison)
    out = tmp_path / "run"
    result = train(**_kw(tiny_model_dir, data, out, max_steps=3, save_every=1))
    assert result["bad_steps"] == 1 and result["steps"] == 3
    # The skipped step left the weights as they were after step 2; steps 1 and 2 did change them.
    assert _same(_weights(out / "final"), _weights(out / "checkpoint-2"))
    assert not _same(_weights(out / "checkpoint-1"), _weights(out / "checkpoint-2"))
    assert checkpoint.load_state(out / "checkpoint-3")["counters"]["bad_steps"] == 1
    # Toy rows are all kept and none is held out, so pair i is data row i + 1.
    rows = [i + 1 for i in poison.poisoned_indices[0]]
    assert f"non-finite loss or gradient at step 3; step skipped (rows {rows} of {data})" in capsys.readouterr().out


def test_bad_step_limit_stops_the_run_naming_the_rows(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = write_toy_pairs(tmp_path / "toy.jsonl", N_PAIRS)
    poison = Poison(train_module.dpo_objective, calls={1, 2, 3})
    monkeypatch.setattr(train_module, "dpo_objective", poison)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--bf16", "false",
            "--device", "cpu", "--batch-size", "2", "--eval-fraction", "0", "--no-progress", "--max-steps", "3",
            "--max-bad-steps", "1"]
    assert cli_main(argv) == 2
    rows = [i + 1 for i in poison.poisoned_indices[1]]
    assert _cli_errors(capsys) == [f"dpolab train: error: 2 steps had a non-finite loss or gradient (limit --max-bad-steps 1); "
                                   f"last at step 2, rows {rows} of {data}"]
    assert poison.count == 2 and not (out / "final").exists()


def test_real_overflow_is_caught_and_never_reaches_the_weights(tmp_path, tiny_model_dir):
    """No injection: a learning rate of 1e30 makes the weights huge after step 1, and from step
    2 on the gradients overflow to inf/NaN; those steps are skipped, the weights stay finite."""
    data = write_toy_pairs(tmp_path / "toy.jsonl", N_PAIRS)
    out = tmp_path / "run"
    result = train(**_kw(tiny_model_dir, data, out, max_steps=3, save_every=1, lr=1e30))
    assert result["bad_steps"] == 2
    final = _weights(out / "final")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert _same(final, _weights(out / "checkpoint-1"))


# ----------------------------------------------------------------------------- disk
def test_keep_last_keeps_the_newest_k(finished_run):
    out, _, _ = finished_run
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-4", "checkpoint-5"]


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
    checkpoint.prune(tmp_path, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    checkpoint.prune(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_size_estimate_covers_the_real_checkpoint_and_final_model(finished_run, tiny_model_dir):
    out, _, _ = finished_run
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    ckpt, final = safety.estimate_bytes(model, tokenizer)
    real_ckpt, real_final = _dir_bytes(out / "checkpoint-5"), _dir_bytes(out / "final")
    assert real_ckpt <= ckpt <= 2 * real_ckpt + 2 * safety.FILE_OVERHEAD
    assert real_final <= final <= 2 * real_final + 2 * safety.FILE_OVERHEAD


def test_not_enough_space_is_refused_before_the_first_step(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`shutil.disk_usage` (the OS boundary) reports one byte less than a checkpoint plus the
    final model need: the run stops with one line before writing anything."""
    data = write_toy_pairs(tmp_path / "toy.jsonl", N_PAIRS)
    ckpt, final = safety.estimate_bytes(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)))
    real_usage = shutil.disk_usage

    def usage(path, free):
        real = real_usage(path)
        return type(real)(real.total, real.used, free)

    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path, ckpt + final - 1))
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(**_kw(tiny_model_dir, data, out, max_steps=1))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"not enough disk space in {out}:") and "--output-dir" in msg
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))
    # Exactly enough is enough; a warning tells when all the checkpoints the run keeps will not fit.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path, ckpt + final))
    result = train(**_kw(tiny_model_dir, data, tmp_path / "run2", max_steps=2, save_every=1))
    assert result["steps"] == 2
    assert "warning: the 2 checkpoints this run keeps need about" in capsys.readouterr().out  # steps 1 and 2


def test_lora_estimate_counts_only_the_adapter(tmp_path, tiny_model_dir):
    data = write_toy_pairs(tmp_path / "toy.jsonl", N_PAIRS)
    out = tmp_path / "run"
    train(**_kw(tiny_model_dir, data, out, max_steps=1, lora=True, lora_r=4))
    from dpolab.models import add_lora

    model = add_lora(load_model(str(tiny_model_dir)), 4, 32, 0.0, "all-linear")
    ckpt, final = safety.estimate_bytes(model, load_tokenizer(str(tiny_model_dir)))
    real_ckpt, real_final = _dir_bytes(out / "checkpoint-1"), _dir_bytes(out / "final")
    assert real_ckpt <= ckpt <= 2 * real_ckpt + 2 * safety.FILE_OVERHEAD
    assert real_final <= final <= 2 * real_final + 2 * safety.FILE_OVERHEAD
    full_ckpt, _ = safety.estimate_bytes(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)))
    assert ckpt < full_ckpt


def _refused_in_child_without_root(path: Path) -> str:
    """Run check_writable as user 'nobody' in a forked child (root ignores permission bits)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        message = ""
        try:
            os.setgid(65534)
            os.setuid(65534)
            safety.check_writable(path)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            message = str(e)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return f.read()


def test_read_only_output_dir_is_refused(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.geteuid() == 0:
            message = _refused_in_child_without_root(out)
        else:
            with pytest.raises(TrainingError) as e:
                safety.check_writable(out)
            message = str(e.value)
    finally:
        out.chmod(0o755)
    assert message == f"output dir {out} is not writable (Permission denied); choose another --output-dir"


def test_unusable_output_dir_is_refused_by_the_cli_in_one_line(tmp_path, tiny_model_dir, capsys):
    data = write_toy_pairs(tmp_path / "toy.jsonl", N_PAIRS)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    assert cli_main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out)]) == 2
    assert _cli_errors(capsys) == [
        f"dpolab train: error: output dir {out} is not writable (Not a directory); choose another --output-dir"]


# ----------------------------------------------------------------------------- signals
def test_first_signal_sets_a_flag_second_stops_at_once(capsys):
    class OneProcess:
        num_processes = 1

    before = signal.getsignal(signal.SIGTERM)
    stop = safety.GracefulStop().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(OneProcess()) and stop.signal_name == "SIGTERM"
        assert "SIGTERM received: finishing this step (or ending the evaluation) and saving a checkpoint" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_handlers_are_left_alone_outside_the_main_thread():
    before = signal.getsignal(signal.SIGINT)
    stops = []
    t = threading.Thread(target=lambda: stops.append(safety.GracefulStop().install()))
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGINT) is before and stops[0]._previous == {}


# ----------------------------------------------------------------------------- nothing runs code
class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _pickle_with_payload(path: Path, marker: Path) -> Path:
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the control: a plain unpickle does run the payload
    assert marker.exists()
    marker.unlink()
    return path


def test_pickled_checkpoint_with_payload_is_refused(tmp_path, tiny_model_dir):
    marker = tmp_path / "marker"
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    shutil.copy(tiny_model_dir / "config.json", only_pickle)
    _pickle_with_payload(only_pickle / "pytorch_model.bin", marker)
    with pytest.raises(ModelError, match="no .safetensors weights; pickled checkpoints are refused"):
        load_model(str(only_pickle))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(only_pickle / "pytorch_model.bin", weights_only=True)
    # Next to real safetensors weights the pickle is never opened.
    both = tmp_path / "both"
    shutil.copytree(tiny_model_dir, both)
    shutil.copy(only_pickle / "pytorch_model.bin", both)
    assert _same(load_model(str(both)).state_dict(), load_model(str(tiny_model_dir)).state_dict())
    assert not marker.exists()


def test_resume_refuses_a_training_state_with_payload(finished_run, tmp_path, tiny_model_dir, capsys):
    run, data, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    marker = tmp_path / "marker"
    _pickle_with_payload(out / "checkpoint-5" / checkpoint.STATE_FILE, marker)
    with pytest.raises(ValueError, match=r"refused to load: not a plain tensor state file \(Unsupported global: GLOBAL "
                                         r"builtins.exec|refused to load: not a plain tensor state file \(Unsupported global: GLOBAL exec"):
        checkpoint.load_state(out / "checkpoint-5")
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--resume",
            "--bf16", "false", "--device", "cpu", "--batch-size", "2", "--eval-fraction", "0", "--max-steps", "6",
            "--no-progress"]
    assert cli_main(argv) == 2
    err = _cli_errors(capsys)
    assert len(err) == 1 and "refused to load" in err[0] and str(out / "checkpoint-5") in err[0]
    assert not marker.exists()


def test_damaged_training_state_is_one_clear_line(tmp_path):
    (tmp_path / checkpoint.STATE_FILE).write_bytes(b"PK\x03\x04 not a zip archive")
    with pytest.raises(ValueError) as e:
        checkpoint.load_state(tmp_path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / checkpoint.STATE_FILE}: cannot read the training state")
    assert message.endswith(f"delete {tmp_path} to resume from the checkpoint before it")


def test_pickled_data_cache_is_not_unpickled(tmp_path, tokenizer_and_pairs_file):
    from dpolab.data import load_pairs

    tokenizer, data = tokenizer_and_pairs_file
    cache = tmp_path / "cache"
    first, _ = load_pairs(str(data), tokenizer, max_length=64, max_prompt_length=32, cache_dir=str(cache))
    (path,) = cache.glob("*.npz")
    marker = tmp_path / "marker"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["rows"] = np.array([Payload(marker)] * len(first), dtype=object)
    with path.open("wb") as f:
        np.savez(f, **arrays)
    with np.load(path, allow_pickle=True) as z:  # the control: allowing pickles runs the payload
        z["rows"]
    assert marker.exists()
    marker.unlink()
    again, _ = load_pairs(str(data), tokenizer, max_length=64, max_prompt_length=32, cache_dir=str(cache))
    assert again == first and not marker.exists()


@pytest.fixture
def tokenizer_and_pairs_file(tmp_path):
    from tests.conftest import build_tokenizer

    return build_tokenizer(), write_toy_pairs(tmp_path / "toy.jsonl", 8)


def test_trust_remote_code_is_off_by_default(tmp_path, tiny_model_dir, monkeypatch):
    assert TrainConfig().trust_remote_code is False and SFTConfig().trust_remote_code is False
    repo = tmp_path / "remote-code-model"
    shutil.copytree(tiny_model_dir, repo)
    marker = tmp_path / "marker"
    config = json.loads((repo / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (repo / "config.json").write_text(json.dumps(config))
    (repo / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    assert type(load_model(str(repo))).__name__ == "LlamaForCausalLM"
    load_tokenizer(str(repo))
    assert not marker.exists()
    # The control: asked to trust it, transformers imports the repo's code (copied to a temp cache).
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert type(load_model(str(repo), trust_remote_code=True)).__name__ == "EvilModel"
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]
    assert marker.exists()


def test_config_files_cannot_build_python_objects(tmp_path):
    marker = tmp_path / "marker"
    config = tmp_path / "run.yaml"
    config.write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="not valid YAML"):  # one line for the CLI, no object built
        load_yaml(str(config), TrainConfig)
    assert not marker.exists()
