"""The capacity planner: memory per GPU, step time, time-to-train and cost of a training run.

Everything here is arithmetic on a model shape (``ModelConfig``), a GPU kind (``GPUSpec``) and a
parallel layout; nothing is run. The formulas, and every assumption, are written out in
docs/capacity.md; the short version:

- memory per GPU, by term, for the worst pipeline stage: parameters, gradients and optimizer
  states (mixed precision with AdamW; sharded per ``sharding``), FSDP's gathered-layer buffers,
  activations (Korthikanti et al. 2022, with and without recomputation), the last stage's
  logits, and MoE dispatch buffers; ``fits`` compares the total with HBM minus a reserve.
- step time, by term: compute = FLOPs / (peak x assumed MFU), plus an alpha-beta cost of every
  collective on the link it runs on (NVLink inside a domain, the NIC outside), minus what is
  assumed to overlap with compute, plus the pipeline bubble.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

from pydantic import Field

from gonogo.capacity.hardware import GPUSpec, get_gpu
from gonogo.errors import UserError
from gonogo.model.shape import ModelConfig, MoEConfig
from gonogo.model.flops import attention_flops_per_token, flops_per_token, layer_counts, parameter_counts
from gonogo.typed_config import Strict, load_toml, resolve_preset, validate

GB = 1e9
# Assumed MFU of the compute term when none is given: large bf16 GEMMs reach 60-70% of an H100's
# dense peak and the rest of a layer (norms, activations, attention) pulls that down; FP8 and FP4
# kernels reach a smaller share of their (2x, 4x) peaks. Stated in docs/capacity.md.
DEFAULT_MFU = {"bf16": 0.50, "fp8": 0.35, "nvfp4": 0.25}
# A datasheet link reaches about this share of its rate in NCCL's bus bandwidth.
LINK_EFFICIENCY = 0.80
# Dropless MoE routing is never perfectly balanced; dispatch buffers are sized for this excess.
DROPLESS_IMBALANCE = 1.25
# Chinchilla's compute-optimal tokens per (active) parameter, the default training length.
TOKENS_PER_PARAMETER = 20


class CapacitySettings(Strict):
    """One configuration to estimate (the flags of ``gonogo capacity``)."""

    model: str                                   # preset word (llama3-405b) or a TOML path
    gpu: str                                     # key of hardware.toml, or "this-machine" in a plan
    gpus: int = Field(ge=1)
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    cp: int = Field(default=1, ge=1)
    ep: int = Field(default=1, ge=1)
    dp: Optional[int] = Field(default=None, ge=1)         # default: gpus / (tp * pp * cp)
    virtual_stages: int = Field(default=1, ge=1)          # interleaved pipeline chunks per GPU
    precision: Literal["bf16", "fp8", "nvfp4"] = "bf16"
    global_batch: Optional[int] = Field(default=None, ge=1)  # sequences per optimizer step
    micro_batch: int = Field(default=1, ge=1)             # sequences per forward on one pipeline
    seq: Optional[int] = Field(default=None, ge=1)        # default: the model's max_seq_len
    tokens: Optional[float] = Field(default=None, gt=0)   # tokens to train on; default 20 x active params
    price_per_gpu_hour: Optional[float] = Field(default=None, ge=0)  # default: the table's assumed price
    mfu: Optional[float] = Field(default=None, gt=0, le=1)  # assumed MFU of the compute term
    activation_checkpointing: Literal["none", "selective", "full"] = "selective"
    sharding: Literal["fsdp", "zero1", "none"] = "fsdp"
    overlap: Literal["dp", "none", "all"] = "dp"
    memory_reserve: float = Field(default=0.10, ge=0, lt=1)  # HBM kept for CUDA/NCCL/fragmentation
    label: Optional[str] = None


def load_model(name_or_path: str) -> ModelConfig:
    path = resolve_preset(name_or_path)
    data = load_toml(path)
    if "model" not in data:
        raise UserError(f"{path}: no [model] table; the capacity planner needs a model shape")
    return validate(ModelConfig, data["model"], f"{path} [model]")


@dataclass(frozen=True)
class Layout:
    """The parallel layout after defaults, checked against the model and the GPU count."""

    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    micro_batch: int
    global_batch: int
    micro_batches: int                           # per pipeline per step (gradient accumulation)
    virtual_stages: int
    seq: int


def resolve_layout(settings: CapacitySettings, model: ModelConfig) -> Layout:
    """Fill in dp, seq and global batch; every impossible combination is one UserError line."""
    s = settings
    tp, pp, cp, ep = s.tp, s.pp, s.cp, s.ep
    if model.n_heads % tp:
        raise UserError(f"tp={tp} does not divide the model's n_heads={model.n_heads}; choose a tp that does")
    if model.n_kv_heads % tp and tp % model.n_kv_heads:
        raise UserError(f"tp={tp} and n_kv_heads={model.n_kv_heads}: one must divide the other")
    if pp > model.n_layers:
        raise UserError(f"pp={pp} exceeds the model's n_layers={model.n_layers}")
    if s.virtual_stages > 1 and pp * s.virtual_stages > model.n_layers:
        raise UserError(f"pp*virtual_stages={pp * s.virtual_stages} exceeds n_layers={model.n_layers}")
    model_parallel = tp * pp * cp
    if s.dp is None:
        if s.gpus % model_parallel:
            raise UserError(f"tp*pp*cp={model_parallel} does not divide --gpus {s.gpus}; "
                            f"choose a GPU count that is a multiple of it")
        dp = s.gpus // model_parallel
    else:
        dp = s.dp
        if model_parallel * dp != s.gpus:
            raise UserError(f"tp*pp*cp*dp = {model_parallel * dp} but --gpus is {s.gpus}; "
                            f"they must be equal (or leave --dp out)")
    if ep > 1:
        if model.moe is None:
            raise UserError(f"ep={ep} needs an MoE model; {s.model} is dense (use ep=1)")
        if _moe(model).n_experts % ep:
            raise UserError(f"ep={ep} does not divide n_experts={_moe(model).n_experts}")
        if (dp * cp) % ep:
            raise UserError(f"ep={ep} must divide dp*cp={dp * cp} (experts are spread over data-parallel ranks)")
    seq = s.seq or model.max_seq_len
    if seq % cp:
        raise UserError(f"cp={cp} does not divide the sequence length {seq}")
    micro_batch = s.micro_batch
    if s.global_batch is None:
        # enough micro-batches to keep a pipeline's bubble near a fifth of the step
        global_batch = dp * micro_batch * (1 if pp == 1 else 4 * pp)
    else:
        global_batch = s.global_batch
        if global_batch % (dp * micro_batch):
            raise UserError(f"global batch {global_batch} is not a multiple of dp*micro_batch="
                            f"{dp * micro_batch}")
    return Layout(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp, micro_batch=micro_batch,
                  global_batch=global_batch, micro_batches=global_batch // (dp * micro_batch),
                  virtual_stages=s.virtual_stages, seq=seq)


# -- memory ---------------------------------------------------------------------------------

def _moe(model: ModelConfig) -> MoEConfig:
    """The expert settings of a model that has MoE layers (callers check ``is_moe_layer`` first)."""
    assert model.moe is not None, "an MoE term asked of a dense model"
    return model.moe


def stage_layers(n_layers: int, pp: int) -> list[range]:
    """Layers of each pipeline stage, as even as possible (the first stages take the extra)."""
    base, extra = divmod(n_layers, pp)
    stages, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        stages.append(range(start, start + size))
        start += size
    return stages


def _local_layer_params(model: ModelConfig, layer: int, tp: int, ep: int) -> tuple[float, float]:
    """(dense, routed-expert) parameters of one block held by one GPU under TP and EP."""
    counts = layer_counts(model, layer)
    replicated = counts["norms"] + (model.d_model * _moe(model).n_experts if model.is_moe_layer(layer) else 0)
    split = counts["total"] - counts["routed_experts"] - replicated  # attention, dense/shared MLP
    return replicated + split / tp, counts["routed_experts"] / (ep * tp)


def layer_activation_bytes(model: ModelConfig, layer: int, tokens: float, seq: int, tp: int,
                           keep_scores: bool) -> float:
    """Stored activations of one block for ``tokens`` tokens (= s*b), 16-bit, per GPU.

    Korthikanti et al. (2022), eq. 2 with sequence parallelism (everything / tp): per layer
    ``s*b*h*(34 + 5*a*s/h)`` bytes for a GPT block with a 4h GELU MLP and dropout. Written term
    by term for these models (no dropout, GQA, SwiGLU or MoE):
      attention  s*b*(6h + 4*kv_dim)  inputs of the QKV and output projections, Q, K, V
      scores     2*a*s^2*b            softmax output; dropped by selective recomputation
      norms      4*s*b*h              inputs of the two RMSNorms
      dense MLP  s*b*(2h + 8f)        input, w1 and w3 outputs, SiLU output, their product
      MoE MLP    s*b*(2h + k*(4h + 8f_e) + n_shared*8f_e)  + each routed copy's input and output
    """
    h = model.d_model
    kv_dim = model.n_kv_heads * model.head_dim
    attention = tokens * (6 * h + 4 * kv_dim)
    scores = 2 * model.n_heads * seq * tokens if keep_scores else 0.0
    norms = 4 * tokens * h
    if model.is_moe_layer(layer):
        moe = _moe(model)
        mlp = tokens * (2 * h + moe.top_k * (4 * h + 8 * moe.expert_ffn_dim)
                        + moe.n_shared_experts * 8 * moe.expert_ffn_dim)
    else:
        mlp = tokens * (2 * h + 8 * model.ffn_dim)
    return (attention + scores + norms + mlp) / tp


@dataclass
class StageMemory:
    """One pipeline stage on one GPU: bytes by term, and what its communication depends on."""

    terms: dict[str, float]       # bytes by term, with "total"
    dense_params: float           # parameters held after the TP split (before sharding)
    expert_params: float          # routed-expert parameters held after the EP and TP split
    layers: int
    moe_layers: int


def memory_per_stage(model: ModelConfig, layout: Layout, settings: CapacitySettings) -> list[StageMemory]:
    """Bytes per GPU by term, for every pipeline stage."""
    tp, ep, pp = layout.tp, layout.ep, layout.pp
    dense_shards = layout.dp * layout.cp             # FSDP / distributed optimizer group
    expert_shards = dense_shards // ep               # the rest of it once experts are spread over ep
    seq_local = layout.seq // layout.cp
    tokens = seq_local * layout.micro_batch          # s*b of one micro-batch on one GPU (before /tp)
    ac = settings.activation_checkpointing
    head = model.vocab_size * model.d_model / tp      # vocab-parallel embedding / output head

    stages = []
    for index, layers in enumerate(stage_layers(model.n_layers, pp)):
        first, last = index == 0, index == pp - 1
        dense = expert = 0.0
        largest_unit = 0.0                            # FSDP gathers one block (unit) at a time
        for layer in layers:
            layer_dense, layer_expert = _local_layer_params(model, layer, tp, ep)
            dense += layer_dense
            expert += layer_expert
            largest_unit = max(largest_unit, layer_dense + layer_expert)
        if first:
            dense += head
        if last:
            dense += model.d_model + (head if (not model.tie_embeddings or pp > 1) else 0.0)
        if first or last:
            largest_unit = max(largest_unit, head)
        local = dense + expert
        sharded = dense / dense_shards + expert / expert_shards

        terms: dict[str, float] = {}
        if settings.sharding == "fsdp":
            # fp32 sharded master parameters, fp32 sharded gradients, AdamW m and v
            terms["parameters"] = 4 * sharded
            terms["gradients"] = 4 * sharded
            terms["optimizer_states"] = 8 * sharded
            # two gathered bf16 blocks (the current one and the prefetched one), plus one block's
            # bf16 gradients and their fp32 copy waiting for the reduce-scatter
            terms["fsdp_buffers"] = largest_unit * (2 * 2 + 2 + 4)
        else:
            # bf16 working weights and fp32 gradient buffers in full; fp32 master + m + v
            # (12 bytes) in full (none) or sharded over data parallel (zero1)
            terms["parameters"] = 2 * local
            terms["gradients"] = 4 * local
            terms["optimizer_states"] = 12 * (sharded if settings.sharding == "zero1" else local)
            terms["fsdp_buffers"] = 0.0

        # 1F1B: stage i holds the activations of min(m, pp - i) micro-batches at its peak
        in_flight = min(layout.micro_batches, pp - index)
        per_layer = [layer_activation_bytes(model, layer, tokens, seq_local, tp, keep_scores=(ac == "none"))
                     for layer in layers]
        if ac == "full":
            # only each block's input is kept; one block's full set is rebuilt at a time
            stored = len(per_layer) * 2 * tokens * model.d_model / tp
            working = max((layer_activation_bytes(model, layer, tokens, seq_local, tp, keep_scores=False)
                           for layer in layers), default=0.0)
            terms["activations"] = in_flight * stored + working
        else:
            terms["activations"] = in_flight * sum(per_layer)
        # bf16 logits plus the fp32 softmax of the loss, one micro-batch
        terms["logits"] = tokens * model.vocab_size / tp * (2 + 4) if last else 0.0
        moe_layers = [layer for layer in layers if model.is_moe_layer(layer)]
        if moe_layers and ep > 1:
            factor = _moe(model).capacity_factor or DROPLESS_IMBALANCE
            # send and receive buffers of one layer's all-to-all, bf16 token copies
            terms["moe_dispatch"] = 2 * (tokens / tp) * _moe(model).top_k * model.d_model * 2 * factor
        else:
            terms["moe_dispatch"] = 0.0
        terms["total"] = sum(terms.values())
        stages.append(StageMemory(terms, dense, expert, len(layers), len(moe_layers)))
    return stages


# -- communication (alpha-beta, ring algorithms) ----------------------------------------------

@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float        # bytes/s per GPU per direction, achievable
    latency: float          # seconds per ring step


def link_for(gpu: GPUSpec, span: int) -> Link:
    """A group spanning ``span`` consecutive GPUs stays on NVLink if the domain holds it."""
    efficiency = 1.0 if gpu.measured_links else LINK_EFFICIENCY
    if span <= gpu.nvlink_domain:
        return Link("nvlink", gpu.nvlink_GBps * GB * efficiency, gpu.nvlink_latency_us * 1e-6)
    return Link("network", gpu.network_GBps * GB * efficiency, gpu.network_latency_us * 1e-6)


def collective_seconds(op: str, size_bytes: float, ranks: int, link: Link) -> float:
    """Ring-algorithm time of one collective (the bus-bandwidth factors of nccl-tests).

    all_reduce: 2(n-1) steps, 2(n-1)/n * S on the wire; all_gather / reduce_scatter (S = the
    full, gathered size) and all_to_all (S = what one rank sends in total): n-1 steps,
    (n-1)/n * S; send/recv: one step, S.
    """
    if ranks <= 1 or size_bytes <= 0:
        return 0.0
    n = ranks
    if op == "all_reduce":
        return 2 * (n - 1) * link.latency + 2 * (n - 1) / n * size_bytes / link.bandwidth
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) * link.latency + (n - 1) / n * size_bytes / link.bandwidth
    if op == "send_recv":
        return link.latency + size_bytes / link.bandwidth
    raise AssertionError(f"unknown collective {op}")


# -- step time ------------------------------------------------------------------------------

def compute_seconds(model: ModelConfig, layout: Layout, settings: CapacitySettings, gpu: GPUSpec,
                    assumed_mfu: float) -> float:
    """FLOPs executed per step (recomputation included) over the GPUs' peak at the assumed MFU;
    with fp8/nvfp4 only the linear layers run at the low-precision peak, attention stays bf16."""
    T = layout.seq
    attention = attention_flops_per_token(model, T)
    matmul = flops_per_token(model, T) - attention
    head = 6 * model.vocab_size * model.d_model
    if settings.activation_checkpointing == "full":     # every block's forward runs twice
        matmul += (matmul - head) / 3
        attention += attention / 3
    elif settings.activation_checkpointing == "selective":  # the attention core's forward runs twice
        attention += attention / 3
    peak_matmul = gpu.peak_flops(settings.precision)
    peak_attention = gpu.peak_tflops.get("bf16", gpu.peak_tflops[settings.precision]) * 1e12
    tokens_per_step = layout.global_batch * T
    return tokens_per_step * (matmul / peak_matmul + attention / peak_attention) / (settings.gpus * assumed_mfu)


def communication_seconds(model: ModelConfig, layout: Layout, settings: CapacitySettings, gpu: GPUSpec,
                          stages: list[StageMemory]) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds per step of each parallelism's collectives on one GPU of the busiest stage, and
    the link each runs on."""
    tp, pp, cp, ep, dp = layout.tp, layout.pp, layout.cp, layout.ep, layout.dp
    m, virtual = layout.micro_batches, layout.virtual_stages
    layers = max(stage.layers for stage in stages)
    moe_layers = max(stage.moe_layers for stage in stages)
    tokens = layout.seq // cp * layout.micro_batch        # s*b of one micro-batch
    hidden_bytes = tokens * model.d_model * 2              # its hidden states, bf16
    recompute = 1 if settings.activation_checkpointing == "full" else 0
    links = {"tensor_parallel": link_for(gpu, tp), "expert_parallel": link_for(gpu, tp * ep),
             "context_parallel": link_for(gpu, tp * cp), "data_parallel": link_for(gpu, settings.gpus // pp),
             "pipeline_p2p": link_for(gpu, settings.gpus)}

    # TP with sequence parallelism: per block 2 all-gathers + 2 reduce-scatters forward and the
    # same backward (= 4 all-reduces), 2 more when a full recomputation reruns the forward
    t_tp = m * layers * (4 + 2 * recompute) * collective_seconds(
        "all_reduce", hidden_bytes, tp, links["tensor_parallel"])
    # EP: dispatch and combine, forward and backward (and forward again when recomputing)
    t_ep = 0.0
    if ep > 1:
        dispatch_bytes = tokens / tp * _moe(model).top_k * model.d_model * 2
        t_ep = m * moe_layers * (4 + 2 * recompute) * collective_seconds(
            "all_to_all", dispatch_bytes, ep, links["expert_parallel"])
    # CP (ring attention): K and V chunks go round the ring forward; K, V and their gradients backward
    kv_chunk = 2 * tokens * max(model.n_kv_heads // tp, 1) * model.head_dim * 2
    t_cp = m * layers * (cp - 1) * (3 + recompute) * collective_seconds(
        "send_recv", kv_chunk, cp, links["context_parallel"])
    # data parallel, on the stage with the most parameters per GPU
    busiest = max(stages, key=lambda stage: stage.dense_params + stage.expert_params)

    def data_parallel(op: str, bytes_per_param: float) -> float:
        link = links["data_parallel"]
        return (collective_seconds(op, busiest.dense_params * bytes_per_param, dp * cp, link)
                + collective_seconds(op, busiest.expert_params * bytes_per_param, dp * cp // ep, link))

    if settings.sharding == "fsdp":
        # FSDP2 defaults: gather bf16 weights for the forward and again for the backward, and
        # reduce-scatter fp32 gradients, for every micro-batch
        t_dp = m * (2 * data_parallel("all_gather", 2) + data_parallel("reduce_scatter", 4))
    elif settings.sharding == "zero1":
        # gradients accumulate locally; once per step reduce-scatter them, all-gather new weights
        t_dp = data_parallel("reduce_scatter", 4) + data_parallel("all_gather", 2)
    else:
        t_dp = data_parallel("all_reduce", 4)
    # PP: each micro-batch's activations forward and their gradients backward, per virtual stage
    t_pp = m * virtual * 2 * collective_seconds("send_recv", hidden_bytes / tp, 2, links["pipeline_p2p"]) \
        if pp > 1 else 0.0
    raw = {"tensor_parallel": t_tp, "expert_parallel": t_ep, "context_parallel": t_cp,
           "data_parallel": t_dp, "pipeline_p2p": t_pp}
    return raw, {key: link.name for key, link in links.items()}


def step_terms(compute: float, raw: dict[str, float], layout: Layout, overlap: str, layers: int) -> dict[str, float]:
    """The exposed part of every term; they add up to the step time (see docs/capacity.md)."""
    bubble_share = (layout.pp - 1) / (layout.virtual_stages * layout.micro_batches)
    if overlap == "all":
        # everything overlaps: only communication beyond compute and bubble shows, in proportion
        bubble = bubble_share * compute
        total_comm = sum(raw.values())
        share = max(0.0, total_comm - compute - bubble) / total_comm if total_comm else 0.0
        exposed = {key: value * share for key, value in raw.items()}
    else:
        exposed = dict(raw)
        if overlap == "dp":
            # FSDP/ZeRO gathers and reductions are prefetched behind compute, but one block's share
            # is always exposed; ring attention overlaps its sends with attention; TP, EP and
            # pipeline sends sit on the critical path
            t_dp, t_cp = raw["data_parallel"], raw["context_parallel"]
            exposed["data_parallel"] = min(t_dp, max(0.0, t_dp - compute) + t_dp / (layers + 1))
            exposed["context_parallel"] = max(0.0, t_cp - compute)
        # the bubble idles for (pp-1)/v micro-batch slots of compute and critical-path communication
        bubble = bubble_share * (compute + exposed["tensor_parallel"] + exposed["expert_parallel"])
    step = {"compute": compute, **exposed, "pipeline_bubble": bubble}
    step["total"] = sum(step.values())
    return step


# -- the estimate ---------------------------------------------------------------------------

def estimate(settings: CapacitySettings, *, model: Optional[ModelConfig] = None,
             gpu: Optional[GPUSpec] = None) -> dict[str, Any]:
    """The full estimate of one configuration, as a JSON-ready dict (see docs/capacity.md)."""
    model = model or load_model(settings.model)
    gpu = gpu or get_gpu(settings.gpu)
    layout = resolve_layout(settings, model)
    precision = settings.precision
    peak_matmul = gpu.peak_flops(precision)
    assumed_mfu = settings.mfu if settings.mfu is not None else DEFAULT_MFU[precision]
    N = settings.gpus
    counts = parameter_counts(model)

    # memory: the worst stage decides whether the job fits
    stages = memory_per_stage(model, layout, settings)
    worst_index = max(range(len(stages)), key=lambda i: stages[i].terms["total"])
    worst = stages[worst_index].terms
    limit = gpu.hbm_GB * GB * (1 - settings.memory_reserve)
    memory = {key: value / GB for key, value in worst.items()}
    # the same stage's activations under each recomputation mode, to show what checkpointing buys
    activations_by_mode = {
        mode: memory_per_stage(model, layout, settings.model_copy(update={"activation_checkpointing": mode}))
        [worst_index].terms["activations"] / GB
        for mode in ("none", "selective", "full")}

    compute = compute_seconds(model, layout, settings, gpu, assumed_mfu)
    raw, links = communication_seconds(model, layout, settings, gpu, stages)
    step = step_terms(compute, raw, layout, settings.overlap, max(stage.layers for stage in stages))
    tokens_per_step = layout.global_batch * layout.seq
    model_flops_per_token = flops_per_token(model, layout.seq)

    tokens_per_second = tokens_per_step / step["total"]
    mfu = model_flops_per_token * tokens_per_second / (N * peak_matmul)
    tokens = settings.tokens if settings.tokens is not None else TOKENS_PER_PARAMETER * counts["active"]
    train_seconds = tokens / tokens_per_second
    gpu_hours = N * train_seconds / 3600
    price = settings.price_per_gpu_hour if settings.price_per_gpu_hour is not None else gpu.price_usd_per_gpu_hour

    memory_terms = {key: value for key, value in memory.items() if key != "total"}
    time_terms = {key: value for key, value in step.items() if key != "total"}
    return {
        "label": settings.label or f"{settings.model} on {N} {settings.gpu}",
        "model": settings.model,
        "gpu": gpu.name,
        "gpus": N,
        "precision": precision,
        "layout": {**asdict(layout), "sharding": settings.sharding,
                   "activation_checkpointing": settings.activation_checkpointing, "overlap": settings.overlap},
        "parameters": {"total": counts["total"], "active": counts["active"]},
        "flops_per_token": model_flops_per_token,
        "memory_GB": memory,
        "memory_worst_stage": worst_index,
        "activations_by_checkpointing_GB": activations_by_mode,
        "hbm_GB": gpu.hbm_GB,
        "memory_limit_GB": limit / GB,
        "fits": worst["total"] <= limit,
        "step_time_s": step,
        "communication_s": raw,
        "links": links,
        "assumed_mfu": assumed_mfu,
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu,
        "tokens": tokens,
        "time_to_train_days": train_seconds / 86400,
        "gpu_hours": gpu_hours,
        "price_per_gpu_hour": price,
        "cost_usd": gpu_hours * price if price is not None else None,
        "dominant_memory": max(memory_terms, key=lambda term: memory_terms[term]),
        "dominant_time": max(time_terms, key=lambda term: time_terms[term]),
    }


def gate_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics a plan's gates read."""
    metrics = {
        "memory_per_gpu_GB": result["memory_GB"]["total"],
        "fits": result["fits"],
        "step_time_s": result["step_time_s"]["total"],
        "tokens_per_second": result["tokens_per_second"],
        "mfu": result["mfu"],
        "time_to_train_days": result["time_to_train_days"],
        "gpu_hours": result["gpu_hours"],
    }
    if result["cost_usd"] is not None:
        metrics["cost_usd"] = result["cost_usd"]
    return metrics
