"""What a run trains, built one way for every measurement and for the trainer: the
transformers model set up as the settings say (dtype, attention kernel, checkpointing, LoRA
through PEFT, an NF4 base through bitsandbytes), the optimizer the estimate counts, FSDP2
sharding as accelerate applies it, and the training step the estimate models.

The simulator, the per-rank and GPU measurements and `plan train` all build through here, so
the trainer trains exactly what the simulator measures.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

from ..contract import EMA_DECAY, Optimizer, Settings
from ..precision import RECIPES

ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")


def measured_config(cfg: dict) -> dict:
    """The config as the simulator runs it, for the formula it is compared with: attention
    dropout 0, whatever the class default (see the module docstring)."""
    return {**cfg, **{k: 0.0 for k in ATTENTION_DROPOUT_KEYS}}




def build_model(cfg: dict, st: Settings, fake_mode=None, weights: str | None = None, meta: bool = False,
                device: str | None = None):
    """The model class a user trains, set up as the settings say. `weights`: a directory of
    safetensors or a .gguf file to load real pretrained weights from (real tensors only).
    `meta`: leave it on the meta device (a sharding wrapper materialises it). `device`: build
    the real tensors there (a GPU) instead of on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    nf4_fake = st.quant == "nf4" and fake_mode is not None
    if st.quant != "none" and not nf4_fake:
        if fake_mode is not None or meta or weights is not None:
            raise ValueError(f"a {st.quant} base is built from random weights on real tensors only"
                             + (" (an NF4 one also on fake tensors)" if st.quant == "int8" else ""))
        return nf4_model(cfg, st, device or "cpu")
    if nf4_fake and (meta or weights is not None):
        raise ValueError("an NF4 base on fake tensors is built from random weights")
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
    # an NF4 base loads in bf16 (nf4_model's dtype) before prepare_model_for_kbit_training upcasts
    dtype = torch.bfloat16 if rc.weight == 2 or nf4_fake else torch.float32
    attn = attention_kernel(config, st)
    cls = model_class(config)
    # Under fake tensors the model is built on the meta device (PEFT's adapter moves cannot swap
    # fake parameters) and each tensor is then turned into a fake CPU tensor of the same shape.
    ctx = torch.device("meta") if fake_mode is not None or meta else \
        (torch.device(device) if device else contextlib.nullcontext())
    with ctx:
        if weights is not None:
            model = cls.from_pretrained(**load, config=config, dtype=dtype, attn_implementation=attn)
        else:
            model = cls.from_config(config, dtype=dtype, attn_implementation=attn)
        if nf4_fake:  # QLoRA as nf4_model sets it up, its base quantised on the meta device
            model = prepare_kbit(nf4_meta_base(model), st)
        elif st.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if st.lora:
            model = with_lora(model, st, sequence_classification=cls is not AutoModelForCausalLM)
        elif st.unfrozen_parameters:
            unfreeze_only(model, st.unfrozen_parameters)
        model.train()
    if st.loss != "standard":
        install_loss(model, st)
    elif st.head_tokens:
        install_labelled_head(model)
    if st.precision == "fp8-ao":
        convert_fp8_ao(model)
    if fake_mode is not None:
        fakeify(model, fake_mode)
    if nf4_fake:
        attach_nf4_states(model)
    return model, config


def with_lora(model, st: Settings, sequence_classification: bool = False):
    """PEFT's LoRA adapters on `model`; with `unfrozen_parameters`, the modules owning a matching
    parameter as `modules_to_save` (PEFT trains a copy of each, the original frozen). Only the
    adapters and those copies train: PEFT's SEQ_CLS would also train the classifier, which the
    estimate leaves frozen unless named. None matching is a ValueError."""
    from peft import get_peft_model

    from ..spec import owning_modules
    saved = sorted(owning_modules((n for n, _ in model.named_parameters()), st.unfrozen_parameters))
    if st.unfrozen_parameters and not saved:
        raise ValueError(f"no parameter name matches {list(st.unfrozen_parameters)}")
    model = get_peft_model(model, lora_config(st, sequence_classification, modules_to_save=saved or None,
                                              model=model))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or any(f"{m}.modules_to_save." in n for m in saved))
    return model


class Fp8LibraryMissing(ValueError):
    """The FP8 recipe the settings ask for needs a library (or a GPU) this machine does not have."""


