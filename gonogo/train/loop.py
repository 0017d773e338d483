"""The training loop, run by every rank (pretraining; finetune reuses its parts).

One optimizer step = ``accumulation`` micro-batches per rank (global batch / (micro batch ·
ranks)), a gradient clip on the global norm, AdamW, and the warmup + cosine learning rate.
Every ``log_every`` steps the ranks agree on the loss, the step time and the MoE routing, and
rank 0 writes the metrics (see gonogo.train.metrics); every ``val_every`` steps all ranks
evaluate the held-out split; checkpoints go through gonogo.train.checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gonogo.errors import UserError
from gonogo.model.config import ModelConfig
from gonogo.train import fault_injection as faults_module
from gonogo.train import guards
from gonogo.train import telemetry as metrics_module
from gonogo.train import triage as triage_module
from gonogo.train.config import TrainConfig, TrainSettings, check_world, gradient_accumulation
from gonogo.train.memory import MemoryGuard
from gonogo.parallel import (World, autocast, build_meshes, clip_grad_norm, parallelize, reduce_expert_gradients,
                             set_gradient_sync, unwrap)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Job:
    """What the parent hands a worker (the resolved JSON file it writes in the stage directory)."""

    config: TrainConfig
    config_filename: str
    run_dir: Path
    stage: str
    stage_dir: Path
    resume: str = "auto"      # "auto" | "never" | a checkpoint path
    # device hours left to the plan when the stage started, and when (time.time()) it started
    budget_device_hours: Optional[float] = None
    budget_started: Optional[float] = None

    @property
    def result_path(self) -> Path:
        return self.stage_dir / "result.json"

    @property
    def tensorboard_dir(self) -> Path:
        return self.stage_dir / "tb"


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


def tokenizer_meta(data) -> dict:
    """meta.json's tokenizer entries: a model's own tokenizer is named with the directory holding it."""
    if data.tokenizer is None:
        return {}
    directory = Path(data.tokenizer)
    directory = directory.parent if directory.is_file() else directory
    return {"tokenizer": "hf", "tokenizer_dir": str(directory.resolve())}


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Start from a checkpoint's consolidated weights (finetuning); the shapes must match exactly."""
    from safetensors.torch import load_file

    from gonogo.train.checkpoint import WEIGHTS_NAME, resolve_checkpoint
    from gonogo.train.manifest import META_NAME

    directory = resolve_checkpoint(path)
    if not (directory / META_NAME).is_file():  # a Hugging Face directory: its own names and layout
        from gonogo.export.hf import load_hf_dir

        weights = load_hf_dir(directory, device="cpu", dtype=torch.float32)[0].state_dict()
    else:
        weights = load_file(str(directory / WEIGHTS_NAME), device="cpu")
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


def node_pids(world: World) -> list[int]:
    """Process ids of every rank on this rank's machine (for the CPU utilisation)."""
    entries: list[Any] = [None] * world.world_size
    dist.all_gather_object(entries, (socket.gethostname(), os.getpid()))
    host = socket.gethostname()
    return [pid for name, pid in entries if name == host]


# -- the loop ---------------------------------------------------------------------------------------

