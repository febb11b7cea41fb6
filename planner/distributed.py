"""Per-GPU memory under sharding: FSDP (FSDP2 as accelerate sets it up, FSDP1) and DeepSpeed ZeRO
1/2/3, with CPU and NVMe offload. Pure functions: a spec and settings in, bytes out.

The step is the single-GPU step of planner/memory.py run by every rank on its own micro-batch;
what changes is where the model states live and which transient buffers the engine adds. Each
function names its source. The figures are checked against real two-process gloo runs and
FSDP2 at world size 8 on torch's fake process group (planner/distmeasure.py,
tables/validation.csv).
"""

from __future__ import annotations

from dataclasses import replace

from .memory import RECIPES, PlanError, Settings, StepParts, activation_phases, lora_params, step_parts
from .spec import ModelSpec, ParamCount

FSDP = ("fsdp", "fsdp-grad-op", "fsdp-hybrid", "fsdp-no-shard")
ZERO = ("zero1", "zero2", "zero3")


def world_size(st: Settings) -> int:
    return st.gpus * st.nodes


def shard_size(st: Settings) -> int:
    """Ranks one parameter is split over. FULL_SHARD, SHARD_GRAD_OP and ZeRO shard over the
    world; HYBRID_SHARD shards within a node and replicates across nodes; NO_SHARD (FSDP2: a
    replicate-only mesh) keeps everything whole."""
    if st.strategy == "fsdp-hybrid":
        return st.gpus
    if st.strategy in ("fsdp-no-shard", "ddp"):
        return 1
    return world_size(st)


def check_strategy(st: Settings) -> None:
    """Combinations the engines do not offer, each with the one that does."""
    if st.strategy == "ddp" and st.offload != "none":
        raise PlanError(f"--offload {st.offload} needs a sharded strategy: DDP keeps everything on the GPU "
                        "(use --strategy zero2 --offload optimizer, or fsdp --offload all)")
    if st.strategy in FSDP and st.offload == "optimizer":
        raise PlanError("FSDP offloads parameters, gradients and optimizer state together: use --offload all "
                        "(or DeepSpeed --strategy zero2/zero3 --offload optimizer)")
    if st.strategy in FSDP and st.offload == "nvme":
        raise PlanError("FSDP cannot offload to NVMe: use --strategy zero3 --offload nvme")
    if st.strategy in ("zero1", "zero2") and st.offload in ("params", "all"):
        raise PlanError(f"--offload {st.offload}: DeepSpeed offloads parameters only under ZeRO-3 "
                        f"(use --strategy zero3, or --offload optimizer with {st.strategy})")
    if st.strategy == "fsdp-hybrid" and st.nodes < 2:
        raise PlanError("--strategy fsdp-hybrid shards within a node and replicates across nodes: it needs --nodes 2 or more")
    if st.strategy in ZERO and st.quant != "none" and st.strategy == "zero3":
        raise PlanError("ZeRO-3 cannot partition bitsandbytes 4/8-bit weights: use zero2 or FSDP for QLoRA")


# ---------------------------------------------------------------- FSDP

