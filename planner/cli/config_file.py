"""A training config file in place of MODEL (`plan estimate CONFIG.yml`): an Axolotl config or a
plan recipe, read into the settings of its run (planner/axolotl.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import typer

from ..contract import PlanError, Settings
from .common import fail
from .options import flag, given

CONFIG_SUFFIXES = (".yml", ".yaml")
APPLY = ("gpus", "nodes")
"""The estimate options a config does not set: the world its launcher starts."""
SET_BY_CONFIG = ("dtype", "precision", "batch_size", "seq_len", "optimizer", "lora_rank", "lora_alpha", "lora_dropout",
                 "lora_targets", "quant", "grad_checkpointing", "attn", "strategy", "offload", "fsdp_version", "loss",
                 "loss_chunks", "unfrozen_parameters", "ema", "compat")


@dataclass
class ConfigRun:
    model: str
    settings: Settings


def is_config(model: str) -> bool:
    return Path(model).suffix.lower() in CONFIG_SUFFIXES


def read_config(options: Mapping[str, Any]) -> ConfigRun:
    """The run a config describes on --gpus x --nodes (default one GPU); what it leaves out is
    said on stderr, one line each; an unsupported key or an estimate option the config already
    sets is one error line."""
    from ..axolotl import is_axolotl, translate
    from ..recipe import RecipeError, from_dict, read, settings
    path = options["model"]
    clash = given(options, SET_BY_CONFIG)
    if clash:
        fail(f"{', '.join(map(flag, clash))}: {path} sets the run; edit the config (only --gpus and --nodes apply)")
    try:
        data = read(path)
        if isinstance(data, dict) and is_axolotl(data):
            t = translate(data, path, bf16_device=True, training=False, base_dir=Path(path).parent)
            for note in t.notes():
                typer.echo(f"note: {note}", err=True)
            recipe, fsdp_version = t.recipe, t.fsdp_version
        else:
            recipe, fsdp_version = from_dict(data, path), 2
        st = settings(recipe)
    except RecipeError as e:
        fail(str(e))
    except PlanError as e:
        fail(f"{path}: {e}")
    gpus, nodes = options.get("gpus") or recipe.plan.gpus, options.get("nodes") or recipe.plan.nodes
    st = replace(st, gpus=gpus, nodes=nodes, fsdp_version=fsdp_version)
    if st.strategy != "ddp" and gpus * nodes == 1:
        typer.echo(f"note: {path} shards with {st.strategy}: per GPU of one; --gpus N for its world", err=True)
    return ConfigRun(recipe.base_model, st)
