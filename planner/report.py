"""Turning estimates into the contract's JSON and into rich tables."""

from __future__ import annotations

import textwrap

from .contract import COMPONENTS, DERIVED_NOTE, UNMEASURED_FUSED, Settings, loss_unmeasured, precision_validation
from .estimate import Estimate
from .speed import OFFLOAD_LINK_EFFICIENCY

ROUTE_METHOD = {"formula": "analytic", "derived": "derived", "simulated": "simulated"}
"""The route that gave a figure -> the contract's `method` (shared/CONTRACT.md)."""


def to_json(name: str, arch: str, st: Settings, est: Estimate, method: str | None = None) -> dict:
    """The contract's object (shared/CONTRACT.md), keys in its order, then `route`: formula,
    derived or simulated (`method` as the contract spells it: analytic, derived, simulated)."""
    route = "simulated" if method == "simulated" else est.route
    return {
        "model": name, "architecture": arch,
        "params": int(est.params), "trainable_params": int(est.trainable_params),
        "precision": st.precision, "optimizer": st.optimizer, "batch_size": st.batch_size, "seq_len": st.seq_len,
        "peak_bytes": int(est.peak_bytes), "device_bytes": int(est.device_bytes),
        "components": {k: int(v) for k, v in est.components.items()},
        "phases": {k: int(est.phases[k]) for k in ("model", "forward", "backward", "optimizer_step")},
        "cpu_bytes": int(est.cpu_bytes), "nvme_bytes": int(est.nvme_bytes),
        "method": ROUTE_METHOD[route],
        "route": route,  # after the contract's keys: formula, derived or simulated
        "needed_bytes": int(est.needed_bytes),  # the least GPU memory the step runs in
        "peak_phase": max(est.phases, key=est.phases.get),  # the phase `components` are those of
        "phase_components": {ph: {k: int(est.phase_components[ph].get(k, 0)) for k in COMPONENTS} for ph in est.phases},
        **options_json(st),
        "notes": list(est.notes),
    }


def options_json(st: Settings) -> dict:
    """Every option the estimate was made with, echoed (keys beside the contract's, named as the
    options are; None where an option does not apply: LoRA's without LoRA, FSDP's version
    outside FSDP)."""
    lora = st.lora
    return {
        "strategy": st.strategy, "offload": st.offload, "gpus": st.gpus, "nodes": st.nodes,
        "fsdp_version": st.fsdp_version if st.strategy.startswith("fsdp") else None,
        "lora_rank": st.lora_rank,
        "lora_alpha": (st.lora_alpha if st.lora_alpha is not None else 2.0 * st.lora_rank) if lora else None,
        "lora_dropout": st.lora_dropout if lora else None, "lora_targets": st.lora_targets if lora else None,
        "quant": st.quant, "grad_checkpointing": st.grad_checkpointing, "attn": st.attn,
        "gradient_accumulation": st.accumulation, "kernels": st.kernels,
        "optimizer_paged": st.optimizer_paged,
        **loss_json(st),
        "unfrozen_parameters": list(st.unfrozen_parameters) or None,  # partial freezing; None: every parameter trains
        "ema": st.ema,  # an EMA copy of the trainable parameters is counted (in weights)
        "lbfgs_history": st.lbfgs_history if st.optimizer == "lbfgs" else None,
        "activation_offload": st.activation_offload,  # saved activations in pinned host RAM (cpu_bytes)
        "precision_validation": precision_validation(st.precision),  # fp8-te and MS-AMP: unmeasured, and why
    }


def loss_json(st: Settings) -> dict:
    """The loss option echoed (keys beside the contract's): the loss, its chunks where chunked,
    and whether its formula is measured here."""
    return {"loss": st.loss, "loss_chunks": st.loss_chunks if st.loss == "chunked" else None,
            "loss_validation": UNMEASURED_FUSED if loss_unmeasured(st) else "measured"}


def loss_label(st: Settings) -> str:
    """`, loss chunked (8 chunks)` for a table's title; empty for the standard loss."""
    if st.loss == "standard":
        return ""
    return f", loss {st.loss}" + (f" ({st.loss_chunks} chunks)" if st.loss == "chunked" else "")


