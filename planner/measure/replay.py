"""Reserved memory without a GPU: the simulator's step as an allocation sequence, replayed through
the caching-allocator model (planner/allocator.py).

`simulated_trace` runs what `planner.measure.gpu` runs on the GPU (the model, a warm-up step that
creates the optimizer state, a measured step) on fake CPU tensors, and records every storage
MemTracker sees come and go, in order. The cuBLAS workspaces a CUDA process allocates from the
caching allocator at its first matmul are added there (two of 32 MiB on Hopper, H200 traces).

`python -m planner.measure.replay TRACES.npz CSV` checks both halves against a GPU run of the
suite: each GPU trace replayed through the model against the reserved peak torch reported, and
each case's simulated trace replayed against it too.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys

from ..allocator import Allocator, replay
from ..contract import Settings
from ..precision import RECIPES
from .builder import build_model, is_encoder, make_optimizer, train_step, unpacked_sequences
from .tracker import Tracker

CUBLAS_WORKSPACES = (32 * 2**20, 32 * 2**20)
"""What the H200 traces show cuBLAS/cuBLASLt taking from the caching allocator at the first
matmul of a process (torch 2.11, CUDA 13): two blocks of 32 MiB, kept to the end."""


class TraceTracker(Tracker):
    """MemTracker that also writes down each storage's arrival and departure, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[bool, int, int]] = []

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        name = getattr(u_type, "name", str(u_type))
        if name == "ADD" and winfo.mem_consumed > 0:
            self.events.append((True, id(winfo), winfo.mem_consumed))
        elif name == "DEL" and winfo.mem_consumed > 0:
            self.events.append((False, id(winfo), 0))
        elif name == "SIZE":
            self.events.append((False, id(winfo), 0))
            self.events.append((True, id(winfo), winfo.mem_consumed))
        super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)


def simulated_trace(cfg: dict, st: Settings) -> list[tuple[bool, int, int]]:
    """The allocation sequence of a model build, a warm-up step and a measured step, on fake
    tensors: (is_alloc, key, bytes) in order."""
    with unpacked_sequences():
        return _trace(cfg, st)


def _trace(cfg: dict, st: Settings) -> list:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    model, config = build_model(cfg, st, mode)
    rc = RECIPES[st.precision]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if rc.autocast else contextlib.nullcontext()
    tracker = TraceTracker()
    with mode:
        tracker.track_external(model)
        ids = torch.randint(0, config.vocab_size, (st.batch_size, st.seq_len))
        labels = torch.zeros(st.batch_size, dtype=torch.long) if is_encoder(config) else ids
        tracker.track_external(ids, labels)
        for i, size in enumerate(CUBLAS_WORKSPACES):
            tracker.events.append((True, ("cublas", i), size))
        batch = dict(input_ids=ids, labels=labels)
        with tracker:
            opt = make_optimizer([p for p in model.parameters() if p.requires_grad], st.optimizer)
            micro = 2 if st.accumulation > 1 else 1
            for _ in range(2):
                train_step(model, opt, batch, amp, lambda phase: phase == "backward" and tracker.reset_mod_stats(),
                           micro_steps=micro)
    return tracker.events


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

    from ..resolve import catalog
    from .gpu import CASES, case_name
    z = np.load(traces)
    names = {case_name(m, Settings(**kw)): (m, Settings(**kw)) for m, kw in CASES}
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
            model_id, st = names[case]
            sim = simulated_reserved(catalog()[model_id]["config"], st, expandable)
            row.update(replay_simulated=sim.peak_reserved, simulated_allocated=sim.peak_allocated,
                       replay_simulated_error_pct=round(100 * (sim.peak_reserved - measured) / measured, 2))
        echo(json.dumps(row))
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    expandable = "default" not in argv[0]
    check(argv[0], argv[1], expandable=expandable, simulate="--no-sim" not in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
