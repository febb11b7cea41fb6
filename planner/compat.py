"""`--compat accelerate`: accelerate's `estimate-memory` table, computed by accelerate's own code.

accelerate builds the bare `AutoModel` (no task head) on the meta device and counts weights only
(`accelerate/commands/estimate.py`): this calls the same `calculate_maximum_sizes`,
`estimate_training_usage` and `convert_bytes`, so the numbers are identical, for comparison with
`plan estimate`.
"""

from __future__ import annotations


def accelerate_table(config: dict) -> list[dict]:
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes, convert_bytes
    from transformers import AutoConfig, AutoModel

    cfg = dict(config)
    mt = cfg.pop("model_type")
    with init_empty_weights():
        model = AutoModel.from_config(AutoConfig.for_model(mt, **cfg))
    total, largest = calculate_maximum_sizes(model)
    rows = []
    for dtype, div in (("float32", 1), ("float16", 2), ("int8", 4), ("int4", 8)):
        stages = estimate_training_usage(total, dtype)
        peak = max(stages.values())
        rows.append({
            "dtype": dtype, "largest_layer": largest[0] / div, "total_size": total / div, "training_stages": stages,
            "training_peak": peak if peak != -1 else None,
            "largest_layer_str": convert_bytes(largest[0] / div), "total_size_str": convert_bytes(total / div),
            "training_str": convert_bytes(peak) if peak != -1 else "N/A",
            "stages_str": {k: convert_bytes(v) for k, v in stages.items()} if peak != -1 else None,
        })
    return rows


# ---------------------------------------------------------------- DeepSpeed

DS_BUFFER_FACTOR = 1.5  # DeepSpeed's `additional_buffer_factor` default


def ds_largest_module_params(spec, pc) -> int:
    """The largest module's own parameters (`parameters(recurse=False)`), as DeepSpeed's
    `model_to_params` (deepspeed/runtime/zero/stage3.py) finds it on a live model: the token
    embedding (or an untied head), a learned position table, transformers 5's fused MoE experts
    module (all experts' gate_up and down in one module), or the widest linear."""
    h = spec.hidden
    cands = [spec.vocab * h]
    if spec.learned_positions:
        cands.append(spec.max_positions * h)
    if spec.experts:
        cands.append(spec.experts * 3 * h * spec.intermediate)
    cands += [i * o + (o if spec.mlp_bias else 0) for _, i, o, _ in pc.linear_shapes]
    return max(cands)


def ds_zero2_model_states(total: int, gpus: int, nodes: int, cpu_offload: bool,
                          buffer: float = DS_BUFFER_FACTOR) -> tuple[int, int]:
    """(per-CPU, per-GPU) bytes of DeepSpeed's `estimate_zero2_model_states_mem_needs`
    (deepspeed/runtime/zero/stage_1_and_2.py): 16-bit params on every GPU plus 18 bytes/param
    (16-bit and fp32 grads, fp32 params, Adam moments) sharded over all GPUs; with optimizer
    offload the GPU keeps the 16-bit params and the host max(4 x GPUs, 16) bytes/param."""
    world = gpus * nodes
    if cpu_offload:
        return int(total * max(4 * world, 16) * buffer), int(2 * total)
    return int(total * 4 * gpus * buffer), int(2 * total + int(18 * total / world))


def ds_zero3_model_states(total: int, largest: int, gpus: int, nodes: int, cpu_offload: bool,
                          cpu_offload_params: bool, zero_init: bool,
                          buffer: float = DS_BUFFER_FACTOR) -> tuple[int, int]:
    """(per-CPU, per-GPU) bytes of DeepSpeed's `estimate_zero3_model_states_mem_needs`
    (deepspeed/runtime/zero/stage3.py): the largest module gathered in fp32 on the GPU, 18
    bytes/param sharded over all GPUs unless offloaded, host memory per node."""
    world = gpus * nodes
    per_node = 1 / nodes
    layer = 4 * largest
    if cpu_offload and cpu_offload_params:
        gpu = layer
        cpu = total * 18 * per_node * buffer if zero_init else total * max(4 * gpus, 18 * per_node) * buffer
    elif cpu_offload:
        gpu = layer + int(2 * total / world)
        cpu = total * 16 * per_node * buffer if zero_init else total * max(4 * gpus, 16 * per_node) * buffer
    else:
        gpu = layer + int(18 * total / world)
        cpu = largest * 4 * gpus * buffer if zero_init else total * 4 * gpus * buffer
    return int(cpu), int(gpu)


def deepspeed_table(spec, pc, gpus: int = 1, nodes: int = 1) -> list[dict]:
    """The rows DeepSpeed's `estimate_zero2/3_model_states_mem_needs_all_cold` print, in bytes."""
    rows = []
    for off in (True, False):
        cpu, gpu = ds_zero2_model_states(pc.total, gpus, nodes, off)
        rows.append({"stage": "zero2", "offload_optimizer": off, "offload_param": False, "zero_init": None,
                     "cpu_bytes": cpu, "gpu_bytes": gpu})
    largest = ds_largest_module_params(spec, pc)
    for off in (True, False):
        for off_p in (True, False):
            if off_p and not off:
                continue
            for zi in (True, False):
                cpu, gpu = ds_zero3_model_states(pc.total, largest, gpus, nodes, off, off_p, zi)
                rows.append({"stage": "zero3", "offload_optimizer": off, "offload_param": off_p, "zero_init": zi,
                             "cpu_bytes": cpu, "gpu_bytes": gpu})
    return rows