class _Window:
    """What happened since the last log step, on this rank."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: Any = 0.0
        self.micro_batches = 0
        self.seconds = 0.0
        self.steps = 0
        self.expert_counts: Optional[list[torch.Tensor]] = None

    def add_counts(self, counts: list[torch.Tensor]) -> None:
        if not counts:
            return
        if self.expert_counts is None:
            self.expert_counts = [c.detach().clone().long() for c in counts]
        else:
            for total, layer in zip(self.expert_counts, counts):
                total += layer


def train(job: Job, world: World) -> Optional[dict[str, Any]]:
    """Run the whole job on this rank; rank 0 returns the stage metrics, the others None."""
    from gonogo.data.loader import PackedLoader
    from gonogo.model.flops import flops_per_token, parameter_counts
    from gonogo.train.peak import measured_peak

    config, settings = job.config, job.config.train
    check_world(config, world.world_size)
    set_determinism(settings)
    build_meshes(world, settings.expert_parallel)
    accumulation = gradient_accumulation(settings, world.world_size)
    tokens_per_step = settings.global_batch_size * settings.seq_len
    is_moe = config.model.moe is not None

    model = build_model(config.model, config, world)
    decoder = unwrap(model)
    optimizer = build_optimizer(model, settings, world)
    scheduler = build_scheduler(optimizer, settings)
    data = config.data
    source = data.open_source("train")
    loader = PackedLoader(source, settings.seq_len, settings.micro_batch_size, world.rank,
                          world.world_size, data.seed)

    checkpointer, start_step = None, 0
    restarts = faults_module.restart_count()
    skipped_checkpoints: list[list[str]] = []
    resumed_from: Optional[str] = None
    if settings.checkpoint_async and settings.checkpoint and "gloo" not in world.backend:
        # DCP's async save stages through a CPU process group; NCCL alone cannot carry it
        raise UserError(f"train.checkpoint_async=true needs a CPU (gloo) backend in the process group, and this "
                        f"run uses {world.backend!r} only; set train.checkpoint_async=false")
    if settings.checkpoint:
        from gonogo.train.checkpoint import Checkpointer

        # each training stage of a plan keeps its own checkpoints (pretrain, finetune, drills ...)
        checkpointer = Checkpointer(job.run_dir / "checkpoints" / job.stage, async_mode=settings.checkpoint_async)
        resume = job.resume
        if restarts and guards.has_committed(checkpointer.root):
            # torchrun restarted this attempt: continue from this stage's own newest good checkpoint
            resume = "auto"
        resumed = checkpointer.load_latest(resume, model, optimizer, scheduler, model_config=config.model)
        skipped_checkpoints = [[str(path), reason] for path, reason in resumed.skipped]
        resumed_from = str(resumed.path) if resumed.path is not None else None
        start_step = resumed.step
        if resumed.loader_state is not None:
            loader.load_state_dict(resumed.loader_state)
        if resumed.path is not None:
            log.info("rank %d resumed from %s at step %d", world.rank, resumed.path, start_step)

    writer = metrics_module.MetricsWriter(job.run_dir / "events.jsonl", job.stage, world.rank,
                                          job.tensorboard_dir if world.rank == 0 else None)
    pids = node_pids(world)
    flops = flops_per_token(config.model, settings.seq_len)
    peak = None
    utilization = None
    mlperf = None
    if world.rank == 0:
        peak = measured_peak(world.device.type, settings.precision)
        utilization = metrics_module.make_utilization(world.device.type, world.local_rank, pids)
        if start_step == 0 and not settings.init_from:  # mlperf.log times pretraining only
            mlperf = _open_mlperf(job, world)
    events_path = job.run_dir / "events.jsonl"
    if world.rank == 0:
        guards.record_event(events_path, job.stage, 0, start_step, "attempt_started", restart=restarts,
                            resumed_from=resumed_from, skipped_checkpoints=skipped_checkpoints)
    injector = faults_module.Injector.from_env(rank=world.rank, stage=job.stage, events_path=events_path)
    watchdog = guards.Watchdog(rank=world.rank, stage=job.stage, stage_dir=job.stage_dir, events_path=events_path,
                               timeout_s=settings.watchdog_timeout_s, min_timeout_s=settings.watchdog_min_timeout_s,
                               factor=settings.watchdog_factor, startup_timeout_s=settings.init_timeout_s).start()
    triage = triage_module.install(job.run_dir, job.stage, job.stage_dir, world.rank, world.world_size, watchdog)
    memory_guard = MemoryGuard(world.device.type, settings.memory_cap_GB)
    timer = guards.SectionTimer(world.device.type)
    stragglers = (guards.StragglerDetector(world.world_size, world.device, settings.straggler_threshold)
                  if settings.straggler_every and world.world_size > 1 else None)
    loss_guard = guards.LossGuard(settings.spike_factor)
    rollbacks, skipped_batches, skip_steps = 0, 0, set()
    budget_stopped = False
    blocked_per_save: list[float] = []  # seconds the loop waited in each checkpoint save
    # a fault that corrupts a committed checkpoint needs it committed first, on every rank alike
    fault = faults_module.Fault.from_env()
    commit_before_fault = settings.checkpoint_async and fault is not None and fault.kind == "corrupt-checkpoint"
    dist.barrier()

    history: dict[str, list] = {"utilization_pct": [], "tokens_per_second": [], "mfu": []}
    last_loss: Optional[float] = None
    last_val: Optional[float] = None
    fractions: list[list[float]] = []
    window = _Window()
    iterator = iter(loader)
    held_out = validation_batches(config, world)
    train_started = time.perf_counter()
    if mlperf:
        mlperf.run_start()
        mlperf.block_start(samples_count=0)
    if utilization is not None:
        utilization.sample()  # start the first utilisation window here, not at set-up

    step = start_step
    while step < settings.steps:
        step += 1
        step_started = time.perf_counter()
        if step in skip_steps:
            # the batch that gave a bad loss after a rollback: drop it, train on the next one
            skip_steps.discard(step)
            for _ in range(accumulation):
                next(iterator)
            skipped_batches += 1
        step_loss = torch.zeros((), dtype=torch.float64, device=world.device)
        for micro in range(accumulation):
            with timer.section("data"):
                inputs, targets = next(iterator)
                inputs, targets = inputs.to(world.device), targets.to(world.device)
            with timer.section("forward_backward"):
                with set_gradient_sync(model, config, enabled=micro == accumulation - 1):
                    with autocast(config, world):
                        logits = model(inputs)
                    loss = injector.loss(step, language_model_loss(logits, targets))
                    total = loss + decoder.aux_loss() if is_moe else loss
                    (total / accumulation).backward()
            with timer.section("forward_backward"):
                injector.slow_down(step, timer.last_seconds)
            window.loss_sum += loss.detach()  # a tensor: no device sync per micro-batch
            window.micro_batches += 1
            step_loss += loss.detach().double()
            if is_moe:
                window.add_counts(decoder.moe_token_counts())
        with timer.section("optimizer"):
            reduce_expert_gradients(model, world)
            grad_norm = clip_grad_norm(model, settings.grad_clip, world)
        # one small all_reduce: every rank sees the same step loss and the same budget decision
        over_budget = world.rank == 0 and guards.budget_spent(job.budget_started, world.world_size,
                                                              job.budget_device_hours)
        agreed = torch.stack([step_loss / accumulation,
                              torch.tensor(float(over_budget), dtype=torch.float64, device=world.device)])
        dist.all_reduce(agreed)
        problem = loss_guard.check(float(agreed[0]) / world.world_size)
        if problem is not None:
            optimizer.zero_grad(set_to_none=True)
            rollbacks += 1
            if rollbacks > settings.max_rollbacks:
                raise RuntimeError(f"step {step}: {problem}, after {settings.max_rollbacks} rollbacks already "
                                   f"(train.max_rollbacks); the run is not recovering: check the data and the "
                                   f"learning rate")
            with watchdog.long_phase():
                back_to = guards.roll_back(checkpointer, model, optimizer, scheduler, loader, config)
            if world.rank == 0:
                guards.record_event(events_path, job.stage, 0, step, "loss_guard", reason=problem,
                                    rolled_back_to=back_to, rollback=rollbacks)
            log.warning("step %d: %s; rolled back to step %s, the batch is skipped", step, problem,
                        back_to if back_to is not None else "(none: update dropped)")
            if back_to is None:
                step -= 1  # no checkpoint to go back to: this step's update is dropped, its batch skipped
                skipped_batches += 1
            else:
                skip_steps.add(step)
                step = back_to
                iterator = iter(loader)
            window.reset()
            watchdog.beat(step)
            continue
        budget_stopped = bool(agreed[1] > 0)
        with timer.section("optimizer"):
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if is_moe:
                decoder.update_router_biases()
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        timer.steps += 1
        window.seconds += time.perf_counter() - step_started
        window.steps += 1
        watchdog.beat(step, time.perf_counter() - step_started)
        memory_guard.check(step)  # the CPU cap (train.memory_cap_GB): over it, this rank stops as on an OOM

        if stragglers is not None and step % settings.straggler_every == 0:
            report = stragglers.gather(timer)
            if world.rank == 0:
                guards.record_event(events_path, job.stage, 0, step, "straggler_scores",
                                    relative=report["relative"], individual=report["individual"],
                                    straggler_ranks=report["straggler_ranks"],
                                    slow_sections={str(k): v for k, v in report["slow_sections"].items()},
                                    warmup=bool(report.get("warmup")))
                if report["straggler_ranks"] and not report.get("warmup"):
                    log.warning("step %d: straggler rank(s) %s (sections %s)", step, report["straggler_ranks"],
                                report["slow_sections"])

        validate = step == settings.steps or (settings.val_every and step % settings.val_every == 0)
        if step % settings.log_every == 0 or validate:
            record = _log_window(window, world, accumulation, tokens_per_step, flops, peak, utilization,
                                 settings)
            record.update(lr=lr, grad_norm=float(grad_norm))
            last_loss = record["loss"]
            if "expert_fractions" in record:
                fractions = record["expert_fractions"]
            if validate:
                if mlperf:
                    mlperf.block_stop(samples_count=step * settings.global_batch_size)
                eval_started_ms = int(time.time() * 1000)
                with watchdog.long_phase():
                    last_val = evaluate(model, held_out, config, world)
                record["val_loss"] = last_val
                if mlperf:
                    reached = mlperf.eval(step * settings.global_batch_size, last_val, eval_started_ms)
                    if not reached and step < settings.steps:
                        mlperf.block_start(samples_count=step * settings.global_batch_size)
            if world.rank != 0:
                writer.write(step, step_time_s_rank=record["step_time_s_rank"],
                             tokens_per_second_rank=record["tokens_per_second_rank"])
            else:
                for key in history:
                    if record.get(key) is not None:
                        history[key].append(record[key])
                writer.write(step, **record)
                metrics_module.print_progress(step=step, steps=settings.steps, loss=record["loss"],
                                              val_loss=record.get("val_loss"),
                                              tokens_per_second=record["tokens_per_second"])
            window.reset()

        if checkpointer is not None and (step == settings.steps or budget_stopped or (
                settings.checkpoint_every and step % settings.checkpoint_every == 0)):
            save_started = time.perf_counter()
            with watchdog.long_phase():
                # an async save first waits for the previous one to commit: that wait is blocked time too
                saved = checkpointer.save(step, model, optimizer, scheduler, loader.state_dict(),
                                          extra={"loss": last_loss, "val_loss": last_val}, model_config=config.model,
                                          meta={"train": config.train.model_dump(), "data": config.data.model_dump(),
                                                **tokenizer_meta(config.data)})
            blocked = time.perf_counter() - save_started
            blocked_per_save.append(blocked)
            if world.rank == 0:
                guards.record_event(events_path, job.stage, 0, step, "checkpoint_saved", checkpoint=str(saved),
                                    blocked_s=blocked, asynchronous=settings.checkpoint_async,
                                    committed_on_return=not settings.checkpoint_async)
                writer.write(step, checkpoint_blocked_s=blocked)
            if commit_before_fault:
                checkpointer.wait()
            injector.after_checkpoint(step, saved)
        injector.after_step(step)
        if budget_stopped:
            log.warning("step %d: the plan's device-hour budget is spent; stopping after a checkpoint", step)
            if world.rank == 0:
                guards.record_event(events_path, job.stage, 0, step, "budget_stopped",
                                    budget_device_hours=job.budget_device_hours)
            break

    watchdog.stop()
    timer.close()
    triage.stop()
    train_seconds = time.perf_counter() - train_started
    final_wait = None
    if checkpointer is not None:
        wait_started = time.perf_counter()
        checkpointer.close()  # an async save still in flight is committed here, before the result
        final_wait = time.perf_counter() - wait_started
    peak_memory = torch.tensor([metrics_module.peak_memory_bytes(world.device.type)], device=world.device)
    dist.all_reduce(peak_memory, op=dist.ReduceOp.MAX)
    writer.write(settings.steps, peak_memory_bytes_rank=metrics_module.peak_memory_bytes(world.device.type))
    writer.close()
    if world.rank != 0:
        return None

    time_to_target = None
    if mlperf:
        mlperf.stop("aborted", settings.steps * settings.global_batch_size)  # no-op when it succeeded
        time_to_target = mlperf.time_to_target_s
        mlperf.close()
    steady = history["tokens_per_second"][1:] or history["tokens_per_second"]
    steady_mfu = history["mfu"][1:] or history["mfu"]
    steady_util = history["utilization_pct"][1:] or history["utilization_pct"]
    result: dict[str, Any] = {
        "final_loss": last_loss,
        "val_loss": last_val,
        "tokens_per_second": statistics.median(steady) if steady else None,
        "tokens_per_second_per_rank": statistics.median(steady) / world.world_size if steady else None,
        "mfu": statistics.median(steady_mfu) if steady_mfu else None,
        "peak_memory_bytes": int(peak_memory.item()),
        "utilization_pct": statistics.median(steady_util) if steady_util else None,
        "time_to_target_s": time_to_target,
        # unknown without a target, or in a resumed attempt (mlperf.log times pretraining from step 0)
        "reached_target": (time_to_target is not None) if mlperf and settings.target_val_loss is not None else None,
        "target_val_loss": settings.target_val_loss,
        "steps": settings.steps,
        "resumed_from_step": start_step,
        "resumed_from": resumed_from,
        "skipped_checkpoints": skipped_checkpoints,
        "restarts": restarts,
        "hang_detections": guards.count_events(events_path, job.stage, "hang_detected"),
        "watchdog_timeout_s": watchdog.timeout_s(),
        "rollbacks": rollbacks,
        "skipped_batches": skipped_batches,
        "budget_stopped": budget_stopped,
        "steps_completed": step,
        "straggler_ranks": sorted(stragglers.straggler_ranks) if stragglers else [],
        "min_relative_score": stragglers.min_relative_score if stragglers else None,
        "straggler_reports": stragglers.reports[-3:] if stragglers else [],
        "train_seconds": train_seconds,
        "checkpoint_async": settings.checkpoint_async,
        "checkpoint_saves": len(blocked_per_save),
        # seconds the loop was blocked per save (staging only, when async); absent without saves
        "checkpoint_blocked_s_mean": statistics.mean(blocked_per_save) if blocked_per_save else None,
        "checkpoint_blocked_s_max": max(blocked_per_save) if blocked_per_save else None,
        "checkpoint_final_wait_s": final_wait if blocked_per_save else None,
        "world_size": world.world_size,
        "device": world.device.type,
        "precision": settings.precision,
        "parallel": settings.parallel,
        "expert_parallel": settings.expert_parallel,
        "flops_per_token": flops,
        "peak_flops": peak["flops"] if peak else None,
        "peak_source": peak["source"] if peak else None,
        "parameters": parameter_counts(config.model)["total"],
        "active_parameters": parameter_counts(config.model)["active"],
    }
    if is_moe:
        result["moe_load_imbalance"] = metrics_module.load_imbalance(fractions)
        result["expert_fractions"] = fractions
    return result


def _log_window(window: _Window, world: World, accumulation: int, tokens_per_step: int, flops: float,
                peak: Optional[dict], utilization, settings: TrainSettings) -> dict[str, Any]:
    """Agree over the ranks on the window's loss and timing; the metrics of one log line."""
    sums = torch.tensor([float(window.loss_sum) / max(1, window.micro_batches)], dtype=torch.float64,
                        device=world.device)
    dist.all_reduce(sums)
    slowest = torch.tensor([window.seconds], dtype=torch.float64, device=world.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    step_time = window.seconds / max(1, window.steps)
    tokens_rank = settings.micro_batch_size * accumulation * settings.seq_len / step_time
    # the global rate is set by the slowest rank: every step waits for it
    tokens_global = tokens_per_step * window.steps / float(slowest.item())
    record: dict[str, Any] = {"loss": float(sums.item()) / world.world_size,
                              "tokens_per_second": tokens_global,
                              "step_time_s": float(slowest.item()) / max(1, window.steps)}
    if window.expert_counts is not None:
        counts = [c.to(world.device) for c in window.expert_counts]
        for layer in counts:
            dist.all_reduce(layer)
        fractions = metrics_module.expert_fractions(counts)
        record["expert_fractions"] = fractions
        record["moe_load_imbalance"] = metrics_module.load_imbalance(fractions)
    # every rank's own line: its step time and tokens/s (stragglers show here)
    record["step_time_s_rank"] = step_time
    record["tokens_per_second_rank"] = tokens_rank
    if world.rank != 0:
        return record
    if peak:
        devices = world.world_size if world.device.type == "cuda" else world.nodes
        record["mfu"] = tokens_global * flops / (peak["flops"] * devices)
    if utilization is not None:
        record["utilization_pct"] = utilization.sample()
    record["peak_memory_bytes"] = metrics_module.peak_memory_bytes(world.device.type)
    return record


def _open_mlperf(job: Job, world: World):
    from gonogo.train.mlperf import MlperfLog
    from gonogo.train.peak import device_name

    settings = job.config.train
    eval_samples = settings.val_batches * settings.micro_batch_size * world.world_size
    return MlperfLog(job.run_dir / "mlperf.log", platform=f"{world.world_size}x {device_name(world.device.type)}",
                     config_filename=job.config_filename, precision=settings.precision,
                     expert_parallelism=settings.expert_parallel, micro_batch_size=settings.micro_batch_size,
                     global_batch_size=settings.global_batch_size, seq_len=settings.seq_len,
                     train_samples=settings.steps * settings.global_batch_size, eval_samples=eval_samples,
                     target=settings.target_val_loss,
                     params={"opt_base_learning_rate": settings.lr, "opt_learning_rate_warmup_steps": settings.warmup_steps,
                             "gradient_accumulation_steps": gradient_accumulation(settings, world.world_size)})
