"""The model and tokenizer a recipe trains, loaded as the plan says.

- Source: a Hub id or local directory (`from_pretrained`), or a GGUF file (`base_model` a path
  ending in .gguf, or `gguf_file` beside a directory), which transformers dequantises.
- Precision: `plan.precision` when the recipe names it, else from `bf16`/`fp16`: full
  fine-tuning keeps fp32 weights under autocast (`bf16-amp`), LoRA stores the frozen base in
  bf16 with fp32 adapters (`bf16-pure`, what `plan recommend` picks), QLoRA stores it in NF4
  with bf16 autocast (`bf16-amp`). Neither flag: fp32.
- Method: full; LoRA through PEFT; QLoRA through bitsandbytes (CUDA only) and PEFT's
  `prepare_model_for_kbit_training`. `unfrozen_parameters` (Axolotl's key) trains only the
  parameters whose names match one of its regular expressions; with an adapter, the modules
  owning them train whole beside it (PEFT's `modules_to_save`).
"""

from __future__ import annotations

from planner.contract import FUSED_LOSSES
from planner.measure.builder import LOSS_LIBRARY, lora_config, nf4_config, unfreeze_only, with_lora
from planner.recipe import LOSS_KEYS, ModelError, Recipe, precision, settings, source


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
    qlora = recipe.adapter == "qlora"
    if qlora and not cuda:
        raise ModelError("adapter: qlora needs a CUDA GPU (bitsandbytes NF4 kernels); on CPU use adapter: lora")
    if recipe.load_in_8bit and not cuda:
        raise ModelError("load_in_8bit: an 8-bit base needs a CUDA GPU (bitsandbytes LLM.int8 kernels); on CPU drop it")
    if recipe.attn_implementation == "flash_attention_2" and not cuda:
        raise ModelError("attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; on CPU "
                         "use sdpa")
    if cuda:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = recipe.tf32
    _check_loss(recipe, num_labels is not None, cuda)
    if recipe.activation_offloading and not cuda:
        raise ModelError("activation_offloading: TRL's OffloadActivations moves activations from a CUDA GPU to host "
                         "RAM; it runs on a CUDA GPU (set activation_offloading: false on CPU)")
    quantised = qlora or recipe.load_in_8bit
    model = _from_pretrained(recipe, num_labels, quantised)
    model.config.use_cache = False
    model = _checkpointing(model, recipe, quantised)
    if recipe.adapter:
        model = _with_adapter(model, recipe, num_labels is not None)
    elif recipe.unfrozen_parameters:
        _unfreeze_only(model, recipe.unfrozen_parameters)
    _with_loss(model, recipe)
    model.train()
    return model


def offload_context(model, recipe: Recipe):
    """The recipe's activation offloading: TRL's `get_act_offloading_ctx_manager` (its
    `OffloadActivations` with streams, the output head under a no-op hook, the parameters' storages
    never offloaded), what Axolotl's `activation_offloading: true` and TRL's SFTConfig run; the
    forward and backward run under it. None asked for: a null context. TRL missing: one line."""
    import contextlib
    if not recipe.activation_offloading:
        return contextlib.nullcontext()
    try:
        from trl.models.activation_offloading import get_act_offloading_ctx_manager
    except ImportError:
        raise ModelError("activation_offloading needs TRL's OffloadActivations (pip install trl)") from None
    return get_act_offloading_ctx_manager(model)


def _check_loss(recipe: Recipe, classify: bool, cuda: bool) -> None:
    """Before loading anything: a loss the run cannot use, as one line naming the key."""
    st = settings(recipe)
    if st.loss == "standard":
        return
    key = LOSS_KEYS[st.loss]
    if classify:
        raise ModelError(f"{key}: a classification run has no language-model head for this loss")
    if st.loss in FUSED_LOSSES and not cuda:
        raise ModelError(f"{key}: {LOSS_LIBRARY[st.loss]}'s loss is a Triton kernel that runs on a CUDA GPU; on CPU "
                         "use chunked_cross_entropy: true")


def _with_loss(model, recipe: Recipe) -> None:
    """The recipe's loss over the head, through its library (planner.measure.builder.install_loss,
    what the simulator measures); a missing library is one line naming what to pip install."""
    st = settings(recipe)
    if st.loss == "standard":
        return
    from planner.measure.builder import install_loss
    try:
        install_loss(model, st)
    except ValueError as e:
        raise ModelError(f"{LOSS_KEYS[st.loss]}: {e}") from None


