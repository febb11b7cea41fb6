"""Measured ground truth: a real training step of the real transformers class, traced by torch's
MemTracker, on fake tensors (no memory allocated, any size) or real CPU tensors.

The step is the one the estimator models: warm-up step (creates optimizer state), then a measured
`loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`.
CPU kernels stand in for CUDA ones, with two corrections applied to the model before measuring:
attention dropout is set to 0 (CUDA's flash kernels drop out without a seq x seq buffer, CPU
falls back to the math kernel), and `use_cache=False` as in training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from ..contract import (
    FUSED_LOSSES,
    MSAMP_NOTE,
    UNMEASURED_FUSED,
    UNMEASURED_OFFLOAD,
    UNMEASURED_TE,
    PlanError,
    Settings,
)
from ..estimate import Estimate, estimate
from ..memory import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, needed_bytes
from ..precision import RECIPES
from ..spec import ModelSpec, SpecError
from .builder import (
    build_model,
    grouped_mm_any_dtype,
    is_encoder,
    make_ema,
    make_optimizer,
    measured_config,
    train_step,
    unpacked_sequences,
)


@dataclass(frozen=True)
class Budget:
    """What one simulated step may take: wall seconds and resident memory. The step's cost is
    predicted from the config before anything is built (`check_budget`), and the wall time is
    enforced while it runs."""
    seconds: float = 120.0
    memory_bytes: int = 8 * 2**30


# Measured on the 2-core CPU machine (Qwen3-8B's width, 4 and 16 layers, full and LoRA r16,
# 2026-11-29): about 6 s of imports and set-up, then 0.12 s and 0.5 MiB per layer (0.45 s and
# 5 MiB with LoRA); the prediction takes twice that, so that it errs towards refusing.
SIM_SECONDS_PER_LAYER = 0.25
SIM_SECONDS_PER_LAYER_LORA = 0.9
SIM_BASE_BYTES = 512 * 2**20
SIM_BYTES_PER_LAYER = 1 * 2**20
SIM_BYTES_PER_LAYER_LORA = 10 * 2**20
SIM_MAX_ELEMENTS = 2**48
"""Largest tensor the simulator builds, in elements (fake tensors hold no data, but torch's
shape arithmetic is 64-bit): 2.8e14, 100x Llama-3.1-405B's largest."""

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "moe_intermediate_size",
               "vocab_size", "num_local_experts", "num_experts", "n_routed_experts", "head_dim",
               "num_attention_heads", "n_head", "num_key_value_heads", "max_position_embeddings", "n_positions")


def _size(cfg: dict, keys: tuple[str, ...]) -> int:
    vals = [cfg[k] for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)]
    return max(vals, default=0)


def check_budget(cfg: dict, st: Settings, budget: Budget) -> None:
    """Refuse, before building anything, a step the budget cannot hold: its predicted time or
    memory (from the layer count, SIM_SECONDS_PER_LAYER...) over the budget, or a tensor over
    SIM_MAX_ELEMENTS (the widest product of two sizes, or the tokens times the vocabulary)."""
    layers = _size(cfg, _LAYER_KEYS)
    seconds = layers * (SIM_SECONDS_PER_LAYER_LORA if st.lora else SIM_SECONDS_PER_LAYER)
    memory = SIM_BASE_BYTES + layers * (SIM_BYTES_PER_LAYER_LORA if st.lora else SIM_BYTES_PER_LAYER)
    if seconds > budget.seconds:
        raise PlanError(f"the simulator would take about {seconds:,.0f} s for {layers:,} layers, over its budget of "
                        f"{budget.seconds:g} s (raise it with {{sim_seconds}})", "sim_seconds")
    if memory > budget.memory_bytes:
        raise PlanError(f"the simulator would need about {memory / 2**30:,.1f} GiB for {layers:,} layers, over its "
                        f"budget of {budget.memory_bytes / 2**30:g} GiB (raise it with {{sim_memory}})", "sim_memory")
    widths = sorted((_size(cfg, (k,)) for k in _WIDTH_KEYS), reverse=True)
    widest = max(widths[0] * widths[1], st.tokens * _size(cfg, ("vocab_size",)))
    if widest > SIM_MAX_ELEMENTS:
        raise PlanError(f"the config's sizes make a tensor of {widest:.2e} elements, over the simulator's limit of "
                        f"{SIM_MAX_ELEMENTS:.1e}: check the config's sizes")


