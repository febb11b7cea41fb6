"""Fit tests on a real GPU: does `plan recommend`'s first plan run on the GPU it was made for?

A large GPU plays a smaller one: `torch.cuda.set_per_process_memory_fraction` caps the caching
allocator at the smaller card's memory as NVML reports it (the catalog's `memory_mib`) less the
memory a process holds outside the allocator (CUDA context, kernels, cuBLAS handles: the
planner's `CUDA_CONTEXT_BYTES`, measured on the GPU). For each scenario the recommended plan's
micro-batch runs `STEPS` optimizer steps under the cap; then the next micro-batch up, and up
again while it fits (at most `LADDER` more), so the row says the largest micro-batch that really
runs, the ground truth a later planner can be scored against offline. A plan that runs out of
memory is tried one micro-batch down until one runs. Each scenario runs in a process of its own.
`python -m planner.measure.fit OUT_DIR` writes `OUT_DIR/fit.csv`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

SCENARIOS = [  # (model, the GPU played, method, optimizer): the six, on one GPU each
    ("meta-llama/Meta-Llama-3-8B", "RTX-4090", "qlora", "adamw"),
    ("meta-llama/Meta-Llama-3-8B", "A100-40GB", "lora", "adamw"),
    ("meta-llama/Meta-Llama-3-8B", "L40S", "lora", "adamw"),
    ("meta-llama/Llama-3.2-3B", "H100-SXM", "full", "adamw"),
    ("meta-llama/Llama-3.2-1B", "T4", "full", "adamw-8bit"),
    ("HuggingFaceTB/SmolLM2-1.7B", "L4", "full", "adamw-8bit"),
]
SEQ_LEN = 2048
STEPS = 3
LADDER = 3


def runnable(plan) -> bool:
    """Plans this harness runs in one process: a single GPU without a sharding engine."""
    return plan.settings.strategy == "ddp" and plan.settings.offload == "none"


def attempt(model, opt, st, config, vocab: int) -> dict:
    """`STEPS` optimizer steps of the settings' micro-batch and accumulation from an emptied
    allocator: whether they ran, and the allocator's peaks."""
    import torch

    from .builder import train_step
    from .gpu import amp_context, release
    release()
    ids = torch.randint(0, vocab, (st.batch_size, st.seq_len), device="cuda")
    try:
        for _ in range(STEPS):
            train_step(model, opt, dict(input_ids=ids, labels=ids), amp_context(st), micro_steps=st.accumulation)
        torch.cuda.synchronize()
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    opt.zero_grad(set_to_none=True)
    out = {"ok": ok, "allocated_peak": torch.cuda.max_memory_allocated(),
           "reserved_peak": torch.cuda.max_memory_reserved()}
    del ids
    release()
    return out


def run_scenario(model_id: str, gpu_name: str, method: str, optimizer: str, outside: int, total: int) -> dict:
    import torch

    from ..contract import Settings
    from ..estimate import estimate
    from ..gpus import lookup
    from ..recommend import Request, recommend
    from ..resolve import catalog
    from ..spec import ModelSpec
    from .builder import make_optimizer
    from .gpu import build, outside_allocator

    gpu = lookup(gpu_name)
    cfg = catalog()[model_id]["config"]
    spec = ModelSpec.from_config(cfg)
    req = Request(gpu=gpu, method=method, optimizer=optimizer, seq_len=SEQ_LEN)
    plans = recommend(spec, req)
    first = plans[0] if plans else None
    plan = next((p for p in plans if runnable(p)), None)
    if plan is not None:
        st, source = plan.settings, "recommend" if plan is first else "recommend, first runnable"
    else:  # nothing fits by the estimate: the smallest plan this harness runs, to learn what really does
        st = Settings(precision="bf16-amp" if gpu.bf16 else "fp16-amp", optimizer=optimizer, seq_len=SEQ_LEN,
                      batch_size=1, grad_checkpointing=True)
        source = "none fits by the estimate: checkpointing, micro-batch 1"
    cap = gpu.memory_bytes - outside
    torch.cuda.set_per_process_memory_fraction(cap / total)
    model, config = build(model_id, cfg, st)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], st.optimizer)
    tries = {}
    micro = st.batch_size
    tries[micro] = attempt(model, opt, st, config, config.vocab_size)
    if tries[micro]["ok"]:
        m = micro + 1
        while m <= micro + LADDER:
            tries[m] = attempt(model, opt, replace(st, batch_size=m), config, config.vocab_size)
            if not tries[m]["ok"]:
                break
            m += 1
    else:
        m = micro - 1
        while m >= 1 and not tries.get(m + 1, {"ok": False})["ok"]:
            tries[m] = attempt(model, opt, replace(st, batch_size=m), config, config.vocab_size)
            m -= 1
    torch.cuda.set_per_process_memory_fraction(1.0)
    outside = outside_allocator() or outside  # NVML's figure where it sees this process
    predicted = {m: estimate(spec, replace(st, batch_size=m)).device_bytes for m in tries}
    largest_ok = max((m for m, t in tries.items() if t["ok"]), default=0)
    nxt = tries.get(micro + 1)
    return {"model": model_id, "gpu_played": gpu_name, "gpu_memory_bytes": gpu.memory_bytes, "cap_bytes": cap,
            "method": method, "optimizer": optimizer, "plan_source": source,
            "precision": st.precision, "lora_rank": st.lora_rank, "quant": st.quant,
            "grad_checkpointing": st.grad_checkpointing, "micro_batch": micro, "accumulation": st.accumulation,
            "seq_len": st.seq_len, "margin": req.margin_for(st), "outside_allocator": outside,
            "predicted_device": predicted[micro],
            "plan_ok": tries[micro]["ok"], "plan_device": tries[micro]["reserved_peak"] + outside,
            "next_ok": None if nxt is None else nxt["ok"],
            "next_device": None if nxt is None else nxt["reserved_peak"] + outside,
            "largest_ok": largest_ok, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "tries": json.dumps({m: {**t, "predicted_device": predicted[m]} for m, t in tries.items()})}


def main(argv: list[str] | None = None) -> int:
    """`OUT_DIR`: every scenario, each in a process of its own (a fresh caching allocator), into
    OUT_DIR/fit.csv. `--scenario I`: scenario I in this process, as a JSON line."""
    from .gpu import run_child, write_csv
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--scenario"]:
        import torch

        from ..memory import CUDA_CONTEXT_BYTES
        torch.zeros(1, device="cuda")
        total = torch.cuda.get_device_properties(0).total_memory
        row = run_scenario(*SCENARIOS[int(argv[1])], outside=CUDA_CONTEXT_BYTES, total=total)
        print(json.dumps(row))
        return 0
    out = argv[0] if argv else "tables"
    rows = []
    for i, scenario in enumerate(SCENARIOS):
        row, error = run_child([sys.executable, "-m", "planner.measure.fit", "--scenario", str(i)])
        if row is None:
            print(f"FAILED {scenario}: {error}", flush=True)
            continue
        print(f"{row['model']} on {row['gpu_played']} ({row['method']}): micro {row['micro_batch']} "
              f"{'ran' if row['plan_ok'] else 'OUT OF MEMORY'} at {row['plan_device'] / 2**30:.2f} GiB "
              f"(predicted {row['predicted_device'] / 2**30:.2f}, card {row['gpu_memory_bytes'] / 2**30:.2f}); "
              f"next up {row['next_ok']}; largest that runs {row['largest_ok']}", flush=True)
        rows.append(row)
        write_csv(os.path.join(out, "fit.csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
