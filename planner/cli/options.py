"""The options the commands share, each declared once as an `Annotated` alias, and the one
conversion of options into the planner's `Settings` (and into a recommend `Request`).

Choices are the contract's Enums, so `--help` lists them and a value outside them is refused
before a command runs. Options that describe the run default to None: an option left out is
None ("given" is "is not None"), and its default lives in one place, `Settings` or `Request`.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import fields
from enum import Enum
from typing import Annotated, Any, Optional

import typer

from ..contract import (
    DTYPE_TO_RECIPE,
    Attention,
    Choice,
    DataFormat,
    Dtype,
    Loss,
    Method,
    Offload,
    OptimizerName,
    Precision,
    Quant,
    Settings,
    Strategy,
    optimizer_choice,
)
from ..recommend import Request

try:
    from typer._click import exceptions as cx  # typer 0.2x carries its own click
except ImportError:
    from click import exceptions as cx

# the precision recipes that compute in each --dtype: --precision must be one of them when both are given
DTYPE_PRECISIONS = {"fp32": ("fp32",), "fp16": ("fp16-amp",), "bf16": ("bf16-amp", "bf16-pure"),
                    "fp8": ("fp8-ao", "fp8-te", "msamp-o1", "msamp-o2", "msamp-o3")}

_DEFAULT = {f.name: f.default for f in fields(Settings)}
_SEARCH = {f.name: f.default for f in fields(Request)}

# --strategy of plan estimate also takes `all`: every strategy side by side
StrategyOrAll = Choice("StrategyOrAll", {**{s.name: s.value for s in Strategy}, "ALL": "all"})
# --method: auto lets plan recommend choose one of the contract's methods
MethodOrAuto = Choice("MethodOrAuto", {"AUTO": "auto", **{m.name: m.value for m in Method}})

# ---------------------------------------------------------------- the model and the run's shape

def finite(value: Optional[float]) -> Optional[float]:
    """A float option's value must be a number: nan and inf are refused as any bad value is."""
    import math
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


Model = Annotated[str, typer.Argument(help="Hub id, directory with config.json, config.json or .gguf")]
DtypeOpt = Annotated[Optional[Dtype], typer.Option(
    "--dtype", help="compute dtype; fp16/bf16 = mixed precision with fp32 weights, bf16 with --lora-rank = a bf16 "
    "base (bf16-pure) as recommend plans it (default: a row for each, bf16 where one plan is written)")]
PrecisionOpt = Annotated[Optional[Precision], typer.Option("--precision", help="precision recipe (default: --dtype's)")]
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", help=f"micro-batch per GPU (default {_DEFAULT['batch_size']})")]
SeqLen = Annotated[Optional[int], typer.Option(
    "--seq-len", help="tokens per sample (default 2048, capped at the model's maximum)")]
OptimizerOpt = Annotated[Optional[OptimizerName], typer.Option(
    "--optimizer", help=f"ours or HF Trainer's / Axolotl's names; paged_* are bitsandbytes' paged ones (default "
    f"{_DEFAULT['optimizer']})")]
# --optimizer of plan recommend also takes auto: the plan search may use 8-bit optimizer state
OptimizerOrAuto = Choice("OptimizerOrAuto", {"AUTO": "auto", **{m.name: m.value for m in OptimizerName}})
OptimizerOrAutoOpt = Annotated[Optional[OptimizerOrAuto], typer.Option(
    "--optimizer", help="ours or HF Trainer's / Axolotl's names, or auto: adamw, or 8-bit state where only that fits "
    f"without QLoRA or offload (default {_SEARCH['optimizer']})")]
LoraRank = Annotated[Optional[int], typer.Option(
    "--lora-rank", help=f"LoRA rank; 0 = full fine-tune (default {_DEFAULT['lora_rank']})")]
LoraAlpha = Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA alpha (default 2 x rank)")]
LoraDropout = Annotated[Optional[float], typer.Option(
    "--lora-dropout", help=f"(default {_DEFAULT['lora_dropout']})")]
LoraTargets = Annotated[Optional[str], typer.Option(
    "--lora-targets", help=f"all-linear or comma-separated module names (default {_DEFAULT['lora_targets']})")]
QuantOpt = Annotated[Optional[Quant], typer.Option(
    "--quant", help=f"frozen base of a LoRA run (default {_DEFAULT['quant']})")]
GradCheckpointing = Annotated[Optional[bool], typer.Option(
    "--grad-checkpointing", metavar="", help="recompute activations")]
AttnOpt = Annotated[Optional[Attention], typer.Option(
    "--attn", help=f"attention kernel; flash counts as sdpa (default {_DEFAULT['attn']})")]
