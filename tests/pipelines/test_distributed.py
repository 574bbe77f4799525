"""The CT stages under `accelerate launch` with two CPU processes (gloo DDP): both ranks train on their own
batches, the loss falls, and only the main process runs the data stages and writes the model and the records.

`accelerate launch --cpu --num_processes 2` starts several CPU processes only through mpirun (it needs a
hostfile) and otherwise runs one; `--multi_gpu --num_processes 2` starts two torchrun workers, which find no
CUDA device (hidden here) and form a gloo process group: the same DDP code path as on GPUs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

CT = "language_expert.pretrain"


def test_two_cpu_processes_train_and_save_once(tmp_path, tiny_llama_factory):
    base_dir, _ = tiny_llama_factory("base", tie=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    steps, batch, block = 10, 4, 64
    overrides = ["corpus.block_size=64", "corpus.max_tokens=8000", f"{CT}.max_steps={steps}",
                 f"{CT}.batch_size={batch}", f"{CT}.grad_accum=1", f"{CT}.save_steps=5", f"{CT}.eval_steps=10",
                 f"{CT}.logging_steps=2",
                 f"{CT}.learning_rate=0.01", f"{CT}.lora.rank=8", f"{CT}.lora.train_embeddings=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")}  # no user config is read
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    script = Path(__file__).with_name("ddp_pretrain_run.py")
    out = subprocess.run([*launch, str(script), str(base_dir), str(run_dir), *overrides], env=env,
                         capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]

    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    for r in ranks:  # each rank ran one forward per step on its own batch of `batch` blocks
        assert len(r["forwards"]) == steps and all(f["tokens"] == batch * block for f in r["forwards"])
        losses = [f["loss"] for f in r["forwards"]]
        assert sum(losses[-3:]) < sum(losses[:3]) - 0.5, losses
    assert all(a["batch"] != b["batch"] for a, b in zip(ranks[0]["forwards"], ranks[1]["forwards"]))

    assert log.count("training blocks of 64 tokens") == 1  # the main process built the corpus, the other reused it
    assert log.count("wrote the model to") == 1  # only the main process writes
    (stage_dir,) = (run_dir / "stages").glob("language_expert-*")
    summary = json.loads((stage_dir / "stage.json").read_text())["outputs"]["summary"]
    assert summary["steps"] == steps and summary["tokens_seen"] == steps * batch * block * 2
    assert summary["final_perplexity"] < summary["initial_perplexity"]
    assert sorted(p.name for p in stage_dir.iterdir()) == ["log_history.json", "model", "stage.json"]
    # Each stage ran once, in the main process (one record each, written once: one "finished" line each).
    assert {p.name.rsplit("-", 1)[0] for p in (run_dir / "stages").iterdir()} == {
        "fetch", "corpus", "tokenizer", "blocks", "language_expert"}
    assert log.count("language_expert: finished in") == 1 and log.count("corpus: finished in") == 1
    model = AutoModelForCausalLM.from_pretrained(stage_dir / "model")
    assert model.lm_head.weight is model.model.embed_tokens.weight
