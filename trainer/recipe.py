"""The training recipe `plan train` runs: a YAML file validated by pydantic.

Key names follow Axolotl's where they overlap (base_model, datasets, adapter, lora_r,
sequence_len, micro_batch_size, ...) and HF Trainer's elsewhere (max_steps, save_steps,
logging_steps, warmup_steps, weight_decay, max_grad_norm). The `plan` section is what the planner
chose and expects: strategy, offload, GPUs, and the predicted memory the run is checked against.
"""

from __future__ import annotations

from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RecipeError(ValueError):
    """A recipe that cannot run: one line naming the key to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dataset(_Strict):
    path: str
    type: Literal["alpaca", "chat", "completion", "classification"] = "alpaca"
    field: Optional[str] = None           # completion/classification: the text field
    label_field: Optional[str] = None     # classification: the label field


class Expected(_Strict):
    """The planner's prediction for this run, per GPU (bytes)."""
    peak_bytes: int
    device_bytes: int
    components: dict[str, int]
    cpu_bytes: int = 0


class PlanSection(_Strict):
    strategy: Literal["ddp", "fsdp", "fsdp-grad-op", "fsdp-hybrid", "fsdp-no-shard", "zero1", "zero2", "zero3"] = "ddp"
    offload: Literal["none", "optimizer", "params", "all", "nvme"] = "none"
    gpus: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    gpu: Optional[str] = None
    precision: str = "bf16-amp"
    expected: Optional[Expected] = None


class Recipe(_Strict):
    base_model: str
    gguf_file: Optional[str] = None
    datasets: list[Dataset] = Field(default_factory=list)
    adapter: Optional[Literal["lora", "qlora"]] = None
    load_in_4bit: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    unfrozen_parameters: Optional[list[str]] = None  # train only parameters matching these regexes
    sequence_len: int = Field(2048, ge=1)
    sample_packing: bool = False
    train_on_inputs: bool = False
    val_set_size: float = Field(0.0, ge=0, lt=1)
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    optimizer: Literal["adamw", "adamw-fused", "adamw-8bit", "sgd", "sgd-momentum", "adafactor", "lion"] = "adamw"
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    bf16: bool = True
    fp16: bool = False
    gradient_checkpointing: bool = False
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
        if self.adapter == "qlora" and not self.load_in_4bit:
            raise ValueError("adapter: qlora needs load_in_4bit: true")
        if self.load_in_4bit and self.adapter != "qlora":
            raise ValueError("load_in_4bit: true trains adapters only: set adapter: qlora")
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


def load(path: str) -> Recipe:
    """Read and validate a recipe; every problem is one RecipeError line naming the key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML ({first})") from None
    return from_dict(data, path)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