Gpus = Annotated[Optional[int], typer.Option(
    "--gpus", help="GPUs per node (default 1, or what --gpu auto counts)")]
Nodes = Annotated[Optional[int], typer.Option("--nodes", help=f"(default {_DEFAULT['nodes']})")]
StrategyOpt = Annotated[Optional[Strategy], typer.Option(
    "--strategy", help=f"data parallelism (default {_DEFAULT['strategy']})")]
StrategyOrAllOpt = Annotated[Optional[StrategyOrAll], typer.Option(
    "--strategy", help=f"data parallelism, or all: compare them side by side (default {_DEFAULT['strategy']})")]
OffloadOpt = Annotated[Optional[Offload], typer.Option(
    "--offload", help=f"what a sharded strategy keeps off the GPU (default {_DEFAULT['offload']})")]
LossOpt = Annotated[Optional[Loss], typer.Option(
    "--loss", help="the loss over the output head: transformers' cross-entropy, Liger's fused linear cross-entropy, "
    "Cut Cross-Entropy, torchtune's chunked one, or TRL's chunked log-probability head (what TRL's SFTTrainer "
    f"trains through) (default {_DEFAULT['loss']})")]
LossChunks = Annotated[Optional[int], typer.Option(
    "--loss-chunks", help=f"chunks of --loss chunked (default {_DEFAULT['loss_chunks']})")]
def none_if_empty(value: Optional[list]) -> Optional[list]:
    """A repeatable option left out parses as []: None, as every option left out is."""
    return value or None


UnfrozenParameters = Annotated[Optional[list[str]], typer.Option(
    "--unfrozen-parameters", metavar="REGEX", callback=none_if_empty,
    help="train only the parameters whose names match; repeat for several (Axolotl's unfrozen_parameters; "
    "default: all train)")]
LbfgsHistory = Annotated[Optional[int], typer.Option(
    "--lbfgs-history", help=f"pairs of flat vectors --optimizer lbfgs keeps (torch's history_size; default "
    f"{_DEFAULT['lbfgs_history']})")]
EmaOpt = Annotated[Optional[bool], typer.Option(
    "--ema", metavar="", help="keep an exponential moving average of the trainable parameters (torch's AveragedModel): "
    "one more copy of them, in their storage dtype")]
ActivationOffloadOpt = Annotated[Optional[bool], typer.Option(
    "--activation-offload", metavar="", help="move the saved activations to pinned host RAM in the forward and back "
    "in the backward (TRL's OffloadActivations, Axolotl's activation_offloading: true); with "
    "--grad-checkpointing, the checkpointed blocks' inputs")]
FsdpVersion = Annotated[Optional[int], typer.Option(
    "--fsdp-version", help=f"FSDP 1 or 2, accelerate's fsdp_version (default {_DEFAULT['fsdp_version']})")]

# ---------------------------------------------------------------- the plan search (plan recommend)

Gpu = Annotated[Optional[str], typer.Option(
    "--gpu", help="a GPU of the catalog (plan gpus), or auto: the local GPUs via NVML")]
GlobalBatch = Annotated[Optional[int], typer.Option(
    "--global-batch", help="sequences per optimizer step, kept exactly (default: 8 per GPU, HF Trainer's "
    "per_device_train_batch_size)")]
MethodOpt = Annotated[Optional[MethodOrAuto], typer.Option(
    "--method", help=f"what trains; auto: full if it fits, else LoRA, else QLoRA (default {_SEARCH['method']})")]
Margin = Annotated[Optional[float], typer.Option(
    "--margin", help="fraction of GPU memory kept free (default: the measured device error of the plan's "
    "kind, 3-10%)")]
Mfu = Annotated[Optional[float], typer.Option(
    "--mfu", help=f"model-FLOPs utilisation assumed for the step-time model (default {_SEARCH['mfu']:g})")]
Samples = Annotated[Optional[int], typer.Option(
    "--samples", help=f"sequences per epoch, for the time per epoch (default {_SEARCH['samples']})")]
HostRam = Annotated[Optional[float], typer.Option(
    "--host-ram", help="GiB of host RAM per node for offload (default: this machine's)",
    callback=finite)]

# ---------------------------------------------------------------- files and output

Json = Annotated[bool, typer.Option("--json", metavar="", help="print JSON (the contract) instead of tables")]
SimSeconds = Annotated[float, typer.Option(
    "--sim-seconds", help="the simulator's time budget for one step (architectures without a formula, --exact)",
    callback=finite)]
