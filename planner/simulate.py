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
from dataclasses import dataclass

from .memory import RECIPES, Settings


ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")


def measured_config(cfg: dict) -> dict:
    """The config as the simulator runs it, for the formula it is compared with: attention
    dropout 0, whatever the class default (see the module docstring)."""
    return {**cfg, **{k: 0.0 for k in ATTENTION_DROPOUT_KEYS}}


@dataclass
class Measurement:
    peak_bytes: int
    phases: dict
    categories: dict  # phase -> MemTracker's categories at that phase's peak, as contract components
    params: int = 0
    trainable_params: int = 0


def build_model(cfg: dict, st: Settings, fake_mode=None, weights: str | None = None, meta: bool = False,
                device: str | None = None):
    """The model class a user trains, set up as the settings say. `weights`: a directory of
    safetensors or a .gguf file to load real pretrained weights from (real tensors only).
    `meta`: leave it on the meta device (a sharding wrapper materialises it). `device`: build
    the real tensors there (a GPU) instead of on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    mt = cfg.pop("model_type")
    cfg["use_cache"] = False
    load = {}
    if weights is not None:
        from pathlib import Path
        path = Path(weights)
        load = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name} if path.suffix == ".gguf" \
            else {"pretrained_model_name_or_path": str(path)}
        config = AutoConfig.from_pretrained(**load, use_cache=False)
    else:
        config = AutoConfig.for_model(mt, **cfg)
    for k in ATTENTION_DROPOUT_KEYS:
        if hasattr(config, k):  # the class default counts too (GPT-2 and BERT default to 0.1)
            setattr(config, k, 0.0)
    rc = RECIPES[st.precision]
    dtype = torch.bfloat16 if rc.weight == 2 else torch.float32
    attn = "eager" if st.attn == "eager" or getattr(config, "attn_logit_softcapping", None) else "sdpa"
    cls = _model_class(config)
    # Under fake tensors the model is built on the meta device (PEFT's adapter moves cannot swap
    # fake parameters) and each tensor is then turned into a fake CPU tensor of the same shape.
    ctx = torch.device("meta") if fake_mode is not None or meta else \
        (torch.device(device) if device else contextlib.nullcontext())
    with ctx:
        if weights is not None:
            model = cls.from_pretrained(**load, config=config, dtype=dtype, attn_implementation=attn)
        else:
            model = cls.from_config(config, dtype=dtype, attn_implementation=attn)
        if st.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if st.lora:
            from peft import LoraConfig, get_peft_model
            lcfg = LoraConfig(r=st.lora_rank, lora_alpha=st.lora_alpha or 2 * st.lora_rank,
                              lora_dropout=st.lora_dropout,
                              target_modules="all-linear" if st.lora_targets == "all-linear" else st.lora_targets.split(","),
                              task_type="CAUSAL_LM" if cls is AutoModelForCausalLM else "SEQ_CLS")
            model = get_peft_model(model, lcfg)
            if cls is not AutoModelForCausalLM:  # PEFT's SEQ_CLS keeps the classifier trainable; adapters only here
                for n, p in model.named_parameters():
                    if "lora_" not in n:
                        p.requires_grad_(False)
        model.train()
    if fake_mode is not None:
        _fakeify(model, fake_mode)
    return model, config


def _is_encoder(config) -> bool:
    """BERT-style encoders (token-type embeddings) train with a task head: sequence classification,
    the head the estimator assumes. transformers' causal-LM head for them needs is_decoder."""
    return getattr(config, "type_vocab_size", None) is not None and not getattr(config, "is_decoder", False)


