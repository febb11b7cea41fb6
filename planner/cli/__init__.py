"""`plan`: the command line, one module per command. Bad input exits 2 with one line on stderr,
never a traceback: the commands' own checks (`common.fail`) and click's usage errors alike."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from . import emit_config, estimate, gpus, models, recommend, train, validate

try:
    from typer._click import exceptions as cx  # typer 0.2x carries its own click
except ImportError:
    from click import exceptions as cx


def usage_line(e: cx.UsageError) -> str:
    """Click's usage error as one line. A value outside an option's choices reads as the
    planner's own unknown choices do: `unknown --method 'dpo'; choose one of auto, full, ...`."""
    choices = getattr(getattr(e, "param", None), "type_descriptor", None)  # typer's resolved Enum choices
    cause = e.__cause__  # typer validates a choice with pydantic: the bad value is the error's input
    if choices is not None and choices.is_choice and hasattr(cause, "errors") and e.param.opts:
        value = cause.errors()[0].get("input")  # as repr quotes it: a control character stays on this line
        return f"unknown {e.param.opts[0]} {value!r}; choose one of {', '.join(map(str, choices.choices))}"
    where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
    return where + " ".join(e.format_message().split())


class OneLineErrors(TyperGroup):
    """The app's group: click's usage errors (an unknown option, a value of the wrong type or
    outside a choice) are answered like every other bad input, with one line and status 2."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            rc = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except cx.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except cx.UsageError as e:
            typer.echo(f"error: {usage_line(e)}", err=True)
            sys.exit(2)
        except (KeyboardInterrupt, typer.Abort):
            sys.exit(130)
        sys.exit(rc if isinstance(rc, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Training-memory planner: will it fit, and on what?")


def version() -> str:
    """The installed distribution's version, else pyproject.toml's (a checkout run in place)."""
    from importlib import metadata
    try:
        return metadata.version("plan-memory")
    except metadata.PackageNotFoundError:
        import re
        from pathlib import Path
        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
        found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        return found.group(1) if found else "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"plan {version()}")
        raise typer.Exit(0)


@app.callback()
def root(show_version: Annotated[bool, typer.Option(
        "--version", metavar="", is_eager=True, callback=_print_version, help="print the version and exit")] = False,
         ) -> None:
    """Training-memory planner: will it fit, and on what?"""
app.command("estimate")(estimate.estimate_cmd)
app.command("simulate")(estimate.simulate_cmd)
app.command("recommend")(recommend.recommend_cmd)
app.command("emit-config")(emit_config.emit_config_cmd)
app.command("train")(train.train_cmd)
app.command("gpus")(gpus.gpus_cmd)
app.command("models")(models.models_cmd)
app.command("validate")(validate.validate_cmd)


def main() -> None:
    """The `plan` entry point."""
    app()
