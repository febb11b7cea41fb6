"""How much GPU memory a plan keeps free, from the measured error of the figure it is fitted by.

Plans are fitted by `needed_bytes`, the least memory a step runs in. The evidence is what the
GPU suite measured (`python -m planner.measure.gpu suite tables/gpu`): each case of
tables/gpu/validation_gpu_expandable.csv needs at least its allocated peak plus the memory
outside the allocator; each micro-batch of the fit tests in tables/gpu/fit.csv ran in its card's
memory or ran out of it. Each is scored against today's estimate, so the margin follows the
formula when it changes. A plan's kind is its method (full, LoRA, QLoRA) and whether it
checkpoints; its margin is the largest under-estimate measured for that kind plus MARGIN_FLOOR.
Kinds the suite has not measured (several GPUs, sharding or offload engines) keep
UNMEASURED_MARGIN.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .contract import Settings, world_size
from .memory import CUDA_CONTEXT_BYTES

EVIDENCE = Path(__file__).resolve().parent.parent / "tables" / "gpu"
MARGIN_FLOOR = 0.03
"""Kept free beyond the worst measured under-estimate: what lies outside the model differs by GPU,
driver and CUDA (the CUDA context measured 742-764 MiB over two GPUs), and a run's data differs
from the suite's (padding, packing)."""
UNMEASURED_MARGIN = 0.10


@dataclass(frozen=True)
class Evidence:
    kind: str
    margin: float
    cases: int = 0
    low: float = 0.0    # the largest under-estimate measured, (predicted - measured) / measured
    gpu: str = ""

    def line(self) -> str:
        """How sure the fit is, in one line."""
        if not self.cases:
            return (f"{self.margin:.0%} kept free: {self.kind} has not been measured on a GPU, "
                    "so the default margin applies")
        return (f"{self.margin:.0%} kept free: {self.kind} was under-estimated by at most {abs(self.low):.1%} "
                f"in {self.cases} runs on {self.gpu} (tables/gpu), plus {MARGIN_FLOOR:.0%}")


def kind(st: Settings) -> str:
    method = "QLoRA" if st.quant != "none" else "LoRA" if st.lora else "full fine-tuning"
    where = "" if world_size(st) == 1 and st.strategy == "ddp" and st.offload == "none" else \
        f" ({st.strategy}, offload {st.offload}, {world_size(st)} GPUs)"
    loss = "" if st.loss == "standard" else f", loss {st.loss}"  # tables/gpu measured transformers' loss only
    loss += ", activation offload" if st.activation_offload else ""  # not measured on a GPU either
    # nor partial freezing, EMA or L-BFGS (measured on CPU only: tables/validation.csv)
    loss += (", unfrozen_parameters" if st.unfrozen_parameters else "") + (", EMA" if st.ema else "") + \
        (", L-BFGS" if st.optimizer == "lbfgs" else "")
    return f"{method} {'with' if st.grad_checkpointing else 'without'} checkpointing{loss}{where}"


_CASE = re.compile(r"^(?P<model>.+)/(?P<precision>[^/]+)/(?P<method>full|lora\d+)/(?P<quant>[^/]+)/"
                   r"(?P<ckpt>ckpt|nockpt)/b(?P<b>\d+)s(?P<s>\d+)/(?P<optimizer>[^/]+)$")


def _lora(rank: int) -> dict:
    return {"lora_rank": rank, "lora_alpha": 2.0 * rank} if rank else {}


def suite_case(name: str) -> tuple[str, Settings]:
    """A case name of planner.measure.gpu (model/precision/lora16|full/quant/ckpt/b4s2048/optimizer)."""
    m = _CASE.match(name)
    rank = int(m["method"][4:]) if m["method"] != "full" else 0
    return m["model"], Settings(precision=m["precision"], quant=m["quant"], grad_checkpointing=m["ckpt"] == "ckpt",
                                batch_size=int(m["b"]), seq_len=int(m["s"]), optimizer=m["optimizer"], **_lora(rank))


def measurements(root: Path = EVIDENCE) -> list[tuple[str, Settings, int, str, str]]:
    """What the GPU suite measured of the memory each step needs, as (model id, settings, bytes,
    relation, GPU). relation `needs`: a suite case needs at least its allocated peak plus the
    memory outside the allocator; `ran`: a fit-test micro-batch ran in its card's bytes;
    `oom`: it ran out of them."""
    import json
    out = []
    path = root / "validation_gpu_expandable.csv"
    if path.exists():
        for r in csv.DictReader(open(path, newline="")):
            outside = int(r.get("outside_allocator") or CUDA_CONTEXT_BYTES)
            out.append((*suite_case(r["case"]), int(r["allocated_peak"]) + outside, "needs", r["gpu"]))
    path = root / "fit.csv"
    if path.exists():
        for r in csv.DictReader(open(path, newline="")):
            rank = int(r["lora_rank"])
            for micro, t in json.loads(r["tries"]).items():
                st = Settings(precision=r["precision"], quant=r["quant"], **_lora(rank),
                              grad_checkpointing=r["grad_checkpointing"] == "True", batch_size=int(micro),
                              seq_len=int(r["seq_len"]), optimizer=r["optimizer"],
                              accumulation=int(r["accumulation"]))
                out.append((r["model"], st, int(r["gpu_memory_bytes"]), "ran" if t["ok"] else "oom", r["gpu"]))
    return out


@lru_cache(maxsize=1)
def _errors() -> dict[str, list[tuple[float, str]]]:
    """Per kind, each measurement's under-estimate of `needed_bytes` (negative), 0 where it shows
    none: a step that needs at least m bytes predicted below m, or one that ran out of a card's m
    bytes predicted to fit in them. A step that ran says nothing of under-estimates."""
    from .estimate import estimate
    from .resolve import catalog
    from .spec import ModelSpec
    models = catalog()
    errors: dict[str, list] = {}
    for model_id, st, measured, relation, gpu in measurements():
        if model_id not in models:
            continue
        predicted = estimate(ModelSpec.from_config(models[model_id]["config"]), st).needed_bytes
        err = 0.0 if relation == "ran" else min((predicted - measured) / measured, 0.0)
        errors.setdefault(kind(st), []).append((err, gpu))
    return errors
def evidence(st: Settings) -> Evidence:
    """The margin for a plan of these settings, and what it rests on."""
    k = kind(st)
    measured = _errors().get(k, [])
    if not measured:
        return Evidence(k, UNMEASURED_MARGIN)
    errs = [e for e, _ in measured]
    low = min(errs)
    return Evidence(k, round(max(0.0, -low) + MARGIN_FLOOR, 3), len(errs), low,
                    ", ".join(sorted({g for _, g in measured})))
