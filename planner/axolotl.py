"""Axolotl configs read as `plan` recipes: `plan estimate CONFIG.yml` and `plan train CONFIG.yml`.

Axolotl's config (axolotl/utils/schemas/config.py, `AxolotlInputConfig`) names most of what a
recipe holds with the same keys (planner/recipe.py takes Axolotl's names where they overlap);
the rest is translated here, key by key:

- the same key, the same meaning: taken as it is (base_model, adapter, lora_r, sequence_len,
  micro_batch_size, optimizer, ...);
- translated: `lora_target_linear` (all-linear), `bf16`/`fp16: auto` (bf16 where the device has
  it, as Axolotl's `is_torch_bf16_gpu_available`; fp32 on a CPU), `flash_attention`,
  `sdp_attention`, `eager_attention` and `attn_implementation`, `datasets` entries (`type:
  chat_template` is the chat format, `field_messages` its field), `deepspeed` (the JSON's ZeRO
  stage and offload devices), `fsdp`/`fsdp_config`/`fsdp_version`, `plugins` (Liger's and Cut
  Cross-Entropy's, whose losses the estimate counts);
- ignored, named in one line: keys that change neither the memory nor the trained weights
  (logging, hub, wandb, when to evaluate and save);
- for the estimate only, named: keys that change the trained weights but not the memory, or
  only lower it (the estimate is then an upper bound); `plan train` refuses them;
- refused, in one line naming them: everything else (techniques `plan` does not model:
  context parallelism, tiled MLP, activation offloading, RL trainers, ...).

An Axolotl key set to null, false or an empty value is unset (Axolotl's own reading), so the
empty `wandb_project:` lines of its examples are not even named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import Recipe, RecipeError, from_dict

PLAN_ONLY = ("plan", "gguf_file")
"""Recipe keys that are `plan`'s own: an Axolotl config does not set them."""

IGNORED = {
    **{k: "logging" for k in ("wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model",
                              "wandb_run_id", "mlflow_tracking_uri", "mlflow_experiment_name", "use_tensorboard",
                              "comet_api_key", "comet_project_name", "swanlab_project", "debug", "logging_dir",
                              "include_tokens_per_second", "profiler_steps")},
    **{k: "the Hub" for k in ("hub_model_id", "hub_strategy", "push_dataset_to_hub", "hf_use_auth_token")},
    **{k: "when to evaluate or save: plan train does at eval_steps, save_steps and the end"
       for k in ("evals_per_epoch", "saves_per_epoch", "save_strategy", "save_total_limit", "eval_strategy",
                 "save_first_step", "save_safetensors", "eval_table_size", "eval_max_new_tokens",
                 "eval_sample_packing", "eval_causal_lm_metrics", "do_causal_lm_eval", "save_only_model")},
    **{k: "where prepared data is cached" for k in ("dataset_prepared_path", "dataset_processes",
                                                   "dataset_num_proc")},
    "strict": "Axolotl's own config check",
    "model_type": "the model class: plan loads the base model's own",
    "tokenizer_type": "the tokenizer class: plan loads the base model's own",
    "gradient_checkpointing_kwargs": "plan checkpoints non-reentrantly (use_reentrant: false); the recomputation "
                                     "keeps the same tensors either way",
    "ddp_find_unused_parameters": "DDP's unused-parameter search",
    "fsdp_final_state_dict_type": "the format of the final FSDP save",
}
"""Keys that change neither the memory nor the trained weights, and what they are about."""

ESTIMATE_ONLY = {
    "chat_template": "a chat template other than the tokenizer's own, which plan renders chats with",
    "special_tokens": "tokens added to or changed in the tokenizer (Axolotl resizes the embeddings for new ones)",
    "streaming": "streamed datasets (plan train reads local files)",
    "shuffle_merged_datasets": "the order of merged datasets",
    "streaming_multipack_buffer_size": "streamed packing",
    "peft_use_rslora": "rank-stabilised LoRA scaling",
    "lora_fan_in_fan_out": "PEFT's fan_in_fan_out",
    **{k: f"Liger's {k.removeprefix('liger_')} kernel: it keeps less than torch's, so the estimate is an upper bound"
       for k in ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_layer_norm", "liger_swiglu",
                 "liger_cross_entropy")},
}
"""Keys that change the trained weights but not the memory the estimate counts (or only lower it):
the estimate names and leaves them out; `plan train` refuses them."""

ATTENTION = {"flash_attention_2": "flash_attention_2", "flash": "flash_attention_2", "sdpa": "sdpa",
             "eager": "eager"}
"""Axolotl's `attn_implementation` values -> the recipe's (transformers')."""
ATTENTION_FLAGS = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "eager_attention": "eager"}
"""Axolotl's older boolean attention keys -> the recipe's attn_implementation."""

DATA_TYPES = {"alpaca": "alpaca", "chat_template": "chat", "completion": "completion"}
"""Axolotl's dataset `type`s -> the recipe's formats."""
DATA_IGNORED = ("split", "ds_type", "shards", "roles_to_train", "train_on_eos")

