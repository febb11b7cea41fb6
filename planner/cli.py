"""`plan`: the command line. Bad input exits 2 with one line, never a traceback."""

from __future__ import annotations

import inspect
import json
import sys
from enum import Enum
from typing import Optional

import typer

from .contract import DTYPE_TO_RECIPE, PlanError, Settings, check_options
from .estimate import estimate
from .resolve import ResolveError, resolve
from .spec import ModelSpec, SpecError, UnsupportedArchitecture

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Training-memory planner: will it fit, and on what?")


class Dtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    fp8 = "fp8"


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _spec(model: str):
    """(resolved, spec); spec is None for a well-formed config of an architecture without a
    formula, which the simulator then measures."""
    try:
        res = resolve(model)
        return res, ModelSpec.from_config(res.config)
    except ResolveError as e:
        fail(str(e))
    except UnsupportedArchitecture:
        from transformers import CONFIG_MAPPING
        mt = res.config.get("model_type")
        if mt not in CONFIG_MAPPING:
            fail(f"{model}: unknown model_type '{mt}': neither plan's formulas nor transformers know it")
        return res, None
    except SpecError as e:
        fail(f"{model}: malformed config: {e}")


def _source_note(res) -> None:
    """Say where the config came from when it is not the user's own file: the built-in catalog
    stands in when the model is not local, not cached and the Hub is offline or unreachable
    (stderr, so that --json output stays one object)."""
    if res.source == "catalog":
        typer.echo(f"note: {res.name}: config from plan's built-in catalog (tables/models.json); not local, not in "
                   "the Hugging Face cache, and the Hub offline or unreachable", err=True)


def _settings(precision, dtype, **kw) -> list[Settings]:
    if precision:
        return [Settings(precision=precision, **kw)]
    if dtype:
        return [Settings(precision=DTYPE_TO_RECIPE[dtype.value], **kw)]
    return [Settings(precision=DTYPE_TO_RECIPE[d], **kw) for d in ("fp32", "fp16", "bf16", "fp8")]


def _default_seq(res, spec: Optional[ModelSpec], seq_len: Optional[int]) -> int:
    if seq_len is not None:
        return seq_len
    if spec is not None:
        return min(2048, spec.max_positions)
    cfg = res.config
    limit = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    return min(2048, int(limit))


