"""The training loop `plan train` launches: `accelerate launch ... -m trainer RECIPE.yaml`.

Written as torchtune's recipes are: `Trainer.setup` builds the run in stages (accelerator,
data, model, optimizer, scheduler, checkpoint and resume), each returning what it builds, and
`Trainer.run` reads top to bottom. Beside it: `state` (what a run carries; the batches of
each optimizer step), `checkpoint` (DCP checkpoints, the final save), `resilience` (the
out-of-memory back-off, skipped steps, the loss watchdog), `measure` (the memory report).

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
`checkpoint-N/` every `save_steps` (trainer/checkpoint.py), `final/` (the adapter or the model
in safetensors, with the tokenizer) and `run_report.json` (predicted against measured memory).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.contract import PlanError
from planner.data import attention_masked, head_tokens
from planner.recipe import Recipe, RecipeError, load, resume_hash, settings

from .checkpoint import Checkpointer, latest_checkpoint, recipe_hash
from .measure import has_formula, predict
from .model import offload_context, param_groups, parameter_counts
from .output import console, screen, to_log_file
from .resilience import (
    OutOfMemory,
    RunStopped,
    agreed_oom,
    back_off,
    bad_loss_count,
    drain_ddp,
    gradient_is_usable,
    injected_nan_steps,
    injected_oom,
    prediction_fields,
    split_rows,
    stop_reason,
)
from .state import RunState, due, optimizer_steps, steps_in_epoch, steps_in_run

# the names the tests and the launcher import from here
__all__ = ["Trainer", "RunState", "RunStopped", "latest_checkpoint", "split_rows", "real_tokens", "main"]

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def finite(x: float | None, digits: int = 5) -> float | None:
    """A value for the JSON files: rounded, and None (null) when not finite."""
    return round(x, digits) if x is not None and math.isfinite(x) else None


def model_name(recipe: Recipe) -> str:
    """The model as the user named it: a GGUF file by its path, not the directory holding it."""
    return str(Path(recipe.base_model) / recipe.gguf_file) if recipe.gguf_file else recipe.base_model


def real_tokens(batch: dict) -> int:
    """The tokens of a micro-batch that are not padding; takes out packed rows' `length` (see
    planner.data.Collator), which the model does not accept."""
    length = batch.pop("length", None)
    if length is not None:
        return int(length.sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def dataset_kind(recipe: Recipe) -> bool:
    """Whether the recipe trains a classifier; refuses datasets that cannot be trained together."""
    if not recipe.datasets:
        raise RecipeError("datasets: the recipe names no dataset to train on")
    fmt = {d.type for d in recipe.datasets}
    if len(fmt) > 1 and "classification" in fmt:
        raise RecipeError("datasets: classification cannot be mixed with other types")
    classify = fmt == {"classification"}
    if classify and recipe.sample_packing:
        raise RecipeError("sample_packing: packing needs causal-LM data, not classification")
    return classify


def fp8_recipe_handler(prec: str, cuda: bool) -> list:
    """accelerate's recipe handler for an FP8 precision: AORecipeKwargs (torchao) or
    TERecipeKwargs (Transformer Engine) with their defaults, the recipes the estimate counts;
    where it cannot run, one line naming what to install or where it runs. Empty without FP8."""
    import importlib.util
    if prec == "fp8-te":
        if not cuda:
            raise RecipeError("plan.precision fp8-te: Transformer Engine runs on a CUDA GPU (Ada or Hopper and newer); "
                              "on CPU use fp8: true (torchao)")
        if importlib.util.find_spec("transformer_engine") is None:
            raise RecipeError("plan.precision fp8-te needs Transformer Engine: "
                              "pip install 'transformer-engine[pytorch]'")
        from accelerate.utils import TERecipeKwargs
        return [TERecipeKwargs()]
    if prec == "fp8-ao":
        if importlib.util.find_spec("torchao") is None:
            raise RecipeError("fp8: true needs torchao: pip install --no-deps 'torchao>=0.10'")
        from accelerate.utils import AORecipeKwargs
        # without FSDP2's FP8 all-gather (AORecipeKwargs defaults it on): it wraps each converted
        # weight in a new Parameter that the optimizer, built before prepare, would never update
        return [AORecipeKwargs(enable_fsdp_float8_all_gather=False)]
    return []


@dataclass(frozen=True)
class Processes:
    """What the accelerator says about this run's processes (`Trainer._setup_accelerator`)."""
    cuda: bool
    mixed_precision: str
    world: int
    main: bool
    fsdp_cpu: bool  # FSDP asked for, on CPU: sharded here (accelerate runs gloo as MULTI_CPU)
    fsdp: bool
    deepspeed: bool
    ddp: bool  # several ranks, replicated model


