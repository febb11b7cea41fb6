"""`plan validate`: estimate and measure every case of the validation matrix."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

OutDir = Annotated[str, typer.Option("--out-dir", help="where validation.csv and accuracy.csv go")]
Plot = Annotated[Optional[str], typer.Option("--plot", help="also draw predicted against measured to this PNG")]


def validate_cmd(out_dir: OutDir = "tables", plot: Plot = None) -> None:
    """Estimate and measure every case of the validation matrix; write the tables."""
    from ..measure.validate import run
    run(out_dir, plot, echo=typer.echo)
