"""What a training run measures about its memory, and the report against the plan's prediction.

- On a GPU: `torch.cuda.max_memory_allocated` per phase of the measured optimizer step (what
  the estimate's `peak_bytes` predicts), `max_memory_reserved`, and a background NVML sampler
  of this process's memory (what `device_bytes` predicts), over the whole run.
- On CPU: torch's MemTracker over the measured step (live tensor bytes per phase and per
  category: parameters, gradients, optimizer state, activations) and the process's peak RSS.

The measured step is an optimizer step after the first (optimizer state exists, as the
estimate assumes): its micro-steps' forward and backward, and the optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import os

GIB = 2**30


def peak_rss() -> int:
    """The process's peak resident set (Linux VmHWM; getrusage elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    """Measures one optimizer step in detail (`step_window`), and the run as a whole."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.notes: list[str] = []
        self.nvml = None
        self.phases: dict = {}
        self.categories: dict = {}
        self.step_start = 0
        self.reserved = 0
        self.state_bytes: int | None = None  # the optimizer's state after the measured step (CPU)
        if cuda:
            try:
                from planner.gpus import NvmlSampler
                self.nvml = NvmlSampler(int(os.environ.get("LOCAL_RANK", 0))).start()
            except Exception as e:  # no NVML library or no permission: allocator stats only
                self.notes.append(f"NVML not measured ({type(e).__name__}: {e})")

    @contextlib.contextmanager
    def step_window(self, model, optimizer, *extra):
        """Around one optimizer step; yields `snap(phase)`, to be called after each forward,
        backward and the optimizer step. Phases seen several times (micro-steps) keep their max.
        `extra`: other modules alive through the step (the EMA copy), counted on CPU too."""
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step_start = torch.cuda.memory_allocated()

            def snap(phase):
                torch.cuda.synchronize()
                self.phases[phase] = max(self.phases.get(phase, 0), torch.cuda.max_memory_allocated())
                self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())
                torch.cuda.reset_peak_memory_stats()
            yield snap
            return
        from planner.measure.tracker import PhaseRecorder, Tracker
        tracker = Tracker()
        tracker.track_external(model, optimizer, *extra)
        with tracker:
            cur = tracker.get_tracker_snapshot("current")
            self.step_start = int(sum(v["Total"] for v in cur.values()))
            # micro-steps call a module's forward again: MemTracker's module state is reset after each backward
            yield PhaseRecorder(tracker, reset_modules_after=("backward",), phases=self.phases,
                                categories=self.categories)
        self.state_bytes = optimizer_state_bytes(optimizer)

    def discard(self) -> None:
        """Forget a step window that did not finish (an out-of-memory error; the step is retried)."""
        self.phases.clear()
        self.categories.clear()
        self.reserved = 0

    def result(self, final: bool = False) -> dict:
        """The measured figures (bytes), for run_report.json."""
        out = {"phases": dict(self.phases), "peak_bytes": max(self.phases.values()) if self.phases else 0,
               "step_start_bytes": int(self.step_start), "host_peak_rss_bytes": peak_rss()}
        if self.phases:
            peak_phase = max(self.phases, key=self.phases.get)
            out["peak_phase"] = peak_phase
            if self.categories:
                comps = dict(self.categories[peak_phase])
                comps["activations"] = comps.get("activations", 0) + comps.pop("logits", 0)
                out["components"] = as_estimated(comps, self.state_bytes)
        if self.cuda:
            import torch
            out["source"] = "cuda-allocator"
            out["max_memory_reserved_bytes"] = int(self.reserved)
            out["run_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            if self.nvml is not None:
                out["nvml_peak_bytes"] = int(self.nvml.stop() if final else max(self.nvml.peak, self.nvml.sample()))
                out["nvml_method"] = self.nvml.method
        else:
            out["source"] = "memtracker-cpu"
        return out


def optimizer_state_bytes(opt) -> int:
    """The bytes of the tensors the optimizer keeps between steps (its `state`; each storage once).
    Under FSDP2 the state is DTensors: this rank's shard (`to_local()`) is what it holds."""
    import torch
    from torch.distributed.tensor import DTensor
    inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    seen, total = set(), 0
    for state in inner.state.values():
        for v in state.values():
            if isinstance(v, DTensor):
                v = v.to_local()
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    return total


def as_estimated(comps: dict, state_bytes: int | None) -> dict:
    """Measured components filed as the estimate files them. MemTracker files every tensor
    created inside `optimizer.step()` as optimizer state (`Optstate`), the foreach AdamW's
    temporary copy of the whole group included; the estimate counts only the state the
    optimizer keeps as `optimizer`, and the step's temporaries (planner/memory.py `opt_temp`) as
    `other`. What the tracker files as optimizer state beyond the state kept is moved to `other`."""
    if state_bytes is None or comps.get("optimizer", 0) <= state_bytes:
        return comps
    out = dict(comps)
    out["other"] = out.get("other", 0) + out["optimizer"] - state_bytes
    out["optimizer"] = state_bytes
    return out


def has_formula(model) -> bool:
    """Whether the model's architecture has a hand-written formula (planner/spec.py), not the
    derived route."""
    from planner.spec import ModelSpec, SpecError
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        ModelSpec.from_config(base.config.to_dict())
    except SpecError:
        return False
    return True


def model_spec(config):
    """The spec a transformers config is predicted with, as the commands plan it: the formulas'
    (every key of the config), else the derived route's (planner/measure/derived.py) from the
    keys that differ from the class's defaults, what `save_pretrained` writes in config.json:
    the derived route's cache is keyed by the config, so a run finds the coefficients its plan
    derived from that file. Raises SpecError or PlanError when neither can."""
    from planner.measure.derived import proxy_spec
    from planner.spec import ModelSpec, UnsupportedArchitecture
    try:
        return ModelSpec.from_config(config.to_dict())
    except UnsupportedArchitecture:
        return proxy_spec(config.to_diff_dict())


def predict(recipe, config, batch: int, seq: int, world: int, cuda: bool,
            accumulation: int | None = None, attention_mask: bool = True,
            head_tokens: int = 0) -> tuple[dict | None, list]:
    """The estimate for a step of this shape (and accumulation, after an OOM back-off; with or
    without an attention mask, planner.data.attention_masked; the head over `head_tokens`
    labelled positions, or every one), as run_report's `predicted`, and notes; None and the
    reason when there is no estimate."""
    from dataclasses import replace

    from planner.contract import PlanError
    from planner.estimate import estimate
    from planner.recipe import RECIPE_NAMES, settings
    from planner.spec import SpecError

    notes = []
    try:
        spec = model_spec(config)
        st = settings(recipe, world, batch, seq, kernels="cuda" if cuda else "cpu", attention_mask=attention_mask)
        st = replace(st, head_tokens=min(head_tokens, batch * (seq - 1)))
        est = estimate(spec, replace(st, accumulation=accumulation) if accumulation else st)
    except SpecError as e:
        return None, [f"no prediction: {e}"]
    except PlanError as e:
        return None, [f"no prediction: {e.render(RECIPE_NAMES)}"]
    return {"peak_bytes": est.peak_bytes, "device_bytes": est.device_bytes, "components": est.components,
            "phases": est.phases, "batch_size": batch, "seq_len": seq, "notes": est.notes}, notes


def _err(pred: float, meas: float) -> float | None:
    return round(100.0 * (pred - meas) / meas, 2) if meas else None


def compare(predicted: dict, measured: dict) -> list[dict]:
    """Rows of (what, predicted, measured, error %): the components at the peak (CPU), the
    phases, the peak; on a GPU the NVML figure against device_bytes."""
    rows = []
    mc = measured.get("components")
    if mc and not measured.get("ranks_peak_bytes"):
        # MemTracker files some saved activations under Temp/Other, and FSDP's unsharded
        # parameters under weights: activations and temporaries are compared together, and
        # components only for one process
        pc = dict(predicted.get("components", {}))
        merged = lambda c: sum(int(c.get(k, 0)) for k in ("activations", "logits", "other"))  # noqa: E731
        for k in ("weights", "gradients", "optimizer"):
            rows.append({"what": k, "predicted": int(pc.get(k, 0)), "measured": int(mc.get(k, 0)),
                         "error_pct": _err(pc.get(k, 0), mc.get(k, 0))})
        rows.append({"what": "activations + temporaries", "predicted": merged(pc), "measured": merged(mc),
                     "error_pct": _err(merged(pc), merged(mc))})
    for k in ("forward", "backward", "optimizer_step"):
        if k in measured["phases"] and k in predicted.get("phases", {}):
            rows.append({"what": f"phase: {k}", "predicted": int(predicted["phases"][k]),
                         "measured": int(measured["phases"][k]),
                         "error_pct": _err(predicted["phases"][k], measured["phases"][k])})
    rows.append({"what": "total (peak)", "predicted": int(predicted["peak_bytes"]),
                 "measured": int(measured["peak_bytes"]),
                 "error_pct": _err(predicted["peak_bytes"], measured["peak_bytes"])})
    if "nvml_peak_bytes" in measured:
        rows.append({"what": "device (NVML)", "predicted": int(predicted["device_bytes"]),
                     "measured": measured["nvml_peak_bytes"],
                     "error_pct": _err(predicted["device_bytes"], measured["nvml_peak_bytes"])})
    return rows


def worst_rank(measured: dict) -> dict:
    """Under several processes: the measurement of the rank with the highest peak, with every
    rank's peak (a collective: every rank calls it)."""
    from accelerate.utils import gather_object
    ranks = gather_object([measured])
    worst = max(ranks, key=lambda m: m["peak_bytes"])
    worst["ranks_peak_bytes"] = [m["peak_bytes"] for m in ranks]
    return worst


def add_comparison(rep: dict, final: bool, cuda: bool, show: bool = True) -> None:
    """A report's comparison rows and the total's error percentage, into `rep`; the table printed
    on the screen when `show`."""
    from .output import console
    rows = compare(rep["predicted"], rep["measured"])
    rep["comparison"] = rows
    rep["total_error_pct"] = next(r["error_pct"] for r in rows if r["what"] == "total (peak)")
    if not show:
        return
    b, s = rep["measured_step_shape"]
    console().print(table(rows, f"memory per {'GPU' if cuda else 'process'}, predicted against measured "
                                           f"({'end of run' if final else 'measured step'}, micro-batch {b} x {s} "
                                           "tokens)"))


def table(rows: list[dict], title: str):
    from rich.table import Table
    t = Table(title=title)
    for c in ("", "predicted", "measured", "error"):
        t.add_column(c, justify="left" if not c else "right")
    for r in rows:
        e = r["error_pct"]
        style = "bold" if r["what"].startswith("total") else None
        t.add_row(r["what"], f"{r['predicted'] / 2**20:,.1f} MiB", f"{r['measured'] / 2**20:,.1f} MiB",
                  "n/a" if e is None else f"{e:+.1f}%", style=style)
    return t


def write_json(path: str, data: dict) -> None:
    """Atomically: a temporary file, then a rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