def check_fp8_library(precision: str) -> None:
    """Raise Fp8LibraryMissing where `precision`'s FP8 library cannot be imported here: torchao
    for fp8-ao; Transformer Engine for fp8-te."""
    import importlib.util
    need = {"fp8-ao": ("torchao", "torchao"), "fp8-te": ("transformer_engine", "transformer-engine")}.get(precision)
    if need is not None and importlib.util.find_spec(need[0]) is None:
        raise Fp8LibraryMissing(f"precision {precision} needs {need[1]}")


def convert_fp8_ao(model) -> None:
    """torchao float8 training as accelerate sets it up for `mixed_precision="fp8"` with the AO
    backend (`Accelerator._prepare_ao`): accelerate's own `convert_model_to_fp8_ao`, which swaps
    every nn.Linear but the first and the last (and any whose sizes are not multiples of 16) for
    torchao's Float8Linear with the default recipe (tensorwise dynamic scaling)."""
    try:
        import torchao.float8  # noqa: F401
        from accelerate.utils.ao import convert_model_to_fp8_ao
    except ImportError:
        raise Fp8LibraryMissing("precision fp8-ao needs torchao (pip install --no-deps 'torchao>=0.10')") from None
    convert_model_to_fp8_ao(model)


def unfreeze_only(model, patterns) -> int:
    """Train only the parameters whose names match (`re.search`) one of `patterns`, Axolotl's
    `unfrozen_parameters`; freeze every other one. Returns how many parameter tensors train; none
    matching is a ValueError."""
    import re
    pats = [re.compile(p) for p in patterns]
    n = 0
    for name, p in model.named_parameters():
        keep = any(pat.search(name) for pat in pats)
        p.requires_grad_(keep)
        n += keep
    if n == 0:
        raise ValueError(f"no parameter name matches {list(patterns)}")
    return n


class LossLibraryMissing(ValueError):
    """The loss the settings ask for needs a library (or a GPU) this machine does not have."""


LOSS_LIBRARY = {"liger-flce": "liger-kernel", "cce": "cut-cross-entropy", "chunked": "torchtune", "trl": "trl"}
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")
"""The per-token outputs TRL's SFTTrainer asks its fused head for (trl/trainer/sft_trainer.py:1144-1147,
TRL 1.16: the loss, and the entropy and token-accuracy metrics)."""