def fsdp_units(spec: ModelSpec, pc: ParamCount) -> dict:
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
    """
    blocks = spec.layers * pc.largest_layer
    embed = spec.vocab * spec.hidden if (not pc.tied or spec.is_encoder) else 0
    return {"block": pc.largest_layer, "embed": embed, "kept": pc.total - blocks - embed,
            "kept_late": bool(pc.tied or spec.learned_positions or spec.is_encoder)}


def _gathered_bytes(n_params: int, pc: ParamCount, spec: ModelSpec, st: Settings) -> float:
    """Bytes of `n_params` parameters as the all-gather leaves them: in MixedPrecisionPolicy's
    param_dtype (bf16 under accelerate's bf16/fp16 mixed precision), else the storage dtype. LoRA
    adapters are cast the same way; a block's share of them is added by the caller."""
    rc = RECIPES[st.precision]
    return n_params * (2 if rc.autocast or rc.weight == 2 else rc.weight)


def _block_lora(spec: ModelSpec, st: Settings) -> int:
    return lora_params(spec, st) // spec.layers if st.lora else 0


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


def fsdp_phases(spec: ModelSpec, pc: ParamCount, st: Settings, notes: list) -> tuple[dict, float, float]:
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
    p = _fsdp_parts(spec, pc, st)
    u = fsdp_units(spec, pc)
    lora_blk = _block_lora(spec, st)
    gb = 2 if RECIPES[st.precision].autocast else RECIPES[st.precision].grad  # unsharded grad dtype
    block_g = _gathered_bytes(u["block"] + lora_blk, pc, spec, st)
    kept_g = _gathered_bytes(u["kept"], pc, spec, st)
    embed_g = _gathered_bytes(u["embed"], pc, spec, st)
    every_g = spec.layers * block_g + kept_g + embed_g
    block_train = (lora_blk if st.lora else u["block"]) * gb

    offload = st.offload in ("params", "all")
    w, g, o, t = (p.weights / n, p.grads / n, p.optimizer / n, p.opt_temp / n)
    host = w + g + o + t if offload else 0
    if offload:
        notes.append("CPUOffloadPolicy: sharded parameters, gradients and optimizer state in pinned host RAM; "
                     "the optimizer step runs on the CPU")
        w_gpu, g_gpu, o_gpu, t_gpu = 0, 0, 0, 0
    else:
        w_gpu, g_gpu, o_gpu, t_gpu = w, g, o, t
    a = activation_phases(p)
    grad_op = st.strategy == "fsdp-grad-op"
    late = u["kept_late"]
    kept_train = 0 if st.lora else u["kept"] * gb        # the kept unit's unsharded gradients
    kept_shard = 0 if (st.lora or offload) else u["kept"] * RECIPES[st.precision].grad / n
    fwd_gathered = every_g if grad_op else kept_g + (block_g if a["fwd_in_block"] else 0)
    if a["bwd_in_block"]:
        # inside a block's backward: this block and the prefetched next one gathered (every block
        # not yet differentiated under SHARD_GRAD_OP), the kept unit if it is released last, the
        # previous block's reduce-scatter input (FSDP2 frees it when the next reduce-scatter waits)
        # and the sharded gradients of the units already reduced
        blocks_g = (spec.layers * block_g + embed_g) if grad_op else 2 * block_g
        gathered_bw = blocks_g + (kept_g if late else 0)
        done_shard = 0 if (st.lora or offload) else u["block"] * RECIPES[st.precision].grad / n
        bw_grads = (kept_train if late else kept_shard) + done_shard + block_train
        # the peak comes as the block's backward starts (its weight gradients come later, when
        # its recompute is being freed): the recompute and the first activation gradients
        a["backward"]["activations"] = p.act["kept"] + p.act["recompute"] + p.act["first_grads"]
    else:
        gathered_bw = every_g if grad_op else kept_g
        bw_grads = 0
    base = {"weights": w_gpu, "optimizer": o_gpu}
    phase_comp = {
        "model": {"weights": w_gpu},
        "forward": {**base, **a["forward"], "other": fwd_gathered},
        "backward": {**base, **a["backward"], "gradients": bw_grads, "other": gathered_bw},
        "optimizer_step": {**base, "gradients": g_gpu, "other": t_gpu},
    }
    # end of backward: every sharded gradient, and the last unit reduced (the embedding, or the
    # kept unit when it is released last) gathered with its unsharded gradients and their copy
    last_g, last_train = (kept_g, kept_train) if late else (embed_g, 0 if st.lora else u["embed"] * gb)
    end_bw = w_gpu + o_gpu + g_gpu + last_g + 2 * max(last_train, block_train)
    notes.append(f"FSDP2 ({st.strategy}), shard group {n} of {world_size(st)} ranks: "
                 f"{'all units stay gathered after forward' if grad_op else 'one block gathered in forward, two in backward'}")
    return phase_comp, end_bw, host * st.gpus


def sharded_phases(spec: ModelSpec, pc: ParamCount, st: Settings, notes: list) -> tuple[dict, float, float, float]:
    """(phase components, end-of-backward bytes, host RAM per node, NVMe bytes per node)."""
    check_strategy(st)
    if st.strategy in FSDP:
        phase_comp, end_bw, host = fsdp_phases(spec, pc, st, notes)
        return phase_comp, end_bw, host, 0
    raise PlanError(f"--strategy {st.strategy}: not modelled yet")
