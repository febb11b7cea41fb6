"""Measured on a GPU: the estimate's peak and device bytes against CUDA's allocator and NVML.

`python -m planner.measure.gpu OUT.csv` runs each case of `CASES` (public configs from the
catalog, random weights built directly on the GPU) as the estimator models it: a warm-up step,
then a measured step `loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()`.
Per phase it reads `torch.cuda.max_memory_allocated` (what `peak_bytes` predicts); over the step
`max_memory_reserved`; and the process's memory as NVML lists it (what `device_bytes` predicts).
QLoRA cases load the random model through transformers' bitsandbytes NF4 path, as a user does.
Each case runs in its own process so one case's allocator cache cannot pad the next.
"""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
import tempfile

from ..contract import Settings
from ..estimate import estimate
from ..precision import RECIPES
from ..spec import ModelSpec
from .builder import build_model, is_encoder, make_optimizer, model_class, nf4_model, train_step

CASES = [
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-amp", batch_size=4, seq_len=2048)),
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-amp", batch_size=4, seq_len=2048, grad_checkpointing=True)),
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-amp", batch_size=4, seq_len=2048, optimizer="adamw-fused")),
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-pure", batch_size=4, seq_len=2048, lora_rank=16)),
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-amp", batch_size=4, seq_len=2048, lora_rank=16, quant="nf4",
                                     grad_checkpointing=True)),
    ("Qwen/Qwen2.5-0.5B", dict(precision="bf16-amp", batch_size=8, seq_len=1024)),
    ("HuggingFaceTB/SmolLM2-1.7B", dict(precision="bf16-amp", batch_size=2, seq_len=2048, grad_checkpointing=True)),
    ("openai-community/gpt2", dict(precision="fp32", batch_size=8, seq_len=1024)),
    ("bert-base-cased", dict(precision="bf16-amp", batch_size=32, seq_len=512)),
    ("meta-llama/Meta-Llama-3-8B", dict(precision="bf16-pure", batch_size=2, seq_len=2048, lora_rank=16)),
    ("meta-llama/Meta-Llama-3-8B", dict(precision="bf16-pure", batch_size=1, seq_len=4096, lora_rank=16,
                                        grad_checkpointing=True)),
    ("meta-llama/Meta-Llama-3-8B", dict(precision="bf16-amp", batch_size=1, seq_len=2048, lora_rank=16, quant="nf4",
                                        grad_checkpointing=True)),
    ("HuggingFaceTB/SmolLM2-1.7B", dict(precision="bf16-amp", batch_size=4, seq_len=2048, grad_checkpointing=True,
                                        optimizer="adamw-8bit")),
    ("meta-llama/Llama-3.2-3B", dict(precision="bf16-pure", batch_size=8, seq_len=2048, lora_rank=16,
                                     grad_checkpointing=True)),
]


MODEL_CACHE = "/dev/shm/plan-gpu-models"
"""Random-weight checkpoints saved once per model for the NF4 loads (memory-backed where /dev/shm
exists: an 8B bf16 checkpoint is 16 GB, and each QLoRA case loads it again)."""

TRACE_ACTIONS = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free", "segment_map",
                 "segment_unmap", "snapshot", "oom")
"""The caching allocator's trace events (`torch.cuda.memory._snapshot()["device_traces"]`), coded
as their index here in the committed traces."""


def _checkpoint(model_id: str, cfg: dict) -> str:
    import os

    import torch
    from transformers import AutoConfig
    root = MODEL_CACHE if os.path.isdir(os.path.dirname(MODEL_CACHE)) else tempfile.gettempdir()
    path = os.path.join(root, model_id.replace("/", "--"))
    if not os.path.exists(os.path.join(path, "config.json")):
        c = dict(cfg)
        config = AutoConfig.for_model(c.pop("model_type"), **c)
        with torch.device("cuda"):
            model = model_class(config).from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def build(model_id: str, cfg: dict, st: Settings):
    """The model on the GPU as the settings say (builder.build_model); NF4 bases load the random
    checkpoint saved once per model (`_checkpoint`)."""
    if st.quant == "none":
        return build_model(cfg, st, device="cuda")
    return nf4_model(cfg, st, "cuda", checkpoint=_checkpoint(model_id, cfg))


