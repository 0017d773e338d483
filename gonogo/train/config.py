"""The pretraining config: a preset's ``[model]``, ``[data]`` and ``[train]`` tables, typed.

A preset is a word (``tiny-dense``) naming ``gonogo/configs/<word>.toml`` or a path to a TOML
file; ``key=value`` overrides (``train.steps=50``) are applied before validation, so a misspelt
key is one line naming the key and the allowed ones. Checks that need the number of processes
(batch divisibility, expert parallelism) live in ``check_world``, called by the launcher before
anything starts and again by every worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

from pydantic import Field, field_validator, model_validator

from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig
from gonogo.typed_config import Strict, apply_overrides, load_toml, resolve_preset, validate


class DataConfig(Strict):
    """Where the tokens come from (see gonogo.data.sources.make_source); validation uses the
    source's held-out ``val`` split (the synthetic corpus's held-out questions)."""

    source: str = "synthetic"                # "synthetic", "stdlib", or a text/JSONL/Parquet path
    seed: int = 0
    text_field: str = "text"                 # the JSONL field / Parquet column holding the text
    val_percent: float = 5.0                 # share of a user corpus or stdlib held out for validation
    # "chat": SFT examples (gonogo.data.sft: built-in reasoning chats or a chat JSONL), the loss
    # only on the assistant's tokens; "text": plain documents (pretraining)
    format: Literal["text", "chat"] = "text"
    min_good_fraction: float = Field(default=0.9, ge=0.0, le=1.0)  # chat JSONL: below this, refuse the file
    # a model's own tokenizer: a directory holding tokenizer.json (or the file itself), e.g. one made
    # by `gonogo tokenizer train`; None = gonogo's byte tokenizer. finetune sets it from the checkpoint
    tokenizer: Optional[str] = None

    def make_tokenizer(self):
        """The HFTokenizer of ``tokenizer``, or None for the byte tokenizer."""
        if self.tokenizer is None:
            return None
        from gonogo.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(self.tokenizer)

    def open_source(self, split: str):
        """This data's source for ``split`` ("train" or "val"); UserError for a bad path or file."""
        tokenizer = self.make_tokenizer()
        if self.format == "chat":
            from gonogo.data.sft import make_sft_source

            return make_sft_source(self.source, split, seed=self.seed, min_good_fraction=self.min_good_fraction,
                                   val_percent=self.val_percent, tokenizer=tokenizer)
        from gonogo.data.sources import make_source

        source = make_source(self.source, split, seed=self.seed, text_field=self.text_field,
                             val_percent=self.val_percent)
        if tokenizer is None:
            return source
        from gonogo.data.hf_tokenizer import TokenizedSource

        return TokenizedSource(source, tokenizer)


