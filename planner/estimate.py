"""`estimate(spec, settings)`: the one entry to the formulas. Peak bytes per phase and per
component for one GPU (per rank, under a strategy), from the single-GPU formulas of
planner/memory.py or the sharding formulas of planner/distributed.py.

The step it models is `loss = model(**batch).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)` with the optimizer state already allocated (the second and later
steps), `use_cache=False`; `peak_bytes` is what `torch.cuda.max_memory_allocated()` reports for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .contract import (
    COMPONENTS,
    FP8_LIBRARIES,
    FUSED_LOSSES,
    MSAMP_NOTE,
    PAGED_NOTE,
    UNMEASURED_FUSED,
    UNMEASURED_OFFLOAD,
    UNMEASURED_TE,
    PlanError,
    Settings,
    check_options,
    loss_unmeasured,
    shard_size,
)
from .distributed import sharded_phases
from .memory import (
    CUBLAS_WORKSPACE_BYTES,
    TRL_TOKEN_TILE,
    TRL_VOCAB_TILE,
    activation_host_bytes,
    allocator_slack,
    device_bytes,
    eager_attention,
    ema_bytes,
    freezing,
    lora_targets,
    modules_to_save,
    needed_bytes,
    optimizer_state_bytes,
    replicated_phases,
    trainable_params,
)
from .spec import ModelSpec, ParamCount, count_params


@dataclass
class Estimate:
    params: int
    trainable_params: int
    peak_bytes: int
    device_bytes: int
    components: dict
    phases: dict
    phase_components: dict
    cpu_bytes: int = 0
    nvme_bytes: int = 0
    notes: list = field(default_factory=list)
    param_counts: ParamCount | None = None
    needed_bytes: int = 0   # the least GPU memory the step runs in (memory.needed_bytes); recommend fits by it
    route: str = "formula"  # what gave the figure: formula, derived (planner/measure/derived.py) or simulated


def validate(spec: ModelSpec, st: Settings) -> Settings:
    """Reject impossible options with one clear line, those that depend on the model included:
    the sequence against the model's maximum, the LoRA rank against the hidden size (PEFT accepts
    a rank above a small layer's width, a MoE router's, but not above the model's), the targets
    against the block's linears. A spec standing in for a model without a formula
    (`extra['derived']`, planner/measure/derived.py) checks its targets against the real module."""
    check_options(st)
    derived = spec.extra.get("derived")
    check_seq_len(spec, st.seq_len)
    if st.precision in FP8_LIBRARIES and spec.is_encoder:
        raise PlanError(f"{{precision}} {st.precision} is modelled for causal LMs; {spec.model_type} is an encoder",
                        "precision")
    if st.head_tokens and spec.is_encoder:
        raise PlanError(f"{{head_tokens}} scores a causal LM's positions; {spec.model_type} trains a classification "
                        "head here", "head_tokens")
    if st.loss != "standard" and spec.is_encoder:
        raise PlanError(f"{{loss}} {st.loss} replaces a causal LM's output head and loss; {spec.model_type} trains a "
                        "classification head here: use {loss} standard", "loss")
    if derived is not None and st.activation_offload:
        raise PlanError("{activation_offload} is modelled for the formula's architectures only", "activation_offload")
    if derived is not None:
        derived.check(st)
    elif st.lora and not lora_targets(spec, st):
        raise PlanError(f"{{lora_targets}} '{st.lora_targets}' matches no linear layer of {spec.model_type}",
                        "lora_targets")
    # PEFT accepts a rank above a small layer's width (a MoE router's), but not above the model's
    if st.lora and st.lora_rank > spec.hidden:
        raise PlanError(f"{{lora_rank}} {st.lora_rank} exceeds the hidden size ({spec.hidden})", "lora_rank")
    return st


def check_seq_len(spec: ModelSpec, seq_len: int) -> None:
    """The sequence against the model's maximum positions (`max_position_embeddings`)."""
    if seq_len > spec.max_positions:
        raise PlanError(f"{{seq_len}} {seq_len} exceeds the model's maximum of {spec.max_positions} positions",
                        "seq_len")


