"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Shards a LoRA policy with FSDP2 (`fully_shard`, which works on CPU) and precomputes the
reference log-probs (base model = adapters off) through `reference.cached`: each process
computes its share of an odd number of batches, so one process runs a padding round. A
process that skipped it would leave the other waiting inside FSDP's all-gather (the test
would time out). Rank 0 also saves the policy's own log-probs (adapters on) for a sanity check.

usage: fsdp_reference_worker.py MODEL_DIR DATA OUT_DIR
"""

import contextlib
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from dpolab import reference as ref
from dpolab.data import load_pairs
from dpolab.data.collate import collate_pairs
from dpolab.logprobs import pair_logps
from dpolab.models import add_lora, load_model, load_tokenizer

BATCH = 3


def main(model_dir: str, data: str, out_dir: str) -> None:
    acc = Accelerator(cpu=True)
    tokenizer = load_tokenizer(model_dir)
    pairs, _ = load_pairs(data, tokenizer, max_length=128, max_prompt_length=64)
    policy = add_lora(load_model(model_dir), 4, 8, 0.0, "all-linear")
    torch.manual_seed(0)  # same on both ranks: LoRA B is zero at init, make the adapter matter
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    for layer in policy.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(policy)

    path = Path(out_dir) / "cache" / "reference.safetensors"
    compute = lambda: ref.compute_all(  # noqa: E731
        policy, "adapter", pairs, BATCH, tokenizer.pad_token_id, True, acc.device, contextlib.nullcontext,
        acc.process_index, acc.num_processes,
    )
    ref.cached(path, compute, acc)
    with torch.no_grad():
        chosen, rejected = pair_logps(policy, collate_pairs(pairs[:BATCH], tokenizer.pad_token_id, True))
    if acc.is_main_process:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(Path(out_dir) / "policy.safetensors"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