def case_name(model_id: str, st: Settings) -> str:
    return "/".join([model_id, st.precision, f"lora{st.lora_rank}" if st.lora else "full", st.quant,
                     "ckpt" if st.grad_checkpointing else "nockpt", f"b{st.batch_size}s{st.seq_len}", st.optimizer])


def amp_context(st: Settings):
    """Autocast as the recipe runs on CUDA: fp16 for fp16-amp, bf16 for the other autocast recipes."""
    import torch
    if not RECIPES[st.precision].autocast:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if st.precision.startswith("fp16") else torch.bfloat16)


def allocator() -> str:
    import os
    return "expandable" if "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") else "default"


def release() -> None:
    """Back to an empty caching allocator between cases in one process: what a fresh process
    starts with, less the CUDA context and loaded kernels (measured separately)."""
    import gc

    import torch
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    torch.cuda.reset_peak_memory_stats()


def outside_allocator() -> int:
    """NVML's figure for this process less what the caching allocator holds, now (the CUDA
    context, loaded kernels, cuBLAS handles): 0 where NVML cannot see the process."""
    import torch

    from ..gpus import NvmlSampler
    torch.cuda.synchronize()
    s = NvmlSampler()
    return s.sample() - torch.cuda.memory_reserved() if s.method == "process" else 0


def _trace_arrays(events: list) -> dict:
    """The allocator's events as compact arrays, and for each alloc the code that asked for it
    (the innermost frames outside torch), so that a peak can be attributed offline."""
    import numpy as np
    sites, site_ids = {}, []
    for e in events:
        frames = [f"{f['filename'].rsplit('site-packages/', 1)[-1]}:{f['line']}:{f['name']}"
                  for f in e.get("frames", []) if "/torch/" not in f["filename"]][:4]
        site_ids.append(sites.setdefault(" < ".join(frames), len(sites)) if e["action"] == "alloc" else -1)
    return {"action": np.array([TRACE_ACTIONS.index(e["action"]) for e in events], dtype=np.uint8),
            "addr": np.array([e["addr"] for e in events], dtype=np.uint64),
            "size": np.array([e["size"] for e in events], dtype=np.int64),
            "stream": np.array([e.get("stream", 0) for e in events], dtype=np.int64),
            "site": np.array(site_ids, dtype=np.int32), "sites": np.array(list(sites), dtype=str)}


