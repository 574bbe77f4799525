"""The one Trainer run that CT and SFT share: build the model (+ LoRA), train with the transformers Trainer
(resuming from the last complete checkpoint in the stage directory), merge LoRA in, and write a full
safetensors model with its tokenizer.

The caller brings the data (datasets and a collator); everything else is a `TrainConfig`. The same code runs
in one process or under `accelerate launch`: with DDP the Trainer shards the batches, and only the main
process writes the model and the stage record; with FSDP (an accelerate config of `configs/accelerate/`) the
Trainer also shards the weights, gradients and optimizer state and writes sharded checkpoints, and at the end
every process takes part in gathering the full weights, which the main process writes as the same
safetensors model.
"""
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from workbench.errors import CheckpointError, ConfigError
from workbench.pipelines.processes import barrier, is_main_process
from workbench.pipelines.stage import write_json_atomic

CHECKPOINTS = "checkpoints"
MODEL = "model"


def resolve_precision(precision: str) -> str:
    """`auto`: bf16 on a GPU that supports it, fp32 on CPU."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision: fp16 needs a GPU; expected auto, fp32 or bf16 on CPU")
    return precision


def stored_dtype(model_dir) -> torch.dtype:
    """The dtype the model's weights are stored in (experts are written in the base's dtype)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def has_tied_embeddings(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def lora_config(cfg, model):
    """peft LoRA from the config; `train_embeddings` trains whole embedding and LM head copies (tied stay tied)."""
    from peft import LoraConfig

    lora = cfg.lora
    extra = {}
    if lora.train_embeddings:
        extra["modules_to_save"] = ["embed_tokens", "lm_head"]
        extra["ensure_weight_tying"] = has_tied_embeddings(model)
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM", **extra)


def load_trainable_model(model_dir, cfg):
    """The model to train: fp32 weights (a frozen LoRA base in bf16 when training in bf16), LoRA applied."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    precision = resolve_precision(cfg.precision)
    dtype = torch.bfloat16 if (cfg.method == "lora" and precision == "bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if cfg.method == "lora":
        missing = [m for m in cfg.lora.target_modules if not any(n.endswith(m) for n, _ in model.named_modules())]
        if missing:
            raise ConfigError(f"lora.target_modules: {', '.join(missing)} not found in the model {model_dir}; "
                              f"expected module names such as q_proj, v_proj, gate_proj")
        with warnings.catch_warnings():
            # peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
            # FutureWarning on every run: nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora_config(cfg, model))
    return model


def fsdp_launched() -> bool:
    """`accelerate launch` with an FSDP config (it sets these variables for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_checkpoints_activations() -> bool:
    """The FSDP config checkpoints activations itself (`fsdp_activation_checkpointing: true`)."""
    return fsdp_launched() and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"


def require_fsdp_applied(trainer) -> None:
    """Fail before training when accelerate was launched with FSDP but the Trainer runs without it: accelerate
    applies FSDP only to GPU (and other accelerator) processes and silently runs plain DDP on CPU processes,
    where every process would hold the whole model, its gradients and its optimizer state."""
    if fsdp_launched() and not trainer.is_fsdp_enabled:
        import accelerate

        kind = getattr(trainer.accelerator.state.distributed_type, "value", "unknown")
        raise ConfigError(f"accelerate was launched with an FSDP config (ACCELERATE_USE_FSDP=true), but accelerate "
                          f"{accelerate.__version__} does not apply FSDP to these processes ({kind}; it shards "
                          f"only on GPUs and other accelerators), so each would hold the whole model; launch it on "
                          f"GPUs, or without the FSDP config (DDP)")


def checkpointing_arguments(enabled: bool) -> dict:
    """Gradient (activation) checkpointing, under the argument names this transformers version uses. Under an
    FSDP config that checkpoints activations itself the Trainer's stays off (the Trainer refuses both)."""
    from transformers import TrainingArguments

    enabled = enabled and not fsdp_checkpoints_activations()
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(cfg, output_dir, *, evaluate: bool, count_tokens: str, fresh: bool):
    """TrainingArguments from a `TrainConfig` (scheduler with warm-up, checkpoints, logging, precision)."""
    from transformers import TrainingArguments

    precision = resolve_precision(cfg.precision)
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=float(cfg.warmup_ratio),  # a float in [0, 1) is a share of the steps
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        **checkpointing_arguments(cfg.gradient_checkpointing),
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        logging_steps=cfg.logging_steps, logging_first_step=True,
        eval_strategy="steps" if evaluate else "no", eval_steps=cfg.eval_steps, eval_on_start=evaluate and fresh,
        prediction_loss_only=True, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, include_num_input_tokens_seen=count_tokens, report_to="none",
        dataloader_num_workers=0, remove_unused_columns=False, ddp_find_unused_parameters=False,
        log_level="warning", disable_tqdm=True)  # StepLog prints one line per logging step instead


def last_checkpoint(folder) -> str | None:
    """The newest checkpoint that was written completely (the Trainer writes trainer_state.json last)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def make_trainer_class():
    from transformers import Trainer, TrainerCallback

    class StepTimer(TrainerCallback):
        """Time inside optimizer steps (no evaluation, no checkpoint writing), for tokens per second."""

        def __init__(self):
            self.seconds, self.tokens, self._start, self._t0 = 0.0, 0, 0, None

        def on_train_begin(self, args, state, control, **kwargs):
            self._start = state.num_input_tokens_seen  # after a resume: the tokens before it

        def on_train_end(self, args, state, control, **kwargs):
            self.tokens = state.num_input_tokens_seen - self._start  # this session's tokens

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._t0

    class StepLog(TrainerCallback):
        """One line per logging step and evaluation (main process only), instead of nested progress bars."""

        def __init__(self, label):
            self.label, self._t0 = label, time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            parts = []
            if "loss" in logs:
                parts.append(f"loss {float(logs['loss']):.3f}")
            if "eval_loss" in logs:
                parts.append(f"held-out loss {logs['eval_loss']:.3f}, perplexity {logs['eval_perplexity']:.1f}")
            if parts:
                print(f"  {self.label} step {state.global_step}/{state.max_steps}: {', '.join(parts)} "
                      f"({state.num_input_tokens_seen:,} tokens, {time.perf_counter() - self._t0:.0f} s)", flush=True)

    class ExpertTrainer(Trainer):
        """The Trainer, with held-out perplexity beside every evaluation loss it logs."""

        def log(self, logs, start_time=None):
            if "eval_loss" in logs:
                logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            super().log(logs, start_time)

    return ExpertTrainer, StepTimer, StepLog


def use_step_log(trainer, label: str) -> None:
    """Log one line per logging step (StepLog) instead of the Trainer's raw dicts (PrinterCallback, what it
    prints with its progress bars off)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(make_trainer_class()[2](label))


