"""`plan recommend`: the fastest plan that fits, chosen from the estimate instead of by crashing.

The search (pure functions, no I/O): method (full fine-tune, LoRA, QLoRA) x LoRA rank x strategy
and offload x gradient checkpointing, and for each the largest micro-batch whose predicted
`needed_bytes` fits the GPU less a margin (bisection on the estimate), with the gradient
accumulation that keeps the global batch the user asked for. Plans are ranked by the step-time
model of planner/speed.py.

Preference, most important first: a plan without offload before one with it (offload is the last
resort: slow, and it needs host RAM); with `--method auto`, full fine-tuning before LoRA before
QLoRA (the closer to full training, the better the model, when it fits); then the plan with the
optimizer and loss asked for before one with a memory technique that keeps quality and speed
(8-bit optimizer state, a fused loss: `TECHNIQUES`), searched when a method does not fit without
offload, or always with `--optimizer auto`; then tokens per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .contract import (
    ACTIVATION_OFFLOAD,
    LOSS_CHUNKS,
    PAGED_NOTE,
    UNMEASURED_FUSED,
    Method,
    Optimizer,
    PlanError,
    Settings,
    check_unfrozen,
    world_size,
)
from .distributed import strategy_choices
from .estimate import Estimate, check_seq_len, estimate, technique_costs, validate
from .gpus import GPU
from .margin import UNMEASURED_MARGIN, evidence
from .memory import CUDA_CONTEXT_BYTES, trainable_params
from .spec import ModelSpec, count_params
from .speed import DEFAULT_MFU, StepTime, step_time

METHODS = Method.values()
LORA_RANKS = (32, 16, 8)
"""The field's defaults are rank 16-32 with alpha = 2 x rank on all linear layers (QLoRA paper,
torchtune's and Unsloth's configs); the highest that fits is taken, 8 when memory is short."""
MAX_MICRO = 1024
ADDRESS_SPACE = 9 / 8
"""The caching allocator's expandable segments reserve virtual addresses for 9/8 of the GPU's
memory (ExpandableSegment in c10/cuda/CUDACachingAllocator.cpp: `max_handles_ =
numSegments(prop.totalGlobalMem + prop.totalGlobalMem / 8)`). A plan runs in `needed_bytes` by
returning free pages under pressure, but its blocks' high-water mark must still fit those
addresses: a plan whose allocator high-water mark (device_bytes less the CUDA context) exceeds
them is refused."""


@dataclass(frozen=True)
class Request:
    gpu: GPU
    gpus: int = 1
    nodes: int = 1
    seq_len: int = 2048
    global_batch: int | None = None   # None: the largest micro-batch, no accumulation
    method: str = "auto"
    margin: float | None = None       # None: from the measured device error of each plan's kind (planner/margin.py)
    optimizer: str = "adamw"           # or "auto": adamw, or 8-bit state where that fits better
    optimizer_paged: bool = False
    mfu: float = DEFAULT_MFU
    samples: int = 10_000             # sequences in an epoch, for the time per epoch
    host_ram_bytes: int | None = None  # per node; None: not limited
    lora_targets: str = "all-linear"
    loss: str = "standard"
    loss_chunks: int = LOSS_CHUNKS
    unfrozen_parameters: tuple = ()   # partial freezing: only these train (with LoRA: PEFT's modules_to_save)
    ema: bool = False                 # keep an EMA of the trainable parameters
    lbfgs_history: int = 100          # --optimizer lbfgs's history_size
    attention_mask: bool = False      # the micro-batches carry one (padded or packed rows: plan train's)

    def margin_for(self, st: Settings) -> float:
        """The fraction of GPU memory a plan of these settings keeps free: the one asked for, else
        the evidence's for its kind (a CPU: the unmeasured kind's margin)."""
        if self.margin is not None:
            return self.margin
        return UNMEASURED_MARGIN if self.gpu.cpu else evidence(st).margin

    def budget_for(self, st: Settings) -> int:
        """Bytes a plan of these settings may use per GPU: the GPU's memory less its margin."""
        return int(self.gpu.memory_bytes * (1 - self.margin_for(st)))

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


