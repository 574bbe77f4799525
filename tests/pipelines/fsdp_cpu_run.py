"""Run by test_fsdp.py under torchrun with two CPU processes (gloo): a tiny Llama sharded by FSDP2 as
accelerate shards it (one unit per decoder layer, then the root), trained with AdamW, its sharded
checkpoint written and read by accelerate's FSDP checkpoint functions (the ones the Trainer calls), and the
result gathered and written by the training code's own functions.

  first BASE WORK: steps 1-2, the sharded checkpoint WORK/checkpoint-2, then every process kills itself
  resume BASE WORK: reads WORK/checkpoint-2, step 3, writes WORK/model (safetensors)
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.config.language import TrainConfig
from workbench.pipelines.processes import is_main_process, process_state
from workbench.pipelines.training import full_state_dict, model_from_state_dict, save_model_atomic

STEPS, LR = 3, 1e-2


def batch(step, rank, vocab):
    """The tokens rank `rank` trains on at `step` (the test builds the same ones)."""
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(100 * step + rank))


def main(phase, base_dir, work):
    torch.set_num_threads(1)
    state = process_state()  # accelerate's CPU process group (gloo), as the Trainer's; its logging needs it
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    accelerator = state  # what the checkpoint functions read of it: process_index, num_processes
    checkpoint = Path(work) / "checkpoint-2"
    first = 1
    if phase == "resume":
        load_fsdp_model(plugin, accelerator, model, checkpoint)
        load_fsdp_optimizer(plugin, accelerator, optimizer, model, checkpoint)
        first = 3
    for step in range(first, STEPS + 1):
        loss = model(input_ids=batch(step, rank, model.config.vocab_size),
                     labels=batch(step, rank, model.config.vocab_size)).loss
        loss.backward()  # FSDP2 reduce-scatters the mean gradient of the two ranks
        optimizer.step()
        optimizer.zero_grad()
        if phase == "first" and step == 2:
            save_fsdp_model(plugin, accelerator, model, checkpoint)
            save_fsdp_optimizer(plugin, accelerator, optimizer, model, checkpoint)
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)  # killed after a complete checkpoint
    state = full_state_dict(model)
    if is_main_process():
        trained = model_from_state_dict(base_dir, TrainConfig(method="full"), state)
        save_model_atomic(trained, AutoTokenizer.from_pretrained(base_dir), Path(work) / "model")
        (Path(work) / "sharded.json").write_text(json.dumps({
            "local_rows": model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0]}))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
