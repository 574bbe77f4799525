"""Run by test_distributed.py under `accelerate launch`: the ordinary CT entry point (the adapt graph until the
language expert, as `workbench pretrain` runs it), plus a callback that records what this rank computed (its
own loss and a hash of its own batch at every training forward)."""
import hashlib
import json
import os
import sys

from transformers import TrainerCallback

from workbench.config.loader import load_language
from workbench.pipelines.adapt import build_graph


class RankLog(TrainerCallback):
    def __init__(self, path):
        self.path, self.records = path, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, kw, output):
            if module.training:
                ids = kw["input_ids"]
                self.records.append({"loss": output.loss.item(), "batch": hashlib.sha1(ids.numpy().tobytes()).hexdigest(),
                                     "tokens": ids.numel()})
        model.register_forward_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        with open(self.path, "w") as f:
            json.dump({"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                       "forwards": self.records}, f)


if __name__ == "__main__":
    base_dir, run_dir, *overrides = sys.argv[1:]
    loaded = load_language("sw", overrides=[*overrides, f"base={{path: {base_dir}}}"])
    rank = os.environ.get("RANK", "0")
    graph = build_graph(loaded, run_dir, callbacks=[RankLog(os.path.join(run_dir, f"rank{rank}.json"))])
    record = graph.execute(until="language_expert")["language_expert"]
    print(f"rank {rank}: language expert {record['outputs']['model']}")