@dataclass
class Plan:
    settings: Settings
    method: str
    accumulation: int
    estimate: Estimate
    time: StepTime
    largest_micro: int
    samples: int
    notes: list = field(default_factory=list)
    techniques: tuple = ()   # the TECHNIQUES this plan uses beyond what was asked for
    saved: dict = field(default_factory=dict)  # technique -> needed bytes it saves on this plan
    spec: ModelSpec | None = None  # the model planned, for what its explanation counts

    @property
    def global_batch(self) -> int:
        return self.settings.batch_size * self.accumulation * world_size(self.settings)

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch * self.settings.seq_len / self.time.total

    @property
    def epoch_s(self) -> float:
        return math.ceil(self.samples / self.global_batch) * self.time.total

    @property
    def offload(self) -> bool:
        return self.settings.offload != "none"


def check_request(req: Request) -> None:
    """Requests that no plan can satisfy, whatever the model: one line each."""
    if req.optimizer != "auto" and req.optimizer not in Optimizer.values():
        raise PlanError(f"unknown {{optimizer}} '{req.optimizer}'; choose auto or one of "
                        f"{', '.join(Optimizer.values())}", "optimizer")
    if req.method not in ("auto",) + METHODS:
        raise PlanError(f"unknown {{method}} '{req.method}'; choose auto, full, lora or qlora", "method")
    if req.margin is not None and not 0 <= req.margin < 1:
        raise PlanError(f"{{margin}} must be in [0, 1), got {req.margin}", "margin")
    if not 0 < req.mfu <= 1:
        raise PlanError(f"{{mfu}} must be in (0, 1], got {req.mfu}", "mfu")
    for name in ("gpus", "nodes", "seq_len", "samples", "loss_chunks", "lbfgs_history"):
        if getattr(req, name) < 1:
            raise PlanError(f"{{{name}}} must be at least 1, got {getattr(req, name)}", name)
    check_unfrozen(Settings(unfrozen_parameters=tuple(req.unfrozen_parameters)))
    if req.host_ram_bytes is not None and req.host_ram_bytes < 0:
        raise PlanError(f"{{host_ram}} must be at least 0, got {req.host_ram_bytes / 2**30:g} GiB", "host_ram")
    if req.global_batch is not None:
        if req.global_batch < 1:
            raise PlanError(f"{{global_batch}} must be at least 1, got {req.global_batch}", "global_batch")
        if req.global_batch % req.world:
            raise PlanError(f"{{global_batch}} {req.global_batch} is not a multiple of the {req.world} GPUs "
                            "(each GPU takes the same micro-batch)", "global_batch")


def fits(spec: ModelSpec, st: Settings, req: Request) -> Estimate | None:
    """The estimate when the plan fits the budget (and the host RAM, if limited), else None."""
    try:
        est = estimate(spec, st)
    except PlanError:
        return None
    return est if fits_estimate(est, st, req) else None


def fits_estimate(est: Estimate, st: Settings, req: Request) -> bool:
    """Whether an estimate fits the request's GPU: `needed_bytes` within its memory less the
    margin, the allocator's high-water mark within the addresses expandable segments reserve
    (ADDRESS_SPACE), and the host RAM, if limited."""
    if est.needed_bytes > req.budget_for(st):
        return False
    if est.device_bytes - CUDA_CONTEXT_BYTES > ADDRESS_SPACE * req.gpu.memory_bytes:
        return False
    return req.host_ram_bytes is None or est.cpu_bytes <= req.host_ram_bytes


def catalog_fits(est: Estimate, st: Settings) -> list[GPU]:
    """The catalog GPUs (tables/gpus.csv) that compute in the estimate's precision and on which
    it fits as recommend fits a plan (`fits_estimate`, margins from evidence), smallest first:
    `plan estimate`'s "fits on" line. Host RAM is not limited here (the estimate shows it)."""
    from .gpus import catalog
    return sorted((g for g in catalog() if g.computes_in(st.precision)
                   and fits_estimate(est, st, Request(gpu=g, gpus=st.gpus, nodes=st.nodes))),
                  key=lambda g: g.memory_bytes)


def largest_micro(spec: ModelSpec, st: Settings, req: Request, cap: int = MAX_MICRO) -> int:
    """The largest micro-batch (up to `cap`) whose estimate fits: doubling, then bisection.
    Memory grows with the micro-batch, so the first size that does not fit bounds the search."""
    if fits(spec, replace(st, batch_size=1), req) is None:
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(spec, replace(st, batch_size=hi), req) is not None:
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(spec, replace(st, batch_size=mid), req) is not None:
            lo = mid
        else:
            hi = mid
    return lo