def train_and_save(model_dir, tokenizer, cfg, stage_dir, *, train_dataset, eval_dataset=None, collator,
                   count_tokens="all", callbacks=()) -> dict:
    """Train `model_dir` per `cfg` in `stage_dir` (resuming), write `stage_dir/model`; returns the summary."""
    from transformers import set_seed

    stage_dir = Path(stage_dir)
    checkpoint = last_checkpoint(stage_dir / CHECKPOINTS)
    set_seed(cfg.seed)
    model = load_trainable_model(model_dir, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = training_arguments(cfg, stage_dir / CHECKPOINTS, evaluate=eval_dataset is not None,
                              count_tokens=count_tokens, fresh=checkpoint is None)
    trainer_cls, timer_cls, _ = make_trainer_class()
    timer = timer_cls()
    trainer = trainer_cls(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=collator, processing_class=tokenizer, callbacks=[timer, *callbacks])
    require_fsdp_applied(trainer)
    use_step_log(trainer, stage_dir.name)
    if checkpoint and is_main_process():
        print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    evals = [h for h in state.log_history if "eval_loss" in h]
    summary = {
        "steps": state.global_step, "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_second": timer.tokens / timer.seconds if timer.seconds else None,
        "train_seconds": round(timer.seconds, 3), "trainable_parameters": trainable, "processes": args.world_size,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "losses": [(h["step"], h["loss"]) for h in state.log_history if "loss" in h],
    }
    if evals:
        summary.update(initial_eval_loss=evals[0]["eval_loss"], initial_perplexity=evals[0]["eval_perplexity"],
                       initial_eval_step=evals[0]["step"], final_eval_loss=evals[-1]["eval_loss"],
                       final_perplexity=evals[-1]["eval_perplexity"])
    merged = trained_model(trainer, model_dir, cfg)  # under FSDP every process takes part, the main one gets it
    if is_main_process():
        save_model_atomic(merged.to(stored_dtype(model_dir)), tokenizer, stage_dir / MODEL)
        write_json_atomic(stage_dir / "log_history.json", state.log_history)
        shutil.rmtree(stage_dir / CHECKPOINTS, ignore_errors=True)
    barrier()
    return summary


def trained_model(trainer, model_dir, cfg):
    """The trained model with LoRA merged in, whole: the Trainer's own model, or under FSDP one rebuilt from
    the gathered full state dict (on the main process; the others return None)."""
    if not trainer.is_fsdp_enabled:
        return trainer.model.merge_and_unload() if cfg.method == "lora" else trainer.model
    state = full_state_dict(trainer.model)
    return model_from_state_dict(model_dir, cfg, state) if is_main_process() else None


def full_state_dict(model) -> dict:
    """The full (unsharded) state dict of a model sharded by FSDP (1 or 2), on the CPU of the main process
    (empty elsewhere). A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def model_from_state_dict(model_dir, cfg, state: dict):
    """`model_dir`'s architecture (+ the LoRA of `cfg`) built without allocating its parameters (on the meta
    device; buffers such as the rotary tables are real) and given the tensors of `state`; LoRA merged in. A
    missing or unexpected key fails (strict)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False):
        # Tied as from_pretrained ties them (LoRA then keeps the tie); outside init_empty_weights, which would
        # register a copy.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if cfg.method == "lora":
        with warnings.catch_warnings():  # peft's is_gradient_checkpointing read, as in load_trainable_model
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora_config(cfg, model))  # the adapters are made on their layers' meta
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{model_dir}: the gathered state dict has no {', '.join(left[:3])}; cannot rebuild "
                              f"the trained model")
    if cfg.method == "lora":
        model = model.merge_and_unload()
    if getattr(model.config, "tie_word_embeddings", False):
        # `assign` gave the head a tensor of its own (equal to the embeddings); transformers' tie_weights
        # refuses an assigned parameter, so tie by hand.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


def print_summary(what: str, s: dict, model_dir, eval_label="held-out perplexity") -> None:
    tps = f"{s['tokens_per_second']:.0f} tokens/s" if s.get("tokens_per_second") else "-"
    resumed = f", resumed from {s['resumed_from']}" if s.get("resumed_from") else ""
    print(f"{what}: {s['steps']} steps, {s['tokens_seen']:,} tokens seen, {tps} "
          f"({s['trainable_parameters']:,} trainable parameters{resumed})")
    if "final_perplexity" in s:
        print(f"  {eval_label} {s['initial_perplexity']:.2f} (step {s['initial_eval_step']}) -> "
              f"{s['final_perplexity']:.2f}")
    print(f"  model: {model_dir}")


def save_model_atomic(model, tokenizer, out_dir) -> Path:
    """Write a full safetensors model and its tokenizer to a temporary sibling, then rename it into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    print(f"wrote the model to {out_dir}")
    return out_dir