class TrainSettings(Strict):
    steps: int = 200
    global_batch_size: int = 16              # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8                # sequences per forward on one rank
    seq_len: int = 256
    # optimizer and schedule (AdamW, linear warmup then cosine decay to min_lr)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0                   # max global gradient norm; 0 disables clipping
    # numerics and parallelism; "auto" (resolved when the config is validated): bf16 where this
    # machine computes it natively (a CUDA GPU, a CPU with AMX or AVX-512 BF16), else fp32; a CPU
    # without them emulates bf16 matmuls about 50x slower than fp32 (measured on an AVX2 EPYC)
    precision: Literal["bf16", "fp32"] = "bf16"
    parallel: Literal["fsdp", "ddp", "none"] = "fsdp"
    # FSDP2's units: "block" = each transformer block and the root (the communication of one block
    # overlaps the compute of another; each rank holds one block's gathered weights at a time);
    # "model" = the whole model as one unit (one all-gather and one reduce-scatter per micro-batch,
    # no overlap, a whole bf16 copy of the model per rank): fewer, larger collectives and fewer
    # hooks, faster for a small model on a few CPU processes (bench/results/pretrain.md)
    fsdp_unit: Literal["block", "model"] = "block"
    # "block" units: free each block's gathered parameters after its forward (True: least memory,
    # a second all-gather in the backward) or keep them until the backward (False: one all-gather
    # per step; torchtitan's reshard_after_forward "never")
    fsdp_reshard_after_forward: bool = True
    # torch.compile (inductor) each transformer block: its elementwise work (RMSNorm, RoPE, SwiGLU,
    # residuals) fused into a few kernels. It pays on long runs: the first step of each process
    # compiles (15-35 s on 2 CPU cores; a cache under /tmp shortens later ones), and the bf16
    # rounding differs from eager's, so a compiled run follows its own trajectory. Off by default;
    # bench/results/pretrain.md measures both. Dense models only (MoE routing has data-dependent shapes).
    compile: bool = False
    expert_parallel: int = 1                 # EP degree for MoE models (1 = every rank has every expert)
    deterministic: bool = False              # fixed seeds, deterministic kernels, fp32
    seed: int = 1234
    # logging, validation, checkpoints
    log_every: int = 10
    val_every: int = 50                      # 0: validate only at the end
    val_batches: int = 4                     # micro-batches per rank per validation
    target_val_loss: float = 1.0             # the MLPerf time-to-train target (nats/token)
    checkpoint_every: int = 0                # 0: only at the end
    checkpoint: bool = True                  # False: never write a checkpoint
    # True: the loop blocks only while the state is staged in memory; DCP writes the files in a
    # background process and the checkpoint is committed once they are written (docs/checkpoint.md)
    checkpoint_async: bool = False
    init_from: Optional[str] = None          # a checkpoint whose weights start the run (finetune)
    # LoRA through peft (gonogo.train.lora): rank 0 = full finetuning; adapters on these linear layers
    lora_rank: int = Field(default=0, ge=0)
    lora_alpha: float = Field(default=16.0, gt=0)
    # None: every one of wq wk wv wo w1 w2 w3 the model has (an all-MoE model has no dense w1 w2 w3)
    lora_targets: Optional[list[str]] = None
    init_timeout_s: float = 120.0            # bound on process-group set-up and every collective
    # resilience (gonogo.train.guards; docs/resilience.md)
    max_restarts: int = 2                    # torchrun restarts of a failed attempt (each resumes by itself)
    watchdog_timeout_s: float = 0.0          # fixed hang timeout; 0: derived from the observed step times
    watchdog_min_timeout_s: float = 60.0     # floor of the derived timeout
    watchdog_factor: float = 10.0            # derived timeout = max(floor, factor x slowest step seen)
    straggler_every: int = 10                # steps between straggler gatherings (0: off)
    straggler_threshold: float = 0.75        # a relative or individual score below it names a straggler
    spike_factor: float = 5.0                # a loss above factor x the running median is a spike (0: off)
    max_rollbacks: int = 3                   # NaN/spike rollbacks before the run fails
    # CPU only: a rank whose peak resident memory goes over it stops as a GPU OOM would (gonogo.train.memory)
    memory_cap_GB: Optional[float] = Field(default=None, gt=0)

    @field_validator("precision", mode="before")
    @classmethod
    def _auto_precision(cls, value: Any) -> Any:
        if value == "auto":
            return "bf16" if native_bf16() else "fp32"
        return value

    @model_validator(mode="after")
    def _check(self) -> "TrainSettings":
        positive = ("steps", "global_batch_size", "micro_batch_size", "seq_len", "log_every",
                    "val_batches", "expert_parallel")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup_steps < 0 or self.val_every < 0 or self.checkpoint_every < 0:
            raise ValueError("warmup_steps, val_every and checkpoint_every must be >= 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        return self


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: an NVIDIA GPU the workers can see, or a CPU with
    AMX / AVX-512 BF16 (x86) or BF16 (Arm) instructions. Read from /proc, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = Path("/proc/driver/nvidia/gpus")
    if visible not in ("", "-1") and gpus.is_dir() and any(gpus.iterdir()):
        return True
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return bool({"amx_bf16", "avx512_bf16", "bf16"} & set(line.split(":", 1)[-1].split()))
    return False


class TrainConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainSettings = TrainSettings()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                             f"{self.model.max_seq_len}; lower train.seq_len or raise model.max_seq_len")
        if self.train.compile and self.model.moe is not None:
            raise ValueError("train.compile=true supports dense models only (an MoE layer's routing has "
                             "data-dependent shapes that would recompile); set train.compile=false")
        if self.data.tokenizer is not None:
            size = self.data.make_tokenizer().vocab_size
            if size > self.model.vocab_size:
                raise ValueError(f"data.tokenizer has {size} ids but model.vocab_size={self.model.vocab_size}; "
                                 f"raise model.vocab_size to at least {size}")
        return self


def load_train_config(preset: str | Path, overrides: Iterable[str] = (),
                      deterministic: bool = False) -> tuple[TrainConfig, Path]:
    """The validated config of a preset word or TOML path, with overrides applied."""
    path = resolve_preset(preset)
    data: dict[str, Any] = apply_overrides(load_toml(path), list(overrides))
    if deterministic:
        data.setdefault("train", {})["deterministic"] = True
    config = validate(TrainConfig, data, source=str(path))
    if config.train.deterministic and config.train.precision != "fp32":
        # bf16 reductions are order-dependent at the last bit; determinism means fp32
        config = config.model_copy(update={"train": config.train.model_copy(update={"precision": "fp32"})})
    return config, path


def overrides_list(overrides: dict[str, Any] | list[str] | None) -> list[str]:
    """A plan's ``overrides`` (a table or a list of ``key=value``) as ``key=value`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, list):
        return [str(item) for item in overrides]
    items: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            items.append(f"{prefix[:-1]}={_toml_value(node)}")

    walk("", overrides)
    return items


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def gradient_accumulation(settings: TrainSettings, world_size: int) -> int:
    return settings.global_batch_size // (settings.micro_batch_size * world_size)


def check_world(config: TrainConfig, world_size: int) -> None:
    """Errors that depend on the number of processes, each one line with the fix."""
    train = config.train
    ep = train.expert_parallel
    if ep > 1:
        if config.model.moe is None:
            raise UserError(f"train.expert_parallel={ep} needs an MoE model (model.moe is not set); "
                            f"use train.expert_parallel=1")
        if world_size % ep:
            raise UserError(f"train.expert_parallel={ep} does not divide the number of processes "
                            f"({world_size}); choose a divisor of {world_size}")
        n_experts = config.model.moe.n_experts
        if ep > n_experts:
            raise UserError(f"train.expert_parallel={ep} means more experts-per-rank than experts "
                            f"(model.moe.n_experts={n_experts}); use at most {n_experts}")
        if n_experts % ep:
            raise UserError(f"train.expert_parallel={ep} does not divide model.moe.n_experts="
                            f"{n_experts}; choose a divisor of {n_experts}")
        if train.parallel != "fsdp":
            raise UserError(f"train.expert_parallel={ep} needs train.parallel='fsdp' "
                            f"(DDP would average different experts' weights together)")
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"micro_batch_size x processes = {train.micro_batch_size} x {world_size} = {per_step}; "
            f"choose a global batch that is a multiple of {per_step}")
    if train.parallel == "none" and world_size > 1:
        raise UserError(f"train.parallel='none' runs one process, but {world_size} were asked for; "
                        f"use --nproc 1 or train.parallel=fsdp|ddp")
