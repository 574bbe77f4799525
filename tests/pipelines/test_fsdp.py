"""FSDP as far as a CPU machine allows (README, "Full fine-tuning on several GPUs (FSDP)"): the shipped
accelerate configs are accepted and mean what they say; a model sharded by FSDP2 over two CPU processes
(gloo) writes sharded checkpoints, is killed, resumes, and is gathered by the training code into a
safetensors model that transformers loads, equal to the same training in one process; and a Trainer
launched with an FSDP config on CPU, which accelerate silently runs as DDP, is refused before training."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import merge_fsdp_weights  # what `accelerate merge-weights` runs
from accelerate.utils.launch import prepare_multi_gpu_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
HERE = Path(__file__).parent
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_CONFIG_FILE": "/nonexistent/none.yaml"}  # no user config is read


@pytest.mark.parametrize("name,processes,machines", [("fsdp_1node_8gpu.yaml", 8, 1), ("fsdp_multinode.yaml", 16, 2)])
def test_shipped_configs_launch_fsdp_full_shard(name, processes, machines):
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "workbench", "adapt"])
    args = _validate_launch_command(args)[0]
    assert args.use_fsdp and (args.num_processes, args.num_machines, args.mixed_precision) == (processes, machines,
                                                                                              "bf16")
    env = prepare_multi_gpu_env(args)  # what every launched process finds in its environment
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # full shard
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT" and env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_training_arguments_leave_checkpointing_to_fsdp(monkeypatch):
    from workbench.pipelines.training import checkpointing_arguments

    assert any(v is True for v in checkpointing_arguments(True).values())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert not any(v is True for v in checkpointing_arguments(True).values())  # the Trainer refuses both


def _reference(base_dir, steps):
    """The same training in one process: AdamW on the mean loss of both ranks' batches."""
    from fsdp_cpu_run import LR, batch

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    vocab = model.config.vocab_size
    for step in range(1, steps + 1):
        loss = sum(model(input_ids=batch(step, r, vocab), labels=batch(step, r, vocab)).loss for r in (0, 1)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def test_fsdp2_on_two_cpu_processes_killed_resumed_and_consolidated(tmp_path, tiny_llama_factory, monkeypatch):
    base_dir, _ = tiny_llama_factory("base")
    work = tmp_path / "work"
    work.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                str(HERE / "fsdp_cpu_run.py")]
    env = {**CPU_ENV, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(["nice", "-n", "10", *torchrun, "first", str(base_dir), str(work)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode != 0 and not (work / "model").exists(), killed.stdout[-2000:] + killed.stderr[-2000:]
    shards = sorted(p.name for p in (work / "checkpoint-2" / "pytorch_model_fsdp_0").iterdir())
    assert [s for s in shards if s.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]  # one per process
    resumed = subprocess.run(["nice", "-n", "10", *torchrun, "resume", str(base_dir), str(work)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert (work / "sharded.json").read_text() == '{"local_rows": 32}'  # each process held half of q_proj

    monkeypatch.syspath_prepend(str(HERE))
    # An abandoned run's sharded checkpoint: `accelerate merge-weights` makes one safetensors file of it.
    merge_fsdp_weights(str(work / "checkpoint-2" / "pytorch_model_fsdp_0"), str(tmp_path / "merged"))
    after_two = _reference(base_dir, steps=2)
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert weights.keys() == after_two.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, after_two[name], atol=2e-5, rtol=1e-4, msg=name)

    expected = _reference(base_dir, steps=3)
    model = AutoModelForCausalLM.from_pretrained(work / "model")  # a plain safetensors model directory
    assert (work / "model" / "model.safetensors").is_file() and (work / "model" / "tokenizer.json").is_file()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=2e-5, rtol=1e-4, msg=name)


def test_an_fsdp_launch_that_accelerate_runs_as_ddp_is_refused(tmp_path, tiny_llama_factory):
    """On CPU processes accelerate ignores the FSDP config and the Trainer would run plain DDP, each process
    holding the whole model: the training stage says so before its first step."""
    base_dir, _ = tiny_llama_factory("base")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ct = "language_expert.pretrain"
    overrides = ["corpus.block_size=64", "corpus.max_tokens=4000", f"{ct}.method=full", f"{ct}.max_steps=2",
                 f"{ct}.batch_size=2", f"{ct}.precision=fp32", f"{ct}.gradient_checkpointing=true"]
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(CONFIGS / "fsdp_1node_8gpu.yaml"),
              "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = subprocess.run(["nice", "-n", "10", *launch, str(HERE / "ddp_pretrain_run.py"), str(base_dir), str(run_dir),
                          *overrides], env=CPU_ENV, capture_output=True, text=True, timeout=120)
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    assert "accelerate was launched with an FSDP config (ACCELERATE_USE_FSDP=true), but accelerate" in log, log[-3000:]
    assert "(MULTI_CPU; it shards only on GPUs and other accelerators)" in log, log[-3000:]
    assert "step 1/2" not in log and "wrote the model to" not in log


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_gathered_lora_state_dict_becomes_the_merged_model(tmp_path, tiny_llama_factory, tie):
    """What the main process does with the gathered state dict of a LoRA run (adapters and trained embedding
    copies): the rebuilt, merged model computes what the trained LoRA model computes, ties kept."""
    from peft import get_peft_model

    from workbench.config.language import LoraSettings, TrainConfig
    from workbench.pipelines.training import full_state_dict, lora_config, model_from_state_dict

    base_dir, _ = tiny_llama_factory("base", tie=tie)
    cfg = TrainConfig(method="lora", lora=LoraSettings(rank=4, dropout=0.0, train_embeddings=True))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    trained = get_peft_model(base, lora_config(cfg, base)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:  # as if trained: B away from zero, the embedding copies moved
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    ids = torch.randint(0, 512, (2, 12), generator=generator)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        rebuilt = model_from_state_dict(base_dir, cfg, full_state_dict(trained)).eval()
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert (rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight) == tie
    assert not any(t.is_meta for t in rebuilt.state_dict().values())
