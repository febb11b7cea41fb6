"""The training loop `plan train` launches: `accelerate launch ... -m trainer RECIPE.yaml`.

One optimizer step is `gradient_accumulation_steps` micro-steps, each a forward and a backward,
then gradient clipping, the optimizer and scheduler steps. The loss is the mean over every
label token of the optimizer step, on every rank (transformers' `num_items_in_batch`), so a
padded or packed micro-batch weighs what its tokens weigh. Gradients are reduced on every
micro-step under FSDP (accelerate's `accumulate()` would keep unsharded gradients), and only
on the last one under DDP (`no_sync`).

Accelerate runs gloo processes on CPU as MULTI_CPU even with an FSDP config; then the model is
sharded here with the plugin accelerate builds from the launcher's environment, through
accelerate's own `fsdp2_prepare_model` (planner.measure.builder.fsdp2_shard).

Outputs in `output_dir`: `metrics.jsonl` (a line per logged step and evaluation),
`checkpoint-N/` every `save_steps` (torch.distributed.checkpoint shards of the trainable
parameters, optimizer, scheduler, RNG, the data position; written to a temporary directory then
renamed), `final/` (the adapter or the model in safetensors, with the tokenizer) and
`run_report.json` (predicted against measured memory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from planner.recipe import RECIPE_NAMES, Recipe, RecipeError, load

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class RunStopped(Exception):
    """The run stopped before its last step, on purpose: a signal, the loss watchdog, or an
    out-of-memory error the back-off cannot get under. One line; exit status 1."""


class _OutOfMemory(Exception):
    """Every rank agreed that `ranks` of them ran out of memory in this `phase` of the step."""

    def __init__(self, ranks: int, phase: str, recoverable: bool):
        super().__init__(f"out of memory in {phase} on {ranks} rank(s)")
        self.ranks, self.phase, self.recoverable = ranks, phase, recoverable


def finite(x: float | None, digits: int = 5) -> float | None:
    """A value for the JSON files: rounded, and None (null) when not finite."""
    return round(x, digits) if x is not None and math.isfinite(x) else None


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


def injected_oom(rows: int, rank: int) -> None:
    """Fault injection for tests, off unless set: PLAN_INJECT_OOM_ROWS=N makes a forward of more
    than N rows raise torch.OutOfMemoryError, on every rank or on PLAN_INJECT_OOM_RANK only."""
    limit = os.environ.get("PLAN_INJECT_OOM_ROWS")
    if limit is None or rows <= int(limit):
        return
    only = os.environ.get("PLAN_INJECT_OOM_RANK")
    if only is None or int(only) == rank:
        import torch
        raise torch.OutOfMemoryError(f"injected: a forward of {rows} rows (PLAN_INJECT_OOM_ROWS={limit})")


def injected_nan_steps() -> set[int]:
    """Fault injection for tests: PLAN_INJECT_NAN_STEPS=3,4 makes those steps' loss NaN."""
    return {int(x) for x in os.environ.get("PLAN_INJECT_NAN_STEPS", "").split(",") if x.strip()}


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def predict(recipe: Recipe, config, batch: int, seq: int, world: int, cuda: bool,
            accumulation: int | None = None) -> tuple[dict | None, list]:
    """The estimate for a step of this shape (and accumulation, after an OOM back-off), as
    run_report's `predicted`, and notes."""
    from dataclasses import replace

    from planner.contract import PlanError
    from planner.estimate import estimate
    from planner.recipe import settings
    from planner.spec import ModelSpec, SpecError

    notes = []
    try:
        spec = ModelSpec.from_config(config.to_dict())
        st = settings(recipe, world, batch, seq, kernels="cuda" if cuda else "cpu")
        est = estimate(spec, replace(st, accumulation=accumulation) if accumulation else st)
    except SpecError as e:
        return None, [f"no prediction: {e}"]
    except PlanError as e:
        return None, [f"no prediction: {e.render(RECIPE_NAMES)}"]
    if recipe.unfrozen_parameters:
        notes.append("unfrozen_parameters: the estimate has no formula for a partly frozen model and counts it "
                     "as full fine-tuning (gradients and optimizer state of every parameter): an upper bound")
    return {"peak_bytes": est.peak_bytes, "device_bytes": est.device_bytes, "components": est.components,
            "phases": est.phases, "batch_size": batch, "seq_len": seq, "notes": est.notes}, notes


