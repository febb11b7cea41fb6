"""The step-time model `plan recommend` ranks plans by. Pure functions: a spec, settings and a GPU
in, seconds out.

Memory is measured (planner/memory.py, checked against MemTracker); speed here is a documented
model, good for ranking plans against each other, not a promise of tokens/s:

- compute: matmul FLOPs per token (`train_flops_per_token`) over the GPU's dense 16-bit tensor
  peak times an assumed model-FLOPs utilisation (MFU), which the output states;
- kernel launches: a fixed cost per micro-step, which is what makes tiny micro-batches slow;
- QLoRA: the 4-bit base dequantised to 16 bits for every pass over the weights (HBM traffic);
- communication: the bytes each strategy's collectives move per GPU (ring algorithms), over
  NVLink or PCIe within a node and the network between nodes, overlapped with compute;
- offload: parameter fetches over PCIe (from NVMe under `nvme`), gradients down and updated
  parameters up once per optimizer step, at half the link's nominal bandwidth, and the CPU (or
  NVMe) optimizer step; none of it overlapped with compute (OFFLOAD_LINK_EFFICIENCY,
  `step_time`);
- activation offload: the saved activations down in the forward (overlapped) and up in the
  backward (not overlapped), `activation_offload_seconds`;
- the optimizer step on the GPU: AdamW is memory-bound, bytes over HBM bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import FSDP, Settings, shard_size, world_size
from .gpus import GPU
from .memory import activation_host_bytes, freezing, lora_params, trainable_params
from .spec import ModelSpec, ParamCount, count_params

DEFAULT_MFU = 0.40
"""Model-FLOPs utilisation assumed for a bf16 fine-tuning step: dense decoder training reaches
35-50% on A100/H100 (PaLM reports 46% MFU, Megatron-LM 40-55% on large GEMMs); fine-tuning at
short sequences sits at the lower end."""

LAUNCH_S = 8e-6
"""Seconds per CUDA kernel launch (CPU-side launch latency, 5-10 µs)."""

KERNELS_PER_LAYER = 75
"""Kernels one transformer block runs per micro-step: about 25 in forward, twice that in
backward (norms, projections, rotary, attention, activation, residual adds)."""

INTER_NODE_GBS = 50.0
"""Network bandwidth per GPU between nodes, one direction: one 400 Gb/s InfiniBand NDR or
RoCE adapter per GPU, as in DGX H100 / B200 systems."""

NVME_GBS = 5.0
"""NVMe read or write bandwidth per node (one PCIe Gen4 SSD)."""

OFFLOAD_LINK_EFFICIENCY = 0.5
"""The fraction of the PCIe link's nominal one-way bandwidth that DeepSpeed's offload copies
reach: a maintainer's reading of a measured ZeRO-Offload step moved about 12 bytes per
parameter at 16 GB/s on a 32 GB/s link (deepspeedai/DeepSpeed#6695, 2024-11-01); the user's
own timing of that step gave 2.7 GB/s for the 16-bit parameters alone."""

HOST_BW_GBS = 100.0
"""Host memory bandwidth a CPU optimizer step (DeepSpeed's CPU Adam) streams at, per node."""

ADAM_BYTES_PER_PARAM = 36
"""AdamW's HBM traffic per trainable parameter and step, fp32 master: read parameter, gradient,
exp_avg, exp_avg_sq (16 B), write parameter and both moments (12 B), and foreach's sqrt
temporary written and read (8 B)."""


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step (all its micro-steps), per part."""
    compute: float       # matmuls at the assumed MFU, all micro-steps
    launch: float        # kernel launches
    dequant: float       # QLoRA dequantisation traffic
    comm: float          # collectives, before overlap
    offload_fetch: float  # parameters fetched from host (ZeRO-3 / FSDP offload), before overlap
    exposed: float       # communication and fetches not hidden behind compute
    optimizer: float     # optimizer step (GPU, or host / NVMe under offload), plus offload copies
    total: float

    @property
    def bound(self) -> str:
        """What dominates the step: compute, communication or offload."""
        parts = {"compute": self.compute + self.launch + self.dequant, "communication": self.exposed,
                 "optimizer": self.optimizer}
        return max(parts, key=parts.get)


def matmul_params(spec: ModelSpec, pc: ParamCount) -> float:
    """Parameters a token multiplies through: every linear of the blocks and the output head (the
    input embedding is a lookup, norms are elementwise). MoE: the router and top-k of the experts."""
    blocks = spec.layers * sum(i * o * n for _, i, o, n in pc.linear_shapes)
    experts = spec.layers * sum(i * o * n for _, i, o, n in pc.expert_shapes)
    if spec.experts:
        experts *= spec.top_k / spec.experts
    head = 0 if spec.is_encoder else spec.vocab * spec.hidden
    return blocks + experts + head


def attention_flops_per_token(spec: ModelSpec, st: Settings) -> float:
    """Forward FLOPs of the attention scores and weighted sum per token: 2 matmuls of
    2 x seq x q_dim per layer (PaLM's accounting, Chowdhery et al. 2022, appendix B)."""
    return 4 * spec.layers * st.seq_len * spec.q_dim


def train_flops_per_token(spec: ModelSpec, st: Settings) -> float:
    """Training FLOPs per token.

    A forward is 2 FLOPs per matmul parameter plus attention. Full fine-tuning adds a backward of
    twice that (input and weight gradients): 6N in all, as in Kaplan et al. / PaLM. LoRA and
    QLoRA skip the frozen weights' gradients: the backward computes input gradients only (2N),
    plus 6 FLOPs per adapter parameter; attention's backward is the same either way (twice its
    forward). Gradient checkpointing recomputes the forward once more. Partial freezing
    (`unfrozen_parameters`): the backward runs only from the lowest trainable block up (input
    gradients and attention there, recompute there under checkpointing) and computes weight
    gradients for the trainable parameters alone (2 FLOPs each).
    """
    pc = count_params(spec)
    n, attn = matmul_params(spec, pc), attention_flops_per_token(spec, st)
    fwd = 2 * n + attn
    fz = freezing(spec, st)
    if fz is not None:
        above = (spec.layers - max(fz.lowest, 0)) / spec.layers  # the blocks the backward reaches
        head = 0 if spec.is_encoder else spec.vocab * spec.hidden
        fwd_above = 2 * (head + (n - head) * above) + attn * above
        return fwd + fwd_above + 2 * fz.trainable + (fwd_above if st.grad_checkpointing else 0)
    if st.lora:
        flops = fwd + (2 * n + 2 * attn) + 6 * lora_params(spec, st)
    else:
        flops = 3 * fwd
    if st.grad_checkpointing:
        flops += fwd
    return flops


def _ring(n_bytes: float, ranks: int, allreduce: bool = False) -> float:
    """Bytes each GPU sends in a ring all-gather or reduce-scatter of `n_bytes` over `ranks`
    ((ranks - 1) / ranks of it), twice that for an all-reduce."""
    if ranks <= 1:
        return 0.0
    return (2 if allreduce else 1) * n_bytes * (ranks - 1) / ranks


@dataclass(frozen=True)
class CommBytes:
    """Bytes one GPU sends, each as (intra-node, network): per micro-step, and once per
    optimizer step."""
    micro: tuple[float, float] = (0.0, 0.0)
    step: tuple[float, float] = (0.0, 0.0)


def comm_bytes(spec: ModelSpec, st: Settings) -> CommBytes:
    """Bytes each GPU sends per micro-step and once per optimizer step (CommBytes).

    - DDP: one all-reduce of the gradients per optimizer step (accelerate's `no_sync` skips it
      on the other micro-steps), in the gradients' dtype (fp32 under autocast).
    - ZeRO-1: reduce-scatter of the 16-bit gradients and all-gather of the updated 16-bit
      parameters, once per step. ZeRO-2: the reduce-scatter on every micro-step (it partitions
      gradients as they are produced). ZeRO-3: all-gather parameters for forward and again for
      backward, reduce-scatter gradients, every micro-step (1.5x DDP's volume, Rajbhandari et al.
      2020).
    - FSDP (accelerate's FSDP2 mixed precision gathers and reduces in bf16): as ZeRO-3;
      `grad-op` gathers once per micro-step; `no-shard` all-reduces; `hybrid` shards within the
      node and all-reduces the shards' gradients across nodes. FSDP syncs on every micro-step
      (plan's trainer does: FSDP2's no-sync mode would keep whole unsharded gradients).
    LoRA moves only the adapters' gradients; the frozen base is gathered like any parameter.
    Across nodes the ring runs at the network's speed, so its bytes count as network bytes.
    """
    world = world_size(st)
    if world == 1:
        return CommBytes()
    pc = count_params(spec)
    p16 = 2 * pc.total                    # the 16-bit parameters
    train = trainable_params(spec, pc, st)
    g16 = 4 * train if st.lora else 2 * pc.total  # gradients as the engines reduce them
    s = st.strategy
    micro = step = 0.0
    if s == "ddp":
        step = _ring(4 * train, world, allreduce=True)
    elif s in ("zero1", "zero2"):
        step = _ring(2 * train if st.lora else p16, world)
        if s == "zero2":
            micro = _ring(g16, world)
        else:
            step += _ring(g16, world)
    elif s == "fsdp-no-shard":
        micro = _ring(g16, world, allreduce=True)
    else:  # zero3 and the sharding FSDP modes
        group = shard_size(st)
        gathers = 1 if s == "fsdp-grad-op" else 2
        micro = gathers * _ring(p16, group) + _ring(g16, group)
        if s == "fsdp-hybrid":
            return CommBytes(micro=(micro, _ring(g16 / group, st.nodes, allreduce=True)))
    if st.nodes > 1:
        return CommBytes(micro=(0.0, micro), step=(0.0, step))
    return CommBytes(micro=(micro, 0.0), step=(step, 0.0))


def offload_bytes(spec: ModelSpec, st: Settings) -> tuple[float, float]:
    """(parameter bytes fetched from host per micro-step, bytes moved over PCIe per optimizer
    step) per GPU.

    Parameter offload (ZeRO-3 `params`/`all`/`nvme`, FSDP `all`) fetches the GPU's partition for
    forward and backward (16-bit under ZeRO-3; FSDP2's fp32 shards), and once more for the
    recompute under gradient checkpointing. Optimizer offload sends the fp32 gradient partition
    down and the updated 16-bit partition up once per step.
    """
    if st.offload == "none":
        return 0.0, 0.0
    pc = count_params(spec)
    part = pc.total / shard_size(st)
    train_part = trainable_params(spec, pc, st) / shard_size(st)
    fetch = 0.0
    if st.offload in ("params", "all", "nvme") and (st.strategy == "zero3" or st.strategy in FSDP):
        fetch = (3 if st.grad_checkpointing else 2) * part * (4 if st.strategy in FSDP else 2)
    return fetch, 6 * train_part


def optimizer_seconds(spec: ModelSpec, st: Settings, gpu: GPU) -> float:
    """One optimizer step: AdamW's traffic over HBM for the GPU's share of the trainable
    parameters, or over host memory (and NVMe) when the optimizer is offloaded. A node's GPUs
    share its host memory bandwidth."""
    pc = count_params(spec)
    share = trainable_params(spec, pc, st) / (shard_size(st) if st.strategy != "ddp" else 1)
    traffic = ADAM_BYTES_PER_PARAM * share
    if st.offload == "none":
        return traffic / (gpu.mem_bw_gbs * 1e9) if gpu.mem_bw_gbs else 0.0
    host = traffic * st.gpus / (HOST_BW_GBS * 1e9)
    if st.offload == "nvme":  # read and write back the fp32 master and moments
        host += 2 * 12 * share * st.gpus / (NVME_GBS * 1e9)
    return host


def activation_offload_seconds(spec: ModelSpec, st: Settings, gpu: GPU, compute: float) -> float:
    """Seconds activation offloading adds to a micro-step: the saved activations' bytes
    (memory.activation_host_bytes) over PCIe each way. Down in the forward, on TRL's side stream,
    overlapped: compute waits only for the copy of the tensor `max_fwd_stash_size` packs back
    (trl/models/activation_offloading.py:273-286), so only the part longer than the forward's
    compute shows. Up in the backward, not overlapped: the unpack hook issues each copy when its
    node runs and makes the compute stream wait for it at once (:456-470; no prefetch)."""
    if not st.activation_offload or not gpu.pcie_gbs:
        return 0.0
    pcie = gpu.pcie_gbs * 1e9
    moved = activation_host_bytes(spec, st) / pcie
    pc = count_params(spec)
    forward = compute * (2 * matmul_params(spec, pc) + attention_flops_per_token(spec, st)) \
        / train_flops_per_token(spec, st)
    return max(0.0, moved - forward) + moved


def step_time(spec: ModelSpec, st: Settings, gpu: GPU, accumulation: int, mfu: float = DEFAULT_MFU) -> StepTime:
    """Seconds of one optimizer step of `accumulation` micro-steps of `st.batch_size` sequences.

    Each micro-step takes its compute (plus kernel launches and QLoRA dequantisation) or its
    communication, whichever is longer (NCCL runs on its own streams and the engines prefetch);
    parameter fetches from host RAM or NVMe add to it, not overlapped: ZeRO-3's offloaded
    parameters are copied host-to-device with a blocking `cudaStreamSynchronize` (NVMe offload of
    a 10B model on V100s ran at 2.3 TFLOPs per GPU against 30-40 with ZeRO-2:
    deepspeedai/DeepSpeed#1130; "Zero3 Offload ... fails to overlap I/O and computation":
    deepspeedai/DeepSpeed#3054). Offload copies run at OFFLOAD_LINK_EFFICIENCY of the link, NVMe
    reads at a node's NVME_GBS shared by its GPUs. The optimizer step and offload copies follow,
    not overlapped."""
    tokens = st.tokens
    peak = gpu.peak_tflops * 1e12
    compute = train_flops_per_token(spec, st) * tokens / (peak * mfu) if peak else float("inf")
    launch = KERNELS_PER_LAYER * spec.layers * LAUNCH_S * (1.33 if st.grad_checkpointing else 1)
    dequant = 0.0
    if st.quant != "none" and gpu.mem_bw_gbs:
        pc = count_params(spec)
        qparams = spec.layers * sum(i * o * n for _, i, o, n in pc.linear_shapes)
        passes = 3 if st.grad_checkpointing else 2
        # read the packed weight (0.5 B nf4 / 1 B int8) and write and read its 16-bit copy
        dequant = passes * qparams * ((0.5 if st.quant == "nf4" else 1) + 4) / (gpu.mem_bw_gbs * 1e9)
    link, net = gpu.link_gbs * 1e9, min(gpu.link_gbs, INTER_NODE_GBS) * 1e9
    cb = comm_bytes(spec, st)
    comm_micro = cb.micro[0] / link + cb.micro[1] / net
    comm_step = cb.step[0] / link + cb.step[1] / net
    fetch, per_step_pcie = offload_bytes(spec, st)
    pcie = gpu.pcie_gbs * 1e9 * OFFLOAD_LINK_EFFICIENCY
    fetch_s = fetch / pcie
    if st.offload == "nvme":  # the parameters come from the node's NVMe, which its GPUs share
        fetch_s = max(fetch_s, fetch * st.gpus / (NVME_GBS * 1e9))
    busy = compute + dequant
    busy += activation_offload_seconds(spec, st, gpu, compute)
    # per micro-step collectives hide behind that micro-step, the per-step all-reduce behind the
    # last micro-step's backward; parameter fetches do not hide
    exposed = accumulation * (max(0.0, comm_micro - busy) + fetch_s) + max(0.0, comm_step - busy)
    optimizer = optimizer_seconds(spec, st, gpu) + per_step_pcie / pcie
    total = accumulation * (busy + launch) + exposed + optimizer
    return StepTime(compute=compute * accumulation, launch=launch * accumulation, dequant=dequant * accumulation,
                    comm=comm_micro * accumulation + comm_step, offload_fetch=fetch_s * accumulation,
                    exposed=exposed, optimizer=optimizer, total=total)
