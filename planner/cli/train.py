"""`plan train`: train a recipe through accelerate launch and print predicted against measured
memory; `--auto MODEL` plans the recipe first (recommend's best plan, written as emit-config
writes it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..contract import DataFormat, PlanError
from ..data import DataError, check_records, read_records
from .common import fail, plan_spec
from .emit_config import plan_files, recommended
from .options import Data, DataFormatOpt, Force, GlobalBatch, Gpu, Gpus, MethodOpt, Out, SeqLen, plain

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
        code = run(path, num_processes, strict, tolerance, echo=lambda m: typer.echo(m, err=True))
    except (RecipeError, PlanError) as e:
        fail(str(e))
    raise typer.Exit(code)


def auto_recipe(options: Mapping[str, Any]) -> str:
    """plan recommend's best plan for --gpu, written as emit-config writes it into --out, where
    the recipe trains. Returns the recipe's path."""
    from ..emit import write_files
    model, data, fmt, out = options["auto"], options["data"], plain(options["data_format"]), options["out"]
    try:  # the data first: a bad file is named before any planning is printed
        check_records(read_records(data)[0], fmt, data)
    except DataError as e:
        fail(str(e))
    res, spec = plan_spec(model)
    plan = recommended(model, options, res, spec)
    contents = plan_files(model, res, spec, plan, out, data=str(Path(data).resolve()), data_format=fmt)
    contents["recipe.yaml"] = _runs_in(contents["recipe.yaml"], out, options["max_steps"])
    for line in plan.why:
        typer.echo(f"plan: {line}", err=True)
    written = write_files(out, contents, options["force"])
    return next(w for w in written if w.endswith("recipe.yaml"))


def _runs_in(recipe_yaml: str, out: str, max_steps: Optional[int]) -> str:
    """The recipe with its output directory `out`, stopping after `max_steps` where given."""
    import yaml
    rec = yaml.safe_load(recipe_yaml)
    rec["output_dir"] = str(Path(out).resolve())
    if max_steps is not None:
        rec["max_steps"] = max_steps
    return yaml.safe_dump(rec, sort_keys=False)
