"""What keeps a run going, or stops it cleanly, when a step goes wrong.

- Out of memory: every rank agrees on the error (`agreed_oom`, one all-reduced flag), then the
  micro-batch is halved and the accumulation doubled (`back_off`; accelerate's
  `find_executable_batch_size`, behind HF Trainer's `auto_find_batch_size`, halves the batch
  the same way, but restarts training: here the step is retried in place, with the same
  samples). `split_rows` cuts the loader's batches; `drain_ddp` brings DDP's reducer back to
  rest after an error in its synchronising forward.
- A gradient norm that is not finite: the step is skipped (`gradient_is_usable`).
- The loss watchdog (Axolotl's `loss_watchdog_threshold`/`_patience`) and signals: the run
  stops after the step, with a checkpoint (`stop_reason`).
- Fault injection for the tests (`injected_oom`, `injected_nan_steps`), off unless set.

Everything but `drain_ddp` is plain Python over plain values, tested without processes in
tests/test_trainer_units.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass


class RunStopped(Exception):
    """The run stopped before its last step, on purpose: a signal, the loss watchdog, or an
    out-of-memory error the back-off cannot get under. One line; exit status 1."""


class OutOfMemory(Exception):
    """Every rank agreed that `ranks` of them ran out of memory in this `phase` of the step;
    `recoverable`: the step can be retried in place."""

    def __init__(self, ranks: int, phase: str, recoverable: bool):
        super().__init__(f"out of memory in {phase} on {ranks} rank(s)")
        self.ranks, self.phase, self.recoverable = ranks, phase, recoverable


# ---------------------------------------------------------------- out of memory

def split_rows(batches: list[dict], parts: int) -> list[dict]:
    """Each loader batch cut into `parts` micro-batches of consecutive rows (the OOM back-off's
    smaller micro-batch: the loader, its position and the step's samples stay as they were)."""
    if parts == 1:
        return batches
    out = []
    for b in batches:
        n = b["input_ids"].shape[0]
        size = -(-n // parts)
        out += [{k: v[i:i + size] for k, v in b.items()} for i in range(0, n, size)]
    return out


def agreed_oom(oom: bool, phase: str, ddp: bool, world: int,
               rank_sum: Callable[[float], float]) -> OutOfMemory | None:
    """The error every rank raises when any rank ran out of memory, or None. Ranks agree by one
    all-reduce of a flag (`rank_sum`), where no rank can be inside another collective: always
    with one process and under DDP (whose forward runs no collective: broadcast_buffers is
    off), never under FSDP or DeepSpeed (their forward gathers parameters), where this rank's
    error is not recoverable and stops the run."""
    if not ddp:
        return OutOfMemory(1, phase, recoverable=world == 1) if oom else None
    ranks = int(rank_sum(float(oom)))
    return OutOfMemory(ranks, phase, recoverable=True) if ranks else None


@dataclass(frozen=True)
class BackOff:
    """One back-off: the new split of each loader batch, the event for run_report.json and the
    line for the log."""
    split: int
    event: dict
    message: str


def back_off(e: OutOfMemory, step: int, shape: tuple[int, int], split: int, accumulation: int, world: int,
             enabled: bool, sharding: str) -> BackOff:
    """After an out-of-memory error every rank agreed on, with micro-batches of `shape` (rows,
    tokens): halve the micro-batch and double the accumulation (the global batch and the step's
    samples stay the same). Raises RunStopped when that cannot help: `oom_backoff` is off, the
    error is not recoverable (under `sharding`, FSDP or DeepSpeed), or the micro-batch is one row."""
    rows, seq = shape
    where = f"out of memory in the {e.phase} of step {step} (micro-batch {rows} x {seq} tokens" + \
        (f", {e.ranks} of {world} ranks)" if world > 1 else ")")
    if not enabled:
        raise RunStopped(f"{where}; oom_backoff is off: lower micro_batch_size")
    if not e.recoverable:
        raise RunStopped(f"{where}; under {sharding} with {world} ranks the step cannot be retried in place: "
                         "lower micro_batch_size (plan recommend)")
    if rows == 1:
        raise RunStopped(f"{where}; the micro-batch is 1 row, nothing left to halve: use gradient_checkpointing, "
                         "LoRA, a shorter sequence_len or more GPUs (plan recommend)")
    new_rows = -(-rows // 2)
    event = {"step": step, "phase": e.phase, "ranks": e.ranks, "micro_batch": [rows, new_rows],
             "accumulation": [accumulation, accumulation * 2], "seq_len": seq}
    message = f"{where}: micro-batch {rows} -> {new_rows}, accumulation {accumulation} -> {accumulation * 2} " \
              f"(global batch unchanged); retrying step {step}"
    return BackOff(split * 2, event, message)


def prediction_fields(pred: dict | None, device_total: int | None) -> dict:
    """What a back-off event adds from the estimate for the step that ran out of memory: its
    prediction, and on a GPU by how much at least it was low when it said the step fits."""
    if pred is None:
        return {}
    out = {"predicted_peak_bytes": pred["peak_bytes"], "predicted_device_bytes": pred["device_bytes"]}
    if device_total is not None:
        out["device_total_bytes"] = device_total
        if pred["device_bytes"] < device_total:  # it said this fits; it did not
            out["prediction_low_by_at_least_pct"] = round((device_total / pred["device_bytes"] - 1) * 100, 1)
    return out


def drain_ddp(acc, model, opt, batch: dict, loss) -> None:
    """After an out-of-memory error in DDP's gradient-synchronising forward, bring every rank's
    reducer back to rest so that the step can be retried: the ranks where the forward finished
    expect a backward with its all-reduces. Every rank runs one backward of zero (a rank whose
    forward failed first runs a one-row, 8-token forward), so all take part in the same
    all-reduces; the zero gradients are then dropped."""
    if loss is None:
        tiny = {k: v[:1, :8] if v.dim() > 1 else v[:1] for k, v in batch.items()}
        with acc.autocast():
            loss = model(**tiny).loss
    acc.backward(loss * 0.0)
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- NaN, watchdog, signals

def gradient_is_usable(grad_norm: float | None) -> bool:
    """Step the optimizer unless the gradient norm is not finite (None: DeepSpeed, which clips
    and checks itself). A skipped step is counted, as DeepSpeed and Megatron count theirs."""
    return grad_norm is None or math.isfinite(grad_norm)


def bad_loss_count(loss: float, count: int, threshold: float | None) -> int:
    """The watchdog's count of bad steps in a row after this `loss`: a loss not finite, or above
    `threshold`, counts; any other resets it (Axolotl's loss_watchdog)."""
    bad = not math.isfinite(loss) or (threshold is not None and loss > threshold)
    return count + 1 if bad else 0


def stop_reason(loss: float, step: int, bad_steps: int, signalled: bool, signal_name: str | None,
                threshold: float | None, patience: int) -> str | None:
    """Why the run must stop after this step, the same on every rank (the loss is the mean over
    all ranks; `signalled`: any rank got SIGINT/SIGTERM): a signal, or `patience` bad losses
    in a row (`bad_steps`, from `bad_loss_count`)."""
    if signalled:
        return f"stopped by {signal_name or 'a signal to another rank'} at step {step}; run the same command to resume"
    if bad_steps >= patience:
        what = "not finite" if not math.isfinite(loss) else f"above loss_watchdog_threshold={threshold:g}"
        return f"loss watchdog: the loss was {what} for {bad_steps} steps in a row (step {step}, loss " \
               f"{loss:.4g}); lower learning_rate or check the data, then resume"
    return None


# ---------------------------------------------------------------- fault injection (tests)

def injected_oom(rows: int, rank: int) -> None:
    """PLAN_INJECT_OOM_ROWS=N makes a forward of more than N rows raise torch.OutOfMemoryError,
    on every rank or on PLAN_INJECT_OOM_RANK only."""
    limit = os.environ.get("PLAN_INJECT_OOM_ROWS")
    if limit is None or rows <= int(limit):
        return
    only = os.environ.get("PLAN_INJECT_OOM_RANK")
    if only is None or int(only) == rank:
        import torch
        raise torch.OutOfMemoryError(f"injected: a forward of {rows} rows (PLAN_INJECT_OOM_ROWS={limit})")


def injected_nan_steps() -> set[int]:
    """PLAN_INJECT_NAN_STEPS=3,4 makes those steps' loss NaN."""
    return {int(x) for x in os.environ.get("PLAN_INJECT_NAN_STEPS", "").split(",") if x.strip()}