def gib(n: float) -> str:
    """Binary units, labelled honestly."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n)} B"


def num(n: float, places: int = 2) -> str:
    """Bytes as GiB, the unit in the column's header: `29.92`."""
    return f"{n / 2**30:,.{places}f}"


def _measure(console, table) -> int:
    """The width `table` needs with nothing wrapped."""
    from rich.measure import Measurement
    return Measurement.get(console, console.options.update_width(100_000), table).maximum


def _grid(cols: list, rows: list, styles: list, no_wrap: bool = True):
    from rich.table import Table
    t = Table()
    for head, justify, *wrap in cols:
        t.add_column(head, justify=justify, no_wrap=no_wrap and not wrap, overflow="fold")
    for row, style in zip(rows, styles, strict=True):
        t.add_row(*row, style=style)
    return t


def show(console, title: str, cols: list, rows: list, styles: list | None = None, key: int = 1) -> None:
    """`title`, then the table: `cols` are (header, justify), `rows` lists of cells (rich markup),
    the first `key` columns name a row; a column (header, justify, True) may wrap at its spaces.
    At its natural width when the console is that wide;
    else transposed (a column per row) when that fits; else split into tables of the columns that
    fit, each repeating the key columns; else one block per row. Nothing is cut: a number, a
    header or a title is never shortened to `…`."""
    from rich.table import Table
    from rich.text import Text
    styles = list(styles or [None] * len(rows))
    width = console.width
    if title:
        console.print(Text(title, style="italic"), overflow="fold")
    natural = _grid(cols, rows, styles)
    if _measure(console, natural) <= width:
        console.print(natural)
        return
    if any(wrap for _, _, *wrap in cols):
        from rich.measure import Measurement
        if Measurement.get(console, console.options.update_width(100_000), natural).minimum <= width:
            console.print(natural)
            return
    # transposed: a column for each row, named by its key cells
    tcols = [(" ".join(h for h, *_ in cols[:key]).replace("\n", " "), "left")] + [
        (" ".join(r[:key]), "right") for r in rows]
    trows = [[head.replace("\n", " ")] + [r[j] for r in rows] for j, (head, *_) in enumerate(cols) if j >= key]
    transposed = _grid(tcols, trows, [None] * len(trows))
    for i, style in enumerate(styles):
        if style:
            transposed.columns[i + 1].header_style = style
            transposed.columns[i + 1].style = style
    if _measure(console, transposed) <= width:
        console.print(transposed)
        return
    # split: the key columns, then as many of the others as fit, table after table
    chunks, current = [], []
    for j in range(key, len(cols)):
        trial = current + [j]
        part = _grid([cols[i] for i in list(range(key)) + trial], [r[:key] + [r[i] for i in trial] for r in rows],
                     styles)
        if current and _measure(console, part) > width:
            chunks.append(current)
            trial = [j]
        current = trial
    chunks.append(current)
    parts = [_grid([cols[i] for i in list(range(key)) + c], [r[:key] + [r[i] for i in c] for r in rows], styles)
             for c in chunks]
    if all(_measure(console, part) <= width for part in parts):
        for part in parts:
            console.print(part)
        return
    # one block per row: each header beside its value, values folded if they must be
    for row, style in zip(rows, styles, strict=True):
        block = Table(box=None, show_header=False, padding=(0, 1))
        block.add_column(no_wrap=False, overflow="fold", style="bold")
        block.add_column(no_wrap=False, overflow="fold")
        for (head, *_), cell in zip(cols, row, strict=True):
            block.add_row(head.replace("\n", " "), cell, style=style)
        console.print(block)
        console.print()


PHASE_LABEL = {"model": "model", "forward": "forward", "backward": "backward", "optimizer_step": "opt step"}
"""A phase as the per-precision table names where the peak is."""


def peak_summary(est: Estimate) -> dict:
    """What the per-precision table shows of an estimate: the peak and its phase; weights,
    gradients and optimizer states, each the most it holds in any phase; activations and logits
    together, at their largest (in the forward or the backward). The peak phase's own components
    are the JSON's `components`, and the phase table shows every phase's."""
    rows = [{k: r.get(k, 0) for k in COMPONENTS} for r in est.phase_components.values()]
    return {"peak": est.peak_bytes, "phase": max(est.phases, key=est.phases.get),
            "weights": max(r["weights"] for r in rows), "gradients": max(r["gradients"] for r in rows),
            "optimizer": max(r["optimizer"] for r in rows),
            "activations_logits": max(r["activations"] + r["logits"] for r in rows), "device": est.device_bytes}