def _micro_and_accum(largest: int, req: Request) -> tuple[int, int]:
    """The micro-batch and accumulation for the global batch: the largest divisor of the
    per-GPU batch that fits. Without a global batch: the largest that fits, no accumulation."""
    if req.global_batch is None:
        return largest, 1
    per_gpu = req.global_batch // req.world
    micro = max(d for d in range(1, min(largest, per_gpu) + 1) if per_gpu % d == 0)
    return micro, per_gpu // micro


def _method_settings(method: str, rank: int, req: Request, gpu: GPU) -> Settings:
    """The precision each method trains in, as practitioners run it. Full fine-tuning: mixed
    precision with fp32 master weights (bf16 autocast, fp16 where the GPU has no bf16). LoRA:
    the frozen base loaded in 16 bits (`torch_dtype=bfloat16`), the adapters in fp32 as PEFT
    keeps them (`bf16-pure`; an fp16 base on a GPU without bf16 takes the same bytes). QLoRA:
    the NF4 base, fp32 adapters, autocast."""
    precision = "bf16-amp" if gpu.bf16 or not gpu.fp16_tflops else "fp16-amp"
    if method == "lora":
        precision = "bf16-pure"
    if gpu.cpu:  # a CPU trains in fp32, as plan train's CPU runs do; its own kernels are modelled
        precision = "fp32"
    lora = dict(lora_rank=rank, lora_alpha=2.0 * rank, lora_targets=req.lora_targets) if method != "full" else {}
    optimizer = "adamw" if req.optimizer == "auto" else req.optimizer
    return Settings(precision=precision, optimizer=optimizer, optimizer_paged=req.optimizer_paged, seq_len=req.seq_len,
                    gpus=req.gpus, nodes=req.nodes, quant="nf4" if method == "qlora" else "none", loss=req.loss,
                    loss_chunks=req.loss_chunks, unfrozen_parameters=tuple(req.unfrozen_parameters), ema=req.ema,
                    lbfgs_history=req.lbfgs_history, attention_mask=req.attention_mask, **lora,
                    **({"kernels": "cpu"} if gpu.cpu else {}))


TECHNIQUES = {
    "8-bit optimizer state": {"optimizer": "adamw-8bit", "optimizer_paged": False},
    "fused linear cross-entropy": {"loss": "liger-flce"},
    "activation offload": {ACTIVATION_OFFLOAD: True},
}
"""Memory techniques tried before QLoRA and offload: bitsandbytes' AdamW8bit (for an AdamW
request) and Liger Kernel's fused linear cross-entropy (for the standard loss) keep quality and
speed; activation offloading keeps quality and costs PCIe time (speed.activation_offload_seconds),
which the ranking by speed weighs. Each as the settings it changes."""

TECHNIQUE_WHY = {
    "8-bit optimizer state": "bitsandbytes AdamW8bit: uint8 moments with a per-block absmax",
    "fused linear cross-entropy": f"Liger Kernel: no B x S x vocab logits ({UNMEASURED_FUSED})",
    "activation offload": "TRL's OffloadActivations: saved activations in pinned host RAM, copied over PCIe "
                          "(GPU side unmeasured)",
}
TECHNIQUE_AGAINST = {"8-bit optimizer state": "the optimizer asked for",
                     "fused linear cross-entropy": "the standard loss",
                     "activation offload": "keeping activations on the GPU"}


def technique_sets(req: Request, spec: ModelSpec | None = None) -> list[tuple[str, ...]]:
    """The combinations of TECHNIQUES a request can use, fewest first: 8-bit state only for an
    AdamW request (or auto), a fused loss only when the standard loss was asked for, and, given
    the model, only those its route estimates (none on the derived route, which measures
    transformers' own loss and AdamW; no fused loss for an encoder)."""
    adamw = req.optimizer in ("auto", "adamw", "adamw-fused")
    usable = [t for t in TECHNIQUES if (t != "8-bit optimizer state" or adamw)
              and (t != "fused linear cross-entropy" or req.loss == "standard")
              and (t != "activation offload" or not req.gpu.cpu)
              and (spec is None or _estimable(spec, t, req))]
    keep = [t for t in usable if t != "activation offload"]  # the ones that cost no speed, together
    sets = [(t,) for t in usable] + ([tuple(keep)] if len(keep) > 1 else [])
    return sets + ([tuple(usable)] if len(usable) > len(keep) and len(usable) > 1 else [])