def _model_class(config):
    """The class a user trains: sequence classification for encoders, a causal LM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    if _is_encoder(config) and config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return AutoModelForSequenceClassification
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    raise ValueError(f"transformers has no causal-LM class for model_type '{config.model_type}'")


def _fakeify(model, fake_mode) -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorConverter

    conv = FakeTensorConverter()
    cpu = torch.device("cpu")
    done = {}  # id(meta parameter) -> fake parameter, so tied weights stay one parameter
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    fake = conv.from_meta_and_device(fake_mode, p.data, cpu)
                    done[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                mod._parameters[name] = done[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = conv.from_meta_and_device(fake_mode, b, cpu)


def make_optimizer(params, name: str, lr: float | None = None, weight_decay: float = 0.0):
    """The optimizer the estimate counts for `name`, as torch / transformers / bitsandbytes build it.
    `params`: tensors or param groups. `lr` None: a small default (the simulator's steps)."""
    import torch
    kw = dict(lr=lr if lr is not None else 1e-4, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, foreach=True, **kw)
    if name == "adamw-fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    if name == "adamw-8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer adamw-8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, foreach=True, **{**kw, "lr": lr if lr is not None else 1e-3})
    if name == "sgd-momentum":
        return torch.optim.SGD(params, momentum=0.9, foreach=True, **{**kw, "lr": lr if lr is not None else 1e-3})
    if name == "adafactor":
        from transformers.optimization import Adafactor
        # as HF Trainer builds it for optim="adafactor": fixed learning rate, no parameter scaling
        return Adafactor(params, lr=lr if lr is not None else 1e-3, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    raise ValueError(f"no {name} optimizer here: choose adamw, adamw-fused, adamw-8bit, sgd, sgd-momentum or adafactor")


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        """MemTracker that accepts frozen parameters (LoRA bases) and keeps the global peak only.

        torch's version registers a gradient hook on every parameter, which raises for one
        without requires_grad. Modules holding frozen parameters get no gradient hooks; their
        gradients are still counted in the total, only under another category."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            ok = all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and ok)

        def _update_peak_stats(self, peak_state) -> None:
            """Only the global peak: torch's version also walks every module on every op to keep
            per-module peaks, which the simulator does not read (minutes for a LoRA model with
            thousands of modules)."""
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return Tracker


def phase_peak(tracker, dev=None) -> tuple:
    """(device, MemTracker's peak snapshot since the last call) for the tracked device, then
    restart the peak from the live bytes now, so that each phase of a step reports its own peak."""
    s = tracker.get_tracker_snapshot("peak")
    dev = dev or next(iter(s))
    peak = dict(s.get(dev, {"Total": 0}))
    cur = tracker.get_tracker_snapshot("current")
    tracker._peak_mem[dev] = cur[dev]["Total"]
    tracker._peak_mem_snap[dev] = dict(cur[dev])
    return dev, peak


@contextlib.contextmanager
def _unpacked_sequences():
    """transformers checks `position_ids` for packed sequences by reading their values; on fake
    tensors it cannot, assumes packing and builds an explicit 4-D mask (and repeats GQA's k and v)
    where a real run passes `is_causal=True`. The simulator feeds unpacked rows (positions
    0..S-1), so it gives the answer a real run computes: no packing."""
    import transformers.masking_utils as mu

    orig = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = orig


def measure(cfg: dict, st: Settings, fake: bool = True, weights: str | None = None) -> Measurement:
    """Run warm-up + measured step under MemTracker; return the peak and per-phase peaks."""
    with _unpacked_sequences():
        return _measure(cfg, st, fake, weights)


def train_step(model, opt, batch: dict, amp, snap=lambda phase: None, engine=None) -> None:
    """One training step as the estimate models it, calling `snap(phase)` at the end of the
    forward, the backward and the optimizer step. `engine`: a DeepSpeed engine, whose `backward`
    and `step` (the optimizer step and gradient release) replace the plain calls."""
    with amp:
        loss = model(**batch).loss
    snap("forward")
    if engine is not None:
        engine.backward(loss)
    else:
        loss.backward()
    del loss
    snap("backward")
    if engine is not None:
        engine.step()
    else:
        opt.step()
        opt.zero_grad(set_to_none=True)
    snap("optimizer_step")


def _measure(cfg: dict, st: Settings, fake: bool, weights: str | None = None) -> Measurement:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
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
        labels = torch.zeros(st.batch_size, dtype=torch.long) if _is_encoder(config) else ids

        batch = dict(input_ids=ids, labels=labels)
        train_step(model, opt, batch, amp)
        tracker = _tracker_class()()
        tracker.track_external(model, opt, ids, labels)
        phases, cats = {}, {}
        with tracker:
            dev = None

            def snap(name):
                nonlocal dev
                dev, s = phase_peak(tracker, dev)
                phases[name] = s["Total"]
                cats[name] = _components(s)

            s0 = tracker.get_tracker_snapshot("current")
            train_step(model, opt, batch, amp, snap)
        d0 = next(iter(s0)) if s0 else None
        phases["model"] = sum(v for k, v in s0[d0].items() if getattr(k, "value", None) in ("Parameter", "Buffer")) if d0 else 0
        cats["model"] = {"weights": phases["model"]}
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        n_train = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    peak = max(phases.values())
    return Measurement(peak_bytes=int(peak), phases={k: int(v) for k, v in phases.items()}, categories=cats,
                       params=int(n_params), trainable_params=int(n_train))


# MemTracker's reference types -> the contract's components (logits are activations to it)
_CATEGORY = {"Parameter": "weights", "Buffer": "weights", "Gradient": "gradients", "Optstate": "optimizer",
             "Activation": "activations", "Temp": "other", "Other": "other"}


def _components(snapshot: dict) -> dict:
    out = {k: 0 for k in ("weights", "gradients", "optimizer", "activations", "logits", "other")}
    for k, v in snapshot.items():
        if k != "Total":
            out[_CATEGORY.get(getattr(k, "value", str(k)), "other")] += int(v)
    return out


def simulated_estimate(cfg: dict, st: Settings):
    """An Estimate measured by the simulator: for architectures without a formula, and --exact.

    The step runs CPU kernels. Where they keep different memory than CUDA's, the measurement is
    corrected and a note says by how much: attention dropout is always off in the simulator
    (CUDA's fused SDPA kernels drop out without a seq x seq buffer); CPU dropout keeps an fp32
    mask where CUDA keeps a bool, and CPU autocast's op lists differ (GELU-tanh's pow). For
    architectures with a formula the difference between the formula's CUDA and CPU kernel
    policies is added to each phase.
    """
    from dataclasses import replace

    from .memory import Estimate, PlanError, device_bytes, estimate
    from .spec import ModelSpec, SpecError

    if st.quant != "none":
        raise PlanError(f"--quant {st.quant}: the simulator cannot run bitsandbytes kernels on CPU; "
                        "drop --exact for the formula")
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
                         f"runs GELU-tanh's pow in fp32 on CUDA): {worst / 2**20:+,.1f} MiB in the phase it changes most")
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    return Estimate(params=m.params, trainable_params=m.trainable_params, peak_bytes=peak,
                    device_bytes=device_bytes(peak, st.grad_checkpointing), components=cats[peak_phase], phases=phases,
                    phase_components=cats, notes=notes)