def render(console, name: str, arch: str, rows: list[tuple[Settings, Estimate]], chosen: int,
           fits: list | None = None, bf16: str | None = None) -> None:
    """The parameter table; a row per precision (`chosen` bold: the one `--dtype bf16` means,
    `bf16`, when several are shown); the catalog GPUs each fits on (`fits`, a list of GPUs per
    row); the chosen row's phases by component."""
    st0, est0 = rows[chosen]
    pc = est0.param_counts
    counts = []
    for k, v in (pc.as_dict() if pc else {"total": est0.params}).items():
        if k in ("tied_embeddings",):
            counts.append(["tied embeddings", "yes" if v else "no"])
        elif k == "buffers_bytes":
            counts.append(["buffers", gib(v)])
        else:
            counts.append([k.replace("_", " "), f"{v:,}"])
    show(console, f"{name} ({arch}): {est0.params:,} parameters, {est0.trainable_params:,} trainable; "
                  f"route: {est0.route}",
         [("part", "left"), ("parameters", "right")], counts)

    title = (f"Training memory per GPU, GiB: batch {st0.batch_size} x {st0.seq_len} tokens, {st0.optimizer}"
             + (f", LoRA r={st0.lora_rank}" if st0.lora else "")
             + (f", {st0.quant} base" if st0.quant != "none" else "")
             + (", grad checkpointing" if st0.grad_checkpointing else "")
             + loss_label(st0)
             + (f"; {st0.strategy}" + (f" (FSDP{st0.fsdp_version})" if st0.strategy.startswith("fsdp") else "")
                + (f", offload {st0.offload}" if st0.offload != "none" else "")
                + f" over {st0.nodes} node(s) x {st0.gpus} GPU(s)"
                if st0.gpus * st0.nodes > 1 or st0.strategy != "ddp" else ""))
    cols = [("precision", "left"), ("peak\nGiB", "right"), ("peak\nin", "left")] + [(c, "right") for c in (
        "weights\nGiB", "grads\nGiB", "states\nGiB", "act.+logits\nGiB", "device\nGiB")]
    table = []
    for st, est in rows:
        s = peak_summary(est)
        table.append([st.precision, num(s["peak"]), PHASE_LABEL[s["phase"]], num(s["weights"]), num(s["gradients"]),
                      num(s["optimizer"]), num(s["activations_logits"]), num(s["device"])])
    show(console, title, cols, table, ["bold" if i == chosen and len(rows) > 1 else None for i in range(len(rows))])
    console.print("peak: the most live memory (torch.cuda.max_memory_allocated) and the phase it is in; weights, "
                  "grads, states (optimizer): the most each holds in any phase; act.+logits: activations and "
                  "logits together at their largest, in the forward or the backward; device: NVML's figure on a "
                  "roomy GPU (CUDA context and allocator reserve)."
                  + (f" Bold: --dtype bf16, which is {bf16} here (README, Options)." if bf16 else ""), style="dim")
    if fits is not None:
        world = st0.gpus * st0.nodes
        console.print("fits on (catalog GPUs with tensor cores for the precision, recommend's margins kept free"
                      + (f"; each of the {world} GPUs" if world > 1 else "") + "):")
        for (st, est), gpus in zip(rows, fits, strict=True):
            names = ", ".join(g.name for g in gpus) if gpus else "none in the catalog"
            line = f"{st.precision} (needs {num(est.needed_bytes, 1)} GiB): {names}"
            console.print(textwrap.fill(line, max(console.width - 1, 40), initial_indent="  ",
                                        subsequent_indent="      ", break_on_hyphens=False), highlight=False)

    comps = COMPONENTS
    peak_phase = max(est0.phases, key=est0.phases.get)
    table = []
    for ph in ("model", "forward", "backward", "optimizer_step"):
        pcomp = est0.phase_components[ph]
        table.append([ph.replace("_", " ")] + [num(pcomp.get(k, 0)) if pcomp.get(k, 0) else "-" for k in comps]
                     + [num(est0.phases[ph])])
    show(console, f"{st0.precision}: peak of each phase, by component, GiB",
         [("phase", "left")] + [(c, "right") for c in comps + ("total",)], table,
         ["bold" if ph == peak_phase else None for ph in ("model", "forward", "backward", "optimizer_step")])
    if est0.cpu_bytes or est0.nvme_bytes:
        console.print(f"host RAM per node: {gib(est0.cpu_bytes)}"
                      + (f"; NVMe per node: {gib(est0.nvme_bytes)}" if est0.nvme_bytes else ""))
    for n in est0.notes:
        console.print(f"note: {n}")
    console.print("peak = live tensors and cuBLAS workspace (torch.cuda.max_memory_allocated); device adds the "
                  "CUDA context and allocator reserve (see README); both GiB.", style="dim")


