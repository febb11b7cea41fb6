"""`plan estimate` and `plan simulate`: training memory per GPU, from the formulas or measured by
the simulator; `--strategy all` compares the strategies side by side, `--compat` prints
accelerate's or DeepSpeed's own tables."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Any, Optional

import typer

from ..compat import accelerate_table, deepspeed_table, ds_largest_module_params
from ..contract import (
    FP8_LIBRARIES,
    QUANT_PRECISIONS,
    SWEEP_PRECISIONS,
    Choice,
    PlanError,
    Precision,
    Settings,
    check_options,
)
from ..distributed import strategy_choices
from ..estimate import estimate, validate
from ..recommend import catalog_fits
from ..report import gib, render, render_strategies, show, to_json
from ..resolve import Resolved
from ..spec import ModelSpec, count_params
from .common import buildable, console, default_seq, derived_spec, fail, model_spec, no_formula, source_note
from .config_file import is_config, read_config
from .options import (
    ActivationOffloadOpt,
    AttnOpt,
    BatchSize,
    DtypeOpt,
    EmaOpt,
    FsdpVersion,
    Gpus,
    GradCheckpointing,
    Json,
    LbfgsHistory,
    LoraAlpha,
    LoraDropout,
    LoraRank,
    LoraTargets,
    LossChunks,
    LossOpt,
    Model,
    Nodes,
    OffloadOpt,
    OptimizerOpt,
    PrecisionOpt,
    QuantOpt,
    SeqLen,
    SimMemory,
    SimSeconds,
    StrategyOrAll,
    StrategyOrAllOpt,
    UnfrozenParameters,
    check_dtype,
    dtype_precision,
    given,
    plain,
    to_settings,
)


class CompatTable(Choice):
    ACCELERATE = "accelerate"
    DEEPSPEED = "deepspeed"


Compat = Annotated[Optional[CompatTable], typer.Option(
    "--compat", help="print accelerate's estimate-memory table, or DeepSpeed's ZeRO estimator tables")]
Exact = Annotated[bool, typer.Option("--exact", metavar="", help="measure with the simulator instead of the formulas")]


def estimate_cmd(ctx: typer.Context, model: Model, dtype: DtypeOpt = None, precision: PrecisionOpt = None,
                 batch_size: BatchSize = None, seq_len: SeqLen = None, optimizer: OptimizerOpt = None,
                 lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None, lora_dropout: LoraDropout = None,
                 lora_targets: LoraTargets = None, quant: QuantOpt = None, grad_checkpointing: GradCheckpointing = None,
                 attn: AttnOpt = None, gpus: Gpus = None, nodes: Nodes = None, strategy: StrategyOrAllOpt = None,
                 offload: OffloadOpt = None, fsdp_version: FsdpVersion = None, loss: LossOpt = None,
                 loss_chunks: LossChunks = None, unfrozen_parameters: UnfrozenParameters = None,
                 ema: EmaOpt = None, lbfgs_history: LbfgsHistory = None,
                 activation_offload: ActivationOffloadOpt = None, compat: Compat = None,
                 exact: Exact = False, sim_seconds: SimSeconds = 120.0, sim_memory: SimMemory = 8.0,
                 as_json: Json = False) -> None:
    """Training memory per GPU, per dtype, per component and per phase."""
    check_dtype(ctx.params)
    if compat == CompatTable.DEEPSPEED:
        return compat_deepspeed(ctx.params)
    if compat == CompatTable.ACCELERATE:
        return compat_accelerate(model, as_json)
    run(ctx.params, exact)


def simulate_cmd(ctx: typer.Context, model: Model, dtype: DtypeOpt = None, precision: PrecisionOpt = None,
                 batch_size: BatchSize = None, seq_len: SeqLen = None, optimizer: OptimizerOpt = None,
                 lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None, lora_dropout: LoraDropout = None,
                 lora_targets: LoraTargets = None, quant: QuantOpt = None, grad_checkpointing: GradCheckpointing = None,
                 attn: AttnOpt = None, gpus: Gpus = None, nodes: Nodes = None, strategy: StrategyOrAllOpt = None,
                 offload: OffloadOpt = None, fsdp_version: FsdpVersion = None, loss: LossOpt = None,
                 loss_chunks: LossChunks = None, unfrozen_parameters: UnfrozenParameters = None,
                 ema: EmaOpt = None, lbfgs_history: LbfgsHistory = None,
                 activation_offload: ActivationOffloadOpt = None, sim_seconds: SimSeconds = 120.0,
                 sim_memory: SimMemory = 8.0, as_json: Json = False) -> None:
    """Run the real training step under fake tensors and report the measured peak.

    bf16-amp unless --dtype/--precision say otherwise; every estimate option applies."""
    check_dtype(ctx.params)
    one = {"precision": Precision.BF16_AMP} if dtype is None and precision is None else {}
    run({**ctx.params, **one}, exact=True)


def run(options: Mapping[str, Any], exact: bool) -> None:
    """Estimate (or, `exact`, measure) each precision the options ask for, and print them; a
    config file (Axolotl's or a recipe) in place of MODEL: the one run it describes."""
    config = read_config(options) if is_config(options["model"]) else None
    if config is not None:
        options = {**options, "model": config.model, "strategy": config.settings.strategy}
    res, spec = model_spec(options["model"])
    formula = spec is not None
    if not formula:
        spec = derived_spec(res)
        if not exact and not options["as_json"]:
            typer.echo(f"note: no formula for model_type '{res.config.get('model_type', '?')}': derived from the "
                       "transformers module on fake tensors (measured once per settings class, then cached)", err=True)
    if options["strategy"] == StrategyOrAll.ALL:
        return compare_strategies(res, spec, options)
    sweep, skipped = ([config.settings], []) if config else _settings(res, spec, options, exact)
    runs = _estimates(spec, sweep, measure_only=exact and not formula)
    if _skipped(options):
        quant = plain(options["quant"])
        typer.echo(f"note: --quant {quant}: skipping {', '.join(_skipped(options))}, "
                   f"which a bitsandbytes {quant} base cannot compute in", err=True)
    method = None
    if exact:
        runs, method = _measured(res, runs, options), "simulated"
    for why in skipped:  # once everything ran: a command that fails says one line only
        typer.echo(f"note: {why}", err=True)
    source_note(res)
    one = options["precision"] is not None or options["dtype"] is not None or config is not None
    _print(res, runs, method, one, options["as_json"])


def _settings(res: Resolved, spec: Optional[ModelSpec], options: Mapping[str, Any],
              exact: bool = False) -> tuple[list[Settings], list[str]]:
    """--precision's or --dtype's settings, else one for each dtype; and why a sweep left a
    precision out."""
    seq = default_seq(res, spec, options["seq_len"])
    if options["precision"] is not None or options["dtype"] is not None:
        return [to_settings(options, seq_len=seq)], []
    sweep = [to_settings(options, seq_len=seq, precision=p) for p in SWEEP_PRECISIONS if p not in _skipped(options)]
    kept, skipped = [], []
    for st in sweep:
        why = _fp8_skipped(spec, st, exact)
        if why is None:
            kept.append(st)
        else:
            skipped.append(f"skipping {st.precision}: {why}")
    return kept, skipped


def _fp8_skipped(spec: Optional[ModelSpec], st: Settings, exact: bool = False) -> str | None:
    """Why a sweep's FP8 row is left out, or None: the other options are outside what FP8 is
    modelled for (LoRA, freezing, sharding, offloading, an encoder), or the simulator
    (`exact`, or a model without a formula) would need a library this machine lacks."""
    if st.precision not in FP8_LIBRARIES:
        return None
    if spec is not None:
        try:
            validate(spec, replace(st, precision="bf16-amp"))
        except PlanError:
            return None  # bad options for every precision: the sweep reports them once
        try:
            validate(spec, st)
        except PlanError as e:
            return str(e)
    if exact or spec is None:
        from ..measure.builder import Fp8LibraryMissing, check_fp8_library
        try:
            check_fp8_library(st.precision)
        except Fp8LibraryMissing as e:
            return f"the simulator cannot run it here ({e})"
    return None


def _skipped(options: Mapping[str, Any]) -> list[str]:
    """The precisions a sweep (no --dtype, no --precision) leaves out: those a bitsandbytes base
    (--quant) cannot compute in."""
    if plain(options.get("quant")) in (None, "none") or given(options, ("precision", "dtype")):
        return []
    return [p for p in SWEEP_PRECISIONS if p not in QUANT_PRECISIONS]


def _estimates(spec: ModelSpec, settings: list[Settings], measure_only: bool = False) -> list[tuple]:
    """(settings, estimate) each; `measure_only` (the simulator's route for a model without a
    formula): no estimate, only the options checked against the model before simulating."""
    try:
        return [(validate(spec, st), None) if measure_only else (st, estimate(spec, st)) for st in settings]
    except PlanError as e:
        fail(str(e))


def _measured(res: Resolved, runs: list[tuple], options: Mapping[str, Any]) -> list[tuple]:
    """The simulator's measurement for each run, with the formula's parameter breakdown where
    there is one. The budget is checked for every run before anything is built or imported."""
    from ..measure.simulate import Budget, check_budget
    budget = Budget(seconds=options["sim_seconds"], memory_bytes=int(options["sim_memory"] * 2**30))
    for st, _ in runs:
        try:
            check_budget(res.config, st, budget)
        except PlanError as e:
            fail(str(e))
    if runs[0][1] is None:
        buildable(res)
        if not options["as_json"]:
            typer.echo(f"note: no formula for model_type '{res.config.get('model_type', '?')}': measuring a real "
                       "training step on fake tensors", err=True)
    sims = []
    for st, est in runs:
        sim = _simulated(res, st, budget)
        sim.param_counts = est.param_counts if est else None
        sim.route = "simulated"
        sims.append((st, sim))
    return sims


def _simulated(res: Resolved, st: Settings, budget):
    from ..measure.simulate import simulated_estimate
    try:
        return simulated_estimate(res.config, st, budget)
    except PlanError as e:
        fail(str(e))
    except Exception as e:  # the simulator cannot run this model or recipe on CPU
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"simulation of {res.name} ({st.precision}, {st.optimizer}) failed: {msg}", 1)


