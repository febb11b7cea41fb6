"""plan's memory check inside the trainers people already use: a `transformers.TrainerCallback`.

    from trainer.callback import PlanCallback
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[PlanCallback()]).train()

It works in any `transformers.Trainer` (TRL's `SFTTrainer` is one), and:

- at train start, prints plan's prediction for a micro-batch of the run: the settings read from
  the `TrainingArguments` (per-device batch, accumulation, bf16/fp16, `optim`, gradient
  checkpointing, processes) and the model (its weights' dtype, a PEFT LoRA adapter's rank,
  alpha, dropout and targets, and the loss: TRL's chunked log-probability head where TRL's
  `add_fused_lm_head` patched its forward, as SFTTrainer does), at the sequence length given or
  the training set's longest row;
- measures the second optimizer step (optimizer state exists, as the estimate assumes) as
  `plan train` does (trainer/measure.py: the CUDA allocator's peaks on a GPU, torch's
  MemTracker per phase and category on CPU), at the micro-batch shape the model really saw;
- after that step prints the predicted-against-measured table once, and writes
  `run_report.json` in `args.output_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback

from planner.data import attention_masked

from .measure import Meter, add_comparison, write_json


def _base(model):
    """The model under a PEFT wrapper (and accelerate's), whose config and dtype the plan reads."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora(model) -> dict:
    """Settings' LoRA fields from a PEFT model's active adapter; {} without one."""
    cfgs = getattr(model, "peft_config", None)
    if not cfgs:
        return {}
    cfg = cfgs.get(getattr(model, "active_adapter", "default")) or next(iter(cfgs.values()))
    targets = cfg.target_modules
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
    return {"lora_rank": int(cfg.r), "lora_alpha": float(cfg.lora_alpha), "lora_dropout": float(cfg.lora_dropout),
            "lora_targets": "all-linear" if targets in ("all-linear", "all_linear") else targets}


def trl_fused_head(model) -> bool:
    """Whether TRL's `add_fused_lm_head` (trl/trainer/utils.py, TRL 1.16) patched the model's
    forward, as SFTTrainer's `__init__` does on the base model under PEFT: the instance's forward
    is then TRL's `_fused_forward`, whose code (not its name: `functools.wraps` copies the
    original's `__name__` and `__qualname__`) is defined in `add_fused_lm_head`."""
    forward = getattr(_base(model), "forward", None)
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    if code is None:
        return False
    qualname = getattr(code, "co_qualname", code.co_name)
    return qualname.startswith("add_fused_lm_head.") and "trl" in Path(code.co_filename).parts


def settings_for(args, model, batch: int, seq: int, cuda: bool, attention_mask: bool = True):
    """plan's Settings for a transformers.Trainer run: its TrainingArguments and its model (the
    loss: `trl` where TRL's fused head replaced the model's forward, `trl_fused_head`);
    `attention_mask`: whether the micro-batch carries one (planner.data.attention_masked; a
    Trainer's collators pad rows, so by default it does)."""
    import torch

    from planner.contract import Settings, optimizer_choice
    lora = _lora(model)
    dtype = next(_base(model).parameters()).dtype
    half = "bf16" if args.bf16 else "fp16" if args.fp16 else None
    if dtype in (torch.bfloat16, torch.float16):
        precision = "bf16-pure" if lora and dtype == torch.bfloat16 else f"{half or 'bf16'}-pure"
    else:
        precision = f"{half}-amp" if half else "fp32"
    optimizer, paged = optimizer_choice(str(getattr(args.optim, "value", args.optim)))
    world = max(1, int(getattr(args, "world_size", 1) or 1))
    return Settings(precision=precision, optimizer=optimizer, optimizer_paged=paged, batch_size=batch, seq_len=seq,
                    grad_checkpointing=bool(args.gradient_checkpointing), gpus=world,
                    accumulation=args.gradient_accumulation_steps, kernels="cuda" if cuda else "cpu",
                    attention_mask=attention_mask, loss="trl" if trl_fused_head(model) else "standard", **lora)


def _longest(dataset) -> int | None:
    """The longest tokenized row of a training set (the padded length of its longest batch)."""
    try:
        return max(len(row["input_ids"]) for row in dataset)
    except (TypeError, KeyError, ValueError, IndexError):
        return None


class PlanCallback(TrainerCallback):
    """plan's prediction at train start, the predicted-against-measured table after the measured
    step, and `run_report.json` (see the module's docstring). `seq_len`: the sequence length of
    the prediction printed at train start (default: the training set's longest row); `model_name`:
    the model as run_report.json names it (default: the config's `_name_or_path`)."""

    def __init__(self, seq_len: int | None = None, model_name: str | None = None, train_dataset=None,
                 echo=None):
        import sys
        self.seq_len = seq_len
        self.model_name = model_name
        self.train_dataset = train_dataset
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self.cuda = False
        self.meter: Meter | None = None
        self.window = None
        self.snap = None
        self.shape: tuple[int, int] | None = None
        self.masked = False  # whether a micro-batch of the measured step carried an attention mask
        self.hook = None
        self.report: dict | None = None
        self.measure_at = 1  # global steps done when the measured step begins: the second step

    # ------------------------------------------------------------ the prediction
    def predict(self, args, model, batch: int, seq: int, masked: bool = True):
        """(the estimate, None) or (None, why not)."""
        from planner.contract import PlanError
        from planner.estimate import estimate
        from planner.spec import SpecError

        from .measure import model_spec
        try:
            spec = model_spec(_base(model).config)
            return estimate(spec, settings_for(args, model, batch, seq, self.cuda, masked)), None
        except (SpecError, PlanError, ValueError) as e:
            return None, f"no prediction: {e}"

    def on_train_begin(self, args, state, control, model=None, **kw):
        import torch
        self.cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
        self.measure_at = 1 if state.max_steps is None or state.max_steps >= 2 else 0
        seq = self.seq_len or _longest(self.train_dataset if self.train_dataset is not None else
                                       getattr(kw.get("train_dataloader"), "dataset", None)) or 512
        est, why = self.predict(args, model, args.per_device_train_batch_size, seq)
        if not state.is_world_process_zero:
            return
        if est is None:
            self.echo(f"plan: {why}")
            return
        c = est.components
        mib = 2**20
        self.echo(f"plan: predicted peak {est.peak_bytes / mib:,.1f} MiB per {'GPU' if self.cuda else 'process'} "
                  f"for micro-batch {args.per_device_train_batch_size} x {seq} tokens (weights "
                  f"{c['weights'] / mib:,.1f}, gradients {c['gradients'] / mib:,.1f}, optimizer "
                  f"{c['optimizer'] / mib:,.1f}, activations {(c['activations'] + c['logits']) / mib:,.1f} MiB); "
                  f"measuring optimizer step {self.measure_at + 1}")

    # ------------------------------------------------------------ the measured step
    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step != self.measure_at or self.meter is not None:
            return

        def shape(_module, a, kwargs):
            ids = kwargs.get("input_ids", a[0] if a else None)
            if ids is not None and self.shape is None:
                self.shape = tuple(ids.shape)
            self.masked = self.masked or attention_masked(kwargs)
        self.hook = model.register_forward_pre_hook(shape, with_kwargs=True)
        self.meter = Meter(self.cuda)
        self.window = self.meter.step_window(model, optimizer)
        self.snap = self.window.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self.snap is not None:
            self.snap("backward")

    def on_optimizer_step(self, args, state, control, **kw):
        if self.snap is not None:
            self.snap("optimizer_step")

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.window is None:
            return
        self.window.__exit__(None, None, None)
        self.window = self.snap = None
        self.hook.remove()
        self._report(args, state, model)

    def _report(self, args, state, model) -> None:
        """The comparison at the shape measured, printed once, and run_report.json."""
        measured = self.meter.result()
        if not state.is_world_process_zero or self.shape is None:
            return
        b, s = self.shape[0], self.shape[-1]
        est, why = self.predict(args, model, b, s, self.masked)
        predicted = None if est is None else {
            "peak_bytes": est.peak_bytes, "device_bytes": est.device_bytes, "components": est.components,
            "phases": {k: v for k, v in est.phases.items() if k in ("model", "optimizer_step")} | {
                "backward": max(est.phases.get("forward", 0), est.phases.get("backward", 0))},
            "batch_size": b, "seq_len": s, "notes": est.notes}
        name = self.model_name or getattr(_base(model).config, "_name_or_path", None)
        rep = {"trainer": "transformers.Trainer + plan's PlanCallback", "model": name,
               "device": "cuda" if self.cuda else "cpu", "world_size": max(1, int(args.world_size or 1)),
               "measured_step": self.measure_at + 1, "measured_step_shape": [b, s], "predicted": predicted,
               "measured": measured, "notes": [why] if why else []}
        if predicted is not None:
            add_comparison(rep, final=False, cuda=self.cuda)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(str(out / "run_report.json"), rep)
        self.report = rep
        if os.environ.get("PLAN_CALLBACK_QUIET") != "1":
            self.echo(f"plan: run_report.json written in {out}")
