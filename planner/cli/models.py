"""`plan models`: the built-in model catalog (tables/models.json), filtered by a query."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..report import render_models
from ..resolve import catalog, catalog_entries, suggestions
from .common import console, fail
from .options import Json


def models_cmd(query: Annotated[str, typer.Argument(
        help="keep the entries whose id, aliases or model_type contain each word (any case)",
        show_default=False)] = "",
        as_json: Json = False) -> None:
    """The built-in model catalog: id, model_type, parameters and source of each config."""
    if len(query) > 200 or not query.isprintable():
        fail("QUERY must be at most 200 printable characters")
    rows = catalog_entries(query)
    if not rows:
        fail(f"no catalog entry matches '{query}'; closest: {', '.join(suggestions(query)) or 'none'}")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    render_models(console(140), rows, len(catalog()), query.strip())