def loss_notes(spec: ModelSpec, st: Settings) -> list[str]:
    """What the estimate says of a loss other than the standard one: where its bytes come from and
    whether they are measured."""
    if st.loss == "chunked":
        return [f"loss chunked: torchtune's CEWithChunkedOutputLoss, {st.loss_chunks} chunks, the head per chunk, "
                "run eagerly (measured on CPU: tables/validation.csv)"]
    if st.loss in FUSED_LOSSES:
        lib = "Liger Kernel's fused linear cross-entropy" if st.loss == "liger-flce" else "Cut Cross-Entropy"
        return [f"loss {st.loss}: {lib}, modelled from the library's source (no B x S x vocab logits); "
                f"{UNMEASURED_FUSED}"]
    if st.loss == "trl":
        head = (f"loss trl: TRL's chunked log-probability head (add_fused_lm_head, what SFTTrainer trains through), "
                f"tiles of {TRL_TOKEN_TILE} tokens x {TRL_VOCAB_TILE} vocabulary entries, no B x S x vocab logits; ")
        notes = [head + (f"its Triton fold is modelled from TRL's source, every position counted as labelled; "
                         f"{UNMEASURED_FUSED}" if loss_unmeasured(st) else
                         "its torch fold on CPU (measured: tables/validation.csv)")]
        if shard_size(st) > 1 and (st.strategy.startswith("fsdp") or st.strategy == "zero3"):
            notes.append("loss trl under a sharded head: TRL gathers the whole head weight for its tiles "
                         "(FSDP2: `full_tensor()`, trl/trainer/utils.py:1636; ZeRO-3: maybe_gather_lm_head_ctx, :200); "
                         "that gathered copy is not modelled")
        return notes
    return []


def precision_notes(spec: ModelSpec, st: Settings) -> list[str]:
    """What the estimate says of an FP8 recipe: which route it models, what it keeps, and whether
    it is measured."""
    if st.precision == "fp8-ao":
        return ["fp8-ao: torchao float8 training (Float8LinearConfig's default: tensorwise dynamic scaling, eager) "
                "as accelerate's mixed_precision fp8 converts the model: every nn.Linear but the first and the head; "
                "it keeps no weight copy, and casts per linear (measured on CPU: tables/validation.csv)"]
    if st.precision == "fp8-te":
        notes = ["fp8-te: Transformer Engine te.Linear (DelayedScaling, HYBRID, amax history 1024) as accelerate "
                 f"converts the model: FP8 saved inputs and FP8 weights with their transposes; {UNMEASURED_TE}"]
        if spec.tied:
            notes.append("fp8-te: accelerate's convert_model gives a tied head its own te.Linear weight, which the "
                         "optimizer does not update and which keeps its gradient: not counted")
        return notes
    if st.precision.startswith("msamp"):
        return [f"{st.precision}: {MSAMP_NOTE}"]
    return []


def freezing_notes(spec: ModelSpec, st: Settings) -> list[str]:
    """What the estimate says of partial freezing: what trains, and where backward stops."""
    fz = freezing(spec, st)
    if fz is None:
        return []
    where = {-1: "the embeddings", spec.layers: "the final norm and head"}.get(fz.lowest, f"block {fz.lowest}")
    return [f"unfrozen_parameters: {fz.trainable:,} of {count_params(spec).total:,} parameters train; backward stops "
            f"at {where}, below which nothing is kept"]


def phase_table(phase_comp: dict, end_bw: dict, cuda: bool) -> dict:
    """Each phase's components in whole bytes, every component named, so that a phase is exactly
    the sum of its components (a float sum drifts from its parts past 2**53 bytes). The backward
    is whichever is larger: its peak at the start (or inside the last block), or its end, every
    gradient allocated (`end_bw`). With CUDA kernels the cuBLAS/cuBLASLt workspaces, allocated
    at the first matmul and kept, are in `other` from the forward on: max_memory_allocated counts
    them (64 MiB on the H100 and H200, tables/gpu/traces_expandable.npz)."""
    table = {ph: {k: int(v.get(k, 0)) for k in COMPONENTS} for ph, v in phase_comp.items()}
    end = {k: int(end_bw.get(k, 0)) for k in COMPONENTS}
    if sum(end.values()) > sum(table["backward"].values()):
        table["backward"] = end
    if cuda:
        for ph in ("forward", "backward", "optimizer_step"):
            table[ph]["other"] += CUBLAS_WORKSPACE_BYTES
    return table


def modules_to_save_notes(spec: ModelSpec, st: Settings) -> list[str]:
    """What the estimate says of LoRA with unfrozen_parameters: the modules PEFT trains whole."""
    ms = modules_to_save(spec, st)
    if ms is None:
        return []
    return [f"unfrozen_parameters with LoRA: PEFT's modules_to_save {', '.join(ms.modules)}: a trainable copy of "
            f"each beside the frozen original, {ms.params:,} parameters besides the adapters"]


