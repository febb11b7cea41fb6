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

from ..contract import PlanError, Settings
from ..estimate import Estimate, estimate
from ..memory import device_bytes
from ..precision import RECIPES
from ..spec import ModelSpec, SpecError
from .builder import build_model, is_encoder, make_optimizer, measured_config, train_step, unpacked_sequences


@dataclass
class Measurement:
    peak_bytes: int
    phases: dict
    categories: dict  # phase -> MemTracker's categories at that phase's peak, as contract components
    params: int = 0
    trainable_params: int = 0


def measure(cfg: dict, st: Settings, fake: bool = True, weights: str | None = None) -> Measurement:
    """Run warm-up + measured step under MemTracker; return the peak and per-phase peaks."""
    with unpacked_sequences():
        return _measure(cfg, st, fake, weights)


def _measure(cfg: dict, st: Settings, fake: bool, weights: str | None = None) -> Measurement:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tracker import PhaseRecorder, Tracker
    mode = FakeTensorMode() if fake else None
    torch.manual_seed(0)
    model, config = build_model(cfg, st, mode, weights)
    ctx = mode if mode is not None else contextlib.nullcontext()
    rc = RECIPES[st.precision]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if rc.autocast else contextlib.nullcontext()
    with ctx:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(trainable, st.optimizer)
        ids = torch.randint(0, config.vocab_size, (st.batch_size, st.seq_len))
        labels = torch.zeros(st.batch_size, dtype=torch.long) if is_encoder(config) else ids

        batch = dict(input_ids=ids, labels=labels)
        train_step(model, opt, batch, amp)
        tracker = Tracker()
        tracker.track_external(model, opt, ids, labels)
        record = PhaseRecorder(tracker)
        with tracker:
            s0 = tracker.get_tracker_snapshot("current")
            train_step(model, opt, batch, amp, record)
        phases, cats = record.phases, record.categories
        d0 = next(iter(s0)) if s0 else None
        phases["model"] = (sum(v for k, v in s0[d0].items() if getattr(k, "value", None) in ("Parameter", "Buffer"))
                           if d0 else 0)
        cats["model"] = {"weights": phases["model"]}
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        n_train = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    peak = max(phases.values())
    return Measurement(peak_bytes=int(peak), phases={k: int(v) for k, v in phases.items()}, categories=cats,
                       params=int(n_params), trainable_params=int(n_train))


def simulated_estimate(cfg: dict, st: Settings) -> Estimate:
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
    if st.optimizer == "adamw-8bit":
        raise PlanError("{optimizer} adamw-8bit: bitsandbytes' 8-bit step reads its values, which fake tensors "
                        "do not have; drop --exact for the formula (measured on real tensors: tables/validation.csv)",
                        "optimizer")
    m = measure(cfg, replace(st, kernels="cpu"), fake=True)
    phases = {k: m.phases[k] for k in ("model", "forward", "backward", "optimizer_step")}
    cats = {k: dict(v) for k, v in m.categories.items()}
    notes = ["measured: a real training step of the transformers model under fake tensors (MemTracker), CPU kernels"]
    try:
        spec = ModelSpec.from_config(measured_config(cfg))
    except SpecError:
        spec = None
        notes.append("attention dropout off as on CUDA's fused kernels; any dropout masks are counted as CPU keeps "
                     "them (fp32, CUDA: 1 byte per value), so this may be slightly high")
    if spec is not None and st.kernels == "cuda":
        cuda, cpu = estimate(spec, replace(st, kernels="cuda")), estimate(spec, replace(st, kernels="cpu"))
        delta = {k: cuda.phases[k] - cpu.phases[k] for k in phases}
        if any(delta.values()):
            for k, d in delta.items():
                phases[k] += d
                cats[k]["activations"] = cats[k].get("activations", 0) + d
            worst = max(delta.values(), key=abs)
            notes.append(f"corrected from CPU to CUDA kernels (dropout masks: bool on CUDA, fp32 on CPU; autocast "
                         f"runs GELU-tanh's pow in fp32 on CUDA): {worst / 2**20:+,.1f} MiB "
                         f"in the phase it changes most")
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    return Estimate(params=m.params, trainable_params=m.trainable_params, peak_bytes=peak,
                    device_bytes=device_bytes(peak, st.grad_checkpointing), components=cats[peak_phase], phases=phases,
                    phase_components=cats, notes=notes)
