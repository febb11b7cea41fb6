"""`plan emit-config`: a plan written as the files the launchers take.

- `accelerate.yaml`: built with accelerate's own `ClusterConfig`, so `accelerate launch
  --config_file` reads it as it reads its own (`accelerate config` writes the same class);
- `deepspeed.json` for ZeRO, with accelerate's `auto` values resolved as accelerate resolves them,
  so DeepSpeed's own `DeepSpeedConfig` parses it and the run is the one the estimate modelled;
- `recipe.yaml` for `plan train` (planner/recipe.py), with the memory the plan expects;
- `PLAN.md`, a short summary for people.

Files are written atomically (a temporary file, then a rename) and an existing file is never
replaced without `force`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .contract import FSDP, ZERO, PlanError, Settings, optimizer_name, shard_size, world_size
from .distributed import zero_stage
from .estimate import Estimate
from .precision import RECIPES
from .recipe import from_dict, recipe_loss_keys

FILES = ("accelerate.yaml", "deepspeed.json", "recipe.yaml", "PLAN.md")


def mixed_precision(st: Settings, bf16_gpu: bool = True) -> str:
    """accelerate's `mixed_precision`: autocast recipes name their dtype; pure 16-bit weights
    (LoRA on a bf16 base) and fp32 run without autocast ("no")."""
    rc = RECIPES[st.precision]
    if not rc.autocast:
        return "no"
    return "bf16" if rc.compute == 2 and st.precision.startswith("bf16") and bf16_gpu else "fp16"


def deepspeed_config(st: Settings, hidden: int, world: int, accumulation: int = 1, clipping: float = 0.0) -> dict:
    """The DeepSpeed config accelerate hands to `deepspeed.initialize` for a ZeRO stage, with
    the values its `auto` entries resolve to (accelerator.py `_prepare_deepspeed`: reduce bucket
    h x h, ZeRO-3 prefetch bucket 0.9 h x h, persistence threshold 10 h). `overlap_comm` off:
    the configuration the estimate was measured against (on, DeepSpeed keeps extra buckets)."""
    zero = {"stage": zero_stage(st), "overlap_comm": False, "contiguous_gradients": True,
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
    rc = RECIPES[st.precision]
    half = rc.compute == 2
    return {"train_micro_batch_size_per_gpu": st.batch_size, "gradient_accumulation_steps": accumulation,
            "train_batch_size": st.batch_size * accumulation * world, "gradient_clipping": clipping,
            "bf16": {"enabled": half and st.precision.startswith("bf16")},
            "fp16": {"enabled": half and st.precision.startswith("fp16")},
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
            "wall_clock_breakdown": False}


def accelerate_config(st: Settings, deepspeed_file: str | None = None, machine_rank: int = 0,
                      main_process_ip: str | None = None, main_process_port: int = 29500, bf16_gpu: bool = True,
                      big_model: bool = False):
    """accelerate's ClusterConfig for the plan: `NO` on one GPU, `MULTI_GPU` for DDP, `FSDP`
    (FSDP2: transformer-block wrapping from the model's `_no_split_modules`, reshard after
    forward unless grad-op, CPU offload for `--offload all`; hybrid and no-shard as a
    replicate x shard device mesh through `parallelism_config`), `DEEPSPEED` with the JSON."""
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
        kw.update(distributed_type="DEEPSPEED",
                  deepspeed_config={"deepspeed_config_file": deepspeed_file, "zero3_init_flag": st.strategy == "zero3",
                                    "deepspeed_multinode_launcher": "standard"})
    elif st.strategy in FSDP:
        fsdp = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_reshard_after_forward": st.strategy != "fsdp-grad-op", "fsdp_offload_params": st.offload == "all",
                "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": big_model,
                "fsdp_activation_checkpointing": False}
        kw.update(distributed_type="FSDP", fsdp_config=fsdp)
        if st.strategy in ("fsdp-hybrid", "fsdp-no-shard"):
            shard = shard_size(st)
            kw["parallelism_config"] = {"parallelism_config_dp_replicate_size": world // shard,
                                        "parallelism_config_dp_shard_size": shard}
    else:
        kw.update(distributed_type="MULTI_GPU" if world > 1 else "NO")
    return ClusterConfig(**kw)


def recipe_dict(model: str, st: Settings, accumulation: int, est: Estimate, gpu: str | None = None,
                data: str | None = None, data_format: str = "alpaca", gguf_file: str | None = None) -> dict:
    """The `plan train` recipe for the plan (planner/recipe.py), with its expected memory."""
    rc = RECIPES[st.precision]
    adapter = None if not st.lora else ("qlora" if st.quant == "nf4" else "lora")
    if st.quant == "int8":
        raise PlanError("plan train runs QLoRA on an NF4 base; an int8 base has no recipe yet (use {quant} nf4)",
                        "quant")
    half = rc.compute == 2 or (st.lora and rc.weight == 2)
    d = {"base_model": model}
    if gguf_file:
        d["gguf_file"] = gguf_file
    if data:
        d["datasets"] = [{"path": data, "type": data_format}]
    if adapter:
        d.update(adapter=adapter, load_in_4bit=adapter == "qlora", lora_r=st.lora_rank,
                 lora_alpha=st.lora_alpha if st.lora_alpha is not None else 2.0 * st.lora_rank,
                 lora_dropout=st.lora_dropout,
                 lora_target_modules="all-linear" if st.lora_targets == "all-linear"
                 else [t.strip() for t in st.lora_targets.split(",") if t.strip()])
    d.update(sequence_len=st.seq_len, micro_batch_size=st.batch_size, gradient_accumulation_steps=accumulation,
             optimizer=optimizer_name(st.optimizer, st.optimizer_paged), learning_rate=2e-4 if adapter else 2e-5,
             bf16=half and "fp16" not in st.precision, fp16=half and "fp16" in st.precision,
             gradient_checkpointing=st.grad_checkpointing, **recipe_loss_keys(st),
             plan={"strategy": st.strategy, "offload": st.offload, "gpus": st.gpus, "nodes": st.nodes, "gpu": gpu,
                   "precision": st.precision,
                   "expected": {"peak_bytes": int(est.peak_bytes), "device_bytes": int(est.device_bytes),
                                "components": {k: int(v) for k, v in est.components.items()},
                                "cpu_bytes": int(est.cpu_bytes)}})
    if gpu is None:
        del d["plan"]["gpu"]
    return from_dict(d, "emitted recipe").model_dump(mode="json", exclude_none=True)


def plan_md(model: str, st: Settings, accumulation: int, est: Estimate, files: list[str], why: list[str] | None = None,
            gpu: str | None = None) -> str:
    gib = 2**30
    world = world_size(st)
    method = ("full fine-tune" if not st.lora
              else (f"QLoRA r={st.lora_rank}" if st.quant == "nf4" else f"LoRA r={st.lora_rank}"))
    lines = [f"# Plan: {model}", "",
             f"- **Hardware**: {st.nodes} node(s) x {st.gpus} GPU(s)" + (f" ({gpu})" if gpu else ""),
             f"- **Method**: {method}, {st.precision}, {st.optimizer}"
             + (", gradient checkpointing" if st.grad_checkpointing else "")
             + (f", loss {st.loss}" + (f" ({st.loss_chunks} chunks)" if st.loss == "chunked" else "")
                if st.loss != "standard" else ""),
             f"- **Strategy**: {st.strategy}" + (f", offload {st.offload}" if st.offload != "none" else ""),
             f"- **Batch**: micro-batch {st.batch_size} x accumulation {accumulation} x {world} GPU(s) = "
             f"{st.batch_size * accumulation * world} sequences of {st.seq_len} tokens per optimizer step",
             f"- **Expected memory per GPU**: {est.peak_bytes / gib:,.2f} GiB of tensors at the peak "
             f"(torch.cuda.max_memory_allocated), {est.device_bytes / gib:,.2f} GiB as NVML sees the process"
             + (f"; host RAM per node {est.cpu_bytes / gib:,.1f} GiB" if est.cpu_bytes else ""), ""]
    if why:
        lines += ["Why:", ""] + [f"- {w}" for w in why] + [""]
    lines += ["Files:", ""] + [f"- `{f}`" for f in files] + ["",
              "Run it:", "", "```bash",
              "plan train recipe.yaml            # plans nothing: launches this recipe through accelerate",
              "accelerate launch --config_file accelerate.yaml your_script.py   # or your own script", "```", ""]
    if st.strategy in FSDP:
        lines += ["FSDP note: the estimate assumes gradients are reduce-scattered on every micro-step "
                  "(what `plan train` does). Wrapping micro-steps in accelerate's `accumulate()` puts FSDP2 in "
                  "no-sync mode, which keeps whole unsharded gradients between micro-steps: more memory.", ""]
    return "\n".join(lines)


def write_files(out_dir: str, contents: dict[str, str], force: bool = False) -> list[str]:
    """Write each file atomically into out_dir. Refuse (before writing anything) when one of
    them exists and `force` is not set; a directory that cannot be created or written is one
    PlanError line."""
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
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
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
           main_process_port: int = 29500, clipping: float = 1.0, gguf_file: str | None = None) -> dict[str, str]:
    """The files' contents, by name."""
    import json

    import yaml

    files: dict[str, str] = {}
    ds_path = None
    if st.strategy in ZERO:
        ds_path = str((Path(out_dir) / "deepspeed.json").resolve())
        files["deepspeed.json"] = json.dumps(deepspeed_config(st, hidden, world_size(st), accumulation, clipping),
                                             indent=2) + "\n"
    cfg = accelerate_config(st, ds_path, machine_rank, main_process_ip, main_process_port, bf16_gpu,
                            big_model=est.params >= 10**9)
    files["accelerate.yaml"] = yaml.safe_dump(cfg.to_dict())
    recipe = recipe_dict(model, st, accumulation, est, gpu, data, data_format, gguf_file)
    files["recipe.yaml"] = yaml.safe_dump(recipe, sort_keys=False)
    names = ["accelerate.yaml"] + (["deepspeed.json"] if ds_path else []) + ["recipe.yaml"]
    files["PLAN.md"] = plan_md(model, st, accumulation, est, names, why, gpu)
    return {n: files[n] for n in FILES if n in files}
