"""What the commands share besides their options: the one-line error exit, the model and GPU
arguments resolved (or refused in one line), the plan search's request, and output helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn, Optional

import typer

from ..gpus import GPU, GPUError, local_host_ram, resolve_gpu
from ..recommend import Request
from ..resolve import Resolved, ResolveError, resolve
from ..spec import ModelSpec, SpecError, UnsupportedArchitecture
from .options import to_request


def fail(msg: str, code: int = 2) -> NoReturn:
    """Bad input: one line on stderr, exit status 2 (or `code`)."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def model_spec(model: str) -> tuple[Resolved, Optional[ModelSpec]]:
    """(resolved, spec); spec is None for a well-formed config of an architecture without a
    formula, which the simulator then measures."""
    try:
        res = resolve(model)
    except ResolveError as e:
        fail(str(e))
    try:
        return res, ModelSpec.from_config(res.config)
    except UnsupportedArchitecture:
        return res, None
    except SpecError as e:
        fail(f"{model}: malformed config: {e}")


def buildable(res: Resolved) -> None:
    """A model type without a formula must be one transformers can build (the simulator's route)."""
    from transformers import CONFIG_MAPPING
    mt = res.config.get("model_type")
    if mt not in CONFIG_MAPPING:
        fail(f"{res.name}: unknown model_type '{mt}': neither plan's formulas nor transformers know it")


def derived_spec(res: Resolved) -> ModelSpec:
    """The spec of a model_type without a formula: its widths for the option checks and the step
    time, and the derived route for the memory (planner/measure/derived.py), which checks that
    transformers can build it (skipped once the cache holds its coefficients: an estimate then
    needs neither torch nor transformers)."""
    from ..contract import PlanError
    from ..measure.derived import proxy_spec
    try:
        spec = proxy_spec(res.config)
    except PlanError as e:
        buildable(res)  # a model_type transformers does not know says so first
        fail(f"{res.name}: {e}")
    if not spec.extra["derived"].derived_before():
        buildable(res)
    return spec


def plan_spec(model: str) -> tuple[Resolved, ModelSpec]:
    """`model_spec` for a command that plans (recommend, emit-config, train --auto): the formulas'
    spec, or the derived route's for a model_type without them."""
    res, spec = model_spec(model)
    return res, spec if spec is not None else derived_spec(res)


def no_formula(name: str, res: Resolved, what_needs: str) -> str:
    return f"{name}: {what_needs}, which model_type '{res.config.get('model_type')}' does not have yet"


def source_note(res: Resolved) -> None:
    """Say where the config came from when it is not the user's own file: the built-in catalog
    stands in when the model is not local, not cached and the Hub offline or unreachable
    (stderr, so that --json output stays one object)."""
    if res.source == "catalog":
        typer.echo(f"note: {res.name}: config from plan's built-in catalog (tables/models.json); not local, not in "
                   "the Hugging Face cache, and the Hub offline or unreachable", err=True)


def default_seq(res: Resolved, spec: Optional[ModelSpec], seq_len: Optional[int]) -> int:
    """--seq-len, else 2048 capped at the model's maximum."""
    if seq_len is not None:
        return seq_len
    if spec is not None:
        return min(2048, spec.max_positions)
    cfg = res.config
    limit = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    return min(2048, int(limit))


def find_gpu(name: str) -> GPU:
    try:
        return resolve_gpu(name)
    except GPUError as e:
        fail(str(e))


DEFAULT_PER_GPU_BATCH = 8
"""Without --global-batch, the global batch is 8 sequences per GPU: HF Trainer's default
(`TrainingArguments.per_device_train_batch_size = 8`, no accumulation), what a run gets when it
says nothing, and the 8 per GPU of Axolotl's example configs (micro-batch 2 x accumulation 4).
It divides among the GPUs by construction."""


def request(options: Mapping[str, Any], res: Resolved, spec: ModelSpec, g: GPU) -> Request:
    """The search request recommend, emit-config and train --auto share: the GPU count `--gpu`
    found unless --gpus says otherwise, the default sequence length, the global batch
    (--global-batch, else DEFAULT_PER_GPU_BATCH per GPU), and host RAM per node (GiB) from
    --host-ram, else this machine's: offload plans that need more than a node has are not plans."""
    gpus, host_ram = options.get("gpus"), options.get("host_ram")
    gpus = gpus if gpus is not None else g.count
    world = gpus * (options.get("nodes") or 1)
    batch = options.get("global_batch")
    host = int(host_ram * 2**30) if host_ram is not None else local_host_ram()
    return to_request(options, gpu=g, gpus=gpus, seq_len=default_seq(res, spec, options.get("seq_len")),
                      host_ram_bytes=host, global_batch=batch if batch is not None else DEFAULT_PER_GPU_BATCH * world)


def loadable(model: str, res: Resolved) -> tuple[str, Optional[str]]:
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


def console(width: int = 0):
    """A rich Console: a terminal's width, or COLUMNS where set; piped or logged without COLUMNS,
    at least `width` columns (the wide layout of the tables, not the narrow one of 80)."""
    import os

    from rich.console import Console
    c = Console()
    return c if c.is_terminal or os.environ.get("COLUMNS") or c.width >= width else Console(width=width)
