"""Reserved memory without a GPU: the simulator's step as an allocation sequence, replayed through
the caching-allocator model (planner/allocator.py).

`simulated_trace` is the simulator's run (planner/measure/simulate.py: the model, a warm-up step
that creates the optimizer state, a measured step, on fake CPU tensors, as `planner.measure.gpu`
runs them on the GPU) as every storage MemTracker saw come and go, in order, with the cuBLAS
workspaces a CUDA process takes from the caching allocator at its first matmul.

`python -m planner.measure.replay TRACES.npz CSV` checks both halves against a GPU run of the
suite: each GPU trace replayed through the model against the reserved peak torch reported, and
each case's simulated trace replayed against it too.

`python -m planner.measure.replay --grid tables/allocator_grid.csv` replays the simulator's whole
runs over GRID (models, full and LoRA, with and without checkpointing, 4k and 16k tokens) and
writes each run's live peak and replayed high-water mark: the evidence the SLACK_* terms of
`memory.allocator_slack` are fitted to. It appends, so an interrupted run resumes.
"""

from __future__ import annotations

import csv
import json
import sys

from ..allocator import Allocator, replay
from ..contract import Settings
from .simulate import measure


def simulated_trace(cfg: dict, st: Settings) -> list[tuple[bool, object, int]]:
    """The allocation sequence of a model build, a warm-up step and a measured step, on fake
    tensors (the simulator's run): (is_alloc, key, bytes) in order."""
    return measure(cfg, st, fake=True, keep_events=True).events


def simulated_reserved(cfg: dict, st: Settings, expandable: bool = True) -> Allocator:
    """The caching allocator after the simulated step: `peak_reserved`, `peak_allocated`."""
    return replay(simulated_trace(cfg, st), expandable)


def gpu_events(z, i: str):
    """A GPU trace of the suite (`planner.measure.gpu`) as (is_alloc, key, bytes) events."""
    act, size, addr = z[f"{i}.action"].tolist(), z[f"{i}.size"].tolist(), z[f"{i}.addr"].tolist()
    for a, s, ad in zip(act, size, addr, strict=True):
        if a == 0:
            yield True, ad, s
        elif a == 2:
            yield False, ad, 0


def check(traces: str, rows_csv: str, expandable: bool = True, simulate: bool = True, echo=print) -> list[dict]:
    """Each case of a GPU run: the reserved peak torch reported, the model's replay of the GPU
    trace, and (`simulate`) the replay of the simulator's trace."""
    import numpy as np

    from ..margin import suite_case
    from ..resolve import catalog
    z = np.load(traces)
    rows = {r["case"]: r for r in csv.DictReader(open(rows_csv))}
    out = []
    for i in sorted({k.split(".")[0] for k in z.files}, key=int):
        case = str(z[f"{i}.case"])
        r = rows[case]
        measured = int(r["reserved_peak"])
        gpu = replay(gpu_events(z, i), expandable)
        row = {"case": case, "allocator": "expandable" if expandable else "default", "reserved": measured,
               "allocated": int(r["allocated_peak"]), "replay_gpu_trace": gpu.peak_reserved,
               "replay_gpu_error_pct": round(100 * (gpu.peak_reserved - measured) / measured, 2)}
        if simulate:
            model_id, st = suite_case(case)
            sim = simulated_reserved(catalog()[model_id]["config"], st, expandable)
            row.update(replay_simulated=sim.peak_reserved, simulated_allocated=sim.peak_allocated,
                       replay_simulated_error_pct=round(100 * (sim.peak_reserved - measured) / measured, 2))
        echo(json.dumps(row))
        out.append(row)
    return out


GRID_MODELS = ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-360M", "openai-community/gpt2",
               "TinyLlama/TinyLlama-1.1B-Chat-v1.0")
GRID_SHAPES = ((2, 2048), (8, 2048))
GRID_FIELDS = ("case", "step_peak", "replayed", "logits16", "ckpt_grads")


def grid_cases() -> list[str]:
    """GRID as suite case names (planner.margin.suite_case reads them): each model full
    (bf16-amp) and LoRA r16 (bf16-pure), with and without checkpointing, at each shape; GPT-2
    (1024 positions) at the same token counts."""
    out = []
    for model in GRID_MODELS:
        for method, precision in (("full", "bf16-amp"), ("lora16", "bf16-pure")):
            for ckpt in ("nockpt", "ckpt"):
                for b, s in GRID_SHAPES:
                    if model == "openai-community/gpt2":
                        b, s = 2 * b, s // 2
                    out.append(f"{model}/{precision}/{method}/none/{ckpt}/b{b}s{s}/adamw")
    return out


def grid(path: str, echo=print) -> None:
    """Simulate and replay each grid case not yet in `path` (a CSV, appended): the simulated
    step's live peak, the whole run's replayed high-water mark, and the sizes the slack terms
    scale with (tests/test_allocator.py scores today's estimate against it)."""
    import os

    from ..margin import suite_case
    from ..memory import loss_logit_elems
    from ..precision import RECIPES
    from ..resolve import catalog
    from ..spec import ModelSpec, count_params
    done = {r["case"] for r in csv.DictReader(open(path))} if os.path.exists(path) else set()
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, GRID_FIELDS)
        if new:
            w.writeheader()
        for case in grid_cases():
            if case in done:
                continue
            model_id, st = suite_case(case)
            cfg = catalog()[model_id]["config"]
            m = measure(cfg, st, fake=True)
            spec = ModelSpec.from_config(cfg)
            pc = count_params(spec)
            rc = RECIPES[st.precision]
            row = {"case": case, "step_peak": m.peak_bytes, "replayed": m.reserved_bytes,
                   "logits16": loss_logit_elems(spec, st) * 2 if rc.compute < 4 else 0,
                   "ckpt_grads": (rc.grad * pc.largest_layer * spec.layers
                                  if st.grad_checkpointing and not st.lora else 0)}
            w.writerow(row)
            f.flush()
            echo(json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--grid":
        grid(argv[1] if len(argv) > 1 else "tables/allocator_grid.csv")
        return 0
    expandable = "default" not in argv[0]
    check(argv[0], argv[1], expandable=expandable, simulate="--no-sim" not in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
