"""What a run carries from step to step (`RunState`), and how it walks the data: the loader's
batches grouped into optimizer steps (`optimizer_steps`).

`RunState` plays the part of torchtune's recipe counters (`epochs_run`, `global_step`) and HF
Trainer's `TrainerState`: the part a checkpoint keeps is written to `trainer_state.json` with
the same keys as before this module existed, so old checkpoints still resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

# trainer_state.json: these keys, in this order (the resume tests read `step`)
CHECKPOINT_KEYS = ("step", "epoch", "batch_in_epoch", "recipe_hash", "world_size", "micro_split", "skipped_steps")


@dataclass
class RunState:
    """One run's counters. Saved in checkpoints: the position (`step`, `epoch`,
    `batch_in_epoch`: loader batches taken in this epoch), `micro_split` (a backed-off
    micro-batch stays backed off) and `skipped_steps`. The rest belongs to this process's run
    (tokens per second count from its start, as before)."""

    step: int = 0  # optimizer steps done (1-based while a step runs)
    epoch: int = 0
    batch_in_epoch: int = 0
    micro_split: int = 1  # each loader batch cut into this many micro-batches (OOM back-off)
    skipped_steps: int = 0  # steps whose gradient norm was not finite (no optimizer step)
    oom_events: list[dict] = field(default_factory=list)  # one per back-off, for run_report.json
    bad_loss_steps: int = 0  # the loss watchdog's count of bad steps in a row
    stop_signal: str | None = None  # SIGINT/SIGTERM received: stop after this step
    tokens: int = 0  # real (not padding) tokens of every rank, this process's run
    label_tokens: int = 0  # tokens the loss was taken over, every rank
    losses: list[float] = field(default_factory=list)
    measured_seconds: float = 0.0  # the step under the memory tracker (slow on CPU), kept out of tokens/s
    measured_tokens: int = 0

    def record_step(self, loss: float, tokens: int) -> None:
        """Count a finished optimizer step's loss (the mean over the ranks) and tokens."""
        self.tokens += tokens
        self.losses.append(loss)

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def mean_loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None

    def checkpoint_fields(self, recipe_hash: str, world_size: int) -> dict:
        """`trainer_state.json`'s content."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "recipe_hash": recipe_hash, "world_size": world_size, "micro_split": self.micro_split,
                "skipped_steps": self.skipped_steps}

    @classmethod
    def from_checkpoint(cls, fields: dict) -> RunState:
        """The state a checkpoint's `trainer_state.json` holds (the last two keys are optional:
        checkpoints written before the OOM back-off lack them)."""
        return cls(step=fields["step"], epoch=fields["epoch"], batch_in_epoch=fields["batch_in_epoch"],
                   micro_split=fields.get("micro_split", 1), skipped_steps=fields.get("skipped_steps", 0))


def optimizer_steps(epoch_batches: Callable[[int, int], Iterable], state: RunState, accumulation: int,
                    total_steps: int) -> Iterator[list]:
    """The loader batches of each optimizer step, `accumulation` at a time, from the position in
    `state` until `state.step` reaches `total_steps`. `epoch_batches(epoch, skip)` gives an
    epoch's batches after its first `skip` (accelerate's `skip_first_batches` on resume).

    Before each yield `state.step` counts the step about to run and `state.batch_in_epoch` the
    batches taken, so a checkpoint written during the step resumes after it. A short group left
    at the end of an epoch is dropped, and the next epoch starts a new group (torchtune's
    recipes and HF Trainer step on whole groups per epoch in the same way)."""
    while state.step < total_steps:
        group: list = []
        for batch in epoch_batches(state.epoch, state.batch_in_epoch):
            group.append(batch)
            state.batch_in_epoch += 1
            if len(group) < accumulation:
                continue
            state.step += 1
            yield group
            group = []
            if state.step >= total_steps:
                return
        state.epoch += 1
        state.batch_in_epoch = 0


def steps_in_epoch(loader_batches: int, world: int, accumulation: int) -> int:
    """Optimizer steps in an epoch: each rank gets its share of the loader's batches (rounded
    up, as accelerate's even_batches pads), grouped by `accumulation`; at least one."""
    return max(1, math.ceil(math.ceil(loader_batches / world) / accumulation))


def steps_in_run(max_steps: int | None, num_epochs: float, per_epoch: int) -> int:
    """`max_steps` when the recipe sets it, else the epochs' steps (HF Trainer's rule)."""
    return max_steps or max(1, math.ceil(num_epochs * per_epoch))


def due(step: int, interval: int | None, total_steps: int) -> bool:
    """Whether an every-`interval`-steps action (evaluation, checkpoint) runs after `step`: not
    after the last step, which the end of the run covers (HF Trainer's `eval_steps`/`save_steps`)."""
    return bool(interval and step % interval == 0 and step < total_steps)