def torchtune_chunked_loss():
    """torchtune's CEWithChunkedOutputLoss class. torchtune's package `__init__` refuses to import
    without torchao (and torchtune 0.6 fails with torchao 0.18); the loss module itself imports
    only torch, so it is loaded from the installed torchtune's file when the package will not
    import."""
    try:
        from torchtune.modules.loss import CEWithChunkedOutputLoss
        return CEWithChunkedOutputLoss
    except ImportError:
        pass
    import importlib.util
    import os
    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        raise LossLibraryMissing("loss chunked needs torchtune's CEWithChunkedOutputLoss (pip install torchtune)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "modules", "loss", "ce_chunked_output_loss.py")
    mod_spec = importlib.util.spec_from_file_location("_torchtune_ce_chunked_output_loss", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.CEWithChunkedOutputLoss


def _fused_loss(st: Settings):
    """The fused loss function of liger-kernel or cut-cross-entropy, or one line naming what to
    install (both are Triton kernels: they need Triton and a CUDA GPU)."""
    what = LOSS_LIBRARY[st.loss]
    try:
        if st.loss == "liger-flce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            return LigerFusedLinearCrossEntropyLoss(reduction="sum")
        from cut_cross_entropy import linear_cross_entropy
        return linear_cross_entropy
    except ImportError as e:
        if "triton" in str(e):
            raise LossLibraryMissing(f"loss {st.loss} needs Triton on a CUDA GPU (pip install {what} triton, where "
                                     "there is one)") from None
        raise LossLibraryMissing(f"loss {st.loss} needs {what} (pip install {what})") from None


def install_trl_head(m) -> None:
    """TRL's chunked log-probability head as SFTTrainer trains through it: TRL's own
    `add_fused_lm_head(model, outputs=TRL_OUTPUTS)` on the base model (sft_trainer.py:1144), and
    a forward that calls the patched one with `fused_lm_head=True` and takes SFTTrainer's loss and
    metrics (`compute_loss`, sft_trainer.py:1611-1635: the sum of `-log_probs` over the labelled
    tokens, the detached entropy's sum, the top-1 count)."""
    import types

    import torch
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        raise LossLibraryMissing("loss trl needs TRL's add_fused_lm_head (pip install 'trl>=1.16')") from None
    add_fused_lm_head(m, outputs=TRL_OUTPUTS)
    fused = m.forward

    def forward(self, *args, num_items_in_batch=None, **kw):
        kw.pop("logits_to_keep", None)
        out = fused(*args, fused_lm_head=True, **kw)
        items = out.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        out.loss = (-out.log_probs).sum() / torch.as_tensor(items).clamp(min=1)
        _ = out.entropy.detach().sum(), out.is_top1.sum()  # the metrics SFTTrainer logs
        return out

    m.forward = types.MethodType(forward, m)


def install_loss(model, st: Settings) -> None:
    """Replace the causal LM's forward (the instance's, under PEFT and any wrapper) with one that
    runs the decoder, then `st.loss` over the head through its library's public API:
    torchtune's CEWithChunkedOutputLoss over the head applied per chunk of positions (torchtune's
    `chunked_output`), Liger's LigerFusedLinearCrossEntropyLoss, cut-cross-entropy's
    `linear_cross_entropy`, or TRL's fused head (`install_trl_head`). Labels are shifted as
    transformers' ForCausalLMLoss shifts them, and the loss is the sum over labelled tokens
    divided by `num_items_in_batch` (or their count)."""
    import types

    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    if st.loss == "trl":
        install_trl_head(m)
        return
    decoder, head = m.base_model, m.get_output_embeddings()
    softcap = getattr(m.config, "final_logit_softcapping", None)
    if st.loss == "chunked":
        chunked = torchtune_chunked_loss()(num_output_chunks=st.loss_chunks)
    else:
        fused = _fused_loss(st)

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kw):
        kw.pop("logits_to_keep", None)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        items = (shifted != -100).sum() if num_items_in_batch is None else num_items_in_batch
        if st.loss == "chunked":
            logits = [head(x) for x in hidden.chunk(st.loss_chunks, dim=1)]
            if softcap:
                logits = [torch.tanh(x / softcap) * softcap for x in logits]
            loss = chunked(logits, shifted) * (shifted != -100).sum() / items
        elif st.loss == "liger-flce":
            loss = fused(head.weight, hidden.reshape(-1, hidden.size(-1)), shifted.reshape(-1), head.bias) / items
        else:
            e, c = hidden, head.weight
            if torch.is_autocast_enabled(e.device.type):  # CCE's kernels take 16-bit inputs
                dtype = torch.get_autocast_dtype(e.device.type)
                e, c = e.to(dtype), c.to(dtype)
            loss = fused(e, c, labels, shift=True, reduction="sum", softcap=softcap) / items
        return CausalLMOutputWithPast(loss=loss, logits=None)

    m.forward = types.MethodType(forward, m)


def install_labelled_head(model) -> bool:
    """The standard loss over the positions whose next token has a label only, as `plan train`
    runs it: the causal LM's own forward (the instance's, under PEFT and any wrapper) is called
    with `logits_to_keep` the boolean mask of those positions, so the head projects only them
    (transformers/modeling_utils.py:5120-5122, `slice_logits_to_keep`, 5.24: the rows flattened to
    kept x hidden; soft-capping and logit scaling stay the model's), and the loss is
    transformers' ForCausalLMLoss on those rows (transformers/loss/loss_utils.py: fp32 logits,
    cross-entropy summed over labelled tokens, divided by `num_items_in_batch` or their count),
    plus a MoE model's weighted router loss, which its forward adds only with labels. Prompt
    and padding positions cost neither the head's matmul nor vocabulary-wide logits. Returns
    False for a class whose forward takes no `logits_to_keep` (its loss stays the standard one)."""
    import inspect
    import types

    import torch

    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = type(m).forward
    if "logits_to_keep" not in inspect.signature(original).parameters:
        return False
    coef = getattr(m.config, "router_aux_loss_coef", 0.0)

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kw):
        if labels is None:
            return original(self, input_ids=input_ids, **kw)
        keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        keep[:, :-1] = labels[:, 1:] != -100
        out = original(self, input_ids=input_ids, logits_to_keep=keep, **kw)
        targets = labels[:, 1:][keep[:, :-1]]
        items = max(targets.numel(), 1) if num_items_in_batch is None else num_items_in_batch  # none: 0, not 0/0
        out.loss = torch.nn.functional.cross_entropy(out.logits.float(), targets, reduction="sum") / items
        if getattr(out, "aux_loss", None) is not None:
            out.loss = out.loss + coef * out.aux_loss.to(out.loss.device)
        return out

    m.forward = types.MethodType(forward, m)
    return True


