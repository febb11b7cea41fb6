"""The model and tokenizer a recipe trains, loaded as the plan says.

- Source: a Hub id or local directory (`from_pretrained`), or a GGUF file (`base_model` a path
  ending in .gguf, or `gguf_file` beside a directory), which transformers dequantises.
- Precision: `plan.precision` when the recipe names it, else from `bf16`/`fp16`: full
  fine-tuning keeps fp32 weights under autocast (`bf16-amp`), LoRA stores the frozen base in
  bf16 with fp32 adapters (`bf16-pure`, what `plan recommend` picks), QLoRA stores it in NF4
  with bf16 autocast (`bf16-amp`). Neither flag: fp32.
- Method: full; LoRA through PEFT; QLoRA through bitsandbytes (CUDA only) and PEFT's
  `prepare_model_for_kbit_training`. `unfrozen_parameters` (Axolotl's key) trains only the
  parameters whose names match one of its regular expressions.
"""

from __future__ import annotations

import re

from planner.measure.builder import lora_config, nf4_config
from planner.recipe import ModelError, Recipe, precision, settings, source


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(**source(recipe))
    except (OSError, ValueError) as e:
        raise ModelError(f"base_model: cannot load a tokenizer for {recipe.base_model} "
                         f"({str(e).strip().splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(recipe: Recipe, num_labels: int | None = None, cuda: bool = False):
    """The model, set up for training (train mode, use_cache off, checkpointing, adapters)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    prec = precision(recipe)
    qlora = recipe.adapter == "qlora"
    if qlora and not cuda:
        raise ModelError("adapter: qlora needs a CUDA GPU (bitsandbytes NF4 kernels); on CPU use adapter: lora")
    dtype = torch.bfloat16 if prec == "bf16-pure" or qlora else torch.float32
    kw = dict(source(recipe), dtype=dtype)
    if num_labels is not None:
        cls = AutoModelForSequenceClassification
        kw["num_labels"] = num_labels
    else:
        cls = AutoModelForCausalLM
    if qlora:
        import importlib.util
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError("adapter: qlora needs bitsandbytes: pip install bitsandbytes")
        kw["quantization_config"] = nf4_config(torch.bfloat16 if recipe.bf16 else torch.float16)
        import os
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = cls.from_pretrained(**kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"base_model: cannot load {recipe.base_model} ({str(e).strip().splitlines()[0]})") from None
    model.config.use_cache = False
    ckpt = {"use_reentrant": False}
    if qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt)
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    if recipe.adapter:
        from peft import get_peft_model
        try:
            model = get_peft_model(model, lora_config(settings(recipe), sequence_classification=num_labels is not None))
        except ValueError as e:
            raise ModelError(f"lora_target_modules: {str(e).strip().splitlines()[0]}") from None
    if recipe.unfrozen_parameters:
        pats = [re.compile(p) for p in recipe.unfrozen_parameters]
        n = 0
        for name, p in model.named_parameters():
            keep = any(pat.search(name) for pat in pats)
            p.requires_grad_(keep)
            n += keep
        if n == 0:
            raise ModelError(f"unfrozen_parameters: no parameter name matches {recipe.unfrozen_parameters}")
    model.train()
    return model


def method(recipe: Recipe) -> str:
    return recipe.adapter or ("partial" if recipe.unfrozen_parameters else "full")


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay on matrices, none on biases and norms (HF Trainer's rule: 1-D parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))
