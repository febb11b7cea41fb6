"""`plan emit-config`: a plan written as accelerate.yaml (+ deepspeed.json for ZeRO), recipe.yaml
and PLAN.md; recommend's best plan for `--gpu`, or the plan the estimate options describe (on
`--gpu` when given, checked against DEFAULT_GPU when not)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..contract import DataFormat, PlanError, Settings
from ..estimate import Estimate, estimate
from ..gpus import GPU
from ..resolve import Resolved
from ..spec import ModelSpec
from .common import default_seq, fail, find_gpu, loadable, plan_spec, request
from .options import (
    ActivationOffloadOpt,
    BatchSize,
    Data,
    DataFormatOpt,
    DtypeOpt,
    EmaOpt,
    Force,
    GlobalBatch,
    Gpu,
    Gpus,
    GradCheckpointing,
    HostRam,
    LbfgsHistory,
    LoraAlpha,
    LoraRank,
    LoraTargets,
    LossChunks,
    LossOpt,
    Margin,
    MethodOpt,
    Model,
    Nodes,
    OffloadOpt,
    OptimizerOrAutoOpt,
    Out,
    PrecisionOpt,
    QuantOpt,
    SeqLen,
    StrategyOpt,
    UnfrozenParameters,
    check_dtype,
    dtype_precision,
    flag,
    given,
    plain,
    to_settings,
)

DEFAULT_GPU = "H100-SXM"
"""The GPU an explicit plan is checked against when --gpu does not name one: the commonest
training GPU of the catalog (80 GB). The plan is written either way; one that does not fit gets a
warning naming the GPU and the memory it needs (stderr and PLAN.md)."""

EXPLICIT = ("dtype", "precision", "batch_size", "grad_accum", "lora_rank", "lora_alpha", "lora_targets", "quant",
            "grad_checkpointing", "strategy", "offload", "activation_offload")
"""The options of an explicit plan: with any of them, --gpu names the GPU the plan is written for
(not recommend's search, which would choose them itself)."""

FromRecommendation = Annotated[bool, typer.Option(
    "--from-recommendation", metavar="", help="write the best plan of plan recommend (needs --gpu)")]
GradAccum = Annotated[Optional[int], typer.Option("--grad-accum", help="gradient accumulation steps (default 1)")]
MainProcessIp = Annotated[Optional[str], typer.Option(
    "--main-process-ip", help="multi-node: address of machine rank 0")]
MainProcessPort = Annotated[int, typer.Option("--main-process-port", help="multi-node: port of machine rank 0")]
MachineRank = Annotated[int, typer.Option("--machine-rank", help="multi-node: this machine's rank")]


def emit_config_cmd(ctx: typer.Context, model: Model, out: Out, gpu: Gpu = None,
                    from_recommendation: FromRecommendation = False, gpus: Gpus = None, nodes: Nodes = None,
                    global_batch: GlobalBatch = None, seq_len: SeqLen = None, method: MethodOpt = None,
                    margin: Margin = None, host_ram: HostRam = None, dtype: DtypeOpt = None,
                    precision: PrecisionOpt = None,
                    batch_size: BatchSize = None, grad_accum: GradAccum = None, optimizer: OptimizerOrAutoOpt = None,
                    lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None, lora_targets: LoraTargets = None,
                    quant: QuantOpt = None, grad_checkpointing: GradCheckpointing = None, strategy: StrategyOpt = None,
                    offload: OffloadOpt = None, loss: LossOpt = None, loss_chunks: LossChunks = None,
                    activation_offload: ActivationOffloadOpt = None,
                    unfrozen_parameters: UnfrozenParameters = None, ema: EmaOpt = None,
                    lbfgs_history: LbfgsHistory = None, data: Data = None,
                    data_format: DataFormatOpt = DataFormat.ALPACA,
                    main_process_ip: MainProcessIp = None, main_process_port: MainProcessPort = 29500,
                    machine_rank: MachineRank = 0, force: Force = False) -> None:
    """Write a plan as accelerate.yaml (+ deepspeed.json for ZeRO), recipe.yaml and PLAN.md.

    --gpu alone writes plan recommend's best plan for it; the estimate options (with --gpu or
    without) write that plan, with a warning when it needs more than the GPU (default H100-SXM)."""
    from ..emit import write_files
    check_dtype(ctx.params)
    check_plan_source(ctx.params)
    if data is not None:
        check_data(data, plain(data_format))
    res, spec = plan_spec(model)
    try:
        plan = recommended(model, ctx.params, res, spec) if from_recommend(ctx.params) \
            else explicit(ctx.params, res, spec)
        contents = plan_files(model, res, spec, plan, out, data=data, data_format=plain(data_format),
                              machine_rank=machine_rank, main_process_ip=main_process_ip,
                              main_process_port=main_process_port, relative_model=True)
        written = write_files(out, contents, force)
    except PlanError as e:
        fail(str(e))
    for w in plan.warnings:  # also at the top of PLAN.md
        typer.echo(f"warning: {w}", err=True)
    for path in written:
        typer.echo(path)


def check_data(path: str, fmt: str) -> None:
    """--data must be a dataset plan train can read, with the fields its format needs: one line,
    status 2, otherwise (checked before planning, as plan train --auto does)."""
    from ..data import DataError, check_records, read_records
    try:
        check_records(read_records(path)[0], fmt, path)
    except DataError as e:
        fail(f"--data {e}")
    except OSError as e:  # unreadable: permissions, a device
        fail(f"--data {path}: cannot read it ({e.strerror or e})")


def from_recommend(options: Mapping[str, Any]) -> bool:
    """recommend's plan: --gpu without any explicit-plan option (or --from-recommendation)."""
    return options["gpu"] is not None and not given(options, EXPLICIT)


def check_plan_source(options: Mapping[str, Any]) -> None:
    """--from-recommendation needs --gpu, and no explicit-plan option beside it (recommend would
    drop it)."""
    if options["from_recommendation"] and options["gpu"] is None:
        fail("--from-recommendation needs --gpu NAME (or auto)")
    both = given(options, EXPLICIT) if options["from_recommendation"] else []
    if both:
        fail(f"{', '.join(map(flag, both))}: explicit-plan options, but --from-recommendation asks plan recommend "
             "to choose the plan; drop it to write your plan on --gpu, or drop these to write recommend's")


@dataclass
class ChosenPlan:
    """What the files describe: the run, its accumulation and estimate; why recommend chose it
    and for which GPU, where it did; warnings for the user (an explicit plan that does not fit)."""
    settings: Settings
    accumulation: int
    estimate: Estimate
    why: list[str] = field(default_factory=list)
    gpu: Optional[GPU] = None
    warnings: list[str] = field(default_factory=list)


def recommended(model: str, options: Mapping[str, Any], res: Resolved, spec: ModelSpec) -> ChosenPlan:
    """plan recommend's best plan for --gpu (exit 2 when nothing fits). On a GPU without bf16
    (T4, V100), the best plan that runs in fp16: LoRA on a 16-bit base is planned in bf16-pure's
    bytes, but plan train loads that base in bf16, which such a GPU cannot compute in, and has no
    fp16 base yet."""
    from ..recommend import recommend
    g = find_gpu(options["gpu"])
    req = request(options, res, spec, g)
    plans = recommend(spec, req)
    runnable = plans if g.bf16 else [p for p in plans if not p.settings.precision.startswith("bf16")]
    if not runnable:
        fail(f"nothing fits {req.world} x {g.name}: run plan recommend {model} --gpu {options['gpu']} to see what would"
             + ("" if not plans else f" (its plans need bf16, which {g.name} does not have)"))
    best = runnable[0]
    why = list(best.notes)
    if best is not plans[0]:
        why.append(f"recommend's first plan, {plans[0].method} on a 16-bit base, loads it in bf16, which {g.name} "
                   "does not have (plan train has no fp16 base yet): this is its best plan in fp16")
    return ChosenPlan(best.settings, best.accumulation, best.estimate, why, g)


def explicit(options: Mapping[str, Any], res: Resolved, spec: ModelSpec) -> ChosenPlan:
    """The plan the estimate options describe, for --gpu when it names one (its GPU count unless
    --gpus says otherwise; fp16 mixed precision on a GPU without bf16, where a bf16 precision is
    refused), else checked against DEFAULT_GPU. A plan whose device memory is larger than the
    GPU's is written with a warning naming the GPU and the GiB it needs."""
    if plain(options.get("optimizer")) == "auto":
        raise PlanError("{optimizer} auto lets plan recommend choose the optimizer: give --gpu, or name one",
                        "optimizer")
    named = options["gpu"] is not None
    g = find_gpu(options["gpu"] if named else DEFAULT_GPU)
    over: dict[str, Any] = {"seq_len": default_seq(res, spec, options["seq_len"])}
    if named and options["gpus"] is None:
        over["gpus"] = g.count
    precision = options["precision"] or (options["dtype"] and plain(options["dtype"]))
    if named and precision is not None and str(plain(precision)).startswith(("fp8", "msamp")) \
            and not g.computes_in("fp8"):
        raise PlanError(f"{g.name} has no FP8 tensor cores: {plain(precision)} cannot run on it "
                        "(Ada, Hopper and newer have them); use --dtype bf16", "precision")
    if named and not g.bf16:
        if precision is not None and str(plain(precision)).startswith("bf16"):
            raise PlanError(f"{g.name} has no bf16: {{precision}} {plain(precision)} cannot run on it; use "
                            "--dtype fp16 (or --quant nf4 for QLoRA)", "precision")
        if precision is None:
            over["precision"] = "fp16-amp"
    if precision is None and "precision" not in over:  # --dtype bf16's meaning (LoRA: a bf16 base)
        over["precision"] = dtype_precision("bf16", lora=bool(options["lora_rank"]), quant=plain(options["quant"])
                                            or "none")
    st = to_settings(options, **over)
    accum = options["grad_accum"] if options["grad_accum"] is not None else 1
    if accum < 1:
        raise PlanError(f"{{grad_accum}} must be at least 1, got {accum}", "grad_accum")
    st = replace(st, accumulation=accum)  # with accumulation every gradient lives through the micro-steps
    est = estimate(spec, st)
    warnings = []
    if est.needed_bytes > g.memory_bytes:  # what recommend fits plans by
        which = f"--gpu {g.name}" if named else f"{g.name} (assumed: no --gpu named)"
        warnings.append(f"this plan needs {est.needed_bytes / 2**30:,.1f} GiB per GPU; {which} has "
                        f"{g.memory_bytes / 2**30:,.1f} GiB: it will run out of memory there (plan recommend "
                        "finds a plan that fits)")
    return ChosenPlan(st, accum, est, gpu=g if named else None, warnings=warnings)


def plan_files(model: str, res: Resolved, spec: ModelSpec, plan: ChosenPlan, out: str, relative_model: bool = False,
               **kw: Any) -> dict[str, str]:
    """The files' contents, by name, as planner.emit renders them (`kw`: the recipe's data and
    the multi-node launch). `relative_model`: a local model given as a relative path is written
    relative to `out` (emit-config's plan directory), not as this machine's absolute path."""
    from ..emit import relative_to, render
    base, gguf = loadable(model, res)
    if relative_model and base != model and not Path(model).is_absolute():
        base = relative_to(os.path.relpath(base), out)
    g = plan.gpu
    return render(base, plan.settings, plan.accumulation, plan.estimate, out, spec.hidden,
                  gpu=g.name if g else None, bf16_gpu=g.bf16 if g else True, why=plan.why or None, gguf_file=gguf,
                  warnings=plan.warnings or None, **kw)
