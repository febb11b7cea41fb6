"""`plan emit-config`: a plan written as the files the launchers take.

- `accelerate.yaml`: built with accelerate's own `ClusterConfig`, so `accelerate launch
  --config_file` reads it as it reads its own (`accelerate config` writes the same class);
- `deepspeed.json` for ZeRO, with accelerate's `auto` values resolved as accelerate resolves them,
  so DeepSpeed's own `DeepSpeedConfig` parses it and the run is the one the estimate modelled;
- `recipe.yaml` for `plan train` (planner/recipe.py), with the memory the plan expects;
- `PLAN.md`, a short summary for people: the plan, why, how to run it, the line a user's own
  script needs for each decision accelerate has no key for, and DeepSpeed's non-defaults.

The files run where they land: every path in them is relative to their directory (the recipe's
data, `deepspeed_config_file`: accelerate 1.15 hands that value to each process in
ACCELERATE_DEEPSPEED_CONFIG_FILE, utils/launch.py, and HfDeepSpeedConfig opens it relative to
the working directory, utils/deepspeed.py), so they are launched from inside it and the
directory moves as a whole. Files are written atomically (a temporary file, then a rename), with
the mode a new file gets under the umask, and an existing file is never replaced without `force`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .contract import (
    DERIVED_NOTE,
    EMA_DECAY,
    FSDP,
    MSAMP_NOTE,
    ZERO,
    PlanError,
    Settings,
    optimizer_name,
    shard_size,
    world_size,
)
from .distributed import zero_stage
from .estimate import Estimate
from .precision import RECIPES
from .recipe import LOSS_KEYS, from_dict, recipe_loss_keys

FILES = ("accelerate.yaml", "deepspeed.json", "recipe.yaml", "PLAN.md")


def half_dtype(st: Settings, bf16_gpu: bool = True) -> str | None:
    """The 16-bit dtype the plan computes in: "bf16", "fp16", or None (fp32). A bf16 recipe on a
    GPU without bf16 (T4, V100) computes in fp16 (emit-config refuses an explicit bf16 precision
    on such a GPU and passes over recommend's bf16 plans there: cli/emit_config.py)."""
    rc = RECIPES[st.precision]
    if rc.compute != 2 and not (st.lora and rc.weight == 2):
        return None
    if st.precision.startswith("fp16") or not bf16_gpu:
        return "fp16"
    return "bf16"


FP8_BACKENDS = {"fp8-ao": "AO", "fp8-te": "TE"}
"""accelerate's FP8BackendType of each FP8 recipe (the accelerate config's `fp8_config: backend`)."""


def fp8_backend(st: Settings) -> str | None:
    """accelerate's `fp8_backend` for the plan: AO (torchao) or TE (Transformer Engine), with
    their default recipes (AORecipeKwargs, TERecipeKwargs), which the formulas count; None
    without FP8."""
    return FP8_BACKENDS.get(st.precision)


def mixed_precision(st: Settings, bf16_gpu: bool = True) -> str:
    """accelerate's `mixed_precision`: autocast recipes name their dtype; pure 16-bit weights
    (LoRA on a bf16 base) and fp32 run without autocast ("no"); the FP8 recipes "fp8", with the
    backend `fp8_backend` names. MS-AMP is refused: no longer maintained."""
    rc = RECIPES[st.precision]
    if st.precision.startswith("msamp"):
        raise PlanError(f"{{precision}} {st.precision}: {MSAMP_NOTE}", "precision")
    if rc.fp8:
        return "fp8"
    if not rc.autocast:
        return "no"
    return "bf16" if rc.compute == 2 and st.precision.startswith("bf16") and bf16_gpu else "fp16"


DS_REASONS = {
    "reduce_bucket_size": "accelerate's `auto` value, resolved as accelerate resolves it (accelerator.py "
                          "`_prepare_deepspeed`: hidden x hidden); DeepSpeed's own default is 5e8",
    "stage3_prefetch_bucket_size": "accelerate's `auto` value (0.9 x hidden x hidden); DeepSpeed's default is 5e7",
    "stage3_param_persistence_threshold": "accelerate's `auto` value (10 x hidden); DeepSpeed's default is 1e5",
    "stage3_gather_16bit_weights_on_model_save": "gathers the whole 16-bit model when it is saved, so "
                                                 "`save_model` writes weights, not shards (accelerate's "
                                                 "`zero3_save_16bit_model`); DeepSpeed's default is false",
    "nvme_path": "a placeholder: set it to a directory on the node's local NVMe before launching",
    "zero_allow_untested_optimizer": "accelerate hands DeepSpeed the script's own torch optimizer, which "
                                     "DeepSpeed refuses without it",
    "steps_per_print": "silences DeepSpeed's own progress lines (its default prints every 10 steps)",
    "gradient_clipping": "the recipe's `max_grad_norm` (DeepSpeed's default 0 clips nothing)",
}
"""Why each setting of deepspeed.json that is not DeepSpeed's default has the value it has
(PLAN.md lists them). Batch sizes and bf16/fp16 are the plan itself."""


def deepspeed_config(st: Settings, hidden: int, world: int, accumulation: int = 1, clipping: float = 0.0,
                     bf16_gpu: bool = True) -> dict:
    """The DeepSpeed config accelerate hands to `deepspeed.initialize` for a ZeRO stage, with
    the values its `auto` entries resolve to (accelerator.py `_prepare_deepspeed`: reduce bucket
    h x h, ZeRO-3 prefetch bucket 0.9 h x h, persistence threshold 10 h).

    `overlap_comm` is DeepSpeed's default (deepspeed/runtime/zero/config.py `overlap_comm_valid`:
    on for ZeRO-3, off for 1-2). It was written `false` for every stage until 2026-11-29,
    copied from the measurement harness of commit 5f81c90, without a reason: the measurement runs
    on CPU, where DeepSpeed has no side streams (`is_synchronized_device`), so the flag changes
    nothing measured there (the four ZeRO-3 torchrun cases of validate.GLOO: the same peak per
    rank to the byte, off and on, 2026-11-29), and on a GPU turning it off serialises ZeRO-3's collectives with the
    compute, which the speed model assumes overlapped. Every other setting that is not
    DeepSpeed's default is in DS_REASONS."""
    stage = zero_stage(st)
    zero = {"stage": stage, "overlap_comm": stage == 3, "contiguous_gradients": True,
            "reduce_bucket_size": hidden * hidden}
    if st.strategy == "zero3":
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                    stage3_param_persistence_threshold=10 * hidden,
                    stage3_gather_16bit_weights_on_model_save=True)
    nvme = st.offload == "nvme"
    if st.offload in ("optimizer", "all", "nvme"):
        zero["offload_optimizer"] = {"device": "nvme" if nvme else "cpu", "pin_memory": True}
    if st.offload in ("params", "all", "nvme") and st.strategy == "zero3":
        zero["offload_param"] = {"device": "nvme" if nvme else "cpu", "pin_memory": True}
    if nvme:
        for k in ("offload_optimizer", "offload_param"):
            if k in zero:
                zero[k]["nvme_path"] = "/local_nvme"
    half = half_dtype(st, bf16_gpu) if st.precision.startswith(("bf16", "fp16")) else None
    return {"train_micro_batch_size_per_gpu": st.batch_size, "gradient_accumulation_steps": accumulation,
            "train_batch_size": st.batch_size * accumulation * world, "gradient_clipping": clipping,
            "bf16": {"enabled": half == "bf16"}, "fp16": {"enabled": half == "fp16"},
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
            "wall_clock_breakdown": False}