def attention_kernel(config, st: Settings) -> str:
    """The attention implementation a run uses: SDPA, unless --attn eager, soft-capped attention
    (SDPA cannot cap), or a class transformers gives no SDPA path (gpt_oss: `_supports_sdpa`
    False, its sinks need eager or a hub kernel)."""
    if st.attn == "eager" or getattr(config, "attn_logit_softcapping", None):
        return "eager"
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""), None)
    return "eager" if cls is not None and getattr(cls, "_supports_sdpa", True) is False else "sdpa"


def is_encoder(config) -> bool:
    """BERT-style encoders (token-type embeddings) train with a task head: sequence classification,
    the head the estimator assumes. transformers' causal-LM head for them needs is_decoder. So do
    encoders that transformers has no causal-LM class for, only a sequence-classification one
    (ModernBERT)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )
    if getattr(config, "is_decoder", False):
        return False
    mt = config.model_type
    return getattr(config, "type_vocab_size", None) is not None or (
        mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)


def model_class(config):
    """The class a user trains: sequence classification for encoders, a causal LM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )
    if is_encoder(config) and config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return AutoModelForSequenceClassification
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    raise ValueError(f"transformers has no causal-LM class for model_type '{config.model_type}'")


def fakeify(model, fake_mode) -> None:
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


