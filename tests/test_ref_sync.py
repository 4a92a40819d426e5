"""TR-DPO's mixing rule and the pruning of synchronised references."""

import torch

from dpolab.ref_sync import mix, prune


def test_mix_is_alpha_policy_plus_one_minus_alpha_reference():
    ref, pol = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ref.weight.detach().clone()
    mix(ref, pol, 0.6)
    torch.testing.assert_close(ref.weight.detach(), 0.6 * pol.weight.detach() + 0.4 * before)
    mix(ref, pol, 1.0)
    assert torch.equal(ref.weight, pol.weight)


def test_prune_keeps_what_the_oldest_checkpoint_needs(tmp_path):
    folder = tmp_path / "reference-sync"
    folder.mkdir()
    for k in (2, 4, 6, 8):
        (folder / f"step-{k}.safetensors").write_text("x")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    prune(folder, every=2)
    # checkpoint-5 resumes with the reference of step 4
    assert sorted(f.name for f in folder.iterdir()) == ["step-4.safetensors", "step-6.safetensors", "step-8.safetensors"]