@dataclass
class Data:
    """The datasets read, split and batched (`Trainer._setup_data`); the loaders are accelerate's
    once prepared."""
    train: Any
    val: Any | None
    classify: bool
    classes: list | None
    stats: dict


def processes(acc, cuda: bool, mixed: str) -> Processes:
    """What the Accelerator's state says: under FSDP on CPU accelerate reports MULTI_CPU, and the
    launcher's ACCELERATE_USE_FSDP says the model is to be sharded here."""
    from accelerate.utils import DistributedType
    fsdp_cpu = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" \
        and acc.distributed_type != DistributedType.FSDP
    fsdp = fsdp_cpu or acc.distributed_type == DistributedType.FSDP
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    world = acc.num_processes
    return Processes(cuda=cuda, mixed_precision=mixed, world=world, main=acc.is_main_process, fsdp_cpu=fsdp_cpu,
                     fsdp=fsdp, deepspeed=deepspeed, ddp=world > 1 and not (fsdp or deepspeed))


class Trainer:
    """One run of a recipe: `setup()`, then `run()`."""

    def __init__(self, recipe: Recipe, recipe_path: str):
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.out = Path(recipe.output_dir)
        self.inject_nan = injected_nan_steps()
        self.state = RunState()
        # built by setup(), stage by stage
        self.acc = None  # accelerate.Accelerator
        self.proc: Processes | None = None
        self.tok = None
        self.config = None  # the model's transformers config, for the prediction
        self.data: Data | None = None
        self.model = None
        self.n_params = self.n_trainable = 0
        self.opt = None
        self.ema = None  # (AveragedModel, live parameters, names) when the recipe has ema_decay
        self.offload_ctx = contextlib.nullcontext()  # activation_offloading: TRL's OffloadActivations
        self.sched = None
        self.total_steps = 0
        self.ckpt: Checkpointer | None = None
        self.measured_shape: tuple[int, int] | None = None  # the micro-batch of the measured step
        self.measured_masked = True  # whether it carried an attention mask (planner.data.attention_masked)
        self.labelled_head = False  # the loss scores only the labelled positions (builder.install_labelled_head)
        self.measured_head_tokens = 0  # the most positions a micro-batch of the measured step scored
        self.table_shown = False  # the predicted-against-measured table, printed once

    @property
    def accumulation(self) -> int:
        """Micro-steps per optimizer step: the recipe's, times the OOM back-off's split."""
        return self.recipe.gradient_accumulation_steps * self.state.micro_split

    # ------------------------------------------------------------ set-up
    def setup(self) -> None:
        """The run built in stages, in this order (the seed is set first: the loader's shuffle
        and a LoRA adapter's initialisation draw from it), as torchtune's recipes' `setup`."""
        from planner.recipe import load_config

        from .model import load_tokenizer
        self.acc, self.proc = self._setup_accelerator()
        self.tok, self.config = load_tokenizer(self.recipe), load_config(self.recipe)
        self.data = self._setup_data()
        if self.data.classify:  # the prediction counts the classifier the model gets
            self.config.num_labels = len(self.data.classes)
        model = self._setup_model()
        self.offload_ctx = offload_context(model, self.recipe)
        self.n_params, self.n_trainable = parameter_counts(model)
        model = self._shard(model) if self.proc.fsdp_cpu else model
        opt = self._setup_optimizer(model)
        self.total_steps = self._count_steps(len(self.data.train))
        self.sched = self._setup_scheduler(opt)
        self.model, self.opt, self.data.train, self.data.val = self._prepare(model, opt)
        self.ema = self._setup_ema()
        self.ckpt = self._setup_checkpoint()
        self.ckpt.ema = self.ema
        self.state = self._resume()

    def _setup_accelerator(self):
        """The Accelerator (CPU unless there is a GPU, the recipe's mixed precision, seedable
        sampler), the seed set, and what the processes are."""
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

        from planner.contract import Settings
        from planner.emit import mixed_precision
        from planner.recipe import precision
        cuda = torch.cuda.is_available()
        prec = precision(self.recipe)
        if not cuda and prec.startswith("fp16"):
            raise RecipeError("fp16: true needs a GPU; on CPU use bf16: true or neither")
        try:
            mixed = mixed_precision(Settings(precision=prec))
        except PlanError as e:
            raise RecipeError(f"plan.precision: {e}") from None
        handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)] + fp8_recipe_handler(prec, cuda)
        # DDP without broadcast_buffers: a transformer's buffers (rotary frequencies, position
        # ids) are constants, and a forward free of collectives lets the ranks agree on an
        # out-of-memory error right after it (resilience.agreed_oom)
        acc = Accelerator(cpu=not cuda, mixed_precision=mixed,
                          dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                          kwargs_handlers=handlers)
        set_seed(self.recipe.seed)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        return acc, processes(acc, cuda, mixed)

    def _setup_data(self) -> Data:
        """Every dataset read and tokenized, split into train and validation, made into rows
        (packed or not) and batched; the counts for run_report.json's `data`."""
        from planner import data as D
        r = self.recipe
        classify = dataset_kind(r)
        ex, stats = self._read_examples()
        train, val = D.split(ex, r.val_set_size, r.seed)
        train_rows = D.rows(train, r.sequence_len, r.sample_packing)
        val_rows = D.rows(val, r.sequence_len, r.sample_packing) if val is not None else []
        stats.update(train_examples=len(train), val_examples=len(val) if val is not None else 0,
                     train_rows=len(train_rows))
        dl, vdl = self._loaders(train_rows, val_rows)
        return Data(train=dl, val=vdl, classify=classify, classes=ex.classes, stats=stats)

    def _read_examples(self):
        """The datasets' examples, one after another (classification labels shared), and counts."""
        from planner import data as D
        r = self.recipe
        parts, classes, stats = [], None, {"records": 0, "truncated": 0, "dropped": 0, "skipped_lines": 0}
        for d in r.datasets:
            records, skipped = D.read_records(d.path, skip_bad_lines=r.skip_bad_lines)
            ex = D.tokenize(records, self.tok, d.type, r.sequence_len, d.path, train_on_inputs=r.train_on_inputs,
                            text_field=d.field, label_field=d.label_field, classes=classes)
            classes = ex.classes
            stats["records"] += len(records)
            stats["truncated"] += ex.truncated
            stats["dropped"] += ex.dropped
            stats["skipped_lines"] += skipped
            parts.append(ex)
        ex = parts[0]
        for p in parts[1:]:
            ex = D.Examples(ex.input_ids + p.input_ids, ex.labels + p.labels, ex.classes, ex.truncated + p.truncated)
        return ex, stats

    def _loaders(self, train_rows: list, val_rows: list):
        """The training loader (shuffled by a generator of the recipe's seed) and the validation
        loader (None without validation rows), both unprepared."""
        import torch

        from planner.data import Collator
        r = self.recipe
        collate = Collator(self.tok.pad_token_id)
        g = torch.Generator()
        g.manual_seed(r.seed)
        dl = torch.utils.data.DataLoader(train_rows, batch_size=r.micro_batch_size, shuffle=True, collate_fn=collate,
                                         generator=g)
        vdl = torch.utils.data.DataLoader(val_rows, batch_size=r.micro_batch_size, collate_fn=collate) \
            if val_rows else None
        return dl, vdl

    def _setup_model(self):
        """The model as trainer/model.py loads it (a classifier for classification data)."""
        from .model import load_model
        classify = self.data.classify
        model = load_model(self.recipe, num_labels=len(self.data.classes) if classify else None, cuda=self.proc.cuda)
        if classify and model.config.pad_token_id is None:
            model.config.pad_token_id = self.tok.pad_token_id
        st = settings(self.recipe)
        if not classify and st.loss == "standard" and st.lora and not st.unfrozen_parameters and has_formula(model):
            # the head and the loss over the labelled positions only (prompt and padding cost nothing);
            # where its memory is validated: LoRA on a model with a formula (a trained tied head's
            # gradients at the end of the backward, which the full logits hid, are not modelled yet,
            # and the derived route measures the head at every position)
            from planner.measure.builder import install_labelled_head
            self.labelled_head = install_labelled_head(model)
        return model

    def _shard(self, model):
        """FSDP2 on CPU: the model sharded over the device mesh of the launcher's environment
        (accelerate's plugin and `fsdp2_prepare_model`, through planner.measure.builder)."""
        from accelerate.utils import FullyShardedDataParallelPlugin

        from planner.measure.builder import device_mesh, fsdp2_shard
        replicate = int(os.environ.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1") or 1)
        mesh, names = device_mesh(self.proc.world, replicate)
        return fsdp2_shard(model, FullyShardedDataParallelPlugin(), self.proc.mixed_precision, mesh, names)

    def _setup_optimizer(self, model):
        """The recipe's optimizer over the trainable parameters, weight decay on matrices only."""
        from planner.measure.builder import make_optimizer
        r = self.recipe
        try:
            if r.loraplus_lr_ratio is not None:  # PEFT's LoRA+: lora_B (and 1-D) at lr x ratio
                from peft.optimizers import create_loraplus_optimizer

                def optimizer(groups, lr, weight_decay=0.0):
                    return make_optimizer(groups, r.optimizer, lr=lr, weight_decay=weight_decay)
                return create_loraplus_optimizer(model, optimizer, lr=r.learning_rate,
                                                 loraplus_lr_ratio=r.loraplus_lr_ratio,
                                                 loraplus_weight_decay=r.weight_decay)
            return make_optimizer(param_groups(model, r.weight_decay, r.learning_rate, r.parameter_groups),
                                  r.optimizer, lr=r.learning_rate, weight_decay=r.weight_decay)
        except ValueError as e:
            raise RecipeError(f"optimizer: {e}") from None

    def _setup_ema(self):
        """`ema_decay`: torch's AveragedModel with `get_ema_multi_avg_fn` over the trainable
        parameters (planner.measure.builder.make_ema, what the simulator measures); None without.
        A sharded model is refused: each rank holds a shard, not the parameters."""
        r = self.recipe
        if r.ema_decay is None:
            return None
        if self.proc.fsdp or self.proc.deepspeed:
            raise RecipeError("ema_decay: the EMA copies whole parameters; under FSDP or DeepSpeed each rank holds "
                              "a shard: train on one process or with DDP")
        from planner.measure.builder import make_ema
        return make_ema(self.acc.unwrap_model(self.model), r.ema_decay)

    def _count_steps(self, loader_batches: int) -> int:
        """The run's optimizer steps: `max_steps`, or the epochs' steps."""
        r = self.recipe
        per_epoch = steps_in_epoch(loader_batches, self.proc.world, r.gradient_accumulation_steps)
        return steps_in_run(r.max_steps, r.num_epochs, per_epoch)

    def _setup_scheduler(self, opt):
        """transformers' `get_scheduler` over the run's optimizer steps. It stays unprepared:
        accelerate's wrapper steps it once per process, for schedules counted in single-process
        steps; this one counts optimizer steps."""
        from transformers import get_scheduler
        r = self.recipe
        warmup = r.warmup_steps or math.ceil(r.warmup_ratio * self.total_steps)  # HF Trainer's get_warmup_steps
        return get_scheduler(r.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=self.total_steps)

    def _prepare(self, model, opt):
        """Model (unless sharded here already), optimizer and loaders through `accelerate.prepare`."""
        acc, train, val = self.acc, self.data.train, self.data.val
        if self.proc.fsdp_cpu:
            opt, train = acc.prepare(opt, train)
        else:
            model, opt, train = acc.prepare(model, opt, train)
        if val is not None:
            val = acc.prepare(val)
        return model, opt, train, val

    def _setup_checkpoint(self) -> Checkpointer:
        """Checkpoints of this run in `output_dir` (trainer/checkpoint.py)."""
        return Checkpointer(self.acc, self.out, self.recipe, self.proc.fsdp, self.proc.cuda)

    def _resume(self) -> RunState:
        """The state of the newest complete checkpoint, loaded (model, optimizer, scheduler,
        RNG); a fresh state when there is none."""
        loaded = self.ckpt.load_latest(self.model, self.opt, self.sched)
        if loaded is None:
            return RunState()
        ck, state = loaded
        self.log(f"resumed from {ck} (step {state.step})")
        return state

    # ------------------------------------------------------------ the loop
    def run(self) -> dict:
        """The loop, as torchtune's recipes' `train`: the batches of each optimizer step
        (`optimizer_steps`), the step, its progress and metrics, evaluation and a checkpoint when
        due, a stop when asked (signal, loss watchdog); then the last evaluation, the final save
        and run_report.json. The measured step is an optimizer step after the first (optimizer
        state exists, as the estimate assumes)."""
        from .measure import Meter
        r, st = self.recipe, self.state
        meter = Meter(self.proc.cuda)
        measure_at = st.step + 2 if self.total_steps >= st.step + 2 else st.step + 1
        report = None
        t0 = time.perf_counter()
        self._catch_signals()
        self.log(f"training {model_name(r)}: {self.n_trainable:,} of {self.n_params:,} parameters trainable, "
                 f"{self.total_steps} steps of {r.micro_batch_size} x {r.gradient_accumulation_steps} x "
                 f"{self.proc.world} rows")
        with self._progress() as show:
            for batches in optimizer_steps(self._epoch_batches, st, r.gradient_accumulation_steps, self.total_steps):
                measured = st.step == measure_at
                loss, grad_norm, signalled = self._train_step(batches, meter if measured else None)
                elapsed = time.perf_counter() - t0
                show(loss, elapsed)
                self._log_step(loss, grad_norm, elapsed)
                if measured:
                    report = self.report(meter, final=False)
                if due(st.step, r.eval_steps, self.total_steps):
                    self.metrics({"step": st.step, **self.evaluate()})
                saved = due(st.step, r.save_steps, self.total_steps)
                if saved:
                    self.ckpt.save(st, self.model, self.opt, self.sched)
                self._stop_if_asked(loss, signalled, saved, meter)
        return self._finish(meter, time.perf_counter() - t0, report)

    def _epoch_batches(self, epoch: int, skip: int):
        """An epoch's batches after its first `skip` (resuming mid-epoch: accelerate's
        `skip_first_batches`, the sampler reseeded for the epoch by `set_epoch`)."""
        self.data.train.set_epoch(epoch)
        return self.acc.skip_first_batches(self.data.train, skip) if skip else self.data.train

    def _catch_signals(self) -> None:
        """SIGINT and SIGTERM stop the run after the step in flight, with a checkpoint; a second
        one stops it at once (KeyboardInterrupt, no checkpoint)."""
        import signal

        def on_signal(sig, _frame):
            if self.state.stop_signal is not None:
                raise KeyboardInterrupt
            self.state.stop_signal = signal.Signals(sig).name
            self.log(f"{self.state.stop_signal}: stopping after this step with a checkpoint (again to stop at once)")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    @contextlib.contextmanager
    def _progress(self):
        """A rich progress bar on rank 0; yields `show(loss, elapsed)` for after each step."""
        import torch
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from .measure import peak_rss
        cuda = self.proc.cuda
        progress = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not self.proc.main,
                            transient=False, console=console())
        with progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.state.step, info="")

            def show(loss: float, elapsed: float) -> None:
                mem = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) / 2**30
                progress.update(task, completed=self.state.step, info=f"loss {loss:.4f}  "
                                f"{self.state.tokens / elapsed:,.0f} tok/s  {'GPU' if cuda else 'RSS'} {mem:.2f} GiB")
            yield show

    def _train_step(self, batches: list, meter) -> tuple[float, float | None, bool]:
        """One optimizer step, counted in the run state: (the loss, the mean over the ranks; the
        gradient norm; whether any rank got a signal: the loss and the flag share one all-reduce)."""
        st = self.state
        t = time.perf_counter()
        loss, grad_norm, tokens = self.optimizer_step(batches, meter)
        loss, signals = self.rank_sum(loss, float(st.stop_signal is not None))
        if meter is not None:  # the measured step runs under the memory tracker (slow on CPU)
            st.measured_seconds, st.measured_tokens = time.perf_counter() - t, tokens
        st.record_step(loss, tokens)
        return loss, grad_norm, signals > 0

    def _log_step(self, loss: float, grad_norm: float | None, elapsed: float) -> None:
        """A metrics.jsonl line every `logging_steps` and after the last step."""
        st = self.state
        if st.step % self.recipe.logging_steps == 0 or st.step == self.total_steps:
            self.metrics({"step": st.step, "epoch": st.epoch, "loss": finite(loss), "grad_norm": finite(grad_norm),
                          "lr": self.sched.get_last_lr()[0], "tokens_per_s": round(st.tokens / elapsed, 1)})

    def _stop_if_asked(self, loss: float, signalled: bool, saved: bool, meter) -> None:
        """Raise RunStopped, after a checkpoint and a partial report, on a signal or when the
        loss watchdog runs out of patience (resilience.stop_reason)."""
        r, st = self.recipe, self.state
        st.bad_loss_steps = bad_loss_count(loss, st.bad_loss_steps, r.loss_watchdog_threshold)
        why = stop_reason(loss, st.step, st.bad_loss_steps, signalled, st.stop_signal, r.loss_watchdog_threshold,
                          r.loss_watchdog_patience)
        if why is None:
            return
        if not saved:
            self.ckpt.save(st, self.model, self.opt, self.sched)
        self.report(meter, final=False, extra={"steps": st.step, "stopped": why})
        raise RunStopped(f"{why}; checkpoint-{st.step} saved in {self.out}")

    def _finish(self, meter, elapsed: float, report: dict | None) -> dict | None:
        """The last evaluation, the final save, and the end-of-run report (the measured step's
        when the end-of-run one has no measurement)."""
        st = self.state
        if self.ckpt.saved_step != st.step:  # the trained weights first: nothing after the last step can lose them
            self.ckpt.save(st, self.model, self.opt, self.sched)
        ev = self.evaluate()
        if ev:
            self.metrics({"step": st.step, **ev})
        try:
            final = self.ckpt.save_final(self.model, self.tok, self.data.classes)
        except RunStopped as e:
            raise RunStopped(f"{e}; the trained weights are in checkpoint-{st.step}") from None
        except Exception as e:  # noqa: BLE001 - whatever the library raises, the weights are safe
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise RunStopped(f"the final save failed ({type(e).__name__}: {first}); the trained weights are in "
                             f"{self.out / f'checkpoint-{st.step}'}") from None
        return self.report(meter, final=True, extra=self._summary(elapsed, ev, final)) or report

    def _summary(self, elapsed: float, ev: dict, final: Path) -> dict:
        """The end-of-run figures of run_report.json: steps, tokens per second (also without the
        measured step, slow under the tracker on CPU), losses, the evaluation, the final save."""
        st = self.state
        rest = elapsed - st.measured_seconds
        return {"steps": st.step, "tokens": st.tokens, "seconds": round(elapsed, 2),
                "tokens_per_s": round(st.tokens / elapsed, 1), "measured_step_seconds": round(st.measured_seconds, 2),
                "tokens_per_s_other_steps": round((st.tokens - st.measured_tokens) / rest, 1) if rest > 0 else None,
                "label_tokens": st.label_tokens, "first_loss": finite(st.first_loss, 8),
                "final_loss": finite(st.last_loss, 8), "mean_loss": finite(st.mean_loss), "eval": ev,
                "saved": str(final), "finished": True, "total_steps": self.total_steps,
                "resume_hash": resume_hash(self.recipe),
                "length": {"max_steps": self.recipe.max_steps, "num_epochs": self.recipe.num_epochs}}

    # ------------------------------------------------------------ one optimizer step
    def optimizer_step(self, batches: list, meter) -> tuple[float, float | None, int]:
        """One optimizer step over the loader's `batches`, each cut into `micro_split`
        micro-batches after an out-of-memory back-off, retried after each back-off. Returns (this
        rank's share of the step's loss, gradient norm, tokens of all ranks)."""
        ntok = sum(real_tokens(b) for b in batches)
        n_items = self._global_items(batches)
        self.state.label_tokens += n_items
        while True:
            micro = split_rows(batches, self.state.micro_split)
            try:
                loss, grad_norm = self._accumulate_and_step(micro, n_items, meter)
            except OutOfMemory as e:
                self.opt.zero_grad(set_to_none=True)
                if meter is not None:
                    meter.discard()
                self._back_off(e, micro)
                continue
            if meter is not None:
                self.measured_shape = tuple(micro[0]["input_ids"].shape)
                self.measured_masked = any(attention_masked(b) for b in micro)
                self.measured_head_tokens = max(head_tokens(b) for b in micro) if self.labelled_head else 0
            return loss, grad_norm, ntok * self.proc.world

    def _accumulate_and_step(self, micro: list, n_items: int, meter) -> tuple[float, float | None]:
        """The micro-steps, then clipping and the optimizer and scheduler steps; a step whose
        gradient norm is not finite is skipped and counted. Under the meter's window when measured."""
        extra = [self.ema[0]] if self.ema is not None else []
        window = meter.step_window(self.model, self.opt, *extra) if meter is not None else \
            contextlib.nullcontext(lambda p: None)
        with window as snap:
            total = 0.0
            for i, b in enumerate(micro):
                total += self.micro_step(b, n_items, i == len(micro) - 1, snap)
            grad_norm = self._grad_norm()
            if gradient_is_usable(grad_norm):
                self.opt.step()
                self.sched.step()
                if self.ema is not None:
                    self.ema[0].update_parameters(self.ema[1])
            else:
                self.state.skipped_steps += 1
                self.log(f"step {self.state.step}: gradient norm {grad_norm}: step skipped "
                         f"({self.state.skipped_steps} so far)")
            self.opt.zero_grad(set_to_none=True)
            snap("optimizer_step")
        return total, grad_norm

    def micro_step(self, batch: dict, n_items: int, last: bool, snap) -> float:
        """One forward and backward (gradients synchronised on the last under DDP); an
        out-of-memory error in either is agreed on by every rank after that half, so that all of
        them abandon the step together."""
        sync = self.acc.no_sync(self.model) if self.proc.ddp and not last else contextlib.nullcontext()
        with sync, self.offload_ctx:  # forward and backward, as Axolotl's training_step wraps them
            loss = self._forward(batch, n_items, snap)
            try:
                self._agree_oom(loss is None, "forward")
            except OutOfMemory:
                if last and self.proc.ddp:
                    drain_ddp(self.acc, self.model, self.opt, batch, loss)
                raise
            value = self._backward(loss)
            del loss
            if value is not None:
                snap("backward")
            self._agree_oom(value is None, "backward")
        return value

    def _forward(self, batch: dict, n_items: int, snap):
        """The micro-batch's share of the step's loss, or None when out of memory (a flag, not
        the exception: its traceback would keep the activations)."""
        import torch
        try:
            injected_oom(batch["input_ids"].shape[0], self.acc.process_index)
            with self.acc.autocast():
                if self.data.classify:
                    loss = self.model(**batch).loss * batch["labels"].numel() / n_items
                else:
                    loss = self.model(**batch, num_items_in_batch=n_items).loss
            if self.state.step in self.inject_nan:
                loss = loss * float("nan")
            snap("forward")
            return loss
        except torch.OutOfMemoryError:
            return None

    def _backward(self, loss) -> float | None:
        """The backward of the loss (times the ranks: DDP and FSDP average gradients, the loss
        is already a share of the global mean); the loss's value, or None when out of memory."""
        import torch
        try:
            scaled = loss * self.proc.world if self.proc.world > 1 and not self.proc.deepspeed else loss
            self.acc.backward(scaled)
            return float(loss.detach())
        except torch.OutOfMemoryError:
            return None

    def _agree_oom(self, oom: bool, phase: str) -> None:
        """Raise OutOfMemory on every rank when any rank ran out of memory (resilience.agreed_oom)."""
        e = agreed_oom(oom, phase, self.proc.ddp, self.proc.world, lambda flag: self.rank_sum(flag)[0])
        if e is not None:
            raise e

    def _grad_norm(self) -> float | None:
        """The global gradient norm, after clipping to max_grad_norm (0: no clipping, the norm
        still computed for the non-finite check); None under DeepSpeed, which clips itself."""
        if self.proc.deepspeed:
            return None
        norm = self.acc.clip_grad_norm_(self.model.parameters(), self.recipe.max_grad_norm or float("inf"))
        return round(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm), 5)

    def _back_off(self, e: OutOfMemory, micro: list) -> None:
        """After an out-of-memory error every rank agreed on: the back-off (resilience.back_off,
        or RunStopped), with the estimate for the step that failed; logged, and kept for
        run_report.json."""
        import torch
        st, proc = self.state, self.proc
        shape = tuple(micro[0]["input_ids"].shape)
        accumulation = self.accumulation
        if proc.cuda:
            torch.cuda.empty_cache()
        b = back_off(e, st.step, shape, st.micro_split, accumulation, proc.world, self.recipe.oom_backoff,
                     "FSDP" if proc.fsdp else "DeepSpeed")
        st.micro_split = b.split
        pred, _ = predict(self.recipe, self.config, *shape, proc.world, proc.cuda, accumulation,
                          attention_mask=any(attention_masked(b) for b in micro))
        total = torch.cuda.mem_get_info()[1] if proc.cuda and pred is not None else None
        b.event.update(prediction_fields(pred, total))
        st.oom_events.append(b.event)
        self.log(b.message)

    # ------------------------------------------------------------ ranks, logs, evaluation
    def log(self, msg: str) -> None:
        if self.proc.main:
            console().print(msg, highlight=False, soft_wrap=True)  # a path in a line stays whole

    def metrics(self, row: dict) -> None:
        if self.proc.main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _global_items(self, batches: list) -> int:
        """Label tokens (causal LM) or rows (classification) of this optimizer step, all ranks."""
        if self.data.classify:
            n = sum(b["labels"].numel() for b in batches)
        else:
            n = sum(head_tokens(b) for b in batches)
        return int(self.rank_sum(n)[0])

    def rank_sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks, in one all-reduce (float64: counts stay exact);
        the values themselves with one process."""
        import torch
        if self.proc.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, reduction="sum").tolist()

    def evaluate(self) -> dict:
        """The validation loss (token-weighted, all ranks) and, for a classifier, accuracy; {}
        without validation data."""
        import torch
        if self.data.val is None:
            return {}
        self.model.eval()
        tot_loss = torch.zeros(1, device=self.acc.device)
        tot_n = torch.zeros(1, device=self.acc.device)
        correct = torch.zeros(1, device=self.acc.device)
        with torch.no_grad(), self.acc.autocast():
            for b in self.data.val:
                real_tokens(b)
                out = self.model(**b)
                if self.data.classify:
                    n = b["labels"].numel()
                    correct += (out.logits.argmax(-1) == b["labels"]).sum()
                else:
                    n = int((b["labels"][:, 1:] != -100).sum())
                tot_loss += out.loss.float() * n
                tot_n += n
        self.model.train()
        tot_loss, tot_n, correct = (self.acc.reduce(t, reduction="sum") if self.proc.world > 1 else t
                                    for t in (tot_loss, tot_n, correct))
        res = {"eval_loss": round(float(tot_loss / tot_n.clamp(min=1)), 5)}
        if self.data.classify:
            res["eval_accuracy"] = round(float(correct / tot_n.clamp(min=1)), 5)
        return res

    # ------------------------------------------------------------ report
    def report(self, meter, final: bool, extra: dict | None = None) -> dict | None:
        """Predicted against measured memory: a rich table and run_report.json (rank 0; the
        worst rank's measurement under several processes). None before the measured step."""
        if not meter.phases:
            return None
        from .measure import add_comparison, worst_rank, write_json
        measured = meter.result(final) if final else {**meter.result(), "partial": True}
        measured = worst_rank(measured) if self.proc.world > 1 else measured
        if not self.proc.main:
            return None
        rep = self._report_fields(measured, meter.notes, extra or {})
        if rep["predicted"] is not None:  # the table on the screen once: after the measured step
            add_comparison(rep, final, self.proc.cuda, show=not self.table_shown)
            self.table_shown = True
        write_json(str(self.out / "run_report.json"), rep)
        return rep

    def _report_fields(self, measured: dict, meter_notes: list, extra: dict) -> dict:
        """run_report.json's content but the comparison: the prediction for the measured step's
        shape and accumulation, the measurement, the run's back-offs and skipped steps, `extra`."""
        r, st, proc = self.recipe, self.state, self.proc
        b, s = self.measured_shape
        predicted, notes = predict(r, self.config, b, s, proc.world, proc.cuda, self.accumulation,
                                   attention_mask=self.measured_masked, head_tokens=self.measured_head_tokens)
        rep = {"recipe": self.recipe_path, "recipe_hash": recipe_hash(r), "model": model_name(r),
               "device": "cuda" if proc.cuda else "cpu", "world_size": proc.world,
               "params": self.n_params, "trainable_params": self.n_trainable, "data": self.data.stats,
               "measured_step_shape": [b, s], "predicted": predicted, "measured": measured,
               "planned": r.plan.expected.model_dump() if r.plan.expected else None,
               "micro_batch_size": -(-r.micro_batch_size // st.micro_split),
               "gradient_accumulation_steps": self.accumulation,
               "oom_backoff": st.oom_events, "skipped_steps": st.skipped_steps, "notes": notes + meter_notes}
        rep.update(extra)
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
        to_log_file(Path(recipe.output_dir))  # library warnings and loading bars: OUTPUT_DIR/train.log
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
    print(f"plan train: {line}", file=screen())
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