def technique_costs(spec: ModelSpec, st: Settings) -> list[str]:
    """One line each on what partial freezing, EMA and L-BFGS cost or save in a plan (recommend's
    explanations; emit-config's PLAN.md): what trains and where backward stops; PEFT's
    modules_to_save copies beside LoRA; the EMA copy; L-BFGS's flat vectors against AdamW's
    moments. Per GPU, from the same formulas as the estimate."""
    gib, pc = 2**30, count_params(spec)
    lines = freezing_notes(spec, st)
    ms = modules_to_save(spec, st)
    if ms is not None:
        lines.append(f"unfrozen_parameters with LoRA: {', '.join(ms.modules)} train whole beside the adapters "
                     f"(PEFT's modules_to_save: a trainable copy beside the frozen original, {ms.params:,} "
                     f"parameters, +{ms.params * ms.nbytes / gib:,.2f} GiB of weights)")
    if st.ema:
        lines.append(f"EMA: +{ema_bytes(spec, pc, st) / gib:,.2f} GiB, one copy of the "
                     f"{trainable_params(spec, pc, st):,} trainable parameters (torch's AveragedModel)")
    if st.optimizer == "lbfgs":
        adamw = optimizer_state_bytes(spec, pc, replace(st, optimizer="adamw"))
        lines.append(f"L-BFGS, history {st.lbfgs_history}: {optimizer_state_bytes(spec, pc, st) / gib:,.2f} GiB of "
                     f"state, {2 * st.lbfgs_history + 2} flat vectors of the trainable parameters (AdamW's two "
                     f"moments: {adamw / gib:,.2f} GiB); one closure evaluation per step")
    return lines


def estimate(spec: ModelSpec, st: Settings) -> Estimate:
    """Peak bytes per phase and per component for one GPU (per rank, under a strategy): from the
    formulas, or, for a model_type without them, from the coefficients the derived route measured
    on the transformers module (`spec.extra['derived']`, planner/measure/derived.py)."""
    st = validate(spec, st)
    if spec.extra.get("derived") is not None:  # the phases measured; the allocator from the spec's widths
        est = spec.extra["derived"].estimate(st)
        est.device_bytes = device_bytes(est.phases, allocator_slack(spec, count_params(spec), st))
        est.needed_bytes = needed_bytes(est.phases)
        return est
    pc = count_params(spec)
    notes: list = []
    cpu = nvme = 0
    if st.strategy == "ddp":
        phase_comp, end_bw = replicated_phases(spec, pc, st, notes)
        cpu = activation_host_bytes(spec, st) * st.gpus
    else:
        phase_comp, end_bw, cpu, nvme = sharded_phases(spec, pc, st, notes)
    phase_comp = phase_table(phase_comp, end_bw, st.kernels == "cuda")
    phases = {k: sum(v.values()) for k, v in phase_comp.items()}
    peak_phase = max(phases, key=phases.get)
    comps = dict(phase_comp[peak_phase])
    peak = phases[peak_phase]
    notes += (precision_notes(spec, st) + loss_notes(spec, st) + freezing_notes(spec, st)
              + modules_to_save_notes(spec, st))
    if st.optimizer == "lbfgs":
        notes.append(f"optimizer lbfgs: torch.optim.LBFGS with {st.lbfgs_history} pairs of flat vectors once its "
                     "history is full, one closure evaluation per step (max_iter=1)")
    if st.ema:
        notes.append("ema: one copy of the trainable parameters in their storage dtype (torch's AveragedModel), "
                     "counted in weights")
    if st.optimizer_paged:
        notes.append(PAGED_NOTE)
    if st.activation_offload:
        notes.append(f"activation offload: {cpu / st.gpus / 2**30:,.2f} GiB of saved activations per GPU in pinned "
                     "host RAM "
                     "(TRL's OffloadActivations, as Axolotl's activation_offloading: true runs it"
                     + ("; the checkpointed blocks' inputs" if st.grad_checkpointing else "") + "); "
                     + UNMEASURED_OFFLOAD)
    if eager_attention(spec, st) and st.attn != "eager":
        notes.append(f"{spec.model_type} attention soft-capping needs eager attention (or --attn flash)")
    return Estimate(params=pc.total, trainable_params=trainable_params(spec, pc, st), peak_bytes=peak,
                    device_bytes=device_bytes(phases, allocator_slack(spec, pc, st)), components=comps, phases=phases,
                    phase_components=phase_comp, cpu_bytes=int(cpu), nvme_bytes=int(nvme), notes=notes,
                    param_counts=pc, needed_bytes=needed_bytes(phases))