def make_optimizer(params, name: str, lr: float | None = None, weight_decay: float = 0.0, lbfgs_history: int = 100):
    """The optimizer the estimate counts for `name`, as torch / transformers / bitsandbytes build it.
    `params`: tensors or param groups. `lr` None: a small default (the simulator's steps)."""
    import torch

    from ..contract import BNB_OPTIMIZERS, optimizer_choice
    name, paged = optimizer_choice(name)
    kw = dict(lr=lr if lr is not None else 1e-4, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, foreach=True, **kw)
    if name == "adamw-fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    if name in BNB_OPTIMIZERS:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(f"optimizer {name} needs bitsandbytes (pip install bitsandbytes)") from None
        cls = {"adamw-8bit": "AdamW8bit", "adamw-32bit": "AdamW32bit", "lion": "Lion", "lion-8bit": "Lion8bit"}[name]
        return getattr(bnb.optim, ("Paged" if paged else "") + cls)(params, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, foreach=True, **{**kw, "lr": lr if lr is not None else 1e-3})
    if name == "sgd-momentum":
        return torch.optim.SGD(params, momentum=0.9, foreach=True, **{**kw, "lr": lr if lr is not None else 1e-3})
    if name == "lbfgs":
        # one closure evaluation per step (train_step passes the closure); no weight decay in L-BFGS
        return torch.optim.LBFGS(params, lr=lr if lr is not None else 1.0, max_iter=1, history_size=lbfgs_history)
    if name == "adafactor":
        from transformers.optimization import Adafactor
        # as HF Trainer builds it for optim="adafactor": fixed learning rate, no parameter scaling
        return Adafactor(params, lr=lr if lr is not None else 1e-3, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    raise ValueError(f"no {name} optimizer here: choose one of {', '.join(Optimizer.values())}")




@contextlib.contextmanager
def unpacked_sequences():
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




@contextlib.contextmanager
def grouped_mm_any_dtype():
    """MoE experts in every precision. transformers (5.x, integrations/moe.py) runs experts
    through `torch.nn.functional.grouped_mm`, whose CPU and meta kernels take bf16 only: an fp32
    or bf16-amp step (fp32 expert weights) stops with "Expected inputs of BF16 type". Here any
    other dtype takes transformers' own `grouped_mm_fallback` op (registered with a fake kernel),
    which keeps the same tensors: the (tokens x out) output, and the input and the weight for
    backward. torch's fake-tensor logger, which prints the refused kernel's traceback before
    the error is raised, is quietened meanwhile."""
    import logging

    import torch
    import transformers.integrations.moe as moe

    orig = moe._can_use_grouped_mm
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    moe._can_use_grouped_mm = lambda input, weight, offs: weight.dtype == torch.bfloat16 and orig(input, weight, offs)
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        moe._can_use_grouped_mm = orig
        log.setLevel(level)


def make_ema(model, decay: float = EMA_DECAY):
    """An exponential moving average of the trainable parameters: torch's `AveragedModel` with
    `get_ema_multi_avg_fn(decay)` over a ParameterList of them (a deep copy of those alone, not
    of the frozen base). Returns (the AveragedModel, the live ParameterList it averages, and their
    names, in order); step it with `ema.update_parameters(live)` after each optimizer step."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    live = torch.nn.ParameterList([p for _, p in named])
    return AveragedModel(live, multi_avg_fn=get_ema_multi_avg_fn(decay)), live, [n for n, _ in named]


def train_step(model, opt, batch: dict, amp, snap=lambda phase: None, engine=None, micro_steps: int = 1,
               ema=None) -> None:
    """One training step as the estimate models it, calling `snap(phase)` at the end of each
    forward, each backward and the optimizer step. `micro_steps` > 1: gradient accumulation, the
    later micro-steps run with every gradient alive. `engine`: a DeepSpeed engine, whose
    `backward` and `step` (the optimizer step and gradient release) replace the plain calls.
    `ema`: make_ema's (AveragedModel, live parameters), updated after the optimizer step."""
    import torch
    if isinstance(opt, torch.optim.LBFGS):  # its step calls the closure: forward and backward inside
        def closure():
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = model(**batch).loss
            snap("forward")
            loss.backward()
            snap("backward")
            return loss.detach()
        opt.step(closure)
        snap("optimizer_step")
        return
    for _ in range(micro_steps):
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
    if ema is not None:  # (AveragedModel, its live parameters), from make_ema
        ema[0].update_parameters(ema[1])
    snap("optimizer_step")




def device_mesh(world: int, replicate: int = 1):
    """The FSDP2 device mesh accelerate builds, and its dimension names: one shard dimension, or
    (replicate, shard) when parameters are replicated over `replicate` groups (hybrid sharding:
    shard within a node, replicate across nodes; no-shard: replicate over every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    if replicate == 1:
        return init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",)), ("dp_shard",)
    names = ("dp_replicate", "dp_shard")
    return init_device_mesh("cpu", (replicate, world // replicate), mesh_dim_names=names), names


def mesh_for(st: Settings, world: int):
    replicate = {"fsdp-hybrid": st.nodes, "fsdp-no-shard": world}.get(st.strategy, 1)
    return device_mesh(world, replicate)


def fsdp2_shard(model, plugin, mixed: str, mesh, names):
    """Shard `model` with accelerate's own `fsdp2_prepare_model` and an FSDP plugin, on CPU.
    accelerate (1.15) turns FSDP on only for GPU-type backends and runs gloo ranks as MULTI_CPU,
    so this hands the function the few accelerator fields it reads: the plugin, the mesh, the
    mixed precision."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    if mixed != "no":
        plugin.set_mixed_precision(mixed)
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=mesh,
                          parallelism_config=SimpleNamespace(fsdp_dim_names=names), mixed_precision=mixed,
                          is_main_process=False, device="cpu")
    return fsdp2_prepare_model(acc, model)