# GPU memory sizes the comparison marks fit against (GiB as NVML reports total memory, rounded
# down): 24 GB cards (RTX 4090, A10G, L4), A100-40GB, 80 GB cards (A100-80GB, H100)
FIT_SIZES = (24, 40, 80)


def render_strategies(console, name: str, arch: str, rows: list, skipped: list) -> None:
    """Strategies side by side: per-GPU memory (model states, activations and logits, engine
    buffers), what each host and NVMe hold, and the common GPU sizes the device figure fits."""
    st0, est0 = rows[0]
    world = st0.gpus * st0.nodes
    title = (f"GiB per GPU and per node: {name} ({arch}), {est0.params / 1e9:,.2f}B params, "
             f"{st0.nodes} node(s) x {st0.gpus} GPU(s), "
             f"{st0.precision}, {st0.batch_size} x {st0.seq_len} tokens per GPU, {st0.optimizer}"
             + (f", LoRA r={st0.lora_rank}" if st0.lora else "")
             + (", checkpointing" if st0.grad_checkpointing else ""))
    cols = [(c, "left" if c in ("strategy", "offload", "fits\n(GiB)") else "right")
            for c in ("strategy", "offload", "states", "activ.", "buffers", "device", "host/node", "NVMe/node",
                      "fits\n(GiB)")]

    def g(n: float) -> str:
        return f"{n / 2**30:,.1f}" if n else "-"

    best = min(est.device_bytes for _, est in rows)
    table = []
    for st, est in rows:
        c = est.components
        fits = [str(size) for size in FIT_SIZES if est.needed_bytes <= size * 2**30]
        table.append([st.strategy, st.offload, g(c["weights"] + c["gradients"] + c["optimizer"]),
                      g(c["activations"] + c["logits"]), g(c["other"]), g(est.device_bytes), g(est.cpu_bytes),
                      g(est.nvme_bytes), f"[green]{' '.join(fits)}[/]" if fits else "[red]none[/]"])
    show(console, title, cols, table, ["bold" if est.device_bytes == best else None for _, est in rows], key=2)
    console.print(f"Per GPU at each strategy's peak phase ({world} GPUs in all): states = weights, gradients and "
                  f"optimizer state; buffers = gathered units, reduce-scatter and DDP buckets, optimizer temporaries; "
                  f"device: NVML's figure on a roomy GPU (CUDA context and the allocator's slack). fits: which of "
                  f"{', '.join(map(str, FIT_SIZES))} GiB GPUs it runs in (peak, unreturnable pages, context). "
                  f"Bold: the least GPU memory.", style="dim")
    for line in skipped:
        console.print(f"not offered: {line}", style="dim")


TECHNIQUE_TAG = {"8-bit optimizer state": "8bit", "fused linear cross-entropy": "flce", "activation offload": "aoff"}
"""A plan's memory techniques (planner/recommend.py: TECHNIQUES) in the plans table's method column."""