def _print(res: Resolved, runs: list[tuple], method: Optional[str], one: bool, as_json: bool) -> None:
    """JSON (one object for one precision asked for, else a list) or the tables: a row per
    precision with the catalog GPUs each fits on, and the phase breakdown of the one `--dtype
    bf16` means (bf16-amp; bf16-pure for LoRA on an unquantised base)."""
    arch = res.config.get("model_type", "?")
    if as_json:
        objs = [to_json(res.name, arch, st, est, method) for st, est in runs]
        typer.echo(json.dumps(objs[0] if one else objs, indent=2))
        return
    st0 = runs[0][0]
    bf16 = dtype_precision("bf16", lora=st0.lora, quant=st0.quant)
    chosen = next((i for i, (st, _) in enumerate(runs) if st.precision == bf16), 0)
    fits = [catalog_fits(est, st) for st, est in runs]
    render(console(120), res.name, arch, runs, chosen, fits=fits, bf16=bf16 if len(runs) > 1 else None)


# ---------------------------------------------------------------- --strategy all

def compare_strategies(res: Resolved, spec: Optional[ModelSpec], options: Mapping[str, Any]) -> None:
    """`--strategy all`: one precision (bf16 mixed precision unless given), every strategy and
    offload the engines offer, side by side."""
    base = to_settings(options, seq_len=default_seq(res, spec, options["seq_len"]), strategy="ddp", offload="none")
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
    if options["as_json"]:
        objs = [to_json(res.name, arch, st, est) for st, est in rows]
        typer.echo(json.dumps(objs, indent=2))
        return
    render_strategies(console(110), res.name, arch, rows, skipped)


