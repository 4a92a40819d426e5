"""Multi-process training on CPU (torchrun, gloo) and the shipped Accelerate configs.

The central check: 2 processes x batch 2 give the same weights as 1 process x batch 2 x
grad_accum 2 (same pairs per step, same micro-batches), and a 2-process run resumed from a
mid-run checkpoint ends where the uninterrupted one ended.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpolab import distributed
from dpolab.train import TrainingError, train

from .conftest import REPO, write_toy_pairs

CONFIGS = sorted((REPO / "examples" / "accelerate").glob("*"))
TIMEOUT = 300  # a hang (ranks waiting on each other) fails the test instead of blocking CI
COMMON = dict(
    max_steps=4, batch_size=2, lr=1e-3, bf16="false", eval_fraction=0.2, eval_batch_size=2,
    precompute_ref=True, progress=False, max_length=128, max_prompt_length=64,
    final_checkpoint=True, keep_last=0,  # the end-of-run checkpoint is resumed from below
)


def _flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def torchrun(script: list[str], cache: Path) -> None:
    """2 processes on CPU; torchrun --standalone picks a free port (parallel test runs are safe)."""
    env = {**os.environ, "DPOLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def train_2proc(model: Path, data: Path, out: Path, cache: Path, **extra) -> None:
    cfg = {**COMMON, "model": model, "data": data, "output_dir": out, **extra}
    torchrun(["-m", "dpolab.cli", "train", *_flags(cfg)], cache)


def weights(run: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "model.safetensors"))


def records(run: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One 2-process run (checkpoints every 2 steps), the same run resumed from checkpoint-2,
    and a single-process run with the same global batch, each with its own reference cache."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_toy_pairs(root / "pairs.jsonl", 26)  # 21 train pairs, 5 eval pairs = 3 eval batches
    two, one = root / "two", root / "one"
    train_2proc(tiny_model_dir, data, two, root / "cache-two", save_every=2)
    uninterrupted = {"final": weights(two), "metrics": records(two, "train")}
    # resume: drop everything after step 2, run again with --resume
    shutil.rmtree(two / "checkpoint-4")
    shutil.rmtree(two / "final")
    train_2proc(tiny_model_dir, data, two, root / "cache-two", save_every=2, resume=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOLAB_CACHE", str(root / "cache-one"))
        train(model=str(tiny_model_dir), data=str(data), output_dir=str(one), grad_accum=2, **COMMON)
    return types.SimpleNamespace(root=root, data=data, two=two, one=one, uninterrupted=uninterrupted)


def test_two_processes_equal_one_process_with_same_global_batch(runs, tiny_model_dir):
    two, one = runs.uninterrupted["final"], weights(runs.one)
    assert_close(two, one, atol=2e-5)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max(float((one[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # training really changed the weights: the equality above is not trivial


def test_metrics_are_reduced_over_all_processes_and_logged_once(runs):
    two, one = runs.uninterrupted["metrics"], records(runs.one, "train")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone writes: no duplicate lines
    for a, b in zip(two, one):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    # 3 eval batches over 2 processes: one process runs a padding batch that must not count
    eval_two, eval_one = records(runs.two, "eval")[0], records(runs.one, "eval")[0]
    for key in ("loss", "rewards/margins", "logps/rejected"):
        assert eval_two[key] == pytest.approx(eval_one[key], rel=1e-4, abs=1e-5), key


def test_precomputed_reference_is_gathered_and_cached_once(runs):
    two = sorted((runs.root / "cache-two" / "reference").iterdir())
    one = sorted((runs.root / "cache-one" / "reference").iterdir())
    assert len(two) == 1 and len(one) == 1, (two, one)  # no temporary files left by any rank
    values_two, values_one = load_file(str(two[0]))["logps"], load_file(str(one[0]))["logps"]
    assert values_two.shape == (26, 2)
    assert bool((values_two != 0).all())  # every row filled by some rank
    torch.testing.assert_close(values_two, values_one, rtol=0, atol=1e-5)


def test_resumed_two_process_run_ends_like_the_uninterrupted_one(runs):
    assert_close(weights(runs.two), runs.uninterrupted["final"], atol=1e-6)
    logged = records(runs.two, "train")  # a resume drops the records of the steps it redoes
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    resumed = logged[2:]
    for a, b in zip(resumed, runs.uninterrupted["metrics"][2:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_checkpoint_of_a_two_process_run_loads_in_one_process(runs):
    from dpolab.models import load_model

    model = load_model(str(runs.two / "checkpoint-2"))
    saved = weights(runs.two, "checkpoint-2")
    state = model.state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_resume_with_another_global_batch_is_refused(runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs.two, copy)
    with pytest.raises(TrainingError, match="4 pairs per step but this launch takes 2"):
        train(model=str(copy / "final"), data=str(runs.data), output_dir=str(copy), resume=True, **{**COMMON, "max_steps": 4})


@pytest.mark.slow  # a third 2-process launch (~15 CPU-seconds of imports); still run in CI
def test_fsdp_sharded_reference_precompute_matches_one_process(tiny_model_dir, tmp_path):
    """FSDP2 runs on CPU too: a sharded LoRA policy, adapters off, 5 batches over 2 ranks."""
    import contextlib

    from dpolab import reference as ref
    from dpolab.data import load_pairs
    from dpolab.models import load_model, load_tokenizer

    data = write_toy_pairs(tmp_path / "pairs.jsonl", 13)
    torchrun([str(REPO / "tests" / "fsdp_reference_worker.py"), str(tiny_model_dir), str(data), str(tmp_path)], tmp_path / "c")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(data), tokenizer, max_length=128, max_prompt_length=64)
    base = load_model(str(tiny_model_dir)).eval()
    expected = ref.compute_all(None, base, pairs, 13, tokenizer.pad_token_id, False, torch.device("cpu"), contextlib.nullcontext)
    got = load_file(str(tmp_path / "cache" / "reference.safetensors"))["logps"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    policy = load_file(str(tmp_path / "policy.safetensors"))["chosen"]  # adapters on: must differ
    assert float((policy - expected[:3, 0]).abs().max()) > 1e-2


# ----------------------------------------------------------------------------- bad launch settings
def test_fewer_pairs_than_one_step_fails_with_one_line(tiny_model_dir, tmp_path):
    data = write_toy_pairs(tmp_path / "pairs.jsonl", 10)
    with pytest.raises(TrainingError, match=r"fewer than one step's 16 \(batch_size x grad_accum x processes\)"):
        train(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), batch_size=4, grad_accum=4, eval_fraction=0, progress=False)


@pytest.mark.skipif(distributed.importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_launch_without_the_package_fails_with_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from dpolab.cli import main

    data = write_toy_pairs(tmp_path / "pairs.jsonl", 8)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "deepspeed package is not installed" in err[0]
    assert not (tmp_path / "run").exists()  # failed before touching anything


def test_accumulation_from_the_launch_config_must_match_the_flag(tiny_model_dir, tmp_path, monkeypatch):
    data = write_toy_pairs(tmp_path / "pairs.jsonl", 8)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # set by `accelerate launch` from a config
    with pytest.raises(distributed.LaunchError, match="sets gradient_accumulation_steps=4 but --grad-accum is 1"):
        train(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), progress=False)


def _deepspeed_accelerator(conf: dict, processes: int = 2):
    """The two attributes `configure_deepspeed` reads from an Accelerator under DeepSpeed
    (a real one needs the deepspeed package and GPUs)."""
    plugin = types.SimpleNamespace(deepspeed_config=conf)
    return types.SimpleNamespace(distributed_type="DEEPSPEED", num_processes=processes, state=types.SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_auto_values_are_filled_from_dpolab_flags():
    conf = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "zero_optimization": {"stage": 3}}
    distributed.configure_deepspeed(_deepspeed_accelerator(conf), batch_size=4, grad_accum=3, max_grad_norm=0.5)
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 3
    assert conf["train_batch_size"] == 24 and conf["gradient_clipping"] == 0.5
    assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    "key, value, flag",
    [("train_micro_batch_size_per_gpu", 8, "--batch-size is 4"), ("gradient_accumulation_steps", 1, "--grad-accum is 3"), ("train_batch_size", 16, "is 24")],
)
def test_deepspeed_values_that_disagree_with_the_flags_are_refused(key, value, flag):
    with pytest.raises(distributed.LaunchError, match=f"sets {key}={value} but .*{flag}"):
        distributed.configure_deepspeed(_deepspeed_accelerator({key: value}), batch_size=4, grad_accum=3, max_grad_norm=1.0)


def test_rounds_give_every_process_the_same_number_of_batches():
    items = list(range(5))
    shares = [distributed.rounds(items, r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    kept = sorted(x for s in shares for x, keep in s if keep)
    assert kept == items  # each item exactly once; the padding round is marked not kept
    assert shares[1][-1] == (0, False)
    assert distributed.rounds([], 1, 2) == []


# ----------------------------------------------------------------------------- shipped configs
def _launch_arguments() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {a.dest for a in launch_command_parser()._actions}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys / bad enums raise
    raw = yaml.safe_load(path.read_text())
    known = _launch_arguments()
    # `accelerate launch` copies nested keys onto its arguments and silently ignores unknown ones
    for key in raw.get("fsdp_config", {}):
        assert (key if key.startswith("fsdp") else "fsdp_" + key) in known, f"{path.name}: unknown fsdp key {key}"
    for key in raw.get("deepspeed_config", {}):
        assert key in known, f"{path.name}: unknown deepspeed key {key}"
    # dpolab's flags decide the batch geometry: a config must not fix it behind their back
    assert "gradient_accumulation_steps" not in raw and "gradient_accumulation_steps" not in raw.get("deepspeed_config", {})
    assert config.num_processes >= config.num_machines >= 1
    if path.name.endswith("zero3.yaml"):
        assert raw["deepspeed_config"]["zero_stage"] == 3 and raw["deepspeed_config"]["zero3_save_16bit_model"] is True
    if path.name.endswith("zero2.yaml"):
        assert raw["deepspeed_config"]["zero_stage"] == 2
    if path.name == "fsdp.yaml":
        fsdp = raw["fsdp_config"]
        assert fsdp["fsdp_reshard_after_forward"] is True and fsdp["fsdp_offload_params"] is True  # full shard + CPU offload
    if path.name == "multinode.yaml":
        assert config.num_machines > 1 and config.main_process_ip


def test_every_launch_kind_has_a_shipped_config():
    names = {p.name for p in CONFIGS}
    assert {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "multinode.yaml"} <= names
