"""`plan emit-config`: a plan written as accelerate.yaml (+ deepspeed.json for ZeRO), recipe.yaml
and PLAN.md; recommend's best plan for `--gpu`, or the plan the estimate options describe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Optional

import typer

from ..contract import DataFormat, PlanError, Settings
from ..estimate import Estimate, estimate
from ..gpus import GPU
from ..resolve import Resolved
from ..spec import ModelSpec
from .common import best_plan, default_seq, fail, find_gpu, formula_spec, loadable
from .options import (
    BatchSize,
    Data,
    DataFormatOpt,
    DtypeOpt,
    Force,
    GlobalBatch,
    Gpu,
    Gpus,
    GradCheckpointing,
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
    check_dtype,
    flag,
    given,
    plain,
    to_settings,
)

EXPLICIT = ("dtype", "precision", "batch_size", "grad_accum", "lora_rank", "lora_alpha", "lora_targets", "quant",
            "grad_checkpointing", "strategy", "offload")
"""The options of an explicit plan. Beside --gpu, recommend chooses these: one given would be dropped."""

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
                    margin: Margin = None, dtype: DtypeOpt = None, precision: PrecisionOpt = None,
                    batch_size: BatchSize = None, grad_accum: GradAccum = None, optimizer: OptimizerOrAutoOpt = None,
                    lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None, lora_targets: LoraTargets = None,
                    quant: QuantOpt = None, grad_checkpointing: GradCheckpointing = None, strategy: StrategyOpt = None,
                    offload: OffloadOpt = None, loss: LossOpt = None, loss_chunks: LossChunks = None,
                    data: Data = None, data_format: DataFormatOpt = DataFormat.ALPACA,
                    main_process_ip: MainProcessIp = None, main_process_port: MainProcessPort = 29500,
                    machine_rank: MachineRank = 0, force: Force = False) -> None:
    """Write a plan as accelerate.yaml (+ deepspeed.json for ZeRO), recipe.yaml and PLAN.md."""
    from ..emit import write_files
    check_dtype(ctx.params)
    res, spec = formula_spec(model, "plan emit-config")
    check_plan_source(ctx.params)
    try:
        plan = recommended(model, ctx.params, res, spec) if gpu is not None else explicit(ctx.params, res, spec)
        contents = plan_files(model, res, spec, plan, out, data=data, data_format=plain(data_format),
                              machine_rank=machine_rank, main_process_ip=main_process_ip,
                              main_process_port=main_process_port)
        written = write_files(out, contents, force)
    except PlanError as e:
        fail(str(e))
    for path in written:
        typer.echo(path)


def check_plan_source(options: Mapping[str, Any]) -> None:
    """The plan comes from recommend (--gpu) or from the explicit-plan options, not both."""
    if options["from_recommendation"] and options["gpu"] is None:
        fail("--from-recommendation needs --gpu NAME (or auto)")
    both = given(options, EXPLICIT) if options["gpu"] is not None else []
    if both:
        fail(f"{', '.join(map(flag, both))}: explicit-plan options, but --gpu asks plan recommend to choose the plan; "
             "drop --gpu to write your plan, or drop these to write recommend's")


@dataclass
class ChosenPlan:
    """What the files describe: the run, its accumulation and estimate; why recommend chose it
    and for which GPU, where it did."""
    settings: Settings
    accumulation: int
    estimate: Estimate
    why: list[str] = field(default_factory=list)
    gpu: Optional[GPU] = None


def recommended(model: str, options: Mapping[str, Any], res: Resolved, spec: ModelSpec) -> ChosenPlan:
    """plan recommend's best plan for --gpu (exit 2 when nothing fits)."""
    g = find_gpu(options["gpu"])
    best = best_plan(model, options, res, spec, g)
    return ChosenPlan(best.settings, best.accumulation, best.estimate, best.notes, g)


def explicit(options: Mapping[str, Any], res: Resolved, spec: ModelSpec) -> ChosenPlan:
    """The plan the estimate options describe (bf16 mixed precision unless they say otherwise)."""
    if plain(options.get("optimizer")) == "auto":
        raise PlanError("{optimizer} auto lets plan recommend choose the optimizer: give --gpu, or name one",
                        "optimizer")
    st = to_settings(options, seq_len=default_seq(res, spec, options["seq_len"]))
    accum = options["grad_accum"] if options["grad_accum"] is not None else 1
    if accum < 1:
        raise PlanError(f"{{grad_accum}} must be at least 1, got {accum}", "grad_accum")
    st = replace(st, accumulation=accum)  # with accumulation every gradient lives through the micro-steps
    return ChosenPlan(st, accum, estimate(spec, st))


def plan_files(model: str, res: Resolved, spec: ModelSpec, plan: ChosenPlan, out: str, **kw: Any) -> dict[str, str]:
    """The files' contents, by name, as planner.emit renders them (`kw`: the recipe's data and
    the multi-node launch)."""
    from ..emit import render
    base, gguf = loadable(model, res)
    g = plan.gpu
    return render(base, plan.settings, plan.accumulation, plan.estimate, out, spec.hidden,
                  gpu=g.name if g else None, bf16_gpu=g.bf16 if g else True, why=plan.why or None, gguf_file=gguf,
                  **kw)