def _estimable(spec: ModelSpec, technique: str, req: Request) -> bool:
    """Whether the estimate takes `technique` on this model (`estimate.validate`): the derived
    route refuses all three, an encoder a fused loss."""
    try:
        validate(spec, with_techniques(_method_settings("full", 0, req, req.gpu), (technique,)))
    except PlanError:
        return False
    return True


def with_techniques(st: Settings, techniques: tuple[str, ...]) -> Settings:
    for t in techniques:
        st = replace(st, **TECHNIQUES[t])
    return st


def _strategies(base: Settings) -> list[tuple[str, str]]:
    """Every strategy and offload the engines offer; on one GPU, sharding has nothing to shard
    over, so only the offloads remain besides plain training."""
    choices = strategy_choices(base)
    if base.kernels == "cpu":  # this machine's CPU, one process: host memory is the device's, nothing to offload to
        return [("ddp", "none")]
    if world_size(base) == 1:
        choices = [(s, o) for s, o in choices if s == "ddp" or o != "none"]
    return choices


def candidates(spec: ModelSpec, req: Request, methods: tuple = METHODS) -> list[Plan]:
    """Every plan that fits: for each method, strategy and offload, and checkpointing, the
    highest LoRA rank that fits and the largest micro-batch, with its step time. A method that
    fits only with offload (or not at all), or any method under `--optimizer auto`, is searched
    again with each set of TECHNIQUES."""
    plans = []
    for method in methods:
        plain = _candidates(spec, req, method, ())
        plans += plain
        if req.optimizer == "auto" or all(p.offload for p in plain):
            for techniques in technique_sets(req, spec):
                plans += _candidates(spec, req, method, techniques)
    return plans


def _candidates(spec: ModelSpec, req: Request, method: str, techniques: tuple[str, ...]) -> list[Plan]:
    plans = []
    ranks = (0,) if method == "full" else LORA_RANKS
    for strategy, offload in _strategies(_method_settings(method, ranks[0], req, req.gpu)):
        for ckpt in (False, True):
            for rank in ranks:
                st = replace(with_techniques(_method_settings(method, rank, req, req.gpu), techniques),
                             strategy=strategy, offload=offload, grad_checkpointing=ckpt)
                largest = largest_micro(spec, st, req)
                if largest:
                    break
            if not largest:
                continue
            micro, accum = _micro_and_accum(largest, req)
            if accum > 1:  # gradients stay alive through the micro-steps: search again with them
                largest = largest_micro(spec, replace(st, accumulation=2), req)
                if not largest:
                    continue
                micro, accum = _micro_and_accum(largest, req)
            st = replace(st, batch_size=micro, accumulation=accum)
            est = fits(spec, st, req)
            plans.append(Plan(settings=st, method=method, accumulation=accum, estimate=est,
                              time=step_time(spec, st, req.gpu, accum, req.mfu), largest_micro=largest,
                              samples=req.samples, techniques=techniques, spec=spec,
                              saved={t: _saved(spec, st, t, req) - est.needed_bytes for t in techniques}))
    return plans


def _saved(spec: ModelSpec, st: Settings, technique: str, req: Request) -> int:
    """The bytes `st` needs (`needed_bytes`, what a plan is fitted by) without `technique`: the
    optimizer and loss asked for instead."""
    base = _method_settings("full", 0, req, req.gpu)
    undo = {k: getattr(base, k) for k in TECHNIQUES[technique]}
    return estimate(spec, replace(st, **undo)).needed_bytes


def rank_plans(plans: list[Plan], req: Request) -> list[Plan]:
    """Best first: no offload before offload; under --method auto, full before LoRA before
    QLoRA (among offload plans, the last resort, speed alone decides); then tokens per second;
    then the larger micro-batch."""
    def key(p: Plan):
        pref = METHODS.index(p.method) if req.method == "auto" and not p.offload else 0
        return (p.offload, pref, len(p.techniques), -p.tokens_per_s, -p.settings.batch_size)
    return sorted(plans, key=key)