def plan_json(p) -> dict:
    """One recommended plan: its settings, the estimate (contract object) and the step-time model."""
    st, t = p.settings, p.time
    return {"method": p.method, "strategy": st.strategy, "offload": st.offload, "precision": st.precision,
            "lora_rank": st.lora_rank, "lora_alpha": st.lora_alpha, "quant": st.quant,
            "micro_batch": st.batch_size, "gradient_accumulation": p.accumulation, "global_batch": p.global_batch,
            "largest_micro_batch": p.largest_micro, "seq_len": st.seq_len,
            "grad_checkpointing": st.grad_checkpointing, "gpus": st.gpus, "nodes": st.nodes,
            "optimizer": st.optimizer, "optimizer_paged": st.optimizer_paged, "techniques": list(p.techniques),
            **loss_json(st), "unfrozen_parameters": list(st.unfrozen_parameters) or None, "ema": st.ema,
            **({"lbfgs_history": st.lbfgs_history} if st.optimizer == "lbfgs" else {}),
            "device_bytes": int(p.estimate.device_bytes), "peak_bytes": int(p.estimate.peak_bytes),
            "needed_bytes": int(p.estimate.needed_bytes),
            "cpu_bytes": int(p.estimate.cpu_bytes), "nvme_bytes": int(p.estimate.nvme_bytes),
            "step_seconds": t.total, "tokens_per_s": p.tokens_per_s, "epoch_seconds": p.epoch_s,
            "time": {"compute": t.compute, "launch": t.launch, "dequant": t.dequant, "comm": t.comm,
                     "offload_fetch": t.offload_fetch, "exposed": t.exposed, "optimizer": t.optimizer},
            "why": p.notes, "route": p.estimate.route}


def _duration(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:,.1f} d"
    if s >= 3600:
        return f"{s / 3600:,.1f} h"
    if s >= 60:
        return f"{s / 60:,.1f} min"
    return f"{s:,.1f} s"


def render_plans(console, name: str, req, plans: list, n_fit: int, notes: list[str] | None = None) -> None:
    """recommend's table, its plans' reasons and the model's assumptions; an NVMe column when a
    plan offloads to NVMe; `notes`: what the command chose for the user (defaults)."""
    g = req.gpu
    title = (f"Plans for {name} on {req.nodes} node(s) x {req.gpus} {g.name} "
             f"({g.memory_bytes / 2**30:,.1f} GiB, "
             + (f"{req.margin:.0%} kept free), " if req.margin is not None else
                "margins from GPU measurements), ")
             + f"{req.seq_len} tokens per sequence"
             + (f", global batch {req.global_batch}" if req.global_batch else "")
             + (f", host RAM {req.host_ram_bytes / 2**30:,.0f} GiB per node" if req.host_ram_bytes is not None else ""))
    nvme = any(p.estimate.nvme_bytes for p in plans)
    names = ["#", "method", "strategy", "offload", "micro\nx accum", "ckpt", "GiB\n/GPU", "host\nGiB"] \
        + (["NVMe\nGiB"] if nvme else []) + ["tokens/s", "step", "epoch"]
    cols = [(c, "left" if c in ("method", "strategy", "offload") else "right") for c in names]
    table = []
    for i, p in enumerate(plans, 1):
        st = p.settings
        full = "partial" if st.unfrozen_parameters else "full"  # only --unfrozen-parameters train
        method = (full if p.method == "full" else f"{p.method} r{st.lora_rank}") + \
            "".join(f" +{TECHNIQUE_TAG[t]}" for t in p.techniques) + (" +ema" if st.ema else "")
        row = [str(i), method, st.strategy, st.offload, f"{st.batch_size} x {p.accumulation}",
               "yes" if st.grad_checkpointing else "no", f"{p.estimate.needed_bytes / 2**30:,.1f}",
               f"{p.estimate.cpu_bytes / 2**30:,.0f}" if p.estimate.cpu_bytes else "-"]
        if nvme:
            row.append(f"{p.estimate.nvme_bytes / 2**30:,.0f}" if p.estimate.nvme_bytes else "-")
        table.append(row + [f"{p.tokens_per_s:,.0f}", _duration(p.time.total), _duration(p.epoch_s)])
    show(console, title, cols, table, ["bold" if i == 0 else None for i in range(len(plans))])
    for i, p in enumerate(plans, 1):
        console.print(f"[bold]{i}.[/] " + "; ".join(p.notes))
    for n in notes or []:
        console.print(n, style="dim")
    console.print(f"{n_fit} plans fit. Speed is a model, not a measurement: {g.peak_tflops:,.0f} dense 16-bit TFLOPs "
                  f"at an assumed MFU of {req.mfu:.0%} (--mfu), kernel launches, collectives over "
                  f"{g.link_gbs:,.0f} GB/s per GPU" + (" and a 50 GB/s-per-GPU network" if req.nodes > 1 else "")
                  + f", offload over PCIe at {OFFLOAD_LINK_EFFICIENCY:.0%} of its {g.pcie_gbs:,.0f} GB/s, not "
                  f"overlapped; epoch = {req.samples:,} sequences (--samples). "
                  "GiB/GPU is what the step needs to run (its peak, the allocator's unreturnable pages, the CUDA "
                  "context); NVML shows more where memory is plentiful (plan estimate's device figure)"
                  + ("; host and NVMe GiB are per node." if nvme else "; host GiB is per node.")
                  + (f" Route: {plans[0].estimate.route}." if plans else ""), style="dim")
    if plans and plans[0].estimate.route == "derived":
        console.print(f"{DERIVED_NOTE} (sharded plans by the sharding formulas over them; QLoRA, its NF4 base "
                      "run through bitsandbytes' own modules, on one GPU or DDP)", style="dim")


