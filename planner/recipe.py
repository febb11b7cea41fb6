"""The training recipe `plan train` runs: a YAML file validated by pydantic.

Key names follow Axolotl's where they overlap (base_model, datasets, adapter, lora_r,
sequence_len, micro_batch_size, ...) and HF Trainer's elsewhere (max_steps, save_steps,
logging_steps, warmup_steps, weight_decay, max_grad_norm). The `plan` section is what the planner
chose and expects: strategy, offload, GPUs, and the predicted memory the run is checked against.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .contract import LOSS_CHUNKS, DataFormat, Offload, OptimizerName, Precision, Settings, Strategy, optimizer_choice

LOSS_KEYS = {"liger-flce": "liger_fused_linear_cross_entropy", "cce": "cut_cross_entropy",
             "chunked": "chunked_cross_entropy", "trl": "trl_fused_lm_head"}
"""The recipe key for each loss other than the standard one (contract.Loss): Axolotl's for the
first three (Axolotl turns the first two on with its Liger and Cut Cross-Entropy plugins), and
plan's own for TRL's chunked log-probability head (named after TRL's `add_fused_lm_head`)."""


class RecipeError(ValueError):
    """A recipe that cannot run: one line naming the key to fix."""


class ModelError(RecipeError):
    """The model cannot be loaded or set up as the recipe asks."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class Dataset(_Strict):
    path: str
    type: DataFormat = "alpaca"
    field: Optional[str] = None           # completion/classification: the text field
    label_field: Optional[str] = None     # classification: the label field


class Expected(_Strict):
    """The planner's prediction for this run, per GPU (bytes)."""
    peak_bytes: int
    device_bytes: int
    components: dict[str, int]
    cpu_bytes: int = 0


class ParameterGroup(_Strict):
    """A learning rate (and weight decay) for the trainable parameters whose names match `regex`
    (`re.search`); the first group a parameter matches wins, the rest keep the recipe's."""
    regex: str
    lr: float = Field(gt=0)
    weight_decay: Optional[float] = Field(None, ge=0)


class PlanSection(_Strict):
    strategy: Strategy = "ddp"
    offload: Offload = "none"
    gpus: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    gpu: Optional[str] = None
    precision: Precision = "bf16-amp"
    expected: Optional[Expected] = None


class Recipe(_Strict):
    base_model: str
    gguf_file: Optional[str] = None
    datasets: list[Dataset] = Field(default_factory=list)
    adapter: Optional[Literal["lora", "qlora"]] = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False  # LoRA on a bitsandbytes LLM.int8 base (CUDA)
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    unfrozen_parameters: Optional[list[str]] = None  # train only parameters matching these regexes
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)  # keep an EMA of the trainable parameters (AveragedModel)
    parameter_groups: Optional[list[ParameterGroup]] = None  # per-parameter learning rates, by regex
    loraplus_lr_ratio: Optional[float] = Field(None, gt=0)  # LoRA+ (Axolotl's key): lora_B at lr x ratio (PEFT)
    sequence_len: int = Field(2048, ge=1)
    sample_packing: bool = False
    train_on_inputs: bool = False
    val_set_size: float = Field(0.0, ge=0, lt=1)
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    optimizer: OptimizerName = "adamw"  # the contract's names or HF Trainer's / Axolotl's (paged_adamw_8bit, ...)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # or this fraction of the run's steps (HF Trainer's, Axolotl's)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    bf16: bool = True
    fp16: bool = False
    fp8: bool = False  # Axolotl's key: torchao float8 training (precision fp8-ao) under bf16 autocast
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # transformers' key
    tf32: bool = False  # TF32 matmuls on a CUDA GPU (torch.backends.cuda.matmul.allow_tf32)
    # the loss over the output head, under Axolotl's keys and plan's trl_fused_lm_head (at most one true;
    # none: transformers' own)
    liger_fused_linear_cross_entropy: bool = False
    cut_cross_entropy: bool = False
    chunked_cross_entropy: bool = False
    chunked_cross_entropy_num_chunks: int = Field(LOSS_CHUNKS, ge=1)
    trl_fused_lm_head: bool = False  # plan's key: TRL's chunked log-probability head, as SFTTrainer trains
    # Axolotl's key: the saved activations to pinned host RAM (TRL's OffloadActivations; a CUDA GPU)
    activation_offloading: bool = False
    seed: int = 42
    output_dir: str = "./out"
    save_steps: Optional[int] = Field(None, ge=1)
    logging_steps: int = Field(10, ge=1)
    eval_steps: Optional[int] = Field(None, ge=1)
    skip_bad_lines: bool = False  # skip (and count) malformed JSONL lines instead of stopping
    loss_watchdog_threshold: Optional[float] = Field(None, gt=0)  # Axolotl's: stop when the loss stays above it
    loss_watchdog_patience: int = Field(3, ge=1)  # ... for this many steps in a row (a non-finite loss always counts)
    oom_backoff: bool = True  # out of memory: halve the micro-batch, double the accumulation, retry the step
    plan: PlanSection = Field(default_factory=PlanSection)

    @model_validator(mode="after")
    def _consistent(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true: choose one")
        if self.fp8 and (self.adapter or not self.bf16):
            raise ValueError("fp8: true (torchao float8) is modelled for full fine-tuning under bf16: true, "
                             "without an adapter")
        if self.adapter == "qlora" and not self.load_in_4bit:
            raise ValueError("adapter: qlora needs load_in_4bit: true")
        if self.load_in_4bit and self.adapter != "qlora":
            raise ValueError("load_in_4bit: true trains adapters only: set adapter: qlora")
        if self.load_in_8bit and self.adapter != "lora":
            raise ValueError("load_in_8bit: true trains LoRA adapters on an 8-bit base: set adapter: lora")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("warmup_steps and warmup_ratio both set the warm-up: choose one")
        on = [k for k in LOSS_KEYS.values() if getattr(self, k)]
        if len(on) > 1:
            raise ValueError(f"{' and '.join(on)} are both true: choose one loss")
        if self.optimizer == "lbfgs":
            raise ValueError("optimizer: lbfgs needs a closure that re-evaluates the loss on the same batch; plan "
                             "train steps through mini-batches (accumulation, clipping, OOM back-off) and has none "
                             "(plan estimate --optimizer lbfgs counts its memory)")
        if self.loraplus_lr_ratio is not None and not self.adapter:
            raise ValueError("loraplus_lr_ratio: LoRA+ sets the adapters' B matrices' learning rate: add adapter: lora")
        if self.loraplus_lr_ratio is not None and self.parameter_groups:
            raise ValueError("parameter_groups and loraplus_lr_ratio both set the adapters' learning rates: choose one")
        for g in self.parameter_groups or ():
            try:
                re.compile(g.regex)
            except re.error as e:
                raise ValueError(f"parameter_groups: '{g.regex}' is not a regular expression ({e})") from None
        for pat in self.unfrozen_parameters or ():
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"unfrozen_parameters: '{pat}' is not a regular expression ({e})") from None
        return self


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "recipe"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if err["type"] == "missing":
        return f"missing key '{where}'"
    return f"{where}: {err['msg']}"


