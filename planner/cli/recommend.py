"""`plan recommend`: the fastest plan that fits a GPU, and when none does, the smallest change
that would make one fit."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..contract import PlanError
from ..gpus import GPU
from ..recommend import Request, nearest_fits, recommend, smallest_need
from ..report import plan_json, render_plans
from ..spec import ModelSpec
from .common import console, fail, find_gpu, plan_spec, request, source_note
from .options import (
    EmaOpt,
    GlobalBatch,
    Gpu,
    Gpus,
    HostRam,
    Json,
    LbfgsHistory,
    LossChunks,
    LossOpt,
    Margin,
    MethodOpt,
    Mfu,
    Model,
    Nodes,
    OptimizerOrAutoOpt,
    Samples,
    SeqLen,
    UnfrozenParameters,
)

Top = Annotated[int, typer.Option("--top", help="how many plans to show")]


def recommend_cmd(ctx: typer.Context, model: Model, gpu: Gpu, gpus: Gpus = None, nodes: Nodes = None,
                  global_batch: GlobalBatch = None, seq_len: SeqLen = None, method: MethodOpt = None,
                  margin: Margin = None, optimizer: OptimizerOrAutoOpt = None, mfu: Mfu = None, samples: Samples = None,
                  host_ram: HostRam = None, loss: LossOpt = None, loss_chunks: LossChunks = None,
                  unfrozen_parameters: UnfrozenParameters = None, ema: EmaOpt = None,
                  lbfgs_history: LbfgsHistory = None, top: Top = 5, as_json: Json = False) -> None:
    """The fastest plan that fits: method, LoRA rank, strategy, offload, micro-batch, accumulation, checkpointing."""
    if top < 1:
        fail(f"--top must be at least 1, got {top}")
    res, spec = plan_spec(model)
    g = find_gpu(gpu)
    req = request(ctx.params, res, spec, g)
    try:
        plans = recommend(spec, req)
        if not plans:
            fail(nothing_fits(spec, req, g))
    except PlanError as e:
        fail(str(e))
    source_note(res)
    if as_json:
        typer.echo(json.dumps({"model": res.name, "gpu": g.name, "gpus": req.gpus, "nodes": req.nodes,
                               "memory_bytes": g.memory_bytes, "budget_bytes": req.budget_for(plans[0].settings),
                               "mfu": req.mfu, "global_batch": req.global_batch, "host_ram_bytes": req.host_ram_bytes,
                               "plans": [plan_json(p) for p in plans[:top]]}, indent=2))
        return
    render_plans(console(120), res.name, req, plans[:top], len(plans), defaults_note(ctx.params, req))


def defaults_note(options, req: Request) -> list[str]:
    """The limits recommend chose because the command line did not: the global batch and the
    host RAM offload may use."""
    from .common import DEFAULT_PER_GPU_BATCH
    out = []
    if options.get("global_batch") is None:
        out.append(f"Global batch {req.global_batch}: the default, {DEFAULT_PER_GPU_BATCH} sequences per GPU "
                   "(HF Trainer's per_device_train_batch_size); --global-batch sets another.")
    if options.get("host_ram") is None and req.host_ram_bytes is not None:
        out.append(f"Host RAM {req.host_ram_bytes / 2**30:,.0f} GiB per node: this machine's; --host-ram sets the "
                   "training nodes'.")
    return out


def nothing_fits(spec: ModelSpec, req: Request, g: GPU) -> str:
    """What the smallest plan needs, and the single changes that would make one fit."""
    from dataclasses import replace
    need, st = smallest_need(spec, req)
    hints = [h for h in nearest_fits(spec, req) if h != "more host RAM (offload)"]
    host = ""
    if req.host_ram_bytes is not None:
        unlimited = recommend(spec, replace(req, host_ram_bytes=None))
        if unlimited:  # the GPU would hold a plan: the host RAM its offload needs is what is short
            cpu = min(p.estimate.cpu_bytes for p in unlimited)
            host = (f"; with offload a plan fits the GPU but needs {cpu / 2**30:,.0f} GiB of host RAM per node, "
                    f"more than the {req.host_ram_bytes / 2**30:,.0f} GiB allowed (--host-ram; default this "
                    "machine's)")
    usable = req.budget_for(st) if st is not None else g.memory_bytes
    return (f"nothing fits {req.world} x {g.name} ({usable / 2**30:,.1f} GiB usable per GPU, "
            f"{1 - usable / g.memory_bytes:.0%} kept free): the smallest plan needs {need / 2**30:,.1f} GiB"
            + (f" ({st.strategy}, offload {st.offload})" if st else "") + host
            + ("; it would fit with " + ", or ".join(hints) if hints else "; no single change makes it fit"))
