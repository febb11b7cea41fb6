"""`plan gpus`: the GPU catalog, and the GPUs NVML sees on this machine."""

from __future__ import annotations

import json

import typer

from ..gpus import catalog, detect
from ..report import render_gpus
from .common import console
from .options import Json


def gpus_cmd(as_json: Json = False) -> None:
    """The GPU catalog, and the GPUs NVML sees on this machine."""
    found, note = detect()
    cat = catalog()
    if as_json:
        typer.echo(json.dumps({"catalog": [{**g.__dict__, "nvml_names": list(g.nvml_names)} for g in cat],
                               "local": found, "local_note": note}, indent=2))
        return
    render_gpus(console(140), cat, found, note)