def from_dict(data: dict, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_first_error(e)}") from None


MAX_RECIPE_BYTES = 1 * 2**20
"""A recipe is a few KB; past this, one line instead of reading it."""


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: an alias repeats a node by reference,
    and a few lines of nested aliases (a "billion laughs" file) expand to more values than any
    machine holds once validated. Recipes have no use for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"line {mark.line + 1}: YAML aliases (*name) are not accepted in a recipe")
        return super().compose_node(parent, index)


def load(path: str) -> Recipe:
    """Read and validate a recipe; every problem is one RecipeError line naming the key."""
    return from_dict(read(path), path)


def read(path: str):
    """A recipe file's YAML, unvalidated (a plan recipe or an Axolotl config: planner/axolotl.py);
    an unreadable file is one RecipeError line."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size:,} bytes is not a recipe (at most {MAX_RECIPE_BYTES // 2**20} MiB)")
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: a directory, not a recipe file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML ({first})") from None
    return data


LENGTH_KEYS = ("max_steps", "num_epochs")
"""The keys that say how long a run trains: a run whose recipe differs only in these is the same
run asked to go on (its checkpoints resume)."""


def resume_hash(recipe: Recipe) -> str:
    """The recipe's identity but its length (LENGTH_KEYS)."""
    import hashlib
    import json
    d = {k: v for k, v in recipe.model_dump(mode="json").items() if k not in LENGTH_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


# Settings fields as a recipe names them, for the planner's errors (PlanError.render)
RECIPE_NAMES = {"precision": "plan.precision", "optimizer": "optimizer", "batch_size": "micro_batch_size",
                "seq_len": "sequence_len", "lora_rank": "lora_r", "lora_alpha": "lora_alpha",
                "lora_dropout": "lora_dropout", "lora_targets": "lora_target_modules", "quant": "adapter",
                "grad_checkpointing": "gradient_checkpointing", "gpus": "plan.gpus", "nodes": "plan.nodes",
                "strategy": "plan.strategy", "offload": "plan.offload",
                "accumulation": "gradient_accumulation_steps", "num_processes": "--num-processes",
                "loss": "/".join(LOSS_KEYS.values()),
                "loss_chunks": "chunked_cross_entropy_num_chunks", "unfrozen_parameters": "unfrozen_parameters",
                "ema": "ema_decay", "activation_offload": "activation_offloading",
                "attn": "attn_implementation"}


ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash"}
"""The recipe's attn_implementation (transformers' names) -> the contract's Attention."""


def loss(recipe: Recipe) -> str:
    """The loss the recipe turns on (contract.Loss), `standard` when none."""
    return next((name for name, key in LOSS_KEYS.items() if getattr(recipe, key)), "standard")


def recipe_loss_keys(st: Settings) -> dict:
    """The recipe keys for `st.loss`: the one key turned on, and the chunks of the chunked loss."""
    if st.loss == "standard":
        return {}
    keys = {LOSS_KEYS[st.loss]: True}
    if st.loss == "chunked":
        keys["chunked_cross_entropy_num_chunks"] = st.loss_chunks
    return keys


def precision(recipe: Recipe) -> str:
    """The precision recipe a run computes in: `plan.precision` when the recipe names it, else
    from `fp8` (torchao float8, `fp8-ao`) and `bf16`/`fp16`: full fine-tuning keeps fp32 weights
    under autocast (`bf16-amp`), LoRA stores the frozen base in bf16 with fp32 adapters
    (`bf16-pure`, what `plan recommend` picks), QLoRA stores it in NF4 and LoRA on an 8-bit base
    in int8, both with bf16 autocast (`bf16-amp`). Neither flag: fp32."""
    if "precision" in recipe.plan.model_fields_set:
        return recipe.plan.precision
    if recipe.fp8:  # Axolotl's fp8: torchao's float8 training
        return "fp8-ao"
    half = "bf16" if recipe.bf16 else "fp16" if recipe.fp16 else None
    if half is None:
        return "fp32"
    if recipe.adapter == "lora" and half == "bf16" and not recipe.load_in_8bit:
        return "bf16-pure"
    return f"{half}-amp"


def settings(recipe: Recipe, world: int | None = None, batch: int | None = None, seq: int | None = None,
             kernels: str = "cuda", attention_mask: bool = True) -> Settings:
    """The planner's settings for this recipe: on the plan's GPUs and nodes, or on another
    count of `world` processes on one node (one of them: no strategy); micro-batch `batch` x
    `seq` tokens (default the recipe's). `attention_mask`: whether the micro-batch carries one
    (planner.data.attention_masked); a recipe's rows are padded or packed, so by default it does."""
    p = recipe.plan
    if world is None or world == p.gpus * p.nodes:  # the plan as written (a 1-GPU ZeRO offload plan too)
        gpus, nodes, strategy = p.gpus, p.nodes, p.strategy
    else:
        gpus, nodes, strategy = world, 1, p.strategy if world > 1 else "ddp"
    targets = recipe.lora_target_modules
    optimizer, paged = optimizer_choice(recipe.optimizer)
    return Settings(precision=precision(recipe), optimizer=optimizer, optimizer_paged=paged,
                    batch_size=batch or recipe.micro_batch_size,
                    seq_len=seq or recipe.sequence_len, lora_rank=recipe.lora_r if recipe.adapter else 0,
                    lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                    lora_targets=targets if isinstance(targets, str) else ",".join(targets),
                    quant="nf4" if recipe.adapter == "qlora" else "int8" if recipe.load_in_8bit else "none",
                    attn=ATTENTION[recipe.attn_implementation],
                    grad_checkpointing=recipe.gradient_checkpointing,
                    gpus=gpus, nodes=nodes, strategy=strategy, offload=p.offload if strategy != "ddp" else "none",
                    accumulation=recipe.gradient_accumulation_steps, kernels=kernels, loss=loss(recipe),
                    loss_chunks=recipe.chunked_cross_entropy_num_chunks,
                    unfrozen_parameters=tuple(recipe.unfrozen_parameters or ()), ema=recipe.ema_decay is not None,
                    activation_offload=recipe.activation_offloading, attention_mask=attention_mask)


def source(recipe: Recipe) -> dict:
    """from_pretrained's location arguments: a Hub id or local directory, or a GGUF file
    (`base_model` a path ending in .gguf, or `gguf_file` beside a directory)."""
    base = recipe.base_model
    if recipe.gguf_file:
        return {"pretrained_model_name_or_path": base, "gguf_file": recipe.gguf_file}
    p = Path(base)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"base_model: {base}: no such GGUF file")
        return {"pretrained_model_name_or_path": str(p.parent), "gguf_file": p.name}
    return {"pretrained_model_name_or_path": base}


def load_config(recipe: Recipe):
    """The base model's transformers config."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(**source(recipe))
    except (OSError, ValueError) as e:
        raise ModelError(f"base_model: cannot load {recipe.base_model} ({str(e).strip().splitlines()[0]})") from None
