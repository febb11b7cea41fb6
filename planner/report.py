"""Turning estimates into the contract's JSON and into rich tables."""

from __future__ import annotations

from .contract import Settings
from .estimate import Estimate


def to_json(name: str, arch: str, st: Settings, est: Estimate, method: str = "analytic") -> dict:
    """The contract's object (shared/CONTRACT.md), keys in its order."""
    return {
        "model": name, "architecture": arch,
        "params": int(est.params), "trainable_params": int(est.trainable_params),
        "precision": st.precision, "optimizer": st.optimizer, "batch_size": st.batch_size, "seq_len": st.seq_len,
        "peak_bytes": int(est.peak_bytes), "device_bytes": int(est.device_bytes),
        "components": {k: int(v) for k, v in est.components.items()},
        "phases": {k: int(est.phases[k]) for k in ("model", "forward", "backward", "optimizer_step")},
        "cpu_bytes": int(est.cpu_bytes), "nvme_bytes": int(est.nvme_bytes),
        "method": method,
    }


def gib(n: float) -> str:
    """Binary units, labelled honestly."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n)} B"


def render(console, name: str, arch: str, rows: list[tuple[Settings, Estimate]], chosen: int) -> None:
    from rich.table import Table

    st0, est0 = rows[chosen]
    pc = est0.param_counts
    head = Table(title=f"{name} ({arch}): {est0.params:,} parameters, {est0.trainable_params:,} trainable",
                 title_justify="left", show_header=True)
    for col in ("part", "parameters"):
        head.add_column(col, justify="right" if col != "part" else "left")
    for k, v in (pc.as_dict() if pc else {"total": est0.params}).items():
        if k in ("tied_embeddings",):
            head.add_row("tied embeddings", "yes" if v else "no")
        elif k == "buffers_bytes":
            head.add_row("buffers", gib(v))
        else:
            head.add_row(k.replace("_", " "), f"{v:,}")
    console.print(head)

    t = Table(title=f"Training memory per GPU: batch {st0.batch_size} x {st0.seq_len} tokens, {st0.optimizer}"
              + (f", LoRA r={st0.lora_rank}" if st0.lora else "")
              + (f", {st0.quant} base" if st0.quant != "none" else "")
              + (", grad checkpointing" if st0.grad_checkpointing else "")
              + (f"; {st0.strategy}" + (f" (FSDP{st0.fsdp_version})" if st0.strategy.startswith("fsdp") else "")
                 + (f", offload {st0.offload}" if st0.offload != "none" else "")
                 + f" over {st0.nodes} node(s) x {st0.gpus} GPU(s)"
                 if st0.gpus * st0.nodes > 1 or st0.strategy != "ddp" else ""),
              title_justify="left")
    for col in ("precision", "weights", "gradients", "optimizer", "activations", "logits", "peak (allocated)",
                "device (NVML)"):
        t.add_column(col, justify="right" if col != "precision" else "left")
    for i, (st, est) in enumerate(rows):
        c = est.components
        style = "bold" if i == chosen and len(rows) > 1 else None
        t.add_row(st.precision, gib(c["weights"]), gib(c["gradients"]), gib(c["optimizer"]), gib(c["activations"]),
                  gib(c["logits"]), gib(est.peak_bytes), gib(est.device_bytes), style=style)
    console.print(t)

    p = Table(title=f"{st0.precision}: peak of each phase, by component", title_justify="left")
    comps = ("weights", "gradients", "optimizer", "activations", "logits", "other")
    p.add_column("phase")
    for col in comps + ("total",):
        p.add_column(col, justify="right")
    peak_phase = max(est0.phases, key=est0.phases.get)
    for ph in ("model", "forward", "backward", "optimizer_step"):
        pcomp = est0.phase_components[ph]
        vals = [gib(pcomp.get(k, 0)) if pcomp.get(k, 0) else "-" for k in comps]
        p.add_row(ph.replace("_", " "), *vals, gib(est0.phases[ph]), style="bold" if ph == peak_phase else None)
    console.print(p)
    if est0.cpu_bytes or est0.nvme_bytes:
        console.print(f"host RAM per node: {gib(est0.cpu_bytes)}"
                      + (f"; NVMe per node: {gib(est0.nvme_bytes)}" if est0.nvme_bytes else ""))
    for n in est0.notes:
        console.print(f"note: {n}")
    console.print("peak = live tensors and cuBLAS workspace (torch.cuda.max_memory_allocated); device adds the "
                  "CUDA context and allocator reserve (see README).", style="dim")


# GPU memory sizes the comparison marks fit against (GiB as NVML reports total memory, rounded
# down): 24 GB cards (RTX 4090, A10G, L4), A100-40GB, 80 GB cards (A100-80GB, H100)
FIT_SIZES = (24, 40, 80)


def render_strategies(console, name: str, arch: str, rows: list, skipped: list) -> None:
    """Strategies side by side: per-GPU memory (model states, activations and logits, engine
    buffers), what each host and NVMe hold, and the common GPU sizes the device figure fits."""
    from rich.table import Table

    st0, est0 = rows[0]
    world = st0.gpus * st0.nodes
    t = Table(title=f"GiB per GPU and per node: {name} ({arch}), {est0.params / 1e9:,.2f}B params, "
                    f"{st0.nodes} node(s) x {st0.gpus} GPU(s), "
                    f"{st0.precision}, {st0.batch_size} x {st0.seq_len} tokens per GPU, {st0.optimizer}"
                    + (f", LoRA r={st0.lora_rank}" if st0.lora else "")
                    + (", checkpointing" if st0.grad_checkpointing else ""),
              title_justify="left")
    for c in ("strategy", "offload", "states", "activ.", "buffers", "device", "host/node", "NVMe/node", "fits (GiB)"):
        t.add_column(c, justify="left" if c in ("strategy", "offload", "fits (GiB)") else "right", no_wrap=True)

    def g(n: float) -> str:
        return f"{n / 2**30:,.1f}" if n else "-"

    best = min(est.device_bytes for _, est in rows)
    for st, est in rows:
        c = est.components
        fits = [str(size) for size in FIT_SIZES if est.device_bytes <= size * 2**30]
        t.add_row(st.strategy, st.offload, g(c["weights"] + c["gradients"] + c["optimizer"]),
                  g(c["activations"] + c["logits"]), g(c["other"]), g(est.device_bytes), g(est.cpu_bytes),
                  g(est.nvme_bytes), f"[green]{' '.join(fits)}[/]" if fits else "[red]none[/]",
                  style="bold" if est.device_bytes == best else None)
    console.print(t)
    console.print(f"Per GPU at each strategy's peak phase ({world} GPUs in all): states = weights, gradients and "
                  f"optimizer state; buffers = gathered units, reduce-scatter and DDP buckets, optimizer temporaries; "
                  f"device adds CUDA context and allocator reserve. fits: which of "
                  f"{', '.join(map(str, FIT_SIZES))} GiB GPUs hold it. Bold: the least GPU memory.", style="dim")
    for line in skipped:
        console.print(f"not offered: {line}", style="dim")


def plan_json(p) -> dict:
    """One recommended plan: its settings, the estimate (contract object) and the step-time model."""
    st, t = p.settings, p.time
    return {"method": p.method, "strategy": st.strategy, "offload": st.offload, "precision": st.precision,
            "lora_rank": st.lora_rank, "lora_alpha": st.lora_alpha, "quant": st.quant,
            "micro_batch": st.batch_size, "gradient_accumulation": p.accumulation, "global_batch": p.global_batch,
            "largest_micro_batch": p.largest_micro, "seq_len": st.seq_len,
            "grad_checkpointing": st.grad_checkpointing, "gpus": st.gpus, "nodes": st.nodes,
            "device_bytes": int(p.estimate.device_bytes), "peak_bytes": int(p.estimate.peak_bytes),
            "cpu_bytes": int(p.estimate.cpu_bytes), "nvme_bytes": int(p.estimate.nvme_bytes),
            "step_seconds": t.total, "tokens_per_s": p.tokens_per_s, "epoch_seconds": p.epoch_s,
            "time": {"compute": t.compute, "launch": t.launch, "dequant": t.dequant, "comm": t.comm,
                     "offload_fetch": t.offload_fetch, "exposed": t.exposed, "optimizer": t.optimizer},
            "why": p.notes}


def _duration(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:,.1f} d"
    if s >= 3600:
        return f"{s / 3600:,.1f} h"
    if s >= 60:
        return f"{s / 60:,.1f} min"
    return f"{s:,.1f} s"


def render_plans(console, name: str, req, plans: list, n_fit: int) -> None:
    from rich.table import Table

    g = req.gpu
    t = Table(title=f"Plans for {name} on {req.nodes} node(s) x {req.gpus} {g.name} "
                    f"({g.memory_bytes / 2**30:,.1f} GiB, {req.budget / 2**30:,.1f} GiB usable "
                    f"at margin {req.margin:g}), "
                    f"{req.seq_len} tokens per sequence"
                    + (f", global batch {req.global_batch}" if req.global_batch else ""), title_justify="left")
    for c in ("#", "method", "strategy", "offload", "micro x accum", "ckpt", "GiB/GPU", "host GiB", "tokens/s",
              "step", "epoch"):
        t.add_column(c, justify="left" if c in ("method", "strategy", "offload") else "right", no_wrap=True)
    for i, p in enumerate(plans, 1):
        st = p.settings
        method = p.method if p.method == "full" else f"{p.method} r{st.lora_rank}"
        t.add_row(str(i), method, st.strategy, st.offload, f"{st.batch_size} x {p.accumulation}",
                  "yes" if st.grad_checkpointing else "no", f"{p.estimate.device_bytes / 2**30:,.1f}",
                  f"{p.estimate.cpu_bytes / 2**30:,.0f}" if p.estimate.cpu_bytes else "-",
                  f"{p.tokens_per_s:,.0f}", _duration(p.time.total), _duration(p.epoch_s),
                  style="bold" if i == 1 else None)
    console.print(t)
    for i, p in enumerate(plans, 1):
        console.print(f"[bold]{i}.[/] " + "; ".join(p.notes))
    console.print(f"{n_fit} plans fit. Speed is a model, not a measurement: {g.peak_tflops:,.0f} dense 16-bit TFLOPs "
                  f"at an assumed MFU of {req.mfu:.0%} (--mfu), kernel launches, collectives over "
                  f"{g.link_gbs:,.0f} GB/s per GPU" + (" and a 50 GB/s-per-GPU network" if req.nodes > 1 else "")
                  + f", offload over PCIe ({g.pcie_gbs:,.0f} GB/s); epoch = {req.samples:,} sequences (--samples). "
                  "Memory per GPU is plan estimate's device figure.", style="dim")


def render_gpus(console, cat: list, found: list, note: str) -> None:
    from rich.table import Table

    t = Table(title="GPU catalog (tables/gpus.csv): dense tensor TFLOPs, memory as NVML reports it",
              title_justify="left")
    for c in ("name", "memory GiB", "bf16", "fp16", "fp8", "HBM GB/s", "interconnect", "GPU link GB/s", "PCIe GB/s"):
        t.add_column(c, justify="left" if c in ("name", "interconnect") else "right", no_wrap=c != "interconnect")
    for g in cat:
        t.add_row(g.name, f"{g.memory_bytes / 2**30:,.1f}", f"{g.bf16_tflops:,.0f}" if g.bf16_tflops else "-",
                  f"{g.fp16_tflops:,.0f}", f"{g.fp8_tflops:,.0f}" if g.fp8_tflops else "-", f"{g.mem_bw_gbs:,.0f}",
                  g.interconnect, f"{g.nvlink_gbs:,.0f}" if g.nvlink_gbs else "-", f"{g.pcie_gbs:,.0f}")
    console.print(t)
    if found:
        lt = Table(title="GPUs on this machine (NVML)", title_justify="left")
        for c in ("index", "name", "memory GiB", "catalog entry"):
            lt.add_column(c)
        from .gpus import GPUError, lookup
        for d in found:
            try:
                entry = lookup(d["name"]).name
            except GPUError:
                entry = "not in the catalog: memory only"
            lt.add_row(str(d["index"]), d["name"], f"{d['memory_bytes'] / 2**30:,.1f}", entry)
        console.print(lt)
    else:
        console.print(f"This machine: {note}. Name a GPU with --gpu instead of auto.")