def measure_case(model_id: str, settings: dict, trace: bool = False) -> tuple[dict, dict | None]:
    """One case in this process, from an empty allocator: predicted against measured, as a row,
    and the allocator's trace from the model's first allocation to the end of the measured step."""
    import torch

    from ..gpus import NvmlSampler
    from ..resolve import catalog

    cfg = catalog()[model_id]["config"]
    st = Settings(**settings)
    if st.quant != "none":
        _checkpoint(model_id, cfg)  # saved once, outside the measurement
    release()
    sampler = NvmlSampler().start()
    est = estimate(ModelSpec.from_config(cfg), st)
    torch.manual_seed(0)
    if trace:
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=4_000_000, clear_history=True)
    model, config = build(model_id, cfg, st)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], st.optimizer)
    amp = amp_context(st)
    ids = torch.randint(0, config.vocab_size, (st.batch_size, st.seq_len), device="cuda")
    labels = torch.zeros(st.batch_size, dtype=torch.long, device="cuda") if is_encoder(config) else ids
    batch = dict(input_ids=ids, labels=labels)
    train_step(model, opt, batch, amp)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    phases, reserved = {}, 0

    def snap(phase):
        nonlocal reserved
        torch.cuda.synchronize()
        phases[phase] = torch.cuda.max_memory_allocated()
        reserved = max(reserved, torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    start = torch.cuda.memory_allocated()
    train_step(model, opt, batch, amp, snap)
    nvml = sampler.stop()
    events = None
    if trace:
        events = _trace_arrays(torch.cuda.memory._snapshot()["device_traces"][0])
        torch.cuda.memory._record_memory_history(enabled=None)
    outside = outside_allocator()
    peak = max(phases.values())
    row = {"case": case_name(model_id, st), "allocator": allocator(),
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "predicted_peak": est.peak_bytes, "allocated_peak": peak,
           "peak_error_pct": round(100 * (est.peak_bytes - peak) / peak, 2),
           "predicted_device": est.device_bytes, "nvml": nvml, "nvml_method": sampler.method,
           "device_error_pct": round(100 * (est.device_bytes - nvml) / nvml, 2),
           "reserved_peak": reserved, "outside_allocator": outside, "start_allocated": start,
           "predicted_phases": json.dumps(est.phases), "measured_phases": json.dumps(phases)}
    del model, opt, batch, ids, labels
    return row, events


def run_child(argv: list[str]) -> tuple[dict | None, str]:
    """One measurement in a process of its own (a fresh caching allocator): the JSON row it prints
    last, or None and the last line of its error output."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or [""])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run(out_csv: str, cases=CASES, echo=print, traces: str | None = None) -> list[dict]:
    """Every case in a process of its own (a fresh caching allocator, as a training run starts
    with: in one process, blocks a case leaves behind, such as cuBLAS workspaces, shift the next
    case's layout), the CSV rewritten after each so that a run cut short keeps what it measured;
    `traces`: an .npz of every case's allocator trace."""
    import os

    import numpy as np
    rows, arrays = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (model_id, settings) in enumerate(cases):
            npz = os.path.join(tmp, f"{i}.npz") if traces else ""
            argv = [sys.executable, "-m", "planner.measure.gpu", "--case", json.dumps([model_id, settings]), npz]
            row, error = run_child(argv)
            if row is None:
                echo(f"FAILED {model_id} {settings}: {error}", flush=True)
                continue
            echo(f"{row['case']} [{row['allocator']}]: peak {row['peak_error_pct']:+.2f}%  "
                 f"device {row['device_error_pct']:+.2f}%  reserved/allocated "
                 f"{row['reserved_peak'] / row['allocated_peak']:.3f}  "
                 f"outside {row['outside_allocator'] / 2**20:,.0f} MiB", flush=True)
            rows.append(row)
            write_csv(out_csv, rows)
            if npz:
                with np.load(npz) as z:
                    arrays.update({f"{i}.{k}": z[k] for k in z.files})
                arrays[f"{i}.case"] = np.array(row["case"])
                np.savez_compressed(traces, **arrays)
    return rows


def environment() -> dict:
    """The GPU as NVML and torch see it, and the memory outside the caching allocator once CUDA,
    cuBLAS and a matmul are initialised."""
    import torch

    from ..gpus import NvmlSampler
    sampler = NvmlSampler()
    nv = sampler._nvml
    total = int(nv.nvmlDeviceGetMemoryInfo(sampler.handle).total)
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    return {"gpu": torch.cuda.get_device_name(0), "nvml_total_bytes": total, "nvml_total_mib": total // 2**20,
            "torch_total_bytes": torch.cuda.get_device_properties(0).total_memory,
            "driver": nv.nvmlSystemGetDriverVersion(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "outside_allocator_after_init": outside_allocator(), "nvml_method": sampler.method}


def suite(out_dir: str, echo=print) -> None:
    """The whole GPU suite, one process per allocator setting: the environment, every case with its
    allocator trace (expandable segments, as `plan train` runs, then the default allocator), then
    the fit tests (planner.measure.fit). Writes into `out_dir`; rerunnable."""
    import os
    import time
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cases(name: str, conf: str) -> None:
        echo(f"== cases, allocator {name} ({time.time() - t0:.0f} s)", flush=True)
        subprocess.run([sys.executable, "-m", "planner.measure.gpu", "--cases", out_dir, name],
                       env={**env, "PYTORCH_CUDA_ALLOC_CONF": conf})

    cases("expandable", "expandable_segments:True")  # as `plan train` runs: first, it matters most
    echo(f"== fit tests ({time.time() - t0:.0f} s)", flush=True)
    subprocess.run([sys.executable, "-m", "planner.measure.fit", out_dir],
                   env={**env, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    cases("default", "")
    echo(f"== done in {time.time() - t0:.0f} s", flush=True)


def rescore(csv_path: str, echo=print) -> None:
    """The measured rows of a run against today's estimate (after a calibration change)."""
    from ..resolve import catalog
    names = {case_name(m, Settings(**kw)): (m, Settings(**kw)) for m, kw in CASES}
    for r in csv.DictReader(open(csv_path)):
        model_id, st = names[r["case"]]
        e = estimate(ModelSpec.from_config(catalog()[model_id]["config"]), st)
        pk, nv = int(r["allocated_peak"]), int(r["nvml"])
        echo(f"{r['case']:78s} peak {100 * (e.peak_bytes - pk) / pk:+6.2f}%  "
             f"device {100 * (e.device_bytes - nv) / nv:+6.2f}%")


def report(root: str, echo=print) -> None:
    """The README's tables from a suite's output directory, scored against today's estimate: per
    case the peak and device errors (both allocators), the reserve, and the allocator model's
    replay of the GPU trace; per fit scenario what ran."""
    import os

    import numpy as np

    from ..allocator import replay
    from ..margin import suite_case
    from ..resolve import catalog
    from .replay import gpu_events

    def rows(name):
        path = os.path.join(root, name)
        return list(csv.DictReader(open(path))) if os.path.exists(path) else []

    default = {r["case"]: r for r in rows("validation_gpu.csv")}
    z = np.load(os.path.join(root, "traces_expandable.npz"))
    traces = {str(z[f"{i}.case"]): i for i in {k.split(".")[0] for k in z.files}}
    echo("| case (batch x seq) | peak | device (NVML) | default allocator | reserved / peak | replay |")
    echo("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows("validation_gpu_expandable.csv"):
        model_id, st = suite_case(r["case"])
        e = estimate(ModelSpec.from_config(catalog()[model_id]["config"]), st)
        pk, nv, res = int(r["allocated_peak"]), int(r["nvml"]), int(r["reserved_peak"])
        d = default.get(r["case"])
        dflt = f"{100 * (e.device_bytes - int(d['nvml'])) / int(d['nvml']):+.1f}%" if d else "-"
        rp = replay(gpu_events(z, traces[r["case"]])).peak_reserved if r["case"] in traces else None
        echo(f"| {r['case']} | {100 * (e.peak_bytes - pk) / pk:+.2f}% | {100 * (e.device_bytes - nv) / nv:+.1f}% | "
             f"{dflt} | {res / pk:.3f} | " + (f"{100 * (rp - res) / res:+.2f}% |" if rp else "- |"))
    echo("")
    echo("| model, GPU played (MiB) | plan | ran at | next micro-batch up |")
    echo("| --- | --- | ---: | --- |")
    for r in rows("fit.csv"):
        tries = {int(k): v for k, v in json.loads(r["tries"]).items()}
        micro, out = int(r["micro_batch"]), int(r["outside_allocator"] or 0)
        up = tries.get(micro + 1)
        nxt = "-" if up is None else "out of memory" if not up["ok"] else \
            f"ran at {(up['reserved_peak'] + out) / 2**30:,.2f} GiB"
        echo(f"| {r['model']}, {r['gpu_played']} ({int(r['gpu_memory_bytes']) // 2**20:,}) | {r['method']} "
             f"r{r['lora_rank']}, micro-batch {micro}{', ckpt' if r['grad_checkpointing'] == 'True' else ''} | "
             f"{(tries[micro]['reserved_peak'] + out) / 2**30:,.2f} GiB | {nxt} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rescore"]:
        rescore(argv[1])
        return 0
    if argv[:1] == ["--report"]:
        report(argv[1])
        return 0
    if argv[:1] == ["suite"]:
        suite(argv[1])
        return 0
    if argv[:1] == ["--cases"]:  # one allocator setting's cases, in this process (the suite's step)
        import os
        out, name = argv[1], argv[2]
        with open(os.path.join(out, "env.json" if name == "expandable" else f"env_{name}.json"), "w") as f:
            json.dump(environment(), f, indent=1)
        suffix = "_expandable" if name == "expandable" else ""
        run(os.path.join(out, f"validation_gpu{suffix}.csv"), traces=os.path.join(out, f"traces_{name}.npz"))
        return 0
    if argv[:1] == ["--case"]:  # one case in this process, as a JSON line; its trace to the .npz named
        import numpy as np
        model_id, settings = json.loads(argv[1])
        row, events = measure_case(model_id, settings, trace=bool(argv[2:3] and argv[2]))
        if events is not None:
            np.savez_compressed(argv[2], **events)
        print(json.dumps(row))
        return 0
    run(argv[0] if argv else "tables/gpu/validation_gpu_expandable.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