@contextlib.contextmanager
def _wall_clock(seconds: float):
    """Stop a step that runs past `seconds` with a PlanError (SIGALRM: the main thread only;
    elsewhere the step runs unbounded)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def stop(*_):
        raise PlanError(f"the simulator stopped after its budget of {seconds:g} s (raise it with {{sim_seconds}})",
                        "sim_seconds")
    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Measurement:
    peak_bytes: int
    phases: dict
    categories: dict  # phase -> MemTracker's categories at that phase's peak, as contract components
    params: int = 0
    trainable_params: int = 0
    reserved_bytes: int = 0  # the caching allocator's high-water mark for the run (planner/allocator.py)
    events: list | None = None  # the allocation sequence replayed for it, when asked for


def measure(cfg: dict, st: Settings, fake: bool = True, weights: str | None = None,
            keep_events: bool = False) -> Measurement:
    """Build the model, run a warm-up and a measured step; return the peak and per-phase peaks of
    the measured step (MemTracker, entered at its start), and the caching allocator's reserved
    peak for the whole run (model, warm-up, step: `AllocationRecorder` from the first tensor)
    from its allocation sequence replayed through planner/allocator.py."""
    if fake and st.optimizer == "lbfgs":
        raise PlanError("{optimizer} lbfgs reads values inside its step (its curvature test, the loss): the "
                        "simulator runs it on real tensors only", "optimizer")
    with unpacked_sequences(), grouped_mm_any_dtype():
        return _measure(cfg, st, fake, weights, keep_events)


CUBLAS_WORKSPACES = (32 * 2**20, 32 * 2**20)
"""What the H200 traces show cuBLAS taking from the caching allocator (torch 2.11, CUDA 13): 32 MiB
at the forward's first matmul and 32 MiB at the backward's (autograd's device thread has its own
handle), kept to the end (CUBLAS_WORKSPACE_BYTES in the formulas)."""


def _measure(cfg: dict, st: Settings, fake: bool, weights: str | None = None, keep_events: bool = False):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..allocator import replay
    from .tracker import AllocationRecorder
    mode = FakeTensorMode() if fake else None
    torch.manual_seed(0)
    with AllocationRecorder(CUBLAS_WORKSPACES) as recorder:
        m = _run(cfg, st, mode, weights)
    m.reserved_bytes = replay(recorder.events).peak_reserved
    m.events = recorder.events if keep_events else None
    return m


def _run(cfg: dict, st: Settings, mode, weights: str | None) -> Measurement:
    import torch

    from .tracker import PhaseRecorder, Tracker
    model, config = build_model(cfg, st, mode, weights)
    ctx = mode if mode is not None else contextlib.nullcontext()
    rc = RECIPES[st.precision]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if rc.autocast else contextlib.nullcontext()
    with ctx:
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], st.optimizer,
                             lbfgs_history=st.lbfgs_history)
        ema = make_ema(model)[:2] if st.ema else None
        ids = torch.randint(0, config.vocab_size, (st.batch_size, st.seq_len))
        labels = torch.zeros(st.batch_size, dtype=torch.long) if is_encoder(config) else ids
        if st.head_tokens:  # labels on the last head_tokens positions a next token follows (row-major)
            keep = torch.zeros(st.batch_size * (st.seq_len - 1), dtype=torch.bool)
            keep[-st.head_tokens:] = True
            labels = torch.full_like(ids, -100)
            labels[:, 1:] = torch.where(keep.view(st.batch_size, -1), ids[:, 1:], -100)
        batch = dict(input_ids=ids, labels=labels)
        if st.attention_mask:  # one padded token: transformers builds its 4-D mask (memory.sdpa_mask_bytes)
            batch["attention_mask"] = torch.ones(st.batch_size, st.seq_len, dtype=torch.long)
            batch["attention_mask"][0, -1] = 0
        micro = 2 if st.accumulation > 1 else 1  # from the second micro-step on, the memory repeats
        # warm-up, under the allocation recorder only: creates the optimizer state. L-BFGS: steps
        # until its history is full (at most one pair per step, none when the step fails its
        # curvature test): twice the history and more. (A MemTracker entered before the warm-up
        # keeps two hidden-sized tensors of a checkpointed LoRA step alive that an untracked run
        # frees: 6% on a small gemma2.)
        for _ in range(2 * st.lbfgs_history + 2 if st.optimizer == "lbfgs" else 1):
            train_step(model, opt, batch, amp, micro_steps=micro, ema=ema)
        tracker = Tracker()
        tracker.track_external(model, opt, *batch.values(), *([ema[0]] if ema else []))
        # state MemTracker's optimizer walk misses: tensors in lists (L-BFGS's history pairs)
        tracker.track_external(*[t for state in opt.state.values() for v in state.values() if isinstance(v, list)
                                 for t in v if isinstance(t, torch.Tensor)])
        record = PhaseRecorder(tracker, reset_modules_after=("backward",) if micro > 1 else ())
        with tracker:
            s0 = tracker.get_tracker_snapshot("current")
            train_step(model, opt, batch, amp, record, micro_steps=micro, ema=ema)
        phases, cats = record.phases, record.categories
        d0 = next(iter(s0)) if s0 else None
        phases["model"] = (sum(v for k, v in s0[d0].items() if getattr(k, "value", None) in ("Parameter", "Buffer"))
                           if d0 else 0)
        cats["model"] = {"weights": phases["model"]}
        n_params = sum(stored_elements(p) for p in {id(p): p for p in model.parameters()}.values())
        n_train = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    peak = max(phases.values())
    return Measurement(peak_bytes=int(peak), phases={k: int(v) for k, v in phases.items()}, categories=cats,
                       params=int(n_params), trainable_params=int(n_train))


def stored_elements(p) -> int:
    """The elements a parameter stands for: a bitsandbytes 4-bit weight packs two into a byte
    and keeps its shape in its QuantState (`Params4bit.quant_state.shape`), what transformers'
    `num_parameters` counts too (transformers/modeling_utils.py:945-952)."""
    import math
    qs = getattr(p, "quant_state", None)
    return math.prod(qs.shape) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()


def simulated_estimate(cfg: dict, st: Settings, budget: Budget = Budget()) -> Estimate:
    """An Estimate measured by the simulator: for architectures without a formula, and --exact.

    The step runs CPU kernels. Where they keep different memory than CUDA's, the measurement is
    corrected and a note says by how much: attention dropout is always off in the simulator
    (CUDA's fused SDPA kernels drop out without a seq x seq buffer); CPU dropout keeps an fp32
    mask where CUDA keeps a bool, and CPU autocast's op lists differ (GELU-tanh's pow). For
    architectures with a formula the difference between the formula's CUDA and CPU kernel
    policies is added to each phase.
    """
    if st.quant != "none":
        raise PlanError(f"{{quant}} {st.quant}: the simulator cannot run bitsandbytes kernels on CPU; "
                        "drop --exact for the formula", "quant")
    if st.optimizer in ("adamw-8bit", "lion-8bit"):
        raise PlanError(f"{{optimizer}} {st.optimizer}: bitsandbytes' 8-bit step reads its values, which fake tensors "
                        "do not have; drop --exact for the formula (measured on real tensors: tables/validation.csv)",
                        "optimizer")
    if st.loss in FUSED_LOSSES:
        raise PlanError(f"{{loss}} {st.loss}: {UNMEASURED_FUSED}; drop --exact for the formula", "loss")
    if st.activation_offload:
        raise PlanError(f"{{activation_offload}}: {UNMEASURED_OFFLOAD}; drop --exact for the formula",
                        "activation_offload")
    if st.precision == "fp8-te":
        raise PlanError(f"{{precision}} fp8-te: {UNMEASURED_TE}; drop --exact for the formula", "precision")
    if st.precision.startswith("msamp"):
        raise PlanError(f"{{precision}} {st.precision}: {MSAMP_NOTE}; drop --exact for the formula", "precision")
    check_budget(cfg, st, budget)
    try:
        with _wall_clock(budget.seconds):
            m = measure(cfg, replace(st, kernels="cpu"), fake=True)
    except PlanError:
        raise
    except Exception as e:  # transformers or torch refusing this config: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise PlanError(f"the simulator cannot run this config ({type(e).__name__}: {first})") from None
    phases = {k: m.phases[k] for k in ("model", "forward", "backward", "optimizer_step")}
    cats = {k: dict(v) for k, v in m.categories.items()}
    notes = ["measured: a real training step of the transformers model under fake tensors (MemTracker), CPU kernels"]
    try:
        spec = ModelSpec.from_config(measured_config(cfg))
    except SpecError:
        spec = None
        notes.append("attention dropout off as on CUDA's fused kernels; any dropout masks are counted as CPU keeps "
                     "them (fp32, CUDA: 1 byte per value), so this may be slightly high")
    delta: dict = {}
    if spec is not None and st.kernels == "cuda":
        cuda, cpu = estimate(spec, replace(st, kernels="cuda")), estimate(spec, replace(st, kernels="cpu"))
        delta = {k: cuda.phases[k] - cpu.phases[k] for k in phases}
        if any(delta.values()):
            for k, d in delta.items():
                phases[k] += d
                cats[k]["activations"] = cats[k].get("activations", 0) + d
            worst = max(delta.values(), key=abs)
            trl = "; TRL's head: a Triton fold in place on CUDA, torch tiles on CPU" if st.loss == "trl" else ""
            notes.append(f"corrected from CPU to CUDA kernels (dropout masks: bool on CUDA, fp32 on CPU; autocast "
                         f"runs GELU-tanh's pow in fp32 on CUDA{trl}): {worst / 2**20:+,.1f} MiB "
                         f"in the phase it changes most")
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    # NVML's figure: the replayed allocator high-water mark (its trace has the cuBLAS workspaces
    # already), with the CUDA-kernel corrections beyond them, and the CUDA context
    cuda_extra = max(max(delta.values(), default=0) - CUBLAS_WORKSPACE_BYTES, 0)
    return Estimate(params=m.params, trainable_params=m.trainable_params, peak_bytes=peak,
                    device_bytes=int(max(peak, m.reserved_bytes + cuda_extra) + CUDA_CONTEXT_BYTES),
                    components=cats[peak_phase], phases=phases,
                    phase_components=cats, notes=notes, needed_bytes=needed_bytes(phases))