def render_gpus(console, cat: list, found: list, note: str) -> None:
    cols = [(c, "left" if c in ("name", "interconnect") else "right")
            for c in ("name", "memory\nGiB", "bf16", "fp16", "fp8", "HBM\nGB/s", "GPU link\nGB/s", "PCIe\nGB/s",
                      "interconnect")]
    table = [[g.name, f"{g.memory_bytes / 2**30:,.1f}", f"{g.bf16_tflops:,.0f}" if g.bf16_tflops else "-",
              f"{g.fp16_tflops:,.0f}", f"{g.fp8_tflops:,.0f}" if g.fp8_tflops else "-", f"{g.mem_bw_gbs:,.0f}",
              f"{g.nvlink_gbs:,.0f}" if g.nvlink_gbs else "-", f"{g.pcie_gbs:,.0f}", g.interconnect] for g in cat]
    show(console, "GPU catalog (tables/gpus.csv): dense tensor TFLOPs, memory as NVML reports it", cols, table)
    if found:
        local = []
        from .gpus import GPUError, lookup
        for d in found:
            try:
                entry = lookup(d["name"]).name
            except GPUError:
                entry = "not in the catalog: memory only"
            local.append([str(d["index"]), d["name"], f"{d['memory_bytes'] / 2**30:,.1f}", entry])
        show(console, "GPUs on this machine (NVML)",
             [("index", "right"), ("name", "left"), ("memory GiB", "right"), ("catalog entry", "left")], local)
    else:
        console.print(f"This machine: {note}. Name a GPU with --gpu instead of auto.")


def params_short(n: int) -> str:
    """A parameter count as the model cards write it: `8.19B`, `596M`."""
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.0f}M"


def render_models(console, rows: list[dict], total: int, query: str) -> None:
    """`plan models`: id, model_type and parameters per entry; the source column where the
    terminal is wide enough for it, else the one rule every entry's source follows (and any
    entry that does not)."""
    from .resolve import hub_source
    title = (f"Model catalog (tables/models.json): {total} configs" if not query
             else f"Model catalog (tables/models.json): {len(rows)} of {total} configs match '{query}'")
    cols = [("id", "left"), ("model_type", "left"), ("params", "right")]
    table = [[r["id"], r["model_type"], params_short(r["params"])] for r in rows]
    wide = _grid(cols + [("source", "left")], [t + [r["source"]] for t, r in zip(table, rows, strict=True)],
                 [None] * len(rows))
    if _measure(console, wide) <= console.width:
        if title:
            from rich.text import Text
            console.print(Text(title, style="italic"), overflow="fold")
        console.print(wide)
    else:
        show(console, title, cols, table)
        console.print("source: https://huggingface.co/<id>/blob/main/config.json", style="dim")
        for r in rows:
            if r["source"] != hub_source(r["id"]):
                console.print(f"source of {r['id']}: {r['source']}", style="dim")
    console.print("params: of the model plan trains (of a multimodal repo, its text model).", style="dim")
    console.print("--json adds each entry's aliases and its published parameter figure.", style="dim")