def recommend(spec: ModelSpec, req: Request) -> list[Plan]:
    """The plans that fit, best first; empty when none does (see `nearest_fits`)."""
    check_request(req)
    check_seq_len(spec, req.seq_len)
    methods = METHODS if req.method == "auto" else (req.method,)
    if req.gpu.cpu:  # QLoRA's NF4 kernels need CUDA
        methods = tuple(m for m in methods if m != "qlora")
    plans = rank_plans(candidates(spec, req, freezable(spec, req, methods)), req)
    for p in plans:
        p.notes = explain(p, plans, req)
    return plans


def freezable(spec: ModelSpec, req: Request, methods: tuple) -> tuple:
    """The methods `--unfrozen-parameters` can be planned with on this model (LoRA takes them as
    PEFT's modules_to_save, outside the blocks only); when none can, the first method's reason,
    one line (a pattern matching no parameter name, a module inside a block under LoRA)."""
    if not req.unfrozen_parameters:
        return methods
    ok, first = [], None
    for m in methods:
        try:
            trainable_params(spec, count_params(spec), _method_settings(m, LORA_RANKS[0], req, req.gpu))
            ok.append(m)
        except PlanError as e:
            first = first or e
    if not ok and first is not None:
        raise first
    return tuple(ok)


def smallest_need(spec: ModelSpec, req: Request) -> tuple[int, Settings | None]:
    """The least device memory any plan of the requested methods needs (micro-batch 1,
    checkpointing, the lowest rank), and that plan: what the GPU would have to hold."""
    methods = METHODS if req.method == "auto" else (req.method,)
    best, best_st, refused = None, None, None
    sets = technique_sets(req, spec)
    for method in methods:
        base = _method_settings(method, LORA_RANKS[-1] if method != "full" else 0, req, req.gpu)
        base = with_techniques(base, sets[-1] if sets else ())
        for strategy, offload in _strategies(base):
            st = replace(base, strategy=strategy, offload=offload, grad_checkpointing=True, batch_size=1)
            try:
                need = estimate(spec, st).needed_bytes
            except PlanError as e:
                refused = refused or e
                continue
            if best is None or need < best:
                best, best_st = need, st
    if best is None and refused is not None:  # no plan could be estimated at all: say why, not "0.0 GiB"
        estimate(spec, replace(_method_settings(methods[0], LORA_RANKS[-1], req, req.gpu), batch_size=1))
        raise refused
    return best or 0, best_st


def nearest_fits(spec: ModelSpec, req: Request) -> list[str]:
    """When nothing fits: the smallest changes that would, each as the option to pass.
    QLoRA (if not already allowed), a shorter sequence (halving), more GPUs (doubling)."""
    out = []
    if req.method in ("full", "lora"):
        if recommend(spec, replace(req, method="qlora")):
            out.append("--method qlora")
    seq = req.seq_len // 2
    while seq >= 64:
        if recommend(spec, replace(req, seq_len=seq, global_batch=None)):
            out.append(f"--seq-len {seq}")
            break
        seq //= 2
    for gpus in (2, 4, 8):
        if gpus <= req.gpus:
            continue
        more = replace(req, gpus=gpus, global_batch=None)
        if recommend(spec, more):
            out.append(f"--gpus {gpus}" + (f" (x {req.nodes} nodes)" if req.nodes > 1 else ""))
            break
    else:
        for nodes in (2, 4, 8, 16, 32):
            if nodes > req.nodes and recommend(spec, replace(req, gpus=max(req.gpus, 8), nodes=nodes,
                                                             global_batch=None)):
                out.append(f"--gpus {max(req.gpus, 8)} --nodes {nodes}")
                break
    if req.host_ram_bytes is not None and recommend(spec, replace(req, host_ram_bytes=None)):
        out.append("more host RAM (offload)")
    return out


_STRATEGY_WHY = {
    "ddp": "replicates the model on every GPU: no sharding traffic",
    "fsdp": "FSDP shards parameters, gradients and optimizer state",
    "fsdp-grad-op": "FSDP grad-op shards gradients and optimizer state, keeps parameters gathered through the step",
    "fsdp-hybrid": "FSDP hybrid shards within a node, replicates across nodes",
    "fsdp-no-shard": "FSDP without sharding",
    "zero1": "ZeRO-1 shards the optimizer state",
    "zero2": "ZeRO-2 shards optimizer state and gradients",
    "zero3": "ZeRO-3 shards parameters, gradients and optimizer state",
}


_OFFLOAD_WHAT = {
    "optimizer": "the optimizer state (and its step) to host RAM",
    "params": "parameters to host RAM",
    "all": "parameters, gradients and optimizer state to host RAM",
    "nvme": "optimizer state and parameters to NVMe",
}