PLUGINS = {
    "axolotl.integrations.liger.LigerPlugin": None,  # its keys say which kernels (liger_*)
    "axolotl.integrations.liger.plugin.LigerPlugin": None,
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": "cut_cross_entropy",
}
"""Plugins whose effect plan models; the value is the recipe key a plugin turns on by itself
(Cut Cross-Entropy's `cut_cross_entropy` defaults to true once the plugin is listed)."""

FSDP_STRATEGIES = {"full_shard": "fsdp", "shard_grad_op": "fsdp-grad-op", "hybrid_shard": "fsdp-hybrid",
                   "no_shard": "fsdp-no-shard"}
"""FSDP's sharding strategies (`fsdp: [full_shard, auto_wrap]` or `fsdp_sharding_strategy`) ->
the contract's strategies; FSDP2's `reshard_after_forward: false` is SHARD_GRAD_OP."""


@dataclass
class Translated:
    """An Axolotl config as a recipe; what was left out and why, one entry per key."""
    recipe: Recipe
    ignored: dict[str, str] = field(default_factory=dict)
    estimate_only: dict[str, str] = field(default_factory=dict)
    fsdp_version: int = 2  # FSDP1 (`fsdp: [full_shard, ...]` without fsdp_version: 2) or FSDP2

    def notes(self) -> list[str]:
        """One line for what was ignored and one for what the estimate leaves out, keys with the
        same reason together."""
        out = []
        if self.ignored:
            out.append("ignored: " + _grouped(self.ignored))
        if self.estimate_only:
            out.append("not modelled, left out of the estimate (plan train refuses them): "
                       + _grouped(self.estimate_only))
        return out


def _grouped(why: dict[str, str]) -> str:
    by: dict[str, list[str]] = {}
    for k, reason in why.items():
        by.setdefault(reason, []).append(k)
    return "; ".join(f"{', '.join(keys)} ({reason})" for reason, keys in by.items())


def unset(value: Any) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {}


def is_axolotl(data: dict) -> bool:
    """Whether a YAML mapping is an Axolotl config rather than a plan recipe: it has a key the
    recipe does not know and this module reads as Axolotl's, or a value only Axolotl writes
    (`bf16: auto`). A recipe with a mistyped key stays a recipe (and says "unknown key")."""
    known = set(Recipe.model_fields)
    axolotl = {*ATTENTION_FLAGS, *IGNORED, *ESTIMATE_ONLY, "lora_target_linear", "deepspeed", "plugins", "fsdp",
               "fsdp_config", "fsdp_version"}
    return any(k not in known and k in axolotl for k in data) or data.get("bf16") == "auto" \
        or data.get("fp16") == "auto"


def translate(data: dict, source: str, *, bf16_device: bool, training: bool, base_dir: Path | None = None,
              ) -> Translated:
    """The recipe an Axolotl config describes. `bf16_device`: whether `bf16: auto` finds bf16
    (a GPU with it); `training`: `plan train` (estimate-only keys and unreadable datasets are
    refused); `base_dir`: where a relative `deepspeed` JSON path is looked for first."""
    known = set(Recipe.model_fields) - set(PLAN_ONLY)
    rec: dict[str, Any] = {}
    t = Translated(recipe=None)  # type: ignore[arg-type]
    refused: dict[str, str] = {}
    plan: dict[str, Any] = {}
    for key, value in data.items():
        if unset(value):
            continue
        if key in ATTENTION_FLAGS:
            rec["attn_implementation"] = ATTENTION_FLAGS[key]
        elif key == "attn_implementation":
            if value not in ATTENTION:
                refused[key] = f"'{value}' (plan runs sdpa, eager or flash_attention_2)"
            else:
                rec[key] = ATTENTION[value]
        elif key == "lora_target_linear":
            rec["lora_target_modules"] = "all-linear"
        elif key in ("bf16", "fp16"):
            rec[key] = (bf16_device if key == "bf16" else False) if value == "auto" else value
        elif key == "datasets":
            if training:
                rec[key] = [_dataset(d, i, source) for i, d in enumerate(value)]
            else:
                t.ignored[key] = "plan estimate does not read the data"
        elif key == "deepspeed":
            plan.update(_deepspeed(value, source, base_dir))
        elif key in ("fsdp", "fsdp_config", "fsdp_version"):
            continue  # read together below
        elif key == "plugins":
            for p in value:
                if p not in PLUGINS:
                    refused[f"plugins: {p}"] = "a plugin plan does not model"
                elif PLUGINS[p] and PLUGINS[p] not in data:
                    rec[PLUGINS[p]] = True
        elif key in IGNORED:
            t.ignored[key] = IGNORED[key]
        elif key in ESTIMATE_ONLY:
            if key == "chat_template" and value == "tokenizer_default":
                continue  # the tokenizer's own: what plan renders with
            if key == "special_tokens" and set(value) <= {"pad_token"}:
                t.ignored[key] = "the pad token: padding is masked out of the loss and the attention"
                continue
            (refused if training else t.estimate_only)[key] = ESTIMATE_ONLY[key]
        elif key == "output_dir" and training:
            rec[key] = str(Path(value).expanduser().resolve())  # from the working directory, as Axolotl
        elif key in known:
            rec[key] = value
        else:
            refused[key] = "not supported"
    if "lora_target_modules" in data and data.get("lora_target_linear"):
        rec["lora_target_modules"] = "all-linear"  # Axolotl adds the listed modules to every linear one
    if not unset(data.get("fsdp")) or not unset(data.get("fsdp_config")):
        plan.update(_fsdp(data.get("fsdp") or [], data.get("fsdp_config") or {}))
        t.fsdp_version = int(data.get("fsdp_version") or (data.get("fsdp_config") or {}).get("fsdp_version") or 1)
    if data.get("load_in_4bit") and data.get("adapter") == "qlora":
        rec.pop("load_in_8bit", None)
    if refused:
        raise RecipeError(f"{source}: not supported by plan: " + "; ".join(
            f"{k} ({why})" for k, why in refused.items()))
    if plan:
        rec["plan"] = plan
    t.recipe = from_dict(rec, source)
    return t


