"""Turning estimates into the contract's JSON and into rich tables."""

from __future__ import annotations

from .memory import Estimate, Settings


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
              + (f", LoRA r={st0.lora_rank}" if st0.lora else "") + (f", {st0.quant} base" if st0.quant != "none" else "")
              + (", grad checkpointing" if st0.grad_checkpointing else "")
              + (f"; {st0.strategy}" + (f" (FSDP{st0.fsdp_version})" if st0.strategy.startswith("fsdp") else "")
                 + (f", offload {st0.offload}" if st0.offload != "none" else "")
                 + f" over {st0.nodes} node(s) x {st0.gpus} GPU(s)" if st0.gpus * st0.nodes > 1 or st0.strategy != "ddp" else ""),
              title_justify="left")
    for col in ("precision", "weights", "gradients", "optimizer", "activations", "logits", "peak (allocated)", "device (NVML)"):
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
        console.print(f"host RAM per node: {gib(est0.cpu_bytes)}" + (f"; NVMe per node: {gib(est0.nvme_bytes)}" if est0.nvme_bytes else ""))
    for n in est0.notes:
        console.print(f"note: {n}")
    console.print("peak = live tensors (torch.cuda.max_memory_allocated); device adds CUDA context, "
                  "cuBLAS workspaces and allocator reserve (see README).", style="dim")


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
                    + (f", LoRA r={st0.lora_rank}" if st0.lora else "") + (", checkpointing" if st0.grad_checkpointing else ""),
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
                  f"device adds CUDA context and allocator reserve. fits: which of {', '.join(map(str, FIT_SIZES))} GiB "
                  f"GPUs hold it. Bold: the least GPU memory.", style="dim")
    for line in skipped:
        console.print(f"not offered: {line}", style="dim")
