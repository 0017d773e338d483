"""The training loop, run by every rank (pretraining; finetune reuses its parts).

One optimizer step = ``accumulation`` micro-batches per rank (global batch / (micro batch ·
ranks)), a gradient clip on the global norm, AdamW, and the warmup + cosine learning rate. The
model is parallelised by gonogo.parallel. The loop hands the rest to three parts, as
torchtitan's trainer hands work to its components:

- resilience (gonogo.train.resilience): section timing and straggler scores, the hang watchdog,
  the loss guard and its rollbacks, the device-hour budget, the drills' fault injection;
- telemetry (gonogo.train.telemetry): every ``log_every`` steps the ranks agree on the loss, the
  step time and the MoE routing, and rank 0 writes the metrics and the MLPerf log; every
  ``val_every`` steps all ranks evaluate the held-out split;
- the checkpoint hook (gonogo.train.checkpoint_hook): resume, save every ``checkpoint_every``
  steps and at the end, roll back, wait for an async save.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gonogo.model.shape import ModelConfig
from gonogo.parallel import (World, autocast, build_meshes, clip_grad_norm, parallelize, reduce_expert_gradients,
                             set_gradient_sync, unwrap)
from gonogo.train.checkpoint_hook import CheckpointHook
from gonogo.train.config import TrainConfig, TrainSettings, check_world, gradient_accumulation
from gonogo.train.fault_injection import restart_count
from gonogo.train.job import Job
from gonogo.train.resilience import Resilience
from gonogo.train.telemetry import Telemetry

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# -- building blocks (shared with finetune) ---------------------------------------------------------

def set_determinism(settings: TrainSettings) -> None:
    torch.manual_seed(settings.seed)
    if settings.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def build_model(model_config: ModelConfig, config: TrainConfig, world: World) -> nn.Module:
    from gonogo.model.decoder import Decoder

    model = Decoder(model_config)
    model.init_weights(config.train.seed)
    if config.train.init_from:
        load_initial_weights(model, config.train.init_from)
    if config.train.lora_rank:
        from gonogo.train.lora import add_lora

        model = add_lora(model, config.train.lora_rank, config.train.lora_alpha, config.train.lora_targets)
    return parallelize(model, config, world)


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Start from a checkpoint's consolidated weights (finetuning); the shapes must match exactly."""
    from gonogo.checkpoints import resolve

    ref = resolve(path)
    if ref.format == "hf":  # a Hugging Face directory: its own names and layout
        from gonogo.checkpoints.hf_import import load_hf_dir

        weights = load_hf_dir(ref.path, device="cpu", dtype=torch.float32)[0].state_dict()
    else:
        from gonogo.checkpoints.loaders import model_weights

        weights = model_weights(ref)
    missing, unexpected = model.load_state_dict({name: tensor.float() for name, tensor in weights.items()},
                                                strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")


def build_optimizer(model: nn.Module, settings: TrainSettings, world: World) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm weights are left alone).

    Parameters are grouped by decay and by DTensor mesh: a fused/foreach kernel runs per group,
    and expert-parallel experts live on another mesh than the FSDP-sharded rest.
    """
    groups: dict[tuple, list] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            mesh = getattr(parameter, "device_mesh", None)
            key = (parameter.dim() >= 2, id(mesh))
            groups.setdefault(key, []).append(parameter)
    param_groups = [{"params": params, "weight_decay": settings.weight_decay if decay else 0.0}
                    for (decay, _), params in groups.items()]
    # fused AdamW runs on CUDA and (since torch 2.4) on CPU; it is deterministic as well
    return torch.optim.AdamW(param_groups, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                             eps=settings.eps, fused=world.device.type in ("cuda", "cpu"))


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup, cosine to min_lr."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    decay_steps = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / decay_steps)
    floor = settings.min_lr / settings.lr if settings.lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32 over the targets that are not ``IGNORE_INDEX``."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def validation_batches(config: TrainConfig, world: World):
    """This rank's fixed held-out batches: the same tokens at every evaluation, so the curve is
    comparable from one evaluation to the next."""
    from gonogo.data.loader import ValidationBatches

    data, train = config.data, config.train
    source = data.open_source("val")
    return ValidationBatches(source, train.seq_len, train.micro_batch_size, train.val_batches,
                             world.rank, world.world_size, data.seed)


@torch.no_grad()
def evaluate(model: nn.Module, batches, config: TrainConfig, world: World) -> float:
    """Validation loss in nats per token over every rank's held-out batches."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=world.device)  # loss sum, token count
    for inputs, targets in batches:
        inputs, targets = inputs.to(world.device), targets.to(world.device)
        with autocast(config, world):
            logits = model(inputs)
        counted = (targets != IGNORE_INDEX).sum()
        totals[0] += language_model_loss(logits, targets).double() * counted
        totals[1] += counted
    model.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