def _dataset(d: Any, i: int, source: str) -> dict:
    """One `datasets:` entry as the recipe's (a local file plan train reads)."""
    if not isinstance(d, dict) or "path" not in d:
        raise RecipeError(f"{source}: datasets[{i}] needs a path")
    fmt = d.get("type", "alpaca")
    if not isinstance(fmt, str) or fmt not in DATA_TYPES:
        raise RecipeError(f"{source}: datasets[{i}]: type {fmt!r} is not supported by plan (it reads "
                          f"{', '.join(DATA_TYPES)})")
    out = {"path": str(Path(d["path"]).expanduser().resolve()), "type": DATA_TYPES[fmt]}
    bad = []
    for k, v in d.items():
        if k in ("path", "type") or unset(v):
            continue
        if k == "field" and fmt == "completion" or k == "field_messages" and fmt == "chat_template":
            out["field"] = v
        elif k == "message_property_mappings" and v == {"role": "role", "content": "content"}:
            continue
        elif k == "split" and v != "train":
            bad.append(f"split {v!r} (plan reads the whole file)")
        elif k in DATA_IGNORED:
            continue
        else:
            bad.append(k)
    if bad:
        raise RecipeError(f"{source}: datasets[{i}]: not supported by plan: {', '.join(bad)}")
    return out


def _deepspeed(value: Any, source: str, base_dir: Path | None) -> dict:
    """The plan section a DeepSpeed JSON (a path, or the config inline) describes: its ZeRO stage
    and offload devices. A relative path is looked for beside the config, then in the working
    directory (where Axolotl, run from its repository, finds deepspeed_configs/)."""
    if isinstance(value, dict):
        cfg = value
    else:
        path = Path(str(value))
        found = next((p for p in ([base_dir / path] if base_dir and not path.is_absolute() else []) + [path]
                      if p.is_file()), None)
        if found is None:
            raise RecipeError(f"{source}: deepspeed: {value}: no such file (beside the config or here)")
        try:
            cfg = json.loads(found.read_text())
        except (OSError, ValueError) as e:
            raise RecipeError(f"{source}: deepspeed: {value}: not a JSON file ({e})") from None
    zero = cfg.get("zero_optimization", {}) if isinstance(cfg, dict) else {}
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise RecipeError(f"{source}: deepspeed: ZeRO stage {stage!r}: plan models stages 1, 2 and 3")
    dev = {k: (zero.get(k) or {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
    opt, par = dev["offload_optimizer"] not in ("none", None), dev["offload_param"] not in ("none", None)
    if "nvme" in dev.values():
        offload = "nvme"
    else:
        offload = "all" if opt and par else "params" if par else "optimizer" if opt else "none"
    return {"strategy": f"zero{stage}", "offload": offload}


def _fsdp(fsdp: Any, cfg: dict) -> dict:
    """The plan section Axolotl's FSDP keys describe: FSDP1's `fsdp: [full_shard, auto_wrap]` and
    `fsdp_config.fsdp_*`, or FSDP2's `fsdp_version: 2` with unprefixed `fsdp_config` keys."""
    cfg = {k.removeprefix("fsdp_"): v for k, v in (cfg or {}).items()}
    words = [w for w in (fsdp if isinstance(fsdp, list) else str(fsdp).split()) if w in FSDP_STRATEGIES]
    name = str(cfg.get("sharding_strategy", words[0] if words else "full_shard")).lower()
    strategy = FSDP_STRATEGIES.get(name, "fsdp")
    if cfg.get("reshard_after_forward") is False:
        strategy = "fsdp-grad-op"
    offload = "all" if cfg.get("offload_params") or "offload" in (fsdp if isinstance(fsdp, list) else []) else "none"
    return {"strategy": strategy, "offload": offload}