def ds_non_defaults(cfg: dict) -> list[tuple[str, object]]:
    """The settings of a deepspeed.json that DeepSpeed would not choose by itself and DS_REASONS
    explains, as (key, value); the batch sizes and the 16-bit dtype are the plan's own."""
    zero = cfg.get("zero_optimization", {})
    items = list(cfg.items()) + list(zero.items())
    for sub in ("offload_optimizer", "offload_param"):
        items += list(zero.get(sub, {}).items())
    out = []
    for k, v in items:
        if k in DS_REASONS and (k, v) not in out and not (k == "gradient_clipping" and not v):
            out.append((k, v))
    return out


def accelerate_config(st: Settings, deepspeed_file: str | None = None, machine_rank: int = 0,
                      main_process_ip: str | None = None, main_process_port: int = 29500, bf16_gpu: bool = True,
                      big_model: bool = False, activation_checkpointing: bool | None = None):
    """accelerate's ClusterConfig for the plan: `NO` on one GPU, `MULTI_GPU` for DDP, `FSDP`
    (FSDP2: transformer-block wrapping from the model's `_no_split_modules`, reshard after
    forward unless grad-op, CPU offload for `--offload all`, activation checkpointing of each
    block when the plan checkpoints; hybrid and no-shard as a replicate x shard device mesh
    through `parallelism_config`), `DEEPSPEED` with the JSON.

    `activation_checkpointing` (default: the plan's) is FSDP's `fsdp_activation_checkpointing`:
    accelerate wraps each transformer block in torch's non-reentrant checkpoint wrapper, the
    recompute the estimate counts. `plan train` passes False: its trainer checkpoints through
    transformers' `gradient_checkpointing_enable` (both at once would recompute twice)."""
    from accelerate.commands.config.config_args import ClusterConfig

    world = world_size(st)
    kw = dict(compute_environment="LOCAL_MACHINE", mixed_precision=mixed_precision(st, bf16_gpu), use_cpu=False,
              debug=False, num_processes=world, num_machines=st.nodes, machine_rank=machine_rank,
              rdzv_backend="static", same_network=True, main_training_function="main", downcast_bf16=False,
              enable_cpu_affinity=False)
    if st.nodes > 1:
        if not main_process_ip:
            raise PlanError(f"{st.nodes} nodes: pass {{main_process_ip}} (the address of machine rank 0)",
                            "main_process_ip")
        kw.update(main_process_ip=main_process_ip, main_process_port=main_process_port)
    if st.strategy in ZERO:
        # the precision is deepspeed.json's: accelerate launch refuses a `mixed_precision` beside a
        # `deepspeed_config_file` (DeepSpeedPlugin._deepspeed_config_checks raises "the following
        # accelerate config variables will be ignored"); `accelerate config` writes None there too
        kw["mixed_precision"] = None
        kw.update(distributed_type="DEEPSPEED",
                  deepspeed_config={"deepspeed_config_file": deepspeed_file, "zero3_init_flag": st.strategy == "zero3",
                                    "deepspeed_multinode_launcher": "standard"})
    elif st.strategy in FSDP:
        fsdp = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_reshard_after_forward": st.strategy != "fsdp-grad-op", "fsdp_offload_params": st.offload == "all",
                "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": big_model,
                "fsdp_activation_checkpointing": st.grad_checkpointing if activation_checkpointing is None
                else activation_checkpointing}
        kw.update(distributed_type="FSDP", fsdp_config=fsdp)
        if st.strategy in ("fsdp-hybrid", "fsdp-no-shard"):
            shard = shard_size(st)
            kw["parallelism_config"] = {"parallelism_config_dp_replicate_size": world // shard,
                                        "parallelism_config_dp_shard_size": shard}
    else:
        kw.update(distributed_type="MULTI_GPU" if world > 1 else "NO")
    if fp8_backend(st):
        kw["fp8_config"] = {"backend": fp8_backend(st)}
        if fp8_backend(st) == "AO":
            # AORecipeKwargs defaults it to true (accelerate/utils/dataclasses.py:350-353): each
            # converted weight becomes a new Parameter (torchao's Float8Linear.from_float), which
            # an optimizer built before `prepare` never sees; it only serves FSDP2's all-gather
            kw["fp8_config"]["enable_fsdp_float8_all_gather"] = False
    return ClusterConfig(**kw)


