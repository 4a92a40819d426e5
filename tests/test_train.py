"""Integration tests of the training loop on a tiny random Llama (CPU, seconds)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.losses import LOSSES, REFERENCE_FREE
from dpolab.train import TrainingError, sft, train

LN2 = math.log(2)


def run(tiny_model_dir, data, out, **kw):
    args = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(out), bf16="false", progress=False,
                lr=1e-3, batch_size=4, max_steps=4, eval_fraction=0.0, warmup_ratio=0.0)
    args.update(kw)
    return train(**args)


def weights(out, sub="final"):
    return load_file(str(out / sub / "model.safetensors"))


def train_losses(result):
    return [r["loss"] for r in result["history"] if r["split"] == "train"]


def test_first_step_loss_is_ln2_and_training_learns(tiny_model_dir, toy_data, tmp_path):
    result = run(tiny_model_dir, toy_data, tmp_path / "r", max_steps=12, eval_fraction=0.2)
    losses = train_losses(result)
    assert losses[0] == pytest.approx(LN2, abs=1e-6)
    assert losses[-1] < losses[0] - 0.05
    evals = [r for r in result["history"] if r["split"] == "eval"]
    assert evals and 0.0 <= evals[-1]["rewards/accuracies"] <= 1.0
    first = result["history"][0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "pairs/s", "tokens/s"):
        assert key in first, key
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 + 1  # 12 train steps + final eval
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "r" / "config.yaml").exists()
    report = json.loads((tmp_path / "r" / "data_report.json").read_text())
    assert report["rows_read"] == 24 and report["kept"] == 24


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains(tiny_model_dir, toy_data, tmp_path, loss):
    extra = {"exo_pair": dict(label_smoothing=1e-3)}.get(loss, {})  # EXO is infinite at eps = 0
    result = run(tiny_model_dir, toy_data, tmp_path / loss, loss=loss, max_steps=2, **extra)
    losses = train_losses(result)
    assert all(math.isfinite(v) for v in losses)
    if loss in ("sigmoid", "cdpo", "robust", "rdpo") and loss not in REFERENCE_FREE:
        # R-DPO adds alpha*(|yw|-|yl|) to the logit, so only exactly ln 2 when lengths match.
        if loss != "rdpo":
            assert losses[0] == pytest.approx(LN2, abs=1e-6)
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = weights(tmp_path / loss)
    assert any(not torch.equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize("kw", [
    dict(loss="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0"),  # MPO
    dict(loss="sigmoid", f_divergence="js_divergence"),
    dict(loss="ipo", ipo_average_logps=True, sft_weight=0.1, sft_token_weighted=True),
])
def test_combined_losses_and_conventions_train(tiny_model_dir, toy_data, tmp_path, kw):
    result = run(tiny_model_dir, toy_data, tmp_path / "r", max_steps=2, **kw)
    losses = train_losses(result)
    assert all(math.isfinite(v) for v in losses)
    if kw.get("f_divergence") == "js_divergence":  # policy == reference: scores equal, ln 2 as DPO
        assert losses[0] == pytest.approx(LN2, abs=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, toy_data, tmp_path):
    run(tiny_model_dir, toy_data, tmp_path / "a", batch_size=4, grad_accum=1)
    run(tiny_model_dir, toy_data, tmp_path / "b", batch_size=2, grad_accum=2)
    run(tiny_model_dir, toy_data, tmp_path / "c", batch_size=1, grad_accum=4, packing=False)
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5)


def test_precomputed_reference_gives_same_losses_as_live(tiny_model_dir, toy_data, tmp_path):
    live = run(tiny_model_dir, toy_data, tmp_path / "live", max_steps=5)
    cached = run(tiny_model_dir, toy_data, tmp_path / "cached", max_steps=5, precompute_ref=True)
    assert train_losses(live) == pytest.approx(train_losses(cached), abs=1e-6)
    # A second run finds the cache on disk and still agrees.
    again = run(tiny_model_dir, toy_data, tmp_path / "again", max_steps=5, precompute_ref=True)
    assert train_losses(again) == pytest.approx(train_losses(live), abs=1e-6)


def test_lora_uses_base_as_reference_and_saves_adapter(tiny_model_dir, toy_data, tmp_path):
    out = tmp_path / "lora"
    result = run(tiny_model_dir, toy_data, out, lora=True, lora_r=4, lr=5e-3, max_steps=6, merge_lora=True)
    losses = train_losses(result)
    assert losses[0] == pytest.approx(LN2, abs=1e-6)
    assert losses[-1] < losses[0]
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert not (out / "final" / "model.safetensors").exists()
    merged = load_file(str(out / "merged" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    # The adapter loads back onto its base through the normal model loader.
    from dpolab.models import load_model

    assert load_model(str(out / "final")).peft_config


def test_lora_precomputed_reference_matches_live(tiny_model_dir, toy_data, tmp_path):
    live = run(tiny_model_dir, toy_data, tmp_path / "l1", lora=True, lr=5e-3, max_steps=3)
    cached = run(tiny_model_dir, toy_data, tmp_path / "l2", lora=True, lr=5e-3, max_steps=3, precompute_ref=True)
    assert train_losses(live) == pytest.approx(train_losses(cached), abs=1e-6)


def test_resume_is_exact(tiny_model_dir, toy_data, tmp_path):
    full = tmp_path / "full"
    run(tiny_model_dir, toy_data, full, max_steps=8, save_every=3, keep_last=0, final_checkpoint=True)
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    # Pretend the run died right after checkpoint-3: keep only what existed then.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    result = run(tiny_model_dir, toy_data, part, max_steps=8, save_every=3, resume=True)
    assert result["steps"] == 8
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_final_checkpoint_off_keeps_periodic_checkpoints_and_final_model(tiny_model_dir, toy_data, tmp_path):
    out = tmp_path / "r"
    run(tiny_model_dir, toy_data, out, max_steps=5, save_every=2, final_checkpoint=False)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # no checkpoint-5
    assert (out / "final" / "model.safetensors").exists()


def test_existing_run_is_not_overwritten(tiny_model_dir, toy_data, tmp_path):
    run(tiny_model_dir, toy_data, tmp_path / "r", max_steps=1)
    with pytest.raises(TrainingError, match="already holds a run"):
        run(tiny_model_dir, toy_data, tmp_path / "r", max_steps=1)


def test_reference_with_other_tokenizer_is_refused(tiny_model_dir, toy_data, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zzzextra"])
    tok.save_pretrained(other)
    with pytest.raises(TrainingError, match="different tokenizer"):
        run(tiny_model_dir, toy_data, tmp_path / "r", ref_model=str(other))


def test_too_little_data_for_one_step(tiny_model_dir, toy_data, tmp_path):
    with pytest.raises(TrainingError, match="fewer than one step"):
        run(tiny_model_dir, toy_data, tmp_path / "r", batch_size=16, grad_accum=2)


def test_sft_lowers_chosen_nll(tiny_model_dir, toy_data, tmp_path):
    result = sft(model=str(tiny_model_dir), data=str(toy_data), output_dir=str(tmp_path / "sft"), bf16="false",
                 progress=False, lr=3e-3, max_steps=10, batch_size=4, eval_fraction=0.0, warmup_ratio=0.0)
    losses = train_losses(result)
    assert losses[-1] < losses[0] - 0.1
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()


def test_sft_first_then_dpo(tiny_model_dir, toy_data, tmp_path, capsys):
    result = run(tiny_model_dir, toy_data, tmp_path / "r", sft_first=True, max_steps=2)
    assert (tmp_path / "r" / "sft" / "final" / "model.safetensors").exists()
    err = capsys.readouterr().err  # each stage announces itself: both log "[train] step k/n"
    assert err.index("stage 1/2, SFT on prompt + chosen") < err.index("stage 2/2, sigmoid from")
    assert train_losses(result)[0] == pytest.approx(LN2, abs=1e-6)  # reference = the SFT model


def test_cosine_schedule_and_bf16_autocast_run(tiny_model_dir, toy_data, tmp_path):
    result = run(tiny_model_dir, toy_data, tmp_path / "r", scheduler="cosine", bf16="true", max_steps=3,
                 gradient_checkpointing=True)
    losses = train_losses(result)
    assert losses[0] == pytest.approx(LN2, abs=1e-6)
    assert all(math.isfinite(v) for v in losses)


def test_resume_logs_each_step_once(tiny_model_dir, toy_data, tmp_path):
    out = tmp_path / "r"
    run(tiny_model_dir, toy_data, out, max_steps=6, save_every=2)
    for p in out.glob("checkpoint-*"):
        if p.name != "checkpoint-2":
            shutil.rmtree(p)
    shutil.rmtree(out / "final")
    run(tiny_model_dir, toy_data, out, max_steps=6, save_every=2, resume=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_flush_denormal_is_set_for_the_run_and_switchable(tiny_model_dir, toy_data, tmp_path):
    denormal = lambda: float(torch.tensor([1e-39]) * 1.0)  # noqa: E731
    on = run(tiny_model_dir, toy_data, tmp_path / "on", max_steps=2, flush_denormal=True)
    assert denormal() > 0.0  # the process-wide mode ends with the run: the caller's arithmetic is its own
    off = run(tiny_model_dir, toy_data, tmp_path / "off", max_steps=2, flush_denormal=False)
    assert denormal() > 0.0
    assert train_losses(on) == pytest.approx(train_losses(off), abs=1e-6)


# ------------------------------------------------------------------ issue 15: loop options


def test_tr_dpo_moves_the_reference_and_resumes_exactly(tiny_model_dir, toy_data, tmp_path):
    kw = dict(max_steps=6, save_every=3, sync_ref_every=2, ref_mix_alpha=0.6)
    full = tmp_path / "full"
    synced = run(tiny_model_dir, toy_data, full, **kw)
    plain = run(tiny_model_dir, toy_data, tmp_path / "plain", max_steps=6)
    # up to the first sync (after step 2) the runs are the same; then the reference differs
    assert train_losses(synced)[:2] == pytest.approx(train_losses(plain)[:2], abs=1e-7)
    assert train_losses(synced)[2] != pytest.approx(train_losses(plain)[2], abs=1e-6)
    files = sorted(p.name for p in (full / "reference-sync").iterdir())
    assert files == ["step-2.safetensors", "step-4.safetensors", "step-6.safetensors"]
    # the reference of step 6 is 0.6 * (policy after step 6 = final) + 0.4 * (reference of step 4)
    ref4, ref6 = load_file(str(full / "reference-sync" / "step-4.safetensors")), load_file(str(full / "reference-sync" / "step-6.safetensors"))
    final = weights(full)
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(ref6[key], 0.6 * final[key] + 0.4 * ref4[key], rtol=1e-5, atol=1e-6)
    # A run that died after checkpoint-3 (and the step-2 reference) resumes bit-identically.
    part = tmp_path / "part"
    (part / "reference-sync").mkdir(parents=True)
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    shutil.copy(full / "reference-sync" / "step-2.safetensors", part / "reference-sync")
    run(tiny_model_dir, toy_data, part, resume=True, **kw)
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tr_dpo_refuses_lora(tiny_model_dir, toy_data, tmp_path):
    with pytest.raises(ValueError, match="sync_ref_every"):
        run(tiny_model_dir, toy_data, tmp_path / "r", lora=True, sync_ref_every=2)


def test_ld_alpha_one_is_dpo_and_below_one_changes_the_loss(tiny_model_dir, toy_data, tmp_path):
    plain = run(tiny_model_dir, toy_data, tmp_path / "a", max_steps=3)
    same = run(tiny_model_dir, toy_data, tmp_path / "b", max_steps=3, ld_alpha=1.0)
    ld = run(tiny_model_dir, toy_data, tmp_path / "c", max_steps=3, ld_alpha=0.3)
    assert train_losses(plain) == train_losses(same)
    assert train_losses(ld)[0] == pytest.approx(LN2, abs=1e-6)  # policy == reference still
    assert train_losses(ld)[1:] != pytest.approx(train_losses(plain)[1:], abs=1e-6)


def test_wpo_weights_the_first_loss_by_pair_probability(tiny_model_dir, toy_data, tmp_path):
    result = run(tiny_model_dir, toy_data, tmp_path / "w", max_steps=2, wpo=True)
    first = result["history"][0]
    # weights exp(mean logp_w + mean logp_l) are < 1, so the weighted ln 2 is smaller
    assert 0 < first["loss"] < LN2


def test_resume_elsewhere_names_the_relative_data_path(tmp_path, monkeypatch):
    """config.yaml keeps --data as typed; --resume from another directory says why it is not found."""
    from dpolab.config import TrainConfig
    from dpolab.train import TrainingError, _check_resumed_paths

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingError, match=r"pairs.jsonl: file not found \(--data in runs/x/config.yaml is relative"):
        _check_resumed_paths(TrainConfig(data="pairs.jsonl", resume=True), Path("runs/x"))
    (tmp_path / "pairs.jsonl").write_text("")
    for ok in (TrainConfig(data="pairs.jsonl", resume=True), TrainConfig(data="someone/prefs", resume=True),
               TrainConfig(data="gone.jsonl", resume=False)):
        _check_resumed_paths(ok, Path("runs/x"))  # found / a hub name / not a resume: nothing to say


def test_data_line_of_a_one_row_file_says_row_and_pair():
    from dpolab.train import data_summary

    class Report:
        rows_read, kept, truncated, dropped, notes = 1, 1, 0, {}, {}

    assert data_summary("x.jsonl", Report(), 0, 1) == "data x.jsonl: 1 row, 1 kept, dropped: none, 0 truncated; 0 train / 1 eval pair"


# ------------------------------------------------------------------ clipping folded into the fused AdamW

@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clip_folded_into_the_fused_adamw_makes_the_update_of_clip_grad_norm(max_norm):
    from accelerate import Accelerator

    from dpolab.train import clip_gradients
    from tests.conftest import build_tiny_model

    acc = Accelerator(cpu=True)
    models = [build_tiny_model(97, seed=3) for _ in range(2)]
    ids = torch.randint(3, 97, (2, 10))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in models]
    for m in models:
        m(input_ids=ids, labels=ids).loss.backward()
    want = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
    optimizers[0].step()
    got = clip_gradients(acc, models[1], optimizers[1], max_norm)
    assert hasattr(optimizers[1], "grad_scale") == (float(want) > max_norm)  # only a step that clips
    grads_before = [p.grad.clone() for p in models[1].parameters()]
    optimizers[1].step()
    torch.testing.assert_close(got, want)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if float(want) <= max_norm:
        assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, models[1].parameters()))


def test_clip_without_a_fused_optimizer_clips_the_gradients_themselves():
    from accelerate import Accelerator

    from dpolab.train import clip_gradients
    from tests.conftest import build_tiny_model

    model = build_tiny_model(97, seed=3)
    ids = torch.randint(3, 97, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    norm = clip_gradients(Accelerator(cpu=True), model, optimizer, 0.05)
    assert float(norm) > 0.05 and not hasattr(optimizer, "grad_scale")
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) == pytest.approx(0.05, rel=1e-4)


def test_a_training_step_leaves_no_clip_factor_on_the_optimizer(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    import dpolab.train as trainer

    seen = []
    make = trainer.make_optimizer

    def spy(*args, **kwargs):
        optimizer, scheduler = make(*args, **kwargs)
        seen.append(optimizer)
        return optimizer, scheduler

    monkeypatch.setattr(trainer, "make_optimizer", spy)
    result = run(tiny_model_dir, toy_data, tmp_path / "o", max_steps=2, max_grad_norm=1e-3)
    assert result["steps"] == 2 and seen and seen[0].defaults["fused"]
    assert not hasattr(seen[0], "grad_scale")
    assert all(h["grad_norm"] > 1e-3 for h in result["history"] if "grad_norm" in h)  # every step clipped