def _from_pretrained(recipe: Recipe, num_labels: int | None, qlora: bool):
    """`from_pretrained` in the plan's storage dtype (NF4 on this rank's GPU for QLoRA); a
    sequence classifier when `num_labels` is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    dtype = torch.bfloat16 if precision(recipe) == "bf16-pure" or qlora else torch.float32
    kw = dict(source(recipe), dtype=dtype)
    if recipe.attn_implementation != "sdpa":  # else transformers' default: SDPA where the class has it
        kw["attn_implementation"] = recipe.attn_implementation
    if num_labels is not None:
        cls = AutoModelForSequenceClassification
        kw["num_labels"] = num_labels
    else:
        cls = AutoModelForCausalLM
    if qlora:
        import importlib.util
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(f"{'load_in_8bit' if recipe.load_in_8bit else 'adapter: qlora'} needs bitsandbytes: "
                             "pip install bitsandbytes")
        if recipe.load_in_8bit:
            from transformers import BitsAndBytesConfig
            kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kw["quantization_config"] = nf4_config(torch.bfloat16 if recipe.bf16 else torch.float16)
        import os
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        return cls.from_pretrained(**kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"base_model: cannot load {recipe.base_model} ({str(e).strip().splitlines()[0]})") from None


def _checkpointing(model, recipe: Recipe, qlora: bool):
    """Non-reentrant gradient checkpointing when the recipe asks; QLoRA through PEFT's
    `prepare_model_for_kbit_training` (which also casts norms to fp32)."""
    ckpt = {"use_reentrant": False}
    if qlora:
        from peft import prepare_model_for_kbit_training
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=ckpt)
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    return model


def _with_adapter(model, recipe: Recipe, sequence_classification: bool):
    """The LoRA adapters of the plan's settings (PEFT's `get_peft_model`). With
    `unfrozen_parameters`, the modules owning a matching parameter train whole beside them, as
    PEFT's `modules_to_save` (planner.measure.builder.with_lora, what the simulator measures)."""
    from peft import get_peft_model
    st = settings(recipe)
    if recipe.unfrozen_parameters:
        try:
            return with_lora(model, st, sequence_classification=sequence_classification)
        except ValueError as e:
            raise ModelError(f"unfrozen_parameters: {str(e).strip().splitlines()[0]}") from None
    try:
        return get_peft_model(model, lora_config(st, sequence_classification=sequence_classification, model=model))
    except ValueError as e:
        raise ModelError(f"lora_target_modules: {str(e).strip().splitlines()[0]}") from None


def _unfreeze_only(model, patterns: list[str]) -> None:
    """Train only the parameters whose names match one of `patterns` (Axolotl's
    `unfrozen_parameters`), as the simulator builds it (planner.measure.builder.unfreeze_only);
    none matching is an error."""
    try:
        unfreeze_only(model, patterns)
    except ValueError as e:
        raise ModelError(f"unfrozen_parameters: {e}") from None


def method(recipe: Recipe) -> str:
    return recipe.adapter or ("partial" if recipe.unfrozen_parameters else "full")


def param_groups(model, weight_decay: float, lr: float | None = None, groups: list | None = None) -> list[dict]:
    """Decay on matrices, none on biases and norms (HF Trainer's rule: 1-D parameters). With the
    recipe's `parameter_groups` (regex, lr, weight_decay), each trainable parameter goes to the
    first group whose regex its name matches (`re.search`), at that group's learning rate and
    weight decay; the others stay at `lr` and `weight_decay`. The order is fixed by the names, so
    a resumed run rebuilds the same groups."""
    import re
    specs = [(re.compile(g.regex), g.lr, weight_decay if g.weight_decay is None else g.weight_decay)
             for g in groups or ()] + [(None, lr, weight_decay)]
    buckets: list[tuple[list, list]] = [([], []) for _ in specs]
    for name, p in model.named_parameters():
        if p.requires_grad:
            i = next(i for i, (pat, _, _) in enumerate(specs) if pat is None or pat.search(name))
            buckets[i][0 if p.ndim >= 2 else 1].append(p)
    out = []
    for (_, g_lr, wd), (decay, no_decay) in zip(specs, buckets, strict=True):
        for params, g_wd in ((decay, wd), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "weight_decay": g_wd, **({"lr": g_lr} if g_lr is not None else {})})
    return out


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))