def wrap_fsdp2(model, st: Settings, mesh_and_names):
    """Shard `model` as `accelerate launch` with an FSDP2 config would (fsdp_reshard_after_forward
    false for SHARD_GRAD_OP)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    rc = RECIPES[st.precision]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=st.strategy != "fsdp-grad-op", auto_wrap_policy="transformer_based_wrap",
        cpu_ram_efficient_loading=False, cpu_offload=st.offload in ("params", "all"),
        state_dict_type="SHARDED_STATE_DICT")
    return fsdp2_shard(model, plugin, "bf16" if rc.autocast else "no", *mesh_and_names)


def lora_config(st: Settings, sequence_classification: bool = False, modules_to_save: list | None = None,
                model=None):
    """PEFT's LoraConfig for the settings: rank, alpha (2 x rank when unset, the field's
    default), dropout, the target modules (`all-linear`, or the comma-separated names), and the
    modules trained whole beside the adapters (`modules_to_save`, see `with_lora`). Given the
    model, `all-linear` leaves out its `not_plain_linears`."""
    from peft import LoraConfig
    targets = "all-linear" if st.lora_targets == "all-linear" else st.lora_targets.split(",")
    exclude = not_plain_linears(model) if model is not None and targets == "all-linear" else []
    return LoraConfig(r=st.lora_rank, lora_alpha=st.lora_alpha or 2 * st.lora_rank, lora_dropout=st.lora_dropout,
                      target_modules=targets, task_type="SEQ_CLS" if sequence_classification else "CAUSAL_LM",
                      modules_to_save=modules_to_save, exclude_modules=exclude or None)


def not_plain_linears(model) -> list[str]:
    """The modules that are an nn.Linear by class but not by forward: a subclass with its own
    forward, such as Llama 4's MoE router (`Llama4Router`, which returns the routing scores and
    logits as a tuple). PEFT's `all-linear` targets them, and its LoRA layer then fails on the
    tuple (`'tuple' object has no attribute 'dtype'`), in a real run as on fake tensors; they are
    left out, as a user's target list would leave them. Only transformers' own classes: the
    quantised and FP8 linears (bitsandbytes', torchao's) are linears PEFT knows how to wrap."""
    import torch
    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and type(mod).forward is not torch.nn.Linear.forward
            and type(mod).__module__.startswith("transformers.")]


def nf4_model(cfg: dict, st: Settings, device: str, checkpoint: str | None = None):
    """QLoRA as a user sets it up: the model loaded through transformers' bitsandbytes NF4 path
    (random bf16 weights saved to `checkpoint`, a temporary directory unless given, then loaded
    quantised onto `device`), PEFT's `prepare_model_for_kbit_training` (fp32 norms, embeddings
    and head; checkpointing if the settings say so) and the LoRA adapters. bitsandbytes >= 0.45
    runs NF4 forward and backward on CPU too."""
    import os
    import tempfile

    import torch
    from transformers import AutoConfig

    c = dict(cfg)
    config = AutoConfig.for_model(c.pop("model_type"), **c)
    config.use_cache = False
    for k in ATTENTION_DROPOUT_KEYS:
        if hasattr(config, k):
            setattr(config, k, 0.0)
    cls = model_class(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint or tmp
        if not os.path.exists(os.path.join(path, "config.json")):
            with torch.device(device):
                model = cls.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(path)
            del model
        model = cls.from_pretrained(path, config=config, quantization_config=nf4_config(torch.bfloat16),
                                    dtype=torch.bfloat16, device_map={"": 0 if device == "cuda" else device},
                                    attn_implementation="sdpa")
    model = prepare_kbit(model, st)
    model = with_lora(model, st)
    model.train()
    return model, config


def prepare_kbit(model, st: Settings):
    """PEFT's `prepare_model_for_kbit_training` as the trainer calls it (trainer/model.py
    `_checkpointing`): every parameter frozen, the bf16/fp16 ones that are not `Params4bit`
    upcast to fp32 (peft/utils/other.py:193-209), non-reentrant checkpointing if the settings
    say so (:228-257; with `use_reentrant` False no input-require-grads hook, :230)."""
    from peft import prepare_model_for_kbit_training
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=st.grad_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


NF4_STATE = ("absmax", "nested_absmax", "nested_quant_map", "quant_map", "offset")
"""The tensors bitsandbytes keeps beside an NF4 weight's packed bytes (its QuantState), as buffers
of the fake-tensor stand-in, named as transformers serialises them (`weight.absmax`, ...)."""


def nf4_state_shapes(out_features: int, in_features: int) -> dict:
    """{name: (shape, dtype)} of what bitsandbytes 0.50.2 stores for one NF4 weight with double
    quantisation (`Params4bit._quantize`, bitsandbytes/nn/modules.py:381, calling
    `quantize_4bit`, functional.py:884): the packed weight, two 4-bit values per uint8 byte,
    shaped ((n + 1) // 2, 1) (the `quantize_4bit` op's fake, _ops.py:221-236); per block of 64
    values an absmax, itself quantised to uint8 by `quantize_blockwise(absmax - offset,
    blocksize=256)` (functional.py:939-940), which keeps one fp32 absmax per 256 blocks and its
    own copy of the 256-entry fp32 dynamic map (:677); the fp32 mean `offset` (:939); and the
    16-entry fp32 NF4 table `get_4bit_type` makes for each weight (:936)."""
    import torch
    n = out_features * in_features
    blocks = -(-n // 64)
    return {"weight": (((n + 1) // 2, 1), torch.uint8), "absmax": ((blocks,), torch.uint8),
            "nested_absmax": ((-(-blocks // 256),), torch.float32), "nested_quant_map": ((256,), torch.float32),
            "quant_map": ((16,), torch.float32), "offset": ((), torch.float32)}


def nf4_meta_base(model):
    """QLoRA's base on the meta device, quantised as transformers' bitsandbytes quantizer does it
    in `from_pretrained` (quantizers/quantizer_bnb_4bit.py:113-138): `preprocess_model` swaps
    every nn.Linear (and Conv1D) but the head, tied weights and `_keep_in_fp32_modules` for
    bitsandbytes' `Linear4bit` (integrations/bitsandbytes.py:162-236, `replace_with_bnb_linear`),
    and `postprocess_model` marks the model loaded in 4 bits (what PEFT reads to wrap those
    layers in its `lora.bnb.Linear4bit`). bitsandbytes cannot quantise on meta or fake tensors
    (`Params4bit` cannot wrap a FakeTensor), so each weight becomes its quantised storage
    (`nf4_state_shapes`): the packed bytes as the frozen `weight`, the quantisation state as
    buffers; `attach_nf4_states` makes the state bitsandbytes' `QuantState` again once the model
    is fake. Forward and backward are then bitsandbytes' own code on fake tensors
    (`Linear4bit.forward`, nn/modules.py:609; `MatMul4Bit`, autograd/_functions.py:300, which
    saves only the packed weight for backward and dequantises it to a transient compute-dtype
    copy there, :383), through its ops' fake kernels (_ops.py)."""
    import bitsandbytes as bnb
    import torch
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(nf4_config(torch.bfloat16), pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=torch.bfloat16, device_map={"": "cpu"})
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            shapes = nf4_state_shapes(mod.out_features, mod.in_features)
            with torch.device("meta"):
                shape, dtype = shapes.pop("weight")
                mod.weight = _params4bit_fields(torch.nn.Parameter(torch.empty(shape, dtype=dtype),
                                                           requires_grad=False))
                for name, (shape, dtype) in shapes.items():
                    mod.register_buffer(f"weight_{name}", torch.empty(shape, dtype=dtype))
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def attach_nf4_states(model) -> None:
    """Give each fake `Linear4bit` of `nf4_meta_base` the `QuantState` bitsandbytes builds in
    `quantize_4bit` (bitsandbytes/functional.py:938-951: nested, blocks of 64, second level of
    256), over its fake buffers, on the weight and the module as `Params4bit._quantize` sets
    them (nn/modules.py:390-393)."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import QuantState

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            b = {k: getattr(mod, f"weight_{k}") for k in NF4_STATE}
            state2 = QuantState(absmax=b["nested_absmax"], code=b["nested_quant_map"], blocksize=256,
                                dtype=torch.float32)
            qs = QuantState(absmax=b["absmax"], shape=torch.Size([mod.out_features, mod.in_features]),
                            code=b["quant_map"], blocksize=64, quant_type="nf4", dtype=torch.bfloat16,
                            offset=b["offset"], state2=state2)
            _params4bit_fields(mod.weight).quant_state = qs
            mod.quant_state = qs


def _params4bit_fields(p):
    """The fields `Params4bit` carries beside its data (bitsandbytes/nn/modules.py:213,
    `__new__`), set on a plain parameter standing for one: PEFT reads `compress_statistics` and
    `quant_type` to wrap the layer (peft/tuners/lora/bnb.py:585-586)."""
    import torch
    p.blocksize, p.compress_statistics, p.quant_type = 64, True, "nf4"
    p.quant_storage, p.bnb_quantized = torch.uint8, True
    return p


def nf4_config(compute_dtype):
    """QLoRA's base as bitsandbytes stores it (the layout the estimate counts): NF4, double
    quantisation, matmuls in `compute_dtype`."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
