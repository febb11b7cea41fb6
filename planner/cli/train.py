"""`plan train`: train a recipe through accelerate launch and print predicted against measured
memory; `--auto MODEL` plans the recipe first (recommend's best plan, written as emit-config
writes it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..contract import DERIVED_NOTE, DataFormat, PlanError
from ..data import DataError, check_records, data_shape, padded, read_records
from .common import default_seq, fail, loadable, plan_spec, request
from .emit_config import ChosenPlan, plan_files, recommended
from .options import Data, DataFormatOpt, GlobalBatch, Gpu, Gpus, MethodOpt, Out, SeqLen, plain

RecipeArg = Annotated[Optional[str], typer.Argument(help="recipe.yaml (plan emit-config writes one)")]
Auto = Annotated[Optional[str], typer.Option(
    "--auto", help="MODEL: plan it with plan recommend, write the plan into --out, train it")]
MaxSteps = Annotated[Optional[int], typer.Option(
    "--max-steps", help="with --auto: stop after this many optimizer steps")]
NumProcesses = Annotated[Optional[int], typer.Option(
    "--num-processes", help="processes to launch (DDP, or the recipe's FSDP)")]
Strict = Annotated[bool, typer.Option(
    "--strict", metavar="", help="exit 1 when the measured peak is outside --tolerance")]
Tolerance = Annotated[float, typer.Option("--tolerance", help="percent, for --strict")]
Force = Annotated[bool, typer.Option(
    "--force", metavar="", help="replace the plan files --auto writes, and train a finished run again from the start "
    "(the old run moves to OUTPUT_DIR/previous-*/)")]


def train_cmd(ctx: typer.Context, recipe: RecipeArg = None, auto: Auto = None, data: Data = None,
              data_format: DataFormatOpt = DataFormat.ALPACA, gpu: Gpu = "auto", gpus: Gpus = None,
              global_batch: GlobalBatch = None, seq_len: SeqLen = None, method: MethodOpt = None,
              max_steps: MaxSteps = None, out: Out = "plan-run", num_processes: NumProcesses = None,
              strict: Strict = False, tolerance: Tolerance = 10.0, force: Force = False) -> None:
    """Train a recipe through accelerate launch, then print predicted against measured memory.

    With --auto MODEL --data PATH, plan the recipe first: the options other than --num-processes,
    --strict and --tolerance serve --auto."""
    from ..launch import run
    from ..recipe import RecipeError
    if (recipe is None) == (auto is None):
        fail("give a RECIPE.yaml or --auto MODEL --data PATH (one of them)")
    if auto is not None and data is None:
        fail("--auto needs --data PATH (the training data)")
    try:
        path = recipe if auto is None else auto_recipe(ctx.params)
        if path is None:  # planned for a GPU this machine does not have: the plan is written, not trained
            raise typer.Exit(0)
        code = run(path, num_processes, strict, tolerance, echo=lambda m: typer.echo(m, err=True), force=force)
    except (RecipeError, PlanError) as e:
        fail(str(e))
    raise typer.Exit(code)


def train_device(gpu: str):
    """What `--auto` plans for, whether it trains here, and the line that says so.

    `--gpu auto` (the default): the GPUs NVML sees, or, with none, this machine's CPU and RAM
    (`planner.gpus.host_machine`). A GPU name plans for that GPU; the run trains only where NVML
    sees one of that name (a plan for a GPU this machine lacks is written, not trained on the CPU)."""
    from ..gpus import GPUError, detect, from_nvml, host_machine, lookup
    found, note = detect()
    if gpu == "auto":
        if not found:
            g = host_machine()
            return g, True, f"no NVIDIA GPU here ({note}): planning for {g.name}, and training on it"
        first = found[0]["name"]
        same = [d for d in found if d["name"] == first]
        g = from_nvml(first, min(d["memory_bytes"] for d in same), len(same))
        return g, True, f"planning for {g.count} x {first} as NVML sees it ({g.memory_bytes / 2**30:,.1f} GiB each)"
    try:
        g = lookup(gpu)
    except GPUError as e:
        fail(str(e))
    here = any(_same_gpu(d["name"], g) for d in found)
    return g, here, f"planning for {g.name}" + ("" if here else ": not on this machine, so the plan is written "
                                                "for planning only, not trained")


def _same_gpu(nvml_name: str, g) -> bool:
    from ..gpus import GPUError, lookup
    try:
        return lookup(nvml_name).name == g.name
    except GPUError:
        return False


def auto_recipe(options: Mapping[str, Any]) -> str | None:
    """plan recommend's best plan for the device `train_device` chooses, written as emit-config
    writes it into --out, where the recipe trains. Returns the recipe's path, or None when the
    plan is for a GPU this machine does not have (written, not to be trained here)."""
    from ..emit import write_files
    model, data, fmt, out = options["auto"], options["data"], plain(options["data_format"]), options["out"]
    try:  # the data first: a bad file is named before any planning is printed
        check_records(read_records(data)[0], fmt, data)
    except DataError as e:
        fail(str(e))
    res, spec = plan_spec(model)
    g, trains, line = train_device(options["gpu"])
    typer.echo(f"plan: {line}", err=True)
    ex = tokenised(model, res, data, fmt, default_seq(res, spec, options["seq_len"]))
    if ex is not None:  # planned for the rows the data has: its longest example, padded
        options = {**options, "seq_len": padded(max(len(i) for i in ex.input_ids))}
    options = {**options, "attention_mask": True}  # plan train's rows are padded or packed: they carry a mask
    plan = cpu_plan(model, options, res, spec, g) if g.cpu else recommended(model, options, res, spec)
    shape = data_shape(ex, plan.settings.batch_size) if ex is not None else None
    if shape is not None:
        plan.why.insert(0, f"data: {shape.line()}")
    contents = plan_files(model, res, spec, plan, out, data=str(Path(data).resolve()), data_format=fmt)
    contents["recipe.yaml"] = _runs_in(contents["recipe.yaml"], out, options["max_steps"], shape)
    for why in plan.why:
        typer.echo(f"plan: {why}", err=True)
    if plan.estimate.route == "derived":
        typer.echo(f"plan: {DERIVED_NOTE}", err=True)
    written = write_files(out, contents, options["force"])
    recipe = next(w for w in written if w.endswith("recipe.yaml"))
    if not trains:
        typer.echo(f"plan: written to {out}; on a machine with {g.name}: plan train {recipe}", err=True)
        return None
    return recipe


def cpu_plan(model: str, options: Mapping[str, Any], res, spec, g) -> ChosenPlan:
    """recommend's best plan for this machine's CPU and RAM (exit 2 when nothing fits)."""
    from ..recommend import recommend
    plans = recommend(spec, request(options, res, spec, g))
    if not plans:
        fail(f"nothing fits {g.name}: try --method lora or a shorter --seq-len, or plan for a GPU with --gpu NAME")
    best = plans[0]
    return ChosenPlan(best.settings, best.accumulation, best.estimate, list(best.notes), None)


def tokenised(model: str, res, data: str, fmt: str, cap: int):
    """The training data tokenised as the run will tokenise it (truncated at `cap` tokens), with
    the model's own tokenizer; None where this machine has no tokenizer for the model (a config
    from the catalog), which is then planned at --seq-len, as the note says."""
    from ..data import tokenize
    if res.source == "catalog":
        typer.echo(f"plan: no tokenizer for {model} here: planned for rows of {cap:,} tokens, not for the data's",
                   err=True)
        return None
    from transformers import AutoTokenizer
    base, gguf = loadable(model, res)
    try:
        tok = AutoTokenizer.from_pretrained(base, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as e:
        fail(f"{model}: cannot load its tokenizer ({str(e).strip().splitlines()[0]})")
    try:
        return tokenize(read_records(data)[0], tok, fmt, cap, data)
    except DataError as e:
        fail(str(e))


def _runs_in(recipe_yaml: str, out: str, max_steps: Optional[int], shape=None) -> str:
    """The recipe with its output directory `out`, stopping after `max_steps` where given, and
    the data's shape: rows of its longest example (padded), packed where packing pays."""
    import yaml
    rec = yaml.safe_load(recipe_yaml)
    rec["output_dir"] = str(Path(out).resolve())
    if shape is not None:
        rec["sequence_len"], rec["sample_packing"] = shape.seq_len, shape.packing
    if max_steps is not None:
        rec["max_steps"] = max_steps
    return yaml.safe_dump(rec, sort_keys=False)