def explain(p: Plan, plans: list[Plan], req: Request) -> list[str]:
    """One short line each on why: the method, the strategy, the batch and checkpointing, and
    what bounds the step."""
    st, gib = p.settings, 2**30
    lines = []
    if p.method == "full" and st.unfrozen_parameters:
        lines.append("partial fine-tune: only --unfrozen-parameters train")
    elif p.method == "full":
        lines.append("full fine-tune: every weight trains")
    else:
        lines.append(f"{'QLoRA (NF4 base)' if p.method == 'qlora' else 'LoRA'} r={st.lora_rank}, "
                     f"alpha={st.lora_alpha:g} on {st.lora_targets}"
                     + ("" if st.lora_rank == LORA_RANKS[0] else ": the highest rank that fits"))
    lines += technique_costs(p.spec, st) if p.spec is not None else []
    for t in p.techniques:
        lines.append(f"{t} ({TECHNIQUE_WHY[t]}): saves {p.saved.get(t, 0) / gib:,.1f} GiB per GPU against "
                     + TECHNIQUE_AGAINST[t]
                     + (f", {p.estimate.cpu_bytes / gib:,.1f} GiB of host RAM" if t == "activation offload" else ""))
    if st.optimizer_paged:
        lines.append(PAGED_NOTE)
    if req.gpu.cpu:
        lines.append(f"one process on {req.gpu.name}, fp32")
    elif req.world == 1 and st.strategy == "ddp":
        lines.append("one GPU, no sharding needed")
    else:
        lines.append(_STRATEGY_WHY[st.strategy] + (f", offloading {_OFFLOAD_WHAT[st.offload]}" if p.offload else ""))
    fill = (f"needs {p.estimate.needed_bytes / gib:,.1f} of {req.budget_for(st) / gib:,.1f} GiB usable"
            + ("" if req.gpu.cpu else
               f"; NVML shows up to {p.estimate.device_bytes / gib:,.1f} where memory is plentiful"))
    if req.global_batch is None:
        lines.append(f"micro-batch {st.batch_size}: the largest that fits ({fill})")
    else:
        lines.append(f"micro-batch {st.batch_size} x {p.accumulation} accumulation x {req.world} GPU(s) = global batch "
                     f"{p.global_batch} ({fill}; largest fitting micro-batch {p.largest_micro})")
    if req.margin is not None:
        lines.append(f"{req.margin:.0%} kept free (--margin)")
    elif req.gpu.cpu:
        lines.append(f"{UNMEASURED_MARGIN:.0%} of the RAM kept free: plan's CPU runs are measured by torch's tensor "
                     "tracker, and the process's other memory (Python, libraries) comes on top")
    else:
        lines.append(evidence(st).line())
    twin = [q for q in plans if q is not p and q.method == p.method and q.settings.strategy == st.strategy
            and q.settings.offload == st.offload and q.settings.grad_checkpointing != st.grad_checkpointing]
    if twin and p.tokens_per_s > 0 and twin[0].tokens_per_s > 0:  # a GPU without speed figures ranks by memory
        other = twin[0]
        gain = p.tokens_per_s / other.tokens_per_s - 1
        if st.grad_checkpointing:
            lines.append(f"checkpointing: micro-batch {st.batch_size} instead of {other.settings.batch_size}, "
                         f"{gain:+.0%} tokens/s after the recompute")
        else:
            lines.append(f"no checkpointing: {gain:+.0%} tokens/s against recomputing at micro-batch "
                         f"{other.settings.batch_size}")
    elif st.grad_checkpointing and not twin:
        lines.append("checkpointing is needed: nothing fits without it")
    t = p.time
    if not t.total or t.total == float("inf"):
        lines.append(f"no speed figures for {req.gpu.name}: tokens/s not modelled")
        return lines
    bound = t.bound
    if bound == "communication":
        lines.append(f"communication-bound: {t.exposed / t.total:.0%} of the step waits on collectives")
    elif bound == "optimizer":
        lines.append(f"optimizer-bound: the {'host ' if p.offload else ''}optimizer step takes "
                     f"{t.optimizer:,.2f} s of {t.total:,.2f} s")
    else:
        lines.append(f"compute-bound ({t.compute / t.total:.0%} of the step in matmuls)")
    return lines