# ---------------------------------------------------------------- --compat

def compat_accelerate(model: str, as_json: bool) -> None:
    """accelerate's `estimate-memory` table, the same numbers."""
    res, spec = model_spec(model)
    if spec is None:
        buildable(res)
    rows = accelerate_table(res.config)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    show(console(), f"Memory Usage for loading `{res.name}` (accelerate estimate-memory)",
         [(col, "left") for col in ("dtype", "Largest Layer", "Total Size", "Training using Adam")],
         [[r["dtype"], r["largest_layer_str"], r["total_size_str"], r["training_str"]] for r in rows])


def compat_deepspeed(options: Mapping[str, Any]) -> None:
    """DeepSpeed's ZeRO-2/ZeRO-3 model-state estimator tables (its `_all_cold` functions)."""
    try:
        st = check_options(to_settings({name: options[name] for name in ("gpus", "nodes")}))
    except PlanError as e:
        fail(str(e))
    res, spec = model_spec(options["model"])
    if spec is None:
        fail(no_formula(options["model"], res, "--compat deepspeed needs the parameter formula"))
    pc = count_params(spec)
    rows = deepspeed_table(spec, pc, st.gpus, st.nodes)
    if options["as_json"]:
        typer.echo(json.dumps(rows, indent=2))
        return
    out = console()
    largest = ds_largest_module_params(spec, pc)
    for stage in ("zero2", "zero3"):
        title = (f"DeepSpeed {stage.upper()} model states (estimate_{stage}_model_states_mem_needs_all_cold): "
                 f"{st.nodes} node(s) x {st.gpus} GPU(s), {pc.total / 1e6:,.0f}M params"
                 + (f", {largest / 1e6:,.0f}M largest layer" if stage == "zero3" else ""))
        _deepspeed_table(out, title, [r for r in rows if r["stage"] == stage])
    out.print("model states only (no activations, no buffers), as DeepSpeed's estimator counts them; "
              "DeepSpeed prints GiB labelled GB", style="dim")


def _deepspeed_table(out, title: str, rows: list[dict]) -> None:
    table = []
    for r in rows:
        opts = f"offload_optimizer={'cpu' if r['offload_optimizer'] else 'none'}"
        if r["stage"] == "zero3":
            opts = f"offload_param={'cpu' if r['offload_param'] else 'none'}, {opts}, zero_init={int(r['zero_init'])}"
        table.append([gib(r["cpu_bytes"]), gib(r["gpu_bytes"]), opts])
    show(out, title, [("per CPU", "right"), ("per GPU", "right"), ("options", "left", True)], table, key=0)