ADAPTER_KEYS = ("load_in_4bit", "load_in_8bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
"""Recipe keys that mean something only with an adapter: left out of a full fine-tune's recipe."""
LOSS_RECIPE_KEYS = (*LOSS_KEYS.values(), "chunked_cross_entropy_num_chunks")
"""Recipe keys of the losses other than the standard one: only the plan's are written."""


QUIET_DEFAULTS = {"load_in_8bit": False, "warmup_ratio": 0.0, "attn_implementation": "sdpa", "tf32": False}
"""Recipe keys (Axolotl's) that a plan leaves at their defaults: not written."""


def relative_to(path: str, out_dir: str) -> str:
    """`path` as the plan directory `out_dir` reaches it: a relative path (taken from the
    working directory) rewritten relative to `out_dir`, starting with `./` or `../` so that it
    never reads as a Hub id; an absolute path as it is."""
    if os.path.isabs(path):
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
    return rel if rel.startswith("..") else "./" + rel


def recipe_dict(model: str, st: Settings, accumulation: int, est: Estimate, gpu: str | None = None,
                data: str | None = None, data_format: str = "alpaca", gguf_file: str | None = None,
                bf16_gpu: bool = True) -> dict:
    """The `plan train` recipe for the plan (planner/recipe.py), with its expected memory; only
    the keys that apply (no LoRA keys in a full fine-tune). Paths are written as given: `render`
    makes them relative to the plan directory."""
    adapter = None if not st.lora else ("qlora" if st.quant == "nf4" else "lora")
    if st.optimizer == "lbfgs":
        raise PlanError("{optimizer} lbfgs: plan train cannot run it (it needs a closure that re-evaluates the loss on "
                        "the same batch, and plan train steps through mini-batches); plan estimate and plan recommend "
                        "count its memory", "optimizer")
    half = half_dtype(st, bf16_gpu)
    d = {"base_model": model}
    if gguf_file:
        d["gguf_file"] = gguf_file
    if data:
        d["datasets"] = [{"path": data, "type": data_format}]
    if adapter:
        d.update(adapter=adapter, load_in_4bit=adapter == "qlora", load_in_8bit=st.quant == "int8",
                 lora_r=st.lora_rank,
                 lora_alpha=st.lora_alpha if st.lora_alpha is not None else 2.0 * st.lora_rank,
                 lora_dropout=st.lora_dropout,
                 lora_target_modules="all-linear" if st.lora_targets == "all-linear"
                 else [t.strip() for t in st.lora_targets.split(",") if t.strip()])
    d.update(sequence_len=st.seq_len, micro_batch_size=st.batch_size, gradient_accumulation_steps=accumulation,
             optimizer=optimizer_name(st.optimizer, st.optimizer_paged), learning_rate=2e-4 if adapter else 2e-5,
             bf16=half == "bf16", fp16=half == "fp16", fp8=st.precision == "fp8-ao",
             gradient_checkpointing=st.grad_checkpointing, activation_offloading=st.activation_offload,
             **recipe_loss_keys(st),
             unfrozen_parameters=list(st.unfrozen_parameters) or None, ema_decay=EMA_DECAY if st.ema else None,
             plan={"strategy": st.strategy, "offload": st.offload, "gpus": st.gpus, "nodes": st.nodes, "gpu": gpu,
                   "precision": st.precision,
                   "expected": {"peak_bytes": int(est.peak_bytes), "device_bytes": int(est.device_bytes),
                                "components": {k: int(v) for k, v in est.components.items()},
                                "cpu_bytes": int(est.cpu_bytes)}})
    if gpu is None:
        del d["plan"]["gpu"]
    out = from_dict(d, "emitted recipe").model_dump(mode="json", exclude_none=True)
    if not adapter:
        for k in ADAPTER_KEYS:
            out.pop(k, None)
    for k, default in QUIET_DEFAULTS.items():  # keys a plan does not set, left out at their defaults
        if out.get(k) == default:
            out.pop(k)
    if not out.get("fp8"):
        out.pop("fp8", None)
    if "loss_watchdog_threshold" not in out:
        out.pop("loss_watchdog_patience", None)
    if not st.activation_offload:
        out.pop("activation_offloading", None)
    loss = recipe_loss_keys(st)
    for k in LOSS_RECIPE_KEYS:  # only the loss the plan uses (none for the standard loss)
        if k not in loss:
            out.pop(k, None)
    return out


def _gib(b: float) -> str:
    return f"{b / 2**30:,.1f} GiB"


def own_script_lines(st: Settings, accumulation: int, bf16_gpu: bool = True) -> list[str]:
    """What a user's own script must do for the plan where accelerate.yaml has no key: one line
    each (`plan train` does all of it from the recipe)."""
    lines = []
    half = half_dtype(st, bf16_gpu)
    dt = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(half or "", "torch.float32")
    if st.quant == "nf4":
        lines.append("4-bit base: `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
                     "bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True, "
                     f"bnb_4bit_compute_dtype={dt}))`")
    elif st.lora and RECIPES[st.precision].weight == 2:
        lines.append(f"16-bit base: `from_pretrained(..., dtype={dt})`")
    if st.lora:
        targets = '"all-linear"' if st.lora_targets == "all-linear" else \
            repr([t.strip() for t in st.lora_targets.split(",") if t.strip()])
        alpha = st.lora_alpha if st.lora_alpha is not None else 2.0 * st.lora_rank
        lines.append(f"adapters: `model = peft.get_peft_model(model, LoraConfig(r={st.lora_rank}, "
                     f"lora_alpha={alpha:g}, lora_dropout={st.lora_dropout:g}, target_modules={targets}))`")
    if st.unfrozen_parameters:
        pats = ", ".join(f"r\"{x}\"" for x in st.unfrozen_parameters)
        lines.append(f"LoRA beside whole modules: add `modules_to_save=` the modules owning a parameter whose name "
                     f"matches {pats} to the LoraConfig (PEFT trains a copy of each)" if st.lora else
                     f"freezing: `p.requires_grad_(any(re.search(r, name) for r in [{pats}]))` for each "
                     "`model.named_parameters()`; only those train")
    if st.ema:
        lines.append("EMA: `ema = torch.optim.swa_utils.AveragedModel(torch.nn.ParameterList(trainable), "
                     f"multi_avg_fn=get_ema_multi_avg_fn({EMA_DECAY}))`, `ema.update_parameters(...)` after each "
                     "optimizer step")
    if st.grad_checkpointing:
        if st.strategy in FSDP:
            lines.append("checkpointing: accelerate.yaml sets `fsdp_activation_checkpointing: true` (each block is "
                         "recomputed); do not also call `gradient_checkpointing_enable`")
        else:
            lines.append("checkpointing: `model.gradient_checkpointing_enable("
                         "gradient_checkpointing_kwargs={\"use_reentrant\": False})`")
    if st.activation_offload:
        lines.append("activation offloading: `ctx = trl.models.activation_offloading.get_act_offloading_ctx_manager("
                     "model)`, the forward and loss under `with ctx:` (what TRL's `activation_offloading=True` does)")
    lines.append(f"micro-batch: `DataLoader(..., batch_size={st.batch_size})`, "
                 f"sequences of at most {st.seq_len} tokens")
    if st.strategy in ZERO:
        lines.append(f"accumulation: {accumulation}, set in deepspeed.json (`gradient_accumulation_steps`)")
    elif accumulation > 1 and st.strategy in FSDP:
        lines.append(f"accumulation: {accumulation} micro-steps per optimizer step, each one's gradients "
                     "reduce-scattered (not accelerate's `accumulate()`: see the note below)")
    elif accumulation > 1:
        lines.append(f"accumulation: `Accelerator(gradient_accumulation_steps={accumulation})`")
    opt = {"adamw": "torch.optim.AdamW(params, foreach=True)", "adamw-fused": "torch.optim.AdamW(params, fused=True)",
           "adamw-8bit": "bitsandbytes.optim.AdamW8bit(params)", "lion": "bitsandbytes.optim.Lion(params)",
           "sgd": "torch.optim.SGD(params, foreach=True)",
           "sgd-momentum": "torch.optim.SGD(params, momentum=0.9, foreach=True)",
           "adafactor": "transformers.optimization.Adafactor(params, scale_parameter=False, relative_step=False)"}
    if st.optimizer in opt:
        lines.append(f"optimizer: `{opt[st.optimizer]}`")
    return lines


def plan_md(model: str, st: Settings, accumulation: int, est: Estimate, files: list[str], why: list[str] | None = None,
            gpu: str | None = None, *, bf16_gpu: bool = True, ds: dict | None = None,
            warnings: list[str] | None = None) -> str:
    gib = 2**30
    world = world_size(st)
    method = ("full fine-tune" if not st.lora
              else (f"QLoRA r={st.lora_rank}" if st.quant == "nf4" else f"LoRA r={st.lora_rank}"))
    half = half_dtype(st, bf16_gpu)
    lines = [f"# Plan: {model}", ""]
    for w in warnings or []:
        lines += [f"**Warning**: {w}", ""]
    lines += [f"- **Hardware**: {st.nodes} node(s) x {st.gpus} GPU(s)" + (f" ({gpu})" if gpu else ""),
              f"- **Method**: {method}, {st.precision}" + (
                  f" (FP8 linears, {fp8_backend(st)} backend, under {half} autocast)" if fp8_backend(st)
                  else f" (computing in {half})" if half else "")
              + f", {st.optimizer}" + (", gradient checkpointing" if st.grad_checkpointing else "")
              + (f", loss {st.loss}" + (f" ({st.loss_chunks} chunks)" if st.loss == "chunked" else "")
                 if st.loss != "standard" else "")
              + (", activation offloading (TRL's OffloadActivations)" if st.activation_offload else ""),
              f"- **Strategy**: {st.strategy}" + (f", offload {st.offload}" if st.offload != "none" else ""),
              f"- **Batch**: micro-batch {st.batch_size} x accumulation {accumulation} x {world} GPU(s) = "
              f"{st.batch_size * accumulation * world} sequences of {st.seq_len} tokens per optimizer step",
              f"- **Expected memory per GPU**: {est.peak_bytes / gib:,.2f} GiB of tensors at the peak "
              f"(torch.cuda.max_memory_allocated), {est.device_bytes / gib:,.2f} GiB as NVML sees the process"
              + (f"; host RAM per node {est.cpu_bytes / gib:,.1f} GiB" if est.cpu_bytes else "")
              + (f"; NVMe per node {est.nvme_bytes / gib:,.1f} GiB" if est.nvme_bytes else "")
              + (f"; {DERIVED_NOTE}" if est.route == "derived" else ""), ""]
    if why:
        lines += ["Why:", ""] + [f"- {w}" for w in why] + [""]
    lines += ["Files:", ""] + [f"- `{f}`" for f in files] + ["",
              "Run it from this directory: the recipe's paths are relative to it"
              + (", and so is accelerate.yaml's `deepspeed_config_file` (accelerate passes it to each process, "
                 "which opens it relative to the working directory)" if "deepspeed.json" in files else "")
              + ". The directory can move (to a cluster) as a whole.", "", "```bash",
              "plan train recipe.yaml            # plans nothing: launches this recipe through accelerate",
              "accelerate launch --config_file accelerate.yaml your_script.py   # or your own script", "```", "",
              "In your own script, the plan's decisions that accelerate.yaml does not carry out (`plan train` "
              "does them all from the recipe):",
              ""] + [f"- {x}" for x in own_script_lines(st, accumulation, bf16_gpu)] + [""]
    if ds is not None:
        lines += ["DeepSpeed settings in `deepspeed.json` that are not DeepSpeed's defaults, and why:", ""]
        lines += [f"- `{k}: {json_value(v)}`: {DS_REASONS[k]}" for k, v in ds_non_defaults(ds)] + [""]
    if st.strategy in FSDP:
        lines += ["FSDP note: the estimate assumes gradients are reduce-scattered on every micro-step "
                  "(what `plan train` does). Wrapping micro-steps in accelerate's `accumulate()` puts FSDP2 in "
                  "no-sync mode, which keeps whole unsharded gradients between micro-steps: more memory.", ""]
    return "\n".join(lines)


def json_value(v: object) -> str:
    import json
    return json.dumps(v)


def write_files(out_dir: str, contents: dict[str, str], force: bool = False) -> list[str]:
    """Write each file atomically into out_dir, with the mode a new file gets (0666 less the
    umask: 0644 under the usual 022), not mkstemp's 0600. Refuse (before writing anything) when
    one of them exists and `force` is not set; a directory that cannot be created or written is
    one PlanError line."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PlanError(f"{{out}} {out_dir}: exists and is not a directory", "out")
    clash = [n for n in contents if (out / n).exists()]
    if clash and not force:
        raise PlanError(f"{{out}} {out_dir}: would overwrite {', '.join(clash)}; pass {{force}} to replace them", "out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in contents.items():
            tmp = out / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, out / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written.append(str(out / name))
        return written
    except OSError as e:
        raise PlanError(f"{{out}} {out_dir}: cannot write ({e.strerror or e})", "out") from None


def render(model: str, st: Settings, accumulation: int, est: Estimate, out_dir: str, hidden: int, *,
           gpu: str | None = None, bf16_gpu: bool = True, why: list[str] | None = None, data: str | None = None,
           data_format: str = "alpaca", machine_rank: int = 0, main_process_ip: str | None = None,
           main_process_port: int = 29500, clipping: float = 1.0, gguf_file: str | None = None,
           warnings: list[str] | None = None) -> dict[str, str]:
    """The files' contents, by name. Paths are relative to `out_dir` (the recipe's data as
    `relative_to` rewrites it, `deepspeed_config_file` as the bare file name), so the directory
    runs where it lands when launched from inside it."""
    import json

    import yaml

    files: dict[str, str] = {}
    ds_path, ds = None, None
    if st.strategy in ZERO:
        ds_path = "deepspeed.json"
        ds = deepspeed_config(st, hidden, world_size(st), accumulation, clipping, bf16_gpu)
        files["deepspeed.json"] = json.dumps(ds, indent=2) + "\n"
    cfg = accelerate_config(st, ds_path, machine_rank, main_process_ip, main_process_port, bf16_gpu,
                            big_model=est.params >= 10**9)
    files["accelerate.yaml"] = yaml.safe_dump(cfg.to_dict())
    recipe = recipe_dict(model, st, accumulation, est, gpu, relative_to(data, out_dir) if data else None,
                         data_format, gguf_file, bf16_gpu)
    files["recipe.yaml"] = yaml.safe_dump(recipe, sort_keys=False)
    names = ["accelerate.yaml"] + (["deepspeed.json"] if ds_path else []) + ["recipe.yaml"]
    files["PLAN.md"] = plan_md(model, st, accumulation, est, names, why, gpu, bf16_gpu=bf16_gpu, ds=ds,
                               warnings=warnings)
    return {n: files[n] for n in FILES if n in files}