SimMemory = Annotated[float, typer.Option("--sim-memory", help="the simulator's memory budget, GiB",
    callback=finite)]
Out = Annotated[str, typer.Option(
    "--out", help="directory for the plan's files: accelerate.yaml (+ deepspeed.json for ZeRO), recipe.yaml, PLAN.md")]
Force = Annotated[bool, typer.Option("--force", metavar="", help="replace files that already exist in --out")]
Data = Annotated[Optional[str], typer.Option("--data", help="training data for the recipe (JSONL, JSON, CSV, Parquet)")]
DataFormatOpt = Annotated[DataFormat, typer.Option("--data-format", help="how the data's records read")]


# ---------------------------------------------------------------- options -> Settings

def plain(value: Any) -> Any:
    """An Enum option as the string users type (what Settings and the recipe hold)."""
    return value.value if isinstance(value, Enum) else value


def _given_fields(options: Mapping[str, Any], names: Container[str]) -> dict[str, Any]:
    return {name: plain(v) for name, v in options.items() if name in names and v is not None}


def to_settings(options: Mapping[str, Any], **overrides: Any) -> Settings:
    """The Settings the options describe: every option named like a Settings field and given, as
    its plain value; `--dtype` stands for its precision recipe unless `--precision` is given;
    `overrides` (Settings fields) win. Options left out keep Settings' defaults."""
    kw = _given_fields(options, _DEFAULT)
    if "optimizer" in kw:  # users' names (paged_adamw_8bit, ...) as the contract's optimizer and paging
        kw["optimizer"], kw["optimizer_paged"] = optimizer_choice(kw["optimizer"])
    if "unfrozen_parameters" in kw:  # a repeated option: a list; Settings keeps a tuple
        kw["unfrozen_parameters"] = tuple(kw["unfrozen_parameters"])
    if "precision" not in kw and options.get("dtype") is not None:
        kw["precision"] = dtype_precision(plain(options["dtype"]), lora=bool(kw.get("lora_rank")),
                                          quant=kw.get("quant", _DEFAULT["quant"]))
    return Settings(**{**kw, **overrides})


def dtype_precision(dtype: str, lora: bool = False, quant: str = "none") -> str:
    """The one meaning of `--dtype`, the same in estimate, simulate, emit-config and recommend.
    bf16 is bf16-amp (fp32 weights, bf16 autocast: accelerate's `mixed_precision="bf16"`, HF
    Trainer's `bf16=True` on fp32 weights, recommend's full fine-tune), except for LoRA on an
    unquantised base: bf16-pure there, the base stored in bf16 with fp32 adapters, which is what
    transformers 5 gives (`from_pretrained` keeps a bf16 checkpoint in bf16, `dtype="auto"`),
    PEFT keeps (adapters upcast to fp32) and recommend plans. QLoRA keeps its NF4 base with bf16
    autocast (bf16-amp). The other dtypes are DTYPE_TO_RECIPE's."""
    if dtype == "bf16" and lora and quant == "none":
        return "bf16-pure"
    return DTYPE_TO_RECIPE[dtype]


def check_dtype(options: Mapping[str, Any]) -> None:
    """The command line's --dtype and --precision, both given, must agree: the recipe computes in
    the dtype (`--dtype fp16 --precision bf16-pure` is refused, a usage error: one line, status 2)."""
    dtype, precision = plain(options.get("dtype")), plain(options.get("precision"))
    if dtype is not None and precision is not None and precision not in DTYPE_PRECISIONS[dtype]:
        raise cx.UsageError(f"--dtype {dtype} computes in {dtype}, --precision {precision} does not: "
                            f"give one of them, or a {dtype} recipe ({', '.join(DTYPE_PRECISIONS[dtype])})")


def to_request(options: Mapping[str, Any], **overrides: Any) -> Request:
    """The plan search the options describe, as `to_settings` for a recommend Request: the options
    named like its fields and given, then `overrides`; the rest keep Request's defaults."""
    kw = _given_fields(options, _SEARCH)
    if "optimizer" in kw:
        kw["optimizer"], kw["optimizer_paged"] = optimizer_choice(kw["optimizer"])
    if "unfrozen_parameters" in kw:
        kw["unfrozen_parameters"] = tuple(kw["unfrozen_parameters"])
    return Request(**{**kw, **overrides})


def given(options: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """Which of `names` the user gave (an option left out is None; a flag given is True)."""
    return [n for n in names if options.get(n) is not None]


def flag(name: str) -> str:
    """An option's name on the command line: `seq_len` -> `--seq-len` (as PlanError renders it)."""
    return "--" + name.replace("_", "-")