def real_tokens(batch: dict) -> int:
    """The tokens of a micro-batch that are not padding; takes out packed rows' `length` (see
    planner.data.Collator), which the model does not accept."""
    length = batch.pop("length", None)
    if length is not None:
        return int(length.sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay on matrices, none on biases and norms (HF Trainer's rule: 1-D parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: `checkpoint-N` directories only exist once renamed from
    their temporary name, and hold `trainer_state.json`, written last before the rename."""
    done = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


class Trainer:
    def __init__(self, recipe: Recipe, recipe_path: str):
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.out = Path(recipe.output_dir)
        self.split = 1  # loader batches cut into this many micro-batches (OOM back-off)
        self.stop_signal: str | None = None
        self.skipped_steps = 0
        self.oom_events: list[dict] = []
        self.inject_nan = injected_nan_steps()

    @property
    def accumulation(self) -> int:
        """Micro-steps per optimizer step: the recipe's, times the OOM back-off's split."""
        return self.recipe.gradient_accumulation_steps * self.split

    # ------------------------------------------------------------ set-up
    def setup(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, set_seed

        from planner.emit import mixed_precision
        from planner.contract import Settings

        from planner import data as D
        from planner.recipe import load_config, precision

        from .model import load_model, load_tokenizer

        r = self.recipe
        self.cuda = torch.cuda.is_available()
        prec = precision(r)
        if not self.cuda and prec.startswith("fp16"):
            raise RecipeError("fp16: true needs a GPU; on CPU use bf16: true or neither")
        mixed = mixed_precision(Settings(precision=prec))
        # DDP without broadcast_buffers: a transformer's buffers (rotary frequencies, position
        # ids) are constants, and a forward free of collectives lets the ranks agree on an
        # out-of-memory error right after it (_agree_oom)
        self.acc = Accelerator(cpu=not self.cuda, mixed_precision=mixed,
                               dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                               kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        acc = self.acc
        set_seed(r.seed)
        self.world = acc.num_processes
        self.main = acc.is_main_process
        self.fsdp_cpu = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" \
            and acc.distributed_type != DistributedType.FSDP
        self.fsdp = self.fsdp_cpu or acc.distributed_type == DistributedType.FSDP
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.ddp = self.world > 1 and not (self.fsdp or self.deepspeed)  # several ranks, replicated model
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)

        self.tok = load_tokenizer(r)
        self.config = load_config(r)
        if not r.datasets:
            raise RecipeError("datasets: the recipe names no dataset to train on")
        fmt = {d.type for d in r.datasets}
        if len(fmt) > 1 and "classification" in fmt:
            raise RecipeError("datasets: classification cannot be mixed with other types")
        self.classify = fmt == {"classification"}
        if self.classify and r.sample_packing:
            raise RecipeError("sample_packing: packing needs causal-LM data, not classification")
        parts, classes, self.data_stats = [], None, {"records": 0, "truncated": 0, "dropped": 0, "skipped_lines": 0}
        for d in r.datasets:
            records, skipped = D.read_records(d.path, skip_bad_lines=r.skip_bad_lines)
            ex = D.tokenize(records, self.tok, d.type, r.sequence_len, d.path, train_on_inputs=r.train_on_inputs,
                            text_field=d.field, label_field=d.label_field, classes=classes)
            classes = ex.classes
            self.data_stats["records"] += len(records)
            self.data_stats["truncated"] += ex.truncated
            self.data_stats["dropped"] += ex.dropped
            self.data_stats["skipped_lines"] += skipped
            parts.append(ex)
        ex = parts[0]
        for p in parts[1:]:
            ex = D.Examples(ex.input_ids + p.input_ids, ex.labels + p.labels, ex.classes, ex.truncated + p.truncated)
        self.classes = ex.classes
        if self.classify:  # the prediction counts the classifier the model gets
            self.config.num_labels = len(self.classes)
        train, val = D.split(ex, r.val_set_size, r.seed)
        train_rows = D.rows(train, r.sequence_len, r.sample_packing)
        val_rows = D.rows(val, r.sequence_len, r.sample_packing) if val is not None else []
        self.data_stats.update(train_examples=len(train), val_examples=len(val) if val is not None else 0,
                               train_rows=len(train_rows))
        collate = D.Collator(self.tok.pad_token_id)
        g = torch.Generator()
        g.manual_seed(r.seed)
        dl = torch.utils.data.DataLoader(train_rows, batch_size=r.micro_batch_size, shuffle=True, collate_fn=collate,
                                         generator=g)
        vdl = torch.utils.data.DataLoader(val_rows, batch_size=r.micro_batch_size, collate_fn=collate) if val_rows else None

        model = load_model(r, num_labels=len(self.classes) if self.classify else None, cuda=self.cuda)
        if self.classify and model.config.pad_token_id is None:
            model.config.pad_token_id = self.tok.pad_token_id
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.fsdp_cpu:
            from accelerate.utils import FullyShardedDataParallelPlugin

            from planner.measure.builder import device_mesh, fsdp2_shard
            replicate = int(os.environ.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1") or 1)
            mesh, names = device_mesh(self.world, replicate)
            model = fsdp2_shard(model, FullyShardedDataParallelPlugin(), mixed, mesh, names)
        from planner.measure.builder import make_optimizer
        try:
            opt = make_optimizer(param_groups(model, r.weight_decay), r.optimizer, lr=r.learning_rate,
                                 weight_decay=r.weight_decay)
        except ValueError as e:
            raise RecipeError(f"optimizer: {e}") from None
        per_rank = math.ceil(len(dl) / self.world)
        self.steps_per_epoch = max(1, math.ceil(per_rank / r.gradient_accumulation_steps))
        self.total_steps = r.max_steps or max(1, math.ceil(r.num_epochs * self.steps_per_epoch))
        from transformers import get_scheduler
        sched = get_scheduler(r.lr_scheduler, opt, num_warmup_steps=r.warmup_steps, num_training_steps=self.total_steps)
        # the scheduler stays unprepared: accelerate's wrapper steps it once per process, for
        # schedules counted in single-process steps; this one counts optimizer steps
        if self.fsdp_cpu:
            opt, dl = acc.prepare(opt, dl)
        else:
            model, opt, dl = acc.prepare(model, opt, dl)
        if vdl is not None:
            vdl = acc.prepare(vdl)
        self.model, self.opt, self.dl, self.vdl, self.sched = model, opt, dl, vdl, sched

    # ------------------------------------------------------------ checkpoints
    def _state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        opts = StateDictOptions(ignore_frozen_params=True)
        msd, osd = get_state_dict(self.acc.unwrap_model(self.model) if not self.fsdp else self.model, self.opt.optimizer
                                  if hasattr(self.opt, "optimizer") else self.opt, options=opts)
        return {"model": msd, "optim": osd}

    def save_checkpoint(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".tmp-checkpoint-{step}"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        dcp.save(self._state(), checkpoint_id=str(tmp))
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.cuda else None}
        torch.save(rng, tmp / f"rng-{self.acc.process_index}.pt")
        self.acc.wait_for_everyone()
        if self.main:
            torch.save(self.sched.state_dict(), tmp / "scheduler.pt")
            state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "recipe_hash": recipe_hash(self.recipe),
                     "world_size": self.world, "micro_split": self.split, "skipped_steps": self.skipped_steps}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            os.replace(tmp, final)
        self.acc.wait_for_everyone()

    def resume(self) -> tuple[int, int, int]:
        """(step, epoch, batch_in_epoch) of the latest complete checkpoint, loaded; zeros if none."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        ck = latest_checkpoint(self.out) if self.out.exists() else None
        if ck is None:
            return 0, 0, 0
        state = json.loads((ck / "trainer_state.json").read_text())
        if state["recipe_hash"] != recipe_hash(self.recipe):
            raise RecipeError(f"{ck}: written by a different recipe; use a new output_dir or delete the checkpoints")
        if state["world_size"] != self.world:
            raise RecipeError(f"{ck}: written by {state['world_size']} processes, resuming with {self.world}")
        sd = self._state()
        dcp.load(sd, checkpoint_id=str(ck))
        model = self.acc.unwrap_model(self.model) if not self.fsdp else self.model
        set_state_dict(model, self.opt.optimizer if hasattr(self.opt, "optimizer") else self.opt,
                       model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        self.sched.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=False))
        rng_file = ck / f"rng-{self.acc.process_index}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if self.cuda and rng["cuda"] is not None:
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.split = state.get("micro_split", 1)  # a backed-off micro-batch stays backed off
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.main:
            self.log(f"resumed from {ck} (step {state['step']})")
        return state["step"], state["epoch"], state["batch_in_epoch"]

    def save_final(self) -> Path:
        """The adapter (PEFT) or the whole model, in safetensors, with the tokenizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        final = self.out / "final"
        sd = None
        if self.fsdp:
            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model = self.acc.unwrap_model(self.model)
        if self.main:
            tmp = self.out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": sd} if sd is not None else {}))
            self.tok.save_pretrained(tmp)
            if self.classes is not None:
                (tmp / "labels.json").write_text(json.dumps(self.classes))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------ loop
    def log(self, msg: str) -> None:
        if self.main:
            from rich.console import Console
            Console(stderr=True).print(msg, highlight=False)

    def metrics(self, row: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _global_items(self, batches: list) -> int:
        """Label tokens (causal LM) or rows (classification) of this optimizer step, all ranks."""
        if self.classify:
            n = sum(b["labels"].numel() for b in batches)
        else:
            n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        return int(self.rank_sum(n)[0])

    def rank_sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks, in one all-reduce (float64: counts stay exact);
        the values themselves with one process."""
        import torch
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, reduction="sum").tolist()

    def micro_step(self, batch: dict, n_items: int, last: bool, snap, step: int) -> float:
        """One forward and backward; an out-of-memory error in either is agreed on by every
        rank after that half (`_agree_oom`), so that all of them abandon the step together."""
        import contextlib

        import torch
        model = self.model
        sync = self.acc.no_sync(model) if self.ddp and not last else contextlib.nullcontext()
        value, oom, loss = 0.0, False, None
        with sync:
            try:
                injected_oom(batch["input_ids"].shape[0], self.acc.process_index)
                with self.acc.autocast():
                    if self.classify:
                        out = model(**batch)
                        loss = out.loss * batch["labels"].numel() / n_items
                    else:
                        loss = model(**batch, num_items_in_batch=n_items).loss
                if step in self.inject_nan:
                    loss = loss * float("nan")
                snap("forward")
            except torch.OutOfMemoryError:  # a flag, not the exception: its traceback would keep the activations
                oom, loss = True, None
            try:
                self._agree_oom(oom, "forward")
            except _OutOfMemory:
                if last and self.ddp:
                    self._drain_ddp(batch, loss)
                raise
            try:
                scaled = loss * self.world if self.world > 1 and not self.deepspeed else loss
                self.acc.backward(scaled)
                value = float(loss.detach())
                del loss, scaled
                snap("backward")
            except torch.OutOfMemoryError:
                oom = True
            self._agree_oom(oom, "backward")
        return value

    def _drain_ddp(self, batch: dict, loss) -> None:
        """After an out-of-memory error in DDP's gradient-synchronising forward, bring every
        rank's reducer back to rest so that the step can be retried: the ranks where the forward
        finished expect a backward with its all-reduces. Every rank runs one backward of zero
        (a rank whose forward failed first runs a one-row, 8-token forward), so all take part
        in the same all-reduces; the zero gradients are then dropped."""
        if loss is None:
            tiny = {k: v[:1, :8] if v.dim() > 1 else v[:1] for k, v in batch.items()}
            with self.acc.autocast():
                loss = self.model(**tiny).loss
        self.acc.backward(loss * 0.0)
        self.opt.zero_grad(set_to_none=True)

    def _agree_oom(self, oom: bool, phase: str) -> None:
        """Raise `_OutOfMemory` on every rank when any rank ran out of memory. Ranks agree by
        one all-reduce of a flag, where no rank can be inside another collective: always with
        one process and under DDP, never under FSDP or DeepSpeed (their forward gathers
        parameters), where an out-of-memory error stops the run."""
        if not self.ddp:
            if oom:
                raise _OutOfMemory(1, phase, recoverable=self.world == 1)
            return
        ranks = int(self.rank_sum(float(oom))[0])
        if ranks:
            raise _OutOfMemory(ranks, phase, recoverable=True)

    def evaluate(self) -> dict:
        import torch
        if self.vdl is None:
            return {}
        self.model.eval()
        tot_loss = torch.zeros(1, device=self.acc.device)
        tot_n = torch.zeros(1, device=self.acc.device)
        correct = torch.zeros(1, device=self.acc.device)
        with torch.no_grad(), self.acc.autocast():
            for b in self.vdl:
                real_tokens(b)
                out = self.model(**b)
                if self.classify:
                    n = b["labels"].numel()
                    correct += (out.logits.argmax(-1) == b["labels"]).sum()
                else:
                    n = int((b["labels"][:, 1:] != -100).sum())
                tot_loss += out.loss.float() * n
                tot_n += n
        self.model.train()
        tot_loss, tot_n, correct = (self.acc.reduce(t, reduction="sum") if self.world > 1 else t
                                    for t in (tot_loss, tot_n, correct))
        res = {"eval_loss": round(float(tot_loss / tot_n.clamp(min=1)), 5)}
        if self.classify:
            res["eval_accuracy"] = round(float(correct / tot_n.clamp(min=1)), 5)
        return res

    def run(self) -> dict:
        import signal

        import torch
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from .measure import Meter, peak_rss

        r = self.recipe
        step, epoch, skip = self.resume()
        meter = Meter(self.cuda)
        measure_at = step + 2 if self.total_steps >= step + 2 else step + 1  # an optimizer step after the first
        t0, tokens, last_loss, first = time.perf_counter(), 0, None, None
        measured_s, measured_tokens = 0.0, 0  # the measured step runs under the memory tracker (slow on CPU)
        self.label_tokens, self.bad_loss_steps = 0, 0
        history = []
        report = None

        def on_signal(sig, _frame):
            if self.stop_signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(sig).name
            self.log(f"{self.stop_signal}: stopping after this step with a checkpoint (again to stop at once)")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

        self.log(f"training {r.base_model}: {self.n_trainable:,} of {self.n_params:,} parameters trainable, "
                 f"{self.total_steps} steps of {r.micro_batch_size} x {r.gradient_accumulation_steps} x {self.world} rows")
        progress = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not self.main,
                            transient=False)
        with progress:
            task = progress.add_task("train", total=self.total_steps, completed=step, info="")
            while step < self.total_steps:
                self.dl.set_epoch(epoch)
                it = self.acc.skip_first_batches(self.dl, skip) if skip else self.dl
                batch_in_epoch = skip
                skip = 0
                batches = []
                for b in it:
                    batches.append(b)
                    batch_in_epoch += 1
                    if len(batches) < r.gradient_accumulation_steps:
                        continue
                    step += 1
                    measured = step == measure_at
                    t_step = time.perf_counter()
                    loss, gnorm, ntok = self.optimizer_step(batches, meter if measured else None, step)
                    loss, signals = self.rank_sum(loss, float(self.stop_signal is not None))  # one all-reduce a step
                    if measured:
                        measured_s, measured_tokens = time.perf_counter() - t_step, ntok
                    batches = []
                    tokens += ntok
                    last_loss = loss
                    first = loss if first is None else first
                    history.append(loss)
                    el = time.perf_counter() - t0
                    mem = (torch.cuda.max_memory_allocated() if self.cuda else peak_rss()) / 2**30
                    progress.update(task, completed=step, info=f"loss {loss:.4f}  {tokens / el:,.0f} tok/s  "
                                    f"{'GPU' if self.cuda else 'RSS'} {mem:.2f} GiB")
                    if step % r.logging_steps == 0 or step == self.total_steps:
                        self.metrics({"step": step, "epoch": epoch, "loss": finite(loss), "grad_norm": finite(gnorm),
                                      "lr": self.sched.get_last_lr()[0], "tokens_per_s": round(tokens / el, 1)})
                    if step == measure_at:
                        report = self.report(meter, final=False)
                    if r.eval_steps and step % r.eval_steps == 0 and step < self.total_steps:
                        self.metrics({"step": step, **self.evaluate()})
                    saved = bool(r.save_steps and step % r.save_steps == 0 and step < self.total_steps)
                    if saved:
                        self.save_checkpoint(step, epoch, batch_in_epoch)
                    why = self._stop_reason(loss, step, signals > 0)
                    if why is not None:
                        if not saved:
                            self.save_checkpoint(step, epoch, batch_in_epoch)
                        self.report(meter, final=False, extra={"steps": step, "stopped": why})
                        raise RunStopped(f"{why}; checkpoint-{step} saved in {self.out}")
                    if step >= self.total_steps:
                        break
                else:
                    epoch += 1
                    continue
                break
        elapsed = time.perf_counter() - t0
        ev = self.evaluate()
        if ev:
            self.metrics({"step": step, **ev})
        final = self.save_final()
        report = self.report(meter, final=True, extra={
            "steps": step, "tokens": tokens, "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
            "measured_step_seconds": round(measured_s, 2), "tokens_per_s_other_steps":
                round((tokens - measured_tokens) / (elapsed - measured_s), 1) if elapsed > measured_s else None,
            "label_tokens": self.label_tokens, "first_loss": finite(first, 8), "final_loss": finite(last_loss, 8),
            "mean_loss": finite(sum(history) / len(history)) if history else None, "eval": ev, "saved": str(final)}) or report
        return report

    def _stop_reason(self, loss: float, step: int, signalled: bool) -> str | None:
        """Why the run must stop after this step, the same on every rank (the loss is the mean
        over all ranks; `signalled`: any rank got SIGINT/SIGTERM): a signal, or the loss
        watchdog (a loss above `loss_watchdog_threshold`, or not finite, for
        `loss_watchdog_patience` steps in a row, as Axolotl's loss_watchdog)."""
        r = self.recipe
        bad = not math.isfinite(loss) or (r.loss_watchdog_threshold is not None and loss > r.loss_watchdog_threshold)
        self.bad_loss_steps = self.bad_loss_steps + 1 if bad else 0
        if signalled:
            return f"stopped by {self.stop_signal or 'a signal to another rank'} at step {step}; run the same " \
                   "command to resume"
        if self.bad_loss_steps >= r.loss_watchdog_patience:
            what = "not finite" if not math.isfinite(loss) else f"above loss_watchdog_threshold={r.loss_watchdog_threshold:g}"
            return f"loss watchdog: the loss was {what} for {self.bad_loss_steps} steps in a row (step {step}, loss " \
                   f"{loss:.4g}); lower learning_rate or check the data, then resume"
        return None

    def optimizer_step(self, batches: list, meter, step: int) -> tuple[float, float | None, int]:
        """One optimizer step over the loader's `batches` (gradient_accumulation_steps of
        them), each cut into `self.split` micro-batches after an out-of-memory back-off. Returns
        (this rank's share of the step's loss, gradient norm, tokens of all ranks). A step whose
        gradient norm is not finite is skipped (no optimizer or scheduler step) and counted."""
        import contextlib
        ntok = sum(real_tokens(b) for b in batches)
        n_items = self._global_items(batches)
        self.label_tokens += n_items
        while True:
            micro = split_rows(batches, self.split)
            window = meter.step_window(self.model, self.opt) if meter is not None else \
                contextlib.nullcontext(lambda p: None)
            try:
                with window as snap:
                    total = 0.0
                    for i, b in enumerate(micro):
                        total += self.micro_step(b, n_items, i == len(micro) - 1, snap, step)
                    gnorm = self._grad_norm()
                    if gnorm is None or math.isfinite(gnorm):
                        self.opt.step()
                        self.sched.step()
                    else:
                        self.skipped_steps += 1
                        self.log(f"step {step}: gradient norm {gnorm}: step skipped ({self.skipped_steps} so far)")
                    self.opt.zero_grad(set_to_none=True)
                    snap("optimizer_step")
                break
            except _OutOfMemory as e:
                self.opt.zero_grad(set_to_none=True)
                if meter is not None:
                    meter.discard()
                self._back_off(e, step, micro)
        if meter is not None:
            self.measured_shape = tuple(micro[0]["input_ids"].shape)
        return total, gnorm, ntok * self.world

    def _grad_norm(self) -> float | None:
        """The global gradient norm, after clipping to max_grad_norm (0: no clipping, the norm
        still computed for the non-finite check); None under DeepSpeed, which clips itself."""
        if self.deepspeed:
            return None
        norm = self.acc.clip_grad_norm_(self.model.parameters(), self.recipe.max_grad_norm or float("inf"))
        return round(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm), 5)

    def _back_off(self, e: "_OutOfMemory", step: int, micro: list) -> None:
        """After an out-of-memory error every rank agreed on: halve the micro-batch, double the
        accumulation (the global batch and the step's samples stay the same) and retry the
        step; or stop when that cannot help. Logged, and kept for run_report.json."""
        import torch
        rows, seq = micro[0]["input_ids"].shape
        accum = self.accumulation
        where = f"out of memory in the {e.phase} of step {step} (micro-batch {rows} x {seq} tokens" + \
            (f", {e.ranks} of {self.world} ranks)" if self.world > 1 else ")")
        if self.cuda:
            torch.cuda.empty_cache()
        if not self.recipe.oom_backoff:
            raise RunStopped(f"{where}; oom_backoff is off: lower micro_batch_size")
        if not e.recoverable:
            raise RunStopped(f"{where}; under {'FSDP' if self.fsdp else 'DeepSpeed'} with {self.world} ranks the step "
                             "cannot be retried in place: lower micro_batch_size (plan recommend)")
        if rows == 1:
            raise RunStopped(f"{where}; the micro-batch is 1 row, nothing left to halve: use gradient_checkpointing, "
                             "LoRA, a shorter sequence_len or more GPUs (plan recommend)")
        self.split *= 2
        new_rows = -(-rows // 2)
        event = {"step": step, "phase": e.phase, "ranks": e.ranks, "micro_batch": [rows, new_rows],
                 "accumulation": [accum, accum * 2], "seq_len": seq}
        pred, _ = predict(self.recipe, self.config, rows, seq, self.world, self.cuda, accum)
        if pred is not None:
            event["predicted_peak_bytes"] = pred["peak_bytes"]
            event["predicted_device_bytes"] = pred["device_bytes"]
            if self.cuda:
                total = torch.cuda.mem_get_info()[1]
                event["device_total_bytes"] = total
                if pred["device_bytes"] < total:  # it said this fits; it did not
                    event["prediction_low_by_at_least_pct"] = round((total / pred["device_bytes"] - 1) * 100, 1)
        self.oom_events.append(event)
        self.log(f"{where}: micro-batch {rows} -> {new_rows}, accumulation {accum} -> {accum * 2} (global batch "
                 f"unchanged); retrying step {step}")

    # ------------------------------------------------------------ report
    def report(self, meter, final: bool, extra: dict | None = None) -> dict | None:
        """Predicted against measured memory: a rich table and run_report.json (rank 0; the
        worst rank's measurement under several processes)."""
        from .measure import compare, table, write_json
        if not meter.phases:
            return None
        measured = meter.result(final) if final else {**meter.result(), "partial": True}
        if self.world > 1:
            from accelerate.utils import gather_object
            ranks = gather_object([measured])
            measured = max(ranks, key=lambda m: m["peak_bytes"])
            measured["ranks_peak_bytes"] = [m["peak_bytes"] for m in ranks]
        if not self.main:
            return None
        b, s = self.measured_shape
        predicted, notes = predict(self.recipe, self.config, b, s, self.world, self.cuda, self.accumulation)
        rep = {"recipe": self.recipe_path, "recipe_hash": recipe_hash(self.recipe), "model": self.recipe.base_model,
               "device": "cuda" if self.cuda else "cpu", "world_size": self.world,
               "params": self.n_params, "trainable_params": self.n_trainable, "data": self.data_stats,
               "measured_step_shape": [b, s], "predicted": predicted, "measured": measured,
               "planned": self.recipe.plan.expected.model_dump() if self.recipe.plan.expected else None,
               "micro_batch_size": -(-self.recipe.micro_batch_size // self.split),
               "gradient_accumulation_steps": self.accumulation,
               "oom_backoff": self.oom_events, "skipped_steps": self.skipped_steps, "notes": notes + meter.notes}
        if extra:
            rep.update(extra)
        if predicted is not None:
            rows = compare(predicted, measured)
            rep["comparison"] = rows
            rep["total_error_pct"] = next(r["error_pct"] for r in rows if r["what"] == "total (peak)")
            from rich.console import Console
            Console(stderr=True).print(table(rows, f"memory per {'GPU' if self.cuda else 'process'}, predicted "
                                                   f"against measured ({'end of run' if final else 'measured step'}, "
                                                   f"micro-batch {b} x {s} tokens)"))
        write_json(str(self.out / "run_report.json"), rep)
        return rep


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainer RECIPE.yaml", file=sys.stderr)
        return EXIT_BAD_INPUT
    from planner.data import DataError
    recipe = None
    try:
        recipe = load(argv[0])
        t = Trainer(recipe, argv[0])
        t.setup()
        t.run()
        _shut_down(t)
    except (RecipeError, DataError) as e:
        return _fail(recipe, str(e), EXIT_BAD_INPUT)
    except RunStopped as e:
        return _fail(recipe, str(e), EXIT_FAILED)
    except KeyboardInterrupt:  # a second signal: no checkpoint for the step in flight
        return _fail(recipe, "stopped at once by a second signal; the newest complete checkpoint is where a rerun "
                     "resumes", EXIT_FAILED)
    return 0


def _fail(recipe: Recipe | None, line: str, status: int) -> int:
    """One line on stderr, and the same for the launcher (when the recipe loaded); the status."""
    print(f"plan train: {line}", file=sys.stderr)
    if recipe is not None:
        _error_file(recipe, line, status)
    return status


def _shut_down(t: Trainer) -> None:
    """Ranks leave together and tear the process group down before the interpreter does: a
    gloo rank that exits while another still talks to it can abort (SIGABRT) at exit."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        t.acc.wait_for_everyone()
        dist.destroy_process_group()


def _error_file(recipe: Recipe, line: str, status: int) -> None:
    """Tell the launcher (planner/launch.py) what went wrong: accelerate launch reports only
    that a process failed. (A recipe that does not load never gets here: the launcher loads it
    first and says so itself.)"""
    from planner.launch import CONFIG_DIR, ERROR_FILE
    from .measure import write_json
    out = Path(recipe.output_dir) / CONFIG_DIR
    if int(os.environ.get("RANK", "0")) == 0 and out.is_dir():
        try:
            write_json(str(out / ERROR_FILE), {"status": status, "error": line})
        except OSError:
            pass
