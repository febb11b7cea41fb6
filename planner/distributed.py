"""Per-GPU memory under sharding: FSDP (FSDP2 as accelerate sets it up, FSDP1) and DeepSpeed ZeRO
1/2/3, with CPU and NVMe offload. Pure functions: a spec and settings in, bytes out.

The step is the single-GPU step of planner/memory.py run by every rank on its own micro-batch;
what changes is where the model states live and which transient buffers the engine adds. Each
function names its source. The figures are checked against real two-process gloo runs and
FSDP2 at world size 8 on torch's fake process group (planner/measure/distributed.py,
tables/validation.csv).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from .contract import FSDP, Settings, check_strategy, shard_size, world_size
from .memory import (
    RECIPES,
    ActivationPhases,
    StepParts,
    activation_phases,
    freezing,
    lora_params,
    modules_to_save,
    optimizer_state_bytes,
    optimizer_step_temp_bytes,
    step_parts,
    trainable_params,
)
from .spec import ModelSpec, ParamCount


@dataclass(frozen=True)
class MeasuredStep:
    """A step whose single-GPU parts were measured instead of counted (the derived route,
    planner/measure/derived.py), for the sharding formulas below to distribute: the model states
    of the storage recipe (`weights` with buffers, `grads`, `optimizer`, `opt_temp`), the
    activation side at each phase's peak as the engine computes (`acts`), the trainable
    parameters, AdamW-like state and step temporary on ZeRO's fp32 master, and the parameters
    ZeRO-3 keeps whole (tensors under its persistence threshold, counted on the module)."""
    weights: float
    grads: float
    optimizer: float
    opt_temp: float
    acts: ActivationPhases
    trainable: int
    master_optimizer: float
    master_opt_temp: float
    persistent: int


# ---------------------------------------------------------------- FSDP

@dataclass(frozen=True)
class FsdpUnits:
    """Parameters per FSDP unit (see `fsdp_units`)."""
    block: int
    embed: int
    kept: int
    kept_late: bool


def fsdp_units(spec: ModelSpec, pc: ParamCount, version: int = 2) -> FsdpUnits:
    """Parameters per FSDP unit in accelerate's FSDP2 layout (fsdp2_prepare_model):

    - `block`: one `_no_split_modules` block (transformer_based_wrap), gathered for its forward
      and again for its backward;
    - `embed`: the input embedding's own unit (untied models, encoders), resharded after forward;
    - `kept`: everything else: the final norm and head (with the input embedding when tied),
      sharded with `reshard_after_forward=False`, and the root's leftovers (learned position and
      token-type tables, pooler, classifier), which the root keeps gathered too. These stay
      gathered from their forward to their backward.
    - `kept_late`: whether the kept unit's backward ends only with the whole backward (a tied
      embedding, position tables and the root are differentiated last), so it stays gathered,
      with its unsharded gradients, while every block runs its backward; an untied head alone is
      differentiated first and released at once.

    FSDP1 (accelerate's FSDP1 path) wraps the blocks only; the root unit holds the embeddings,
    final norm and head, and FSDP1 never reshards the root after forward, so all of it is kept
    until the root's backward ends, last.
    """
    blocks = spec.layers * pc.largest_layer
    if version == 1:
        return FsdpUnits(block=pc.largest_layer, embed=0, kept=pc.total - blocks, kept_late=True)
    embed = spec.vocab * spec.hidden if (not pc.tied or spec.is_encoder) else 0
    return FsdpUnits(block=pc.largest_layer, embed=embed, kept=pc.total - blocks - embed,
                     kept_late=bool(pc.tied or spec.learned_positions or spec.is_encoder))


def _gathered_bytes(n_params: int, st: Settings) -> float:
    """Bytes of `n_params` parameters as the all-gather leaves them: in MixedPrecisionPolicy's
    param_dtype (bf16 under accelerate's bf16/fp16 mixed precision), else the storage dtype. LoRA
    adapters are cast the same way; a block's share of them is added by the caller."""
    rc = RECIPES[st.precision]
    return n_params * (2 if rc.autocast or rc.weight == 2 else rc.weight)


def _block_lora(spec: ModelSpec, st: Settings) -> int:
    return lora_params(spec, st) // spec.layers if st.lora else 0


def trainable_units(spec: ModelSpec, pc: ParamCount, st: Settings, u: FsdpUnits) -> tuple[int, int, int]:
    """Trainable parameters of the last block, the kept unit and the embedding unit (see
    `fsdp_units`): what each unit's backward makes unsharded gradients of and reduces. Full
    fine-tuning: all of each; LoRA: a block's adapters, and PEFT's modules_to_save copies where
    they sit; partial freezing (`unfrozen_parameters`): what trains in each."""
    fz, ms = freezing(spec, st), modules_to_save(spec, st)
    if fz is None and ms is None:
        return (_block_lora(spec, st), 0, 0) if st.lora else (u.block, u.kept, u.embed)
    if ms is not None:  # PEFT's copies sit outside the blocks: the embedding's below them, the rest above
        below = min(ms.params, spec.vocab * spec.hidden) if ms.embeddings else 0
        top, block = ms.params - below, _block_lora(spec, st)
    else:
        below, top, block = fz.trainable_in(-1), fz.trainable_in(spec.layers), fz.trainable_in(spec.layers - 1)
    embed = min(u.embed, below)  # the word embedding's own unit, when it has one
    return block, top + below - embed, embed


def _fsdp_parts(spec: ModelSpec, pc: ParamCount, st: Settings) -> StepParts:
    """The single-GPU parts as FSDP's mixed precision runs them: the all-gathered parameters are
    bf16, so autocast has nothing to cast and the activations are those of pure bf16 compute;
    the sharded parameters keep their storage dtype (fp32: accelerate upcasts trainable
    parameters to fp32 before `fully_shard` when mixed precision is on)."""
    p = step_parts(spec, pc, st)  # activations: _ctx computes in bf16 under FSDP mixed precision
    if RECIPES[st.precision].autocast:  # weight gradients of the gathered bf16 parameters
        p = replace(p, head_grad=p.head_grad and 2 * spec.vocab * spec.hidden,
                    block_wgrad=p.block_wgrad and 2 * pc.largest_layer)
    return p


def fsdp_phases(spec: ModelSpec, pc: ParamCount, st: Settings, notes: list,
                measured: MeasuredStep | None = None) -> tuple[dict, dict, float]:
    """Per-GPU phases under FSDP.

    Sharded (divided by the shard size): the stored parameters, gradients (reduce-scattered into
    the sharded parameter's dtype), optimizer state and optimizer-step temporary; with
    `--offload params|all` (CPUOffloadPolicy) these live in host RAM instead and the optimizer
    step runs on the CPU.

    Gathered, in the all-gather dtype (FSDP2 `FSDPParamGroup.unshard`, `reshard_after_forward`):
    - forward: the `kept` unit from its forward on, and the block being computed;
    - backward: the block being differentiated and the next one (FSDP2 prefetches one unit in
      backward), the block's unsharded gradients and the reduce-scatter input they are copied
      into (`foreach_reduce`: `torch.empty` then `_chunk_cat`);
    - SHARD_GRAD_OP (`reshard_after_forward=False`): every unit stays gathered from its forward
      to its backward, so the whole model is gathered at the loss.
    """
    n = shard_size(st)
    p = measured or _fsdp_parts(spec, pc, st)
    u = fsdp_units(spec, pc, st.fsdp_version)
    lora_blk = (measured.trainable // spec.layers if st.lora else 0) if measured else _block_lora(spec, st)
    gb = 2 if RECIPES[st.precision].autocast else RECIPES[st.precision].grad  # unsharded grad dtype
    block_g = _gathered_bytes(u.block + lora_blk, st)
    kept_g = _gathered_bytes(u.kept, st)
    embed_g = _gathered_bytes(u.embed, st)
    every_g = spec.layers * block_g + kept_g + embed_g
    t_block, t_kept, t_embed = trainable_units(spec, pc, st, u)
    block_train = t_block * gb

    offload = st.offload in ("params", "all")
    w, g, o, t = (p.weights / n, p.grads / n, p.optimizer / n, p.opt_temp / n)
    host = w + g + o + t if offload else 0
    if offload:
        notes.append("CPUOffloadPolicy: sharded parameters, gradients and optimizer state in pinned host RAM; "
                     "the optimizer step runs on the CPU")
        w_gpu, g_gpu, o_gpu, t_gpu = 0, 0, 0, 0
    else:
        w_gpu, g_gpu, o_gpu, t_gpu = w, g, o, t
    a = copy.deepcopy(measured.acts) if measured else activation_phases(p)
    grad_op = st.strategy == "fsdp-grad-op"
    late = u.kept_late
    kept_train = t_kept * gb        # the kept unit's unsharded gradients
    kept_shard = 0 if offload else t_kept * RECIPES[st.precision].grad / n
    fwd_gathered = every_g if grad_op else kept_g + (block_g if a.fwd_in_block else 0)
    if a.bwd_in_block:
        # inside a block's backward: this block and the prefetched next one gathered (every block
        # not yet differentiated under SHARD_GRAD_OP), the kept unit if it is released last, the
        # previous block's reduce-scatter input (FSDP2 frees it when the next reduce-scatter waits)
        # and the sharded gradients of the units already reduced
        blocks_g = (spec.layers * block_g + embed_g) if grad_op else 2 * block_g
        gathered_bw = blocks_g + (kept_g if late else 0)
        done_shard = 0 if (st.lora or offload) else t_block * RECIPES[st.precision].grad / n
        bw_grads = (kept_train if late else kept_shard) + done_shard + block_train
        # the peak comes as the block's backward starts (its weight gradients come later, when
        # its recompute is being freed): the recompute and the first activation gradients (a
        # measured step keeps its single-GPU peak's, which holds some weight gradients too)
        if measured is None:
            a.backward["activations"] = p.act.kept + p.act.recompute + p.act.first_grads
    else:
        gathered_bw = every_g if grad_op else kept_g
        bw_grads = 0
    base = {"weights": w_gpu, "optimizer": o_gpu}
    phase_comp = {
        "model": {"weights": w_gpu},
        "forward": {**base, **a.forward, "other": fwd_gathered},
        "backward": {**base, **a.backward, "gradients": bw_grads, "other": gathered_bw},
        "optimizer_step": {**base, "gradients": g_gpu, "other": t_gpu},
    }
    # end of backward: every sharded gradient, and the last unit reduced (the embedding, or the
    # kept unit when it is released last) gathered with its unsharded gradients and their copy
    last_g, last_train = (kept_g, kept_train) if late else (embed_g, t_embed * gb)
    # (its unsharded gradients in gradients, their reduce-scatter copy in other)
    last_grad = max(last_train, block_train)
    end_bw = {"weights": w_gpu, "optimizer": o_gpu, "gradients": g_gpu + last_grad, "other": last_g + last_grad}
    notes.append(f"FSDP{st.fsdp_version} ({st.strategy}), shard group {n} of {world_size(st)} ranks: "
                 + ("all units stay gathered after forward" if grad_op
                    else "one block gathered in forward, two in backward"))
    return phase_comp, end_bw, host * st.gpus


# ---------------------------------------------------------------- DeepSpeed ZeRO

# DeepSpeed defaults, and what accelerate's `auto` fills in from the model's hidden size
# (accelerate/accelerator.py `_prepare_deepspeed`; deepspeed/runtime/zero/config.py)
DS_MAX_REUSE_DISTANCE = 10**9      # stage3_max_reuse_distance, numel
DS_PREFETCH_FACTOR = 0.9           # stage3_prefetch_bucket_size = 0.9 h^2 (accelerate auto)
DS_PERSISTENCE_FACTOR = 10         # stage3_param_persistence_threshold = 10 h (accelerate auto)
DS_OPT_SWAP_BUFFERS = 4            # offload_optimizer.buffer_count (NVMe)


def zero_stage(st: Settings) -> int:
    return int(st.strategy[-1])


def zero_persistent_params(spec: ModelSpec, pc: ParamCount) -> int:
    """Parameters ZeRO-3 keeps whole on every rank: each tensor under the persistence threshold
    (10 x hidden under accelerate's `auto`; stage3.py `persistence_threshold`). Those are the
    vectors: norm weights and biases, linear biases, and a MoE router with fewer than 10 experts."""
    h, limit = spec.hidden, DS_PERSISTENCE_FACTOR * spec.hidden
    norm = [h, h] if spec.norm == "layer" else [h]
    per_block = norm * spec.norms_per_layer
    if spec.qkv_bias:
        per_block += [spec.q_dim, spec.kv_dim, spec.kv_dim]
    if spec.out_bias:
        per_block.append(h)
    if spec.mlp_bias:
        per_block += [spec.intermediate, h]
    if spec.experts:
        per_block.append(spec.experts * h)
    small = sum(n for n in per_block if n < limit)
    return spec.layers * small + sum(norm)


def zero3_gathered_at_loss(spec: ModelSpec, pc: ParamCount, lowest: int = -1) -> int:
    """Parameters ZeRO-3 still holds gathered when the forward reaches the loss.

    After the first step the coordinator knows the module trace (forward, then backward in
    reverse). When a module finishes, its parameters are released unless they recur within the
    next `stage3_max_reuse_distance` parameters of the trace (partitioned_param_coordinator.py
    `__params_to_release`). A module's next use is its own backward: between the two the trace
    runs every later module forward and back, twice the parameters after it. The head and the
    blocks closest to it are kept; a model under about 0.5B parameters stays gathered whole.
    Under partial freezing (`lowest`, the lowest trainable place: -1 the embeddings, a block,
    `layers` the head) the modules below it have no backward: they do not recur in the step's
    trace, so each is released after its forward (measured on two gloo ranks).
    """
    u = fsdp_units(spec, pc)
    order = ([u.embed] if lowest < 0 else []) + [u.block] * (spec.layers - max(lowest, 0)) + [u.kept]
    gathered, after = 0, 0
    for n in reversed(order):
        if 2 * after < DS_MAX_REUSE_DISTANCE:
            gathered += n
        after += n
    return gathered


def zero_phases(spec: ModelSpec, pc: ParamCount, st: Settings, notes: list,
                measured: MeasuredStep | None = None) -> tuple[dict, dict, float, float]:
    """Per-GPU phases under DeepSpeed ZeRO, as `deepspeed.initialize` runs it with the client
    optimizer (DeepSpeedZeroOptimizer for stages 1-2, DeepSpeedZeroOptimizer_Stage3).

    The module is cast to bf16 (fp16) by DeepSpeed, so the step computes as pure bf16; the
    optimizer keeps an fp32 master partition and runs on it. Per GPU (N ranks, T trainable):
    - stages 1-2: the bf16 module whole; fp32 master 4T/N; optimizer state on the master
      partition; in backward a bf16 gradient partition (2T/N) and the reduce bucket (h x h
      values); in the step an fp32 gradient partition (4T/N) and the optimizer's temporary. ZeRO-1
      reduces through the same buckets into a partition in DeepSpeed 0.19 (measured equal).
    - stage 3: the bf16 partition 2P/N (parameters under the persistence threshold whole), the
      flat bf16 gradient-partition buffer 2T/N from the start; the gathered parameters of the
      modules ZeRO-3 keeps between their forward and backward (`zero3_gathered_at_loss`), one
      block and the prefetch bucket inside backward.
    Offload: `optimizer` moves master, state and fp32 gradients to host RAM (DeepSpeedCPUAdam
    steps there); `params`/`all` (ZeRO-3) also the bf16 partition; `nvme` swaps those to NVMe
    through pinned buffers.
    """
    n = world_size(st)
    stage = zero_stage(st)
    rc = RECIPES[st.precision]
    b = 2 if rc.compute == 2 else 4
    if measured is None:
        p = step_parts(spec, pc, st)  # activations: _ctx computes in 16-bit under ZeRO with bf16
        p = replace(p, head_grad=p.head_grad and b * spec.vocab * spec.hidden,
                    block_wgrad=p.block_wgrad and b * pc.largest_layer)
        t = trainable_params(spec, pc, st)
        on_master = replace(st, precision="fp32")  # the optimizer runs on the fp32 master partition
        opt = optimizer_state_bytes(spec, pc, on_master) / n
        opt_temp = optimizer_step_temp_bytes(spec, pc, on_master) / n
    else:
        t, opt, opt_temp = measured.trainable, measured.master_optimizer / n, measured.master_opt_temp / n
    master = 4 * t / n
    fp32_grad = 4 * t / n
    bucket = spec.hidden * spec.hidden * b
    offload_opt = st.offload in ("optimizer", "all", "nvme")
    offload_par = stage == 3 and st.offload in ("params", "all", "nvme")
    to_nvme = st.offload == "nvme"
    host = (master + opt + fp32_grad) if offload_opt else 0
    if stage == 3:
        persist = measured.persistent if measured else zero_persistent_params(spec, pc)
        w_part = b * (pc.total - persist) / n
        if offload_par:
            host += w_part
        w = (0 if offload_par else w_part) + b * persist + pc.buffers_bytes
        # the flat gradient-partition buffer; with optimizer offload it is pinned host memory
        grad_part = 0 if offload_opt else b * t / n
        fz = freezing(spec, st)
        at_loss = b * zero3_gathered_at_loss(spec, pc, fz.lowest if fz is not None else -1)
        in_block = b * (pc.largest_layer + DS_PREFETCH_FACTOR * spec.hidden ** 2)
    else:
        w = b * pc.total + pc.buffers_bytes
        grad_part = 0 if offload_opt else b * t / n  # offloaded: reduced straight into host fp32 partitions
        at_loss = in_block = 0
    gpu_master, gpu_opt = (0, 0) if offload_opt else (master, opt)
    a = copy.deepcopy(measured.acts) if measured else activation_phases(p)
    bw_in_block = a.bwd_in_block
    if measured is not None:
        block_trainable = measured.trainable // spec.layers if st.lora else pc.largest_layer
    else:
        block_trainable = trainable_units(spec, pc, st, fsdp_units(spec, pc))[0]
    block_grads = b * block_trainable if bw_in_block else 0
    base = {"weights": w, "optimizer": gpu_master + gpu_opt}
    phase_comp = {
        "model": {"weights": w},
        "forward": {**base, **a.forward, "other": at_loss + (grad_part if stage == 3 else 0)},
        # stages 1-2 allocate the gradient partition at the first reduce, inside the backward
        "backward": {**base, **a.backward,
                     "gradients": (grad_part + bucket + block_grads) if (bw_in_block or stage == 3) else 0,
                     "other": in_block if bw_in_block else at_loss},
        "optimizer_step": {**base, "gradients": 0 if offload_opt else fp32_grad,
                           "other": (0 if offload_opt else opt_temp) + (grad_part if stage == 3 else 0)},
    }
    end_bw = {"weights": w, "optimizer": gpu_master + gpu_opt, "gradients": grad_part + bucket}
    nvme = 0
    if to_nvme:
        nvme, host = host, DS_OPT_SWAP_BUFFERS * 4 * min(t / n, 10**9)  # sub_group_size 1e9 values, fp32
        notes.append("NVMe offload: optimizer state (and ZeRO-3 parameters) swapped to NVMe through pinned buffers")
    elif offload_opt:
        notes.append("optimizer offload: fp32 master, optimizer state and fp32 gradients in pinned host RAM "
                     "(DeepSpeedCPUAdam steps on the CPU)")
    notes.append(f"DeepSpeed ZeRO-{stage} over {n} ranks, bf16 module" if b == 2
                 else f"DeepSpeed ZeRO-{stage} over {n} ranks, fp32")
    return phase_comp, end_bw, host * st.gpus, nvme * st.gpus


def sharded_phases(spec: ModelSpec, pc: ParamCount, st: Settings, notes: list,
                   measured: MeasuredStep | None = None) -> tuple[dict, dict, float, float]:
    """(phase components, components at the end of backward, host RAM per node, NVMe bytes per node); from
    the formulas' single-GPU parts, or from `measured` ones (the derived route)."""
    check_strategy(st)
    if st.strategy in FSDP:
        phase_comp, end_bw, host = fsdp_phases(spec, pc, st, notes, measured)
        return phase_comp, end_bw, host, 0
    return zero_phases(spec, pc, st, notes, measured)


def strategy_choices(st: Settings) -> list[tuple[str, str]]:
    """(strategy, offload) pairs `--strategy all` compares: every strategy without offload, and
    the offloads each engine offers (FSDP: everything to CPU; ZeRO-2: optimizer; ZeRO-3:
    optimizer, parameters too, NVMe). Hybrid sharding only across nodes."""
    out = [("ddp", "none"), ("fsdp", "none"), ("fsdp-grad-op", "none")]
    if st.nodes > 1:
        out.append(("fsdp-hybrid", "none"))
    out += [("fsdp-no-shard", "none"), ("fsdp", "all"), ("zero1", "none"), ("zero2", "none"), ("zero2", "optimizer"),
            ("zero3", "none"), ("zero3", "optimizer"), ("zero3", "all"), ("zero3", "nvme")]
    return out