# -- the loop ---------------------------------------------------------------------------------------

def train(job: Job, world: World) -> Optional[dict[str, Any]]:
    """Run the whole job on this rank; rank 0 returns the stage metrics, the others None."""
    from gonogo.data.loader import PackedLoader

    config, settings = job.config, job.config.train
    check_world(config, world.world_size)
    set_determinism(settings)
    build_meshes(world, settings.expert_parallel)
    accumulation = gradient_accumulation(settings, world.world_size)
    is_moe = config.model.moe is not None
    model = build_model(config.model, config, world)
    decoder: Any = unwrap(model)  # the Decoder: its MoE aux loss, token counts and router biases
    optimizer = build_optimizer(model, settings, world)
    scheduler = build_scheduler(optimizer, settings)
    loader = PackedLoader(config.data.open_source("train"), settings.seq_len, settings.micro_batch_size,
                          world.rank, world.world_size, config.data.seed)
    checkpoints = CheckpointHook(job, world)
    start_step = checkpoints.resume(model, optimizer, scheduler, loader, restarted=restart_count() > 0)
    telemetry = Telemetry(job, world, accumulation, start_step)
    resilience = Resilience(job, world, checkpoints, start_step)
    dist.barrier()

    held_out = validation_batches(config, world)

    def validate() -> float:
        with resilience.long_phase():
            return evaluate(model, held_out, config, world)

    iterator = iter(loader)
    train_started = time.perf_counter()
    telemetry.start()
    step = start_step
    while step < settings.steps:
        step += 1
        step_started = time.perf_counter()
        if resilience.skips_batch(step):  # it gave a bad loss before a rollback: train on the next one
            for _ in range(accumulation):
                next(iterator)
        step_loss = torch.zeros((), dtype=torch.float64, device=world.device)
        for micro in range(accumulation):
            with resilience.section("data"):
                inputs, targets = (tensor.to(world.device) for tensor in next(iterator))
            with resilience.forward_backward(step), set_gradient_sync(model, config, micro == accumulation - 1):
                with autocast(config, world):
                    logits = model(inputs)
                loss = resilience.loss(step, language_model_loss(logits, targets))
                ((loss + decoder.aux_loss() if is_moe else loss) / accumulation).backward()
            telemetry.add_micro_batch(loss, decoder.moe_token_counts() if is_moe else None)
            step_loss += loss.detach().double()
        with resilience.section("optimizer"):
            reduce_expert_gradients(model, world)
            grad_norm = clip_grad_norm(model, settings.grad_clip, world)
        problem = resilience.check_loss(resilience.agree(step_loss / accumulation))
        if problem is not None:  # the update is dropped; back to the newest good checkpoint if any
            optimizer.zero_grad(set_to_none=True)
            back_to = resilience.roll_back(step, problem,
                                           lambda: checkpoints.roll_back(model, optimizer, scheduler, loader))
            if back_to is None:
                step -= 1  # no checkpoint to go back to: only this update is dropped, its batch skipped
            else:
                step, iterator = back_to, iter(loader)  # the loader's position came back with the checkpoint
            telemetry.window.reset()
            resilience.beat(step)
            continue
        with resilience.section("optimizer"):
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if is_moe:
                decoder.update_router_biases()
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds = time.perf_counter() - step_started
        telemetry.step_done(step_seconds)
        resilience.step_done(step, step_seconds)
        if telemetry.is_log_step(step):
            telemetry.log(step, lr=lr, grad_norm=float(grad_norm), validate=validate)
        if checkpoints.is_due(step, stopping=resilience.budget_stopped):
            with resilience.long_phase():
                saved = checkpoints.save(step, model, optimizer, scheduler, loader,
                                         extra={"loss": telemetry.last_loss, "val_loss": telemetry.last_val},
                                         stopping=resilience.budget_stopped)
            telemetry.checkpoint_blocked(step, checkpoints.blocked_per_save[-1])
            resilience.after_checkpoint(step, saved)
        if resilience.after_step(step):
            break  # the plan's device-hour budget is spent

    resilience.stop()
    train_seconds = time.perf_counter() - train_started
    checkpoints.close()  # an async save still in flight is committed here, before the result
    telemetry.close()
    if world.rank != 0:
        return None
    return {**telemetry.summary(), **resilience.summary(), **checkpoints.summary(),
            "resumed_from_step": start_step, "steps_completed": step, "train_seconds": train_seconds}