@app.command("estimate")
def estimate_cmd(
    model: str = typer.Argument(..., help="Hub id, directory with config.json, config.json or .gguf"),
    dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="compute dtype; fp16/bf16 = mixed precision"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16-amp, bf16-amp, bf16-pure, fp8-te, msamp-o1/o2/o3"),
    batch_size: int = typer.Option(1, "--batch-size", help="micro-batch per GPU"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per sample (default 2048, capped at the model's maximum)"),
    optimizer: str = typer.Option("adamw", "--optimizer"),
    lora_rank: int = typer.Option(0, "--lora-rank"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
    lora_targets: str = typer.Option("all-linear", "--lora-targets"),
    quant: str = typer.Option("none", "--quant", help="none, int8, nf4 (frozen base)"),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing"),
    attn: str = typer.Option("sdpa", "--attn", help="sdpa (also flash) or eager"),
    gpus: int = typer.Option(1, "--gpus"),
    nodes: int = typer.Option(1, "--nodes"),
    strategy: str = typer.Option("ddp", "--strategy", help="ddp, fsdp, fsdp-grad-op, fsdp-hybrid, fsdp-no-shard, "
                                 "zero1, zero2, zero3, or all (compare them side by side)"),
    offload: str = typer.Option("none", "--offload", help="none, optimizer, params, all, nvme"),
    fsdp_version: int = typer.Option(2, "--fsdp-version", help="FSDP 1 or 2 (accelerate's fsdp_version)"),
    compat: Optional[str] = typer.Option(None, "--compat", help="accelerate: print accelerate's estimate-memory table"),
    exact: bool = typer.Option(False, "--exact", help="measure with the simulator instead of the formulas"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (contract) instead of tables"),
):
    """Training memory per GPU, per dtype, per component and per phase."""
    if compat is not None:
        return _compat(model, compat, as_json, gpus, nodes)
    res, spec = _spec(model)
    kw = dict(batch_size=batch_size, seq_len=_default_seq(res, spec, seq_len), optimizer=optimizer, lora_rank=lora_rank,
              lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets, quant=quant,
              grad_checkpointing=grad_checkpointing, attn=attn, gpus=gpus, nodes=nodes, strategy=strategy,
              offload=offload, fsdp_version=fsdp_version)
    if strategy == "all":
        return _compare_strategies(res, spec, precision, dtype, kw, as_json)
    try:
        # without a formula there is no estimate, only the options to check before simulating
        runs = [(check_options(st), estimate(spec, st) if spec else None) for st in _settings(precision, dtype, **kw)]
    except PlanError as e:
        fail(str(e))
    from .report import render, to_json
    arch = res.config.get("model_type", "?")
    method = "analytic"
    if exact or spec is None:
        if spec is None and not as_json:
            typer.echo(f"note: no formula for model_type '{arch}': measuring a real training step on fake tensors", err=True)
        sims = []
        for st, est in runs:
            sim = _simulated(res, st)
            sim.param_counts = est.param_counts if est else None  # the formula's breakdown, where there is one
            sims.append((st, sim))
        runs, method = sims, "simulated"
    _source_note(res)
    if as_json:
        objs = [to_json(res.name, arch, st, est, method) for st, est in runs]
        typer.echo(json.dumps(objs[0] if (precision or dtype) else objs, indent=2))
        return
    from rich.console import Console
    chosen = next((i for i, (st, _) in enumerate(runs) if st.precision == "bf16-amp"), 0)
    render(Console(), res.name, arch, runs, chosen)


def _compare_strategies(res, spec, precision, dtype, kw: dict, as_json: bool) -> None:
    """`--strategy all`: one precision (bf16 mixed precision unless given), every strategy and
    offload the engines offer, side by side."""
    from dataclasses import replace

    from .distributed import strategy_choices
    from .report import render_strategies, to_json
    if spec is None:
        fail(f"{res.name}: --strategy all needs the formulas, which model_type "
             f"'{res.config.get('model_type')}' does not have yet")
    base = _settings(precision, dtype or Dtype.bf16, **{**kw, "strategy": "ddp", "offload": "none"})[0]
    try:
        estimate(spec, base)  # the options every strategy shares: fail on them once, not per strategy
    except PlanError as e:
        fail(str(e))
    rows, skipped = [], []
    for strat, off in strategy_choices(base):
        st = replace(base, strategy=strat, offload=off)
        try:
            rows.append((st, estimate(spec, st)))
        except PlanError as e:
            skipped.append(f"{strat} --offload {off}: {e}")
    arch = res.config.get("model_type", "?")
    if as_json:
        objs = [{**to_json(res.name, arch, st, est), "strategy": st.strategy, "offload": st.offload,
                 "gpus": st.gpus, "nodes": st.nodes} for st, est in rows]
        typer.echo(json.dumps(objs, indent=2))
        return
    from rich.console import Console
    console = Console()
    if not console.is_terminal:  # piped or logged: the whole table, not one squeezed to 80 columns
        console = Console(width=max(console.width, 110))
    render_strategies(console, res.name, arch, rows, skipped)


def _simulated(res, st: Settings):
    from .measure.simulate import simulated_estimate
    try:
        return simulated_estimate(res.config, st)
    except PlanError as e:
        fail(str(e))
    except Exception as e:  # the simulator cannot run this model or recipe on CPU
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"simulation of {res.name} ({st.precision}, {st.optimizer}) failed: {msg}", 1)


def simulate_cmd(**kw):
    """Run the real training step under fake tensors and report the measured peak (bf16-amp
    unless --dtype/--precision say otherwise). Takes every estimate option."""
    if kw["dtype"] is None and kw["precision"] is None:
        kw["precision"] = "bf16-amp"
    estimate_cmd(**kw, compat=None, exact=True)


# simulate takes estimate's options, less the two that choose another answer
_sig = inspect.signature(estimate_cmd)
simulate_cmd.__signature__ = _sig.replace(
    parameters=[p for n, p in _sig.parameters.items() if n not in ("compat", "exact")])
simulate_cmd.__annotations__ = {n: a for n, a in estimate_cmd.__annotations__.items() if n not in ("compat", "exact")}
app.command("simulate")(simulate_cmd)


def _gpu(name: str):
    from .gpus import GPUError, resolve_gpu
    try:
        return resolve_gpu(name)
    except GPUError as e:
        fail(str(e))


def _request(res, spec, gpu_arg: str, g, gpus: Optional[int], nodes: int, seq_len: Optional[int],
             host_ram: Optional[float], **kw):
    """The search request recommend and emit-config share: the GPU count NVML found unless
    --gpus says otherwise, the default sequence length, and host RAM (GiB) from --host-ram, or
    this machine's with --gpu auto, else not limited."""
    from .gpus import local_host_ram
    from .recommend import Request
    host = int(host_ram * 2**30) if host_ram is not None else (local_host_ram() if gpu_arg == "auto" else None)
    return Request(gpu=g, gpus=gpus if gpus is not None else g.count, nodes=nodes,
                   seq_len=_default_seq(res, spec, seq_len), host_ram_bytes=host, **kw)


def _best_plan(model: str, res, spec, gpu_arg: str, g, gpus: Optional[int], nodes: int, seq_len: Optional[int], **kw):
    """plan recommend's first plan for the request, or exit 2 saying nothing fits."""
    from .recommend import recommend
    req = _request(res, spec, gpu_arg, g, gpus, nodes, seq_len, None, **kw)
    plans = recommend(spec, req)
    if not plans:
        fail(f"nothing fits {req.world} x {g.name}: run plan recommend {model} --gpu {gpu_arg} to see what would")
    return plans[0]


def _check_data_format(data_format: str) -> None:
    """One of the recipe's dataset types (planner/recipe.py)."""
    from .contract import DataFormat
    formats = DataFormat.values()
    if data_format not in formats:
        fail(f"--data-format {data_format}: choose {', '.join(formats[:-1])} or {formats[-1]}")


@app.command("recommend")
def recommend_cmd(
    model: str = typer.Argument(..., help="Hub id, directory with config.json, config.json or .gguf"),
    gpu: str = typer.Option(..., "--gpu", help="a GPU of the catalog (plan gpus), or auto: the local GPUs via NVML"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs per node (default: 1, or what --gpu auto counts)"),
    nodes: int = typer.Option(1, "--nodes"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="sequences per optimizer step, kept exactly "
                                               "(default: the largest micro-batch, no accumulation)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per sample (default 2048, capped at the model's maximum)"),
    method: str = typer.Option("auto", "--method", help="auto (full if it fits, else LoRA, else QLoRA), full, lora, qlora"),
    margin: float = typer.Option(0.1, "--margin", help="fraction of GPU memory kept free"),
    optimizer: str = typer.Option("adamw", "--optimizer"),
    mfu: float = typer.Option(0.40, "--mfu", help="model-FLOPs utilisation assumed for the step-time model"),
    samples: int = typer.Option(10_000, "--samples", help="sequences per epoch, for the time per epoch"),
    host_ram: Optional[float] = typer.Option(None, "--host-ram", help="GiB of host RAM per node for offload (default: this machine's with --gpu auto, else not limited)"),
    top: int = typer.Option(5, "--top", help="how many plans to show"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
):
    """The fastest plan that fits: method, LoRA rank, strategy, offload, micro-batch, accumulation, checkpointing."""
    from .recommend import nearest_fits, recommend, smallest_need
    res, spec = _spec(model)
    if spec is None:
        fail(f"{model}: plan recommend needs the formulas, which model_type '{res.config.get('model_type')}' does not have yet")
    g = _gpu(gpu)
    req = _request(res, spec, gpu, g, gpus, nodes, seq_len, host_ram, global_batch=global_batch, method=method,
                   margin=margin, optimizer=optimizer, mfu=mfu, samples=samples)
    try:
        plans = recommend(spec, req)
    except PlanError as e:
        fail(str(e))
    if not plans:
        need, st = smallest_need(spec, req)
        hints = nearest_fits(spec, req)
        fail(f"nothing fits {req.world} x {g.name} ({req.budget / 2**30:,.1f} GiB usable per GPU at margin {margin:g}): "
             f"the smallest plan needs {need / 2**30:,.1f} GiB"
             + (f" ({st.strategy}, offload {st.offload})" if st else "")
             + ("; it would fit with " + ", or ".join(hints) if hints else "; no single change makes it fit"))
    from .report import plan_json, render_plans
    _source_note(res)
    if as_json:
        typer.echo(json.dumps({"model": res.name, "gpu": g.name, "gpus": req.gpus, "nodes": req.nodes,
                               "memory_bytes": g.memory_bytes, "budget_bytes": req.budget, "mfu": req.mfu,
                               "plans": [plan_json(p) for p in plans[:top]]}, indent=2))
        return
    from rich.console import Console
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    render_plans(console, res.name, req, plans[:top], len(plans))


def _loadable(model: str, res) -> tuple[str, Optional[str]]:
    """What `from_pretrained` loads for the recipe: a hub id as given, a local path made
    absolute; a .gguf file as its directory plus `gguf_file` (transformers' convention)."""
    from pathlib import Path
    if res.source not in ("local", "gguf"):
        return model, None
    p = Path(model).resolve()
    if res.source == "gguf":
        if p.is_dir():
            return str(p), sorted(p.glob("*.gguf"))[0].name
        return str(p.parent), p.name
    return str(p.parent if p.is_file() else p), None


@app.command("emit-config")
def emit_config_cmd(
    model: str = typer.Argument(..., help="Hub id, directory with config.json, config.json or .gguf"),
    out: str = typer.Option(..., "--out", help="directory to write accelerate.yaml, deepspeed.json, recipe.yaml, PLAN.md"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="plan with `plan recommend` for this GPU (or auto) and write its best plan"),
    from_recommendation: bool = typer.Option(False, "--from-recommendation", help="write the best plan of plan recommend (needs --gpu)"),
    gpus: Optional[int] = typer.Option(None, "--gpus"),
    nodes: int = typer.Option(1, "--nodes"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    method: str = typer.Option("auto", "--method", help="with --gpu: auto, full, lora, qlora"),
    margin: float = typer.Option(0.1, "--margin"),
    dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="explicit plan: compute dtype (default bf16)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="explicit plan: recipe"),
    batch_size: int = typer.Option(1, "--batch-size", help="explicit plan: micro-batch per GPU"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="explicit plan: gradient accumulation steps"),
    optimizer: str = typer.Option("adamw", "--optimizer"),
    lora_rank: int = typer.Option(0, "--lora-rank"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha"),
    lora_targets: str = typer.Option("all-linear", "--lora-targets"),
    quant: str = typer.Option("none", "--quant"),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing"),
    strategy: str = typer.Option("ddp", "--strategy"),
    offload: str = typer.Option("none", "--offload"),
    data: Optional[str] = typer.Option(None, "--data", help="training data for the recipe (JSONL, JSON, CSV, Parquet)"),
    data_format: str = typer.Option("alpaca", "--data-format", help="alpaca, chat, completion, classification"),
    main_process_ip: Optional[str] = typer.Option(None, "--main-process-ip", help="multi-node: address of machine rank 0"),
    main_process_port: int = typer.Option(29500, "--main-process-port"),
    machine_rank: int = typer.Option(0, "--machine-rank"),
    force: bool = typer.Option(False, "--force", help="replace files that already exist in --out"),
):
    """Write a plan as accelerate.yaml (+ deepspeed.json for ZeRO), recipe.yaml and PLAN.md."""
    from .emit import render, write_files
    res, spec = _spec(model)
    if spec is None:
        fail(f"{model}: plan emit-config needs the formulas, which model_type '{res.config.get('model_type')}' does not have yet")
    if from_recommendation and gpu is None:
        fail("--from-recommendation needs --gpu NAME (or auto)")
    if gpu is not None:  # recommend chooses these; an explicit value would be silently dropped
        given = {"--dtype": dtype is not None, "--precision": precision is not None, "--batch-size": batch_size != 1,
                 "--grad-accum": grad_accum != 1, "--lora-rank": lora_rank != 0, "--lora-alpha": lora_alpha is not None,
                 "--lora-targets": lora_targets != "all-linear", "--quant": quant != "none",
                 "--grad-checkpointing": grad_checkpointing, "--strategy": strategy != "ddp", "--offload": offload != "none"}
        if any(given.values()):
            fail(f"{', '.join(k for k, v in given.items() if v)}: explicit-plan options, but --gpu asks plan recommend to "
                 "choose the plan; drop --gpu to write your plan, or drop these to write recommend's")
    _check_data_format(data_format)
    why, gpu_name, bf16_gpu = None, None, True
    try:
        if gpu is not None:
            g = _gpu(gpu)
            gpu_name, bf16_gpu = g.name, g.bf16
            best = _best_plan(model, res, spec, gpu, g, gpus, nodes, seq_len, global_batch=global_batch, method=method,
                              margin=margin, optimizer=optimizer)
            st, accum, est, why = best.settings, best.accumulation, best.estimate, best.notes
        else:
            st = _settings(precision, dtype or Dtype.bf16, batch_size=batch_size, seq_len=_default_seq(res, spec, seq_len),
                           optimizer=optimizer, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                           quant=quant, grad_checkpointing=grad_checkpointing, gpus=gpus or 1, nodes=nodes,
                           strategy=strategy, offload=offload)[0]
            if grad_accum < 1:
                raise PlanError(f"--grad-accum must be at least 1, got {grad_accum}")
            accum, est = grad_accum, estimate(spec, st)
        base, gguf = _loadable(model, res)
        contents = render(base, st, accum, est, out, spec.hidden, gpu=gpu_name, bf16_gpu=bf16_gpu, why=why,
                          data=data, data_format=data_format, machine_rank=machine_rank,
                          main_process_ip=main_process_ip, main_process_port=main_process_port, gguf_file=gguf)
        written = write_files(out, contents, force)
    except PlanError as e:
        fail(str(e))
    for path in written:
        typer.echo(path)


@app.command("train")
def train_cmd(
    recipe: Optional[str] = typer.Argument(None, help="recipe.yaml (plan emit-config writes one)"),
    auto: Optional[str] = typer.Option(None, "--auto", help="MODEL: plan it with plan recommend, write the plan, train it"),
    data: Optional[str] = typer.Option(None, "--data", help="with --auto: training data (JSONL, JSON, CSV, Parquet)"),
    data_format: str = typer.Option("alpaca", "--data-format", help="with --auto: alpaca, chat, completion, classification"),
    gpu: str = typer.Option("auto", "--gpu", help="with --auto: the GPU to plan for (auto: what NVML sees)"),
    gpus: Optional[int] = typer.Option(None, "--gpus"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    method: str = typer.Option("auto", "--method", help="with --auto: auto, full, lora, qlora"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="with --auto: stop after this many optimizer steps"),
    out: str = typer.Option("plan-run", "--out", help="with --auto: directory for the plan's files and the run"),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help="processes to launch (DDP, or the recipe's FSDP)"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when the measured peak is outside --tolerance"),
    tolerance: float = typer.Option(10.0, "--tolerance", help="percent, for --strict"),
    force: bool = typer.Option(False, "--force", help="with --auto: replace plan files in --out"),
):
    """Train a recipe through accelerate launch, then print predicted against measured memory."""
    from . import launch
    from planner.recipe import RecipeError
    if (recipe is None) == (auto is None):
        fail("give a RECIPE.yaml or --auto MODEL --data PATH (one of them)")
    try:
        if auto is not None:
            if data is None:
                fail("--auto needs --data PATH (the training data)")
            recipe = _auto_recipe(auto, data, data_format, gpu, gpus, global_batch, seq_len, method, max_steps, out, force)
        code = launch.run(recipe, num_processes, strict, tolerance, echo=lambda m: typer.echo(m, err=True))
    except (RecipeError, PlanError) as e:
        fail(str(e))
    raise typer.Exit(code)


def _auto_recipe(model, data, data_format, gpu_arg, gpus, global_batch, seq_len, method, max_steps, out, force) -> str:
    """plan recommend's best plan for the GPU, written as emit-config writes it, into `out`;
    the recipe trains there. Returns the recipe's path."""
    from pathlib import Path

    import yaml

    from planner.data import DataError, check_records, read_records

    from .emit import render, write_files
    _check_data_format(data_format)
    try:  # the data first: a bad file is named before any planning is printed
        check_records(read_records(data)[0], data_format, data)
    except DataError as e:
        fail(str(e))
    res, spec = _spec(model)
    if spec is None:
        fail(f"{model}: plan train --auto needs the formulas, which model_type '{res.config.get('model_type')}' lacks")
    g = _gpu(gpu_arg)
    best = _best_plan(model, res, spec, gpu_arg, g, gpus, 1, seq_len, global_batch=global_batch, method=method,
                      margin=0.1, optimizer="adamw")
    base, gguf = _loadable(model, res)
    contents = render(base, best.settings, best.accumulation, best.estimate, out, spec.hidden, gpu=g.name,
                      bf16_gpu=g.bf16, why=best.notes, data=str(Path(data).resolve()), data_format=data_format,
                      gguf_file=gguf)
    rec = yaml.safe_load(contents["recipe.yaml"])
    rec["output_dir"] = str(Path(out).resolve())
    if max_steps is not None:
        rec["max_steps"] = max_steps
    contents["recipe.yaml"] = yaml.safe_dump(rec, sort_keys=False)
    for line in best.notes:
        typer.echo(f"plan: {line}", err=True)
    written = write_files(out, contents, force)
    return next(w for w in written if w.endswith("recipe.yaml"))


@app.command("gpus")
def gpus_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables")):
    """The GPU catalog, and the GPUs NVML sees on this machine."""
    from .gpus import catalog, detect
    found, note = detect()
    cat = catalog()
    if as_json:
        typer.echo(json.dumps({"catalog": [{**g.__dict__, "nvml_names": list(g.nvml_names)} for g in cat],
                               "local": found, "local_note": note}, indent=2))
        return
    from rich.console import Console
    from .report import render_gpus
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    render_gpus(console, cat, found, note)


@app.command("validate")
def validate_cmd(
    out_dir: str = typer.Option("tables", "--out-dir", help="where validation.csv and accuracy.csv go"),
    plot: Optional[str] = typer.Option(None, "--plot", help="also draw predicted against measured to this PNG"),
):
    """Estimate and measure every case of the validation matrix; write the tables."""
    from .measure.validate import run
    run(out_dir, plot, echo=typer.echo)


def _compat(model: str, compat: str, as_json: bool, gpus: int = 1, nodes: int = 1) -> None:
    if compat not in ("accelerate", "deepspeed"):
        fail(f"--compat {compat}: choose accelerate or deepspeed")
    if compat == "deepspeed":
        return _compat_deepspeed(model, as_json, gpus, nodes)
    res, _ = _spec(model)
    from .compat import accelerate_table
    rows = accelerate_table(res.config)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"Memory Usage for loading `{res.name}` (accelerate estimate-memory)", title_justify="left")
    for col in ("dtype", "Largest Layer", "Total Size", "Training using Adam"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["dtype"], r["largest_layer_str"], r["total_size_str"], r["training_str"])
    Console().print(t)


def _compat_deepspeed(model: str, as_json: bool, gpus: int, nodes: int) -> None:
    """DeepSpeed's ZeRO-2/ZeRO-3 model-state estimator tables (its `_all_cold` functions)."""
    try:
        check_options(Settings(gpus=gpus, nodes=nodes))
    except PlanError as e:
        fail(str(e))
    res, spec = _spec(model)
    if spec is None:
        fail(f"{model}: --compat deepspeed needs the parameter formula, which model_type "
             f"'{res.config.get('model_type')}' does not have yet")
    from .compat import deepspeed_table, ds_largest_module_params
    from .spec import count_params
    pc = count_params(spec)
    rows = deepspeed_table(spec, pc, gpus, nodes)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    from .report import gib
    largest = ds_largest_module_params(spec, pc)
    for stage in ("zero2", "zero3"):
        t = Table(title=f"DeepSpeed {stage.upper()} model states (estimate_{stage}_model_states_mem_needs_all_cold): "
                        f"{nodes} node(s) x {gpus} GPU(s), {pc.total / 1e6:,.0f}M params"
                        + (f", {largest / 1e6:,.0f}M largest layer" if stage == "zero3" else ""), title_justify="left")
        for col in ("per CPU", "per GPU", "options"):
            t.add_column(col, justify="right" if col != "options" else "left")
        for r in rows:
            if r["stage"] == stage:
                opts = f"offload_optimizer={'cpu' if r['offload_optimizer'] else 'none'}"
                if stage == "zero3":
                    opts = (f"offload_param={'cpu' if r['offload_param'] else 'none'}, {opts}, "
                            f"zero_init={int(r['zero_init'])}")
                t.add_row(gib(r["cpu_bytes"]), gib(r["gpu_bytes"]), opts)
        Console().print(t)
    Console().print("model states only (no activations, no buffers), as DeepSpeed's estimator counts them; "
                    "DeepSpeed prints GiB labelled GB", style="dim")


def main() -> None:
    """The `plan` entry point. Click's usage errors (an unknown option, a value of the wrong
    type or outside a choice) are answered like every other bad input: one line, status 2."""
    try:
        from typer._click import exceptions as cx  # typer 0.2x carries its own click
    except ImportError:
        from click import exceptions as cx
    try:
        rc = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as e:
        e.show()
        sys.exit(e.exit_code)
    except cx.UsageError as e:
        where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
        typer.echo(f"error: {where}{' '.join(e.format_message().split())}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
