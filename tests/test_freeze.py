"""Partial freezing (issue 21, Axolotl's `unfrozen_parameters`): the names the estimate matches
are the model's own, freezing nothing changes nothing, and a partly frozen step is predicted as
torch's MemTracker measures it (the simulator builds it through the builder, as `plan train` does)."""
import json
from dataclasses import replace

import pytest
from helpers import run_plan

from planner.contract import PlanError, Settings
from planner.estimate import estimate
from planner.measure.builder import build_model, measured_config
from planner.measure.validate import SMALL
from planner.memory import freezing
from planner.recipe import from_dict, settings
from planner.spec import ModelSpec, count_params, named_params

NAMED = [k for k in SMALL if k != "mixtral"]


@pytest.mark.parametrize("arch", NAMED)
def test_named_params_are_the_models_own(arch):
    """Every parameter name and shape the estimate matches regexes against is the one
    `named_parameters()` of the class a user trains gives (built on the meta device)."""
    cfg = SMALL[arch]
    model, _ = build_model(cfg, Settings(precision="fp32"), meta=True)
    real = sorted((n, tuple(p.shape)) for n, p in model.named_parameters())
    ours = sorted((n, shape) for n, shape, _ in named_params(ModelSpec.from_config(cfg)))
    assert ours == real


@pytest.mark.parametrize("arch", NAMED)
@pytest.mark.parametrize("ckpt", [False, True])
def test_unfreezing_everything_is_full_fine_tuning(arch, ckpt):
    spec = ModelSpec.from_config(measured_config(SMALL[arch]))
    st = Settings(precision="bf16-amp", batch_size=2, seq_len=256, grad_checkpointing=ckpt, kernels="cpu")
    full, all_ = estimate(spec, st), estimate(spec, replace(st, unfrozen_parameters=(".",)))
    assert all_.trainable_params == full.trainable_params == count_params(spec).total
    assert all_.phases == full.phases


def test_lower_half_frozen_saves_gradients_state_and_activations():
    spec = ModelSpec.from_config(SMALL["llama"])
    st = Settings(precision="fp32", batch_size=2, seq_len=256, kernels="cpu")
    full = estimate(spec, st)
    top = estimate(spec, replace(st, unfrozen_parameters=(r"layers\.2\.", r"model\.norm", "lm_head")))
    fz = freezing(spec, replace(st, unfrozen_parameters=(r"layers\.2\.", r"model\.norm", "lm_head")))
    assert fz.lowest == 2 and fz.blocks == {2} and fz.head and fz.final_norm and not fz.embeddings
    assert top.trainable_params == count_params(spec).largest_layer + spec.hidden + spec.vocab * spec.hidden
    c_full, c_top = full.phase_components["backward"], top.phase_components["backward"]
    assert c_top["activations"] < c_full["activations"] / 2
    assert top.phase_components["optimizer_step"]["optimizer"] == 2 * 4 * top.trainable_params


def test_minilm_head_only_example_figures():
    """The example's head-only step (all-MiniLM-L6-v2, classifier alone, fp32, 16 x 128, 8 labels):
    the simulator's real CPU step (attention dropout 0) measured 125,489,824 bytes at 2 labels, and
    `plan train` (attention dropout 0.1, CPU SDPA's math kernel) 148,831,848 (2026-11-30); the
    estimate was 821 MiB before freezing was modelled."""
    cfg = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "intermediate_size": 1536,
           "num_hidden_layers": 6, "num_attention_heads": 12, "max_position_embeddings": 512,
           "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1}
    st = Settings(precision="fp32", batch_size=16, seq_len=128, kernels="cpu", unfrozen_parameters=("classifier",))
    sim = estimate(ModelSpec.from_config(measured_config({**cfg, "num_labels": 2})), st).peak_bytes
    assert abs(sim / 125_489_824 - 1) < 0.01
    trained = estimate(ModelSpec.from_config({**cfg, "id2label": {str(i): str(i) for i in range(8)}}), st)
    assert trained.trainable_params == 384 * 8 + 8
    assert abs(trained.peak_bytes / 148_831_848 - 1) < 0.05


@pytest.mark.parametrize("arch,prec,ckpt,pats", [
    ("gpt2", "fp32", False, (r"h\.2\.", "ln_f")),
    ("llama", "bf16-amp", False, (r"layers\.2\.mlp",)),
    ("qwen2", "bf16-pure", True, (r"layers\.[12]\.",)),
])
def test_simulated_partly_frozen_step_within_5_percent(arch, prec, ckpt, pats):
    from planner.measure.simulate import measure
    st = Settings(precision=prec, batch_size=2, seq_len=256, grad_checkpointing=ckpt, kernels="cpu",
                  unfrozen_parameters=pats)
    m = measure(SMALL[arch], st)
    est = estimate(ModelSpec.from_config(measured_config(SMALL[arch])), st)
    assert m.trainable_params == est.trainable_params
    assert abs(est.peak_bytes / m.peak_bytes - 1) < 0.05, (est.phases, m.phases)


def test_builder_freezes_by_name():
    st = Settings(precision="fp32", unfrozen_parameters=(r"layers\.1\.mlp", "lm_head"))
    model, _ = build_model(SMALL["llama"], st, meta=True)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                      "model.layers.1.mlp.down_proj.weight", "lm_head.weight"}


def test_refused_combinations():
    spec = ModelSpec.from_config(SMALL["llama"])
    with pytest.raises(PlanError, match="matches no parameter"):
        estimate(spec, Settings(seq_len=256, unfrozen_parameters=("nothing_here",)))
    with pytest.raises(PlanError, match="inside a block"):
        estimate(spec, Settings(seq_len=256, unfrozen_parameters=(r"layers\.2\.mlp",), lora_rank=8))
    with pytest.raises(PlanError, match="FSDP1"):
        estimate(spec, Settings(seq_len=256, unfrozen_parameters=("lm_head",), gpus=2, strategy="fsdp", fsdp_version=1))


def test_recipe_key_reaches_the_settings():
    r = from_dict({"base_model": "x", "unfrozen_parameters": ["classifier", r"layers\.5\."]})
    assert settings(r).unfrozen_parameters == ("classifier", r"layers\.5\.")


def test_cli_option_and_json(tiny):
    r = run_plan("estimate", str(tiny / "model"), "--dtype", "fp32", "--json", "--unfrozen-parameters",
                 r"layers\.1\.", "--unfrozen-parameters", r"model\.norm")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    full = json.loads(run_plan("estimate", str(tiny / "model"), "--dtype", "fp32", "--json").stdout)
    assert d["unfrozen_parameters"] == [r"layers\.1\.", r"model\.norm"] and full["unfrozen_parameters"] is None
    assert d["trainable_params"] < full["trainable_params"] and d["peak_bytes"] < full["peak_bytes"]
    assert any("backward stops at block 1" in n for n in d["notes"])


# ---------------------------------------------------------------- LoRA with unfrozen_parameters

@pytest.mark.parametrize("arch,pats", [("llama", ("lm_head", r"model\.norm")), ("qwen2", ("embed_tokens",)),
                                       ("gpt2", ("ln_f",)), ("bert", ("classifier",))])
def test_lora_modules_to_save_train_what_the_estimate_counts(arch, pats):
    """Under LoRA, the modules owning a matching parameter are PEFT's modules_to_save: the builder's
    trainable parameters (adapters and the copies) are the estimate's, and the frozen original
    stays beside each copy."""
    st = Settings(precision="bf16-pure", lora_rank=8, unfrozen_parameters=pats)
    model, _ = build_model(SMALL[arch], st, meta=True)
    trains = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    copies = [n for n in trains if ".modules_to_save." in n]
    assert copies and all("lora_" in n or ".modules_to_save." in n for n in trains)
    originals = [n for n, _ in model.named_parameters() if ".original_module." in n]
    assert originals or arch == "qwen2"  # a tied embedding's original is listed once, as the head's weight
    # against LoRA alone (PEFT's all-linear also adapts BERT's pooler, which the estimate leaves out either way)
    plain, _ = build_model(SMALL[arch], replace(st, unfrozen_parameters=()), meta=True)
    spec = ModelSpec.from_config(measured_config(SMALL[arch]))
    est = estimate(spec, replace(st, seq_len=64, kernels="cpu"))
    est_plain = estimate(spec, replace(st, seq_len=64, kernels="cpu", unfrozen_parameters=()))
    assert est.trainable_params - est_plain.trainable_params == \
        sum(trains.values()) - sum(p.numel() for p in plain.parameters() if p.requires_grad) > 0
    assert any("modules_to_save" in n for n in est.notes)


def test_lora_with_a_trained_head_costs_its_copy_gradient_and_state():
    spec = ModelSpec.from_config(SMALL["llama"])
    st = Settings(precision="bf16-pure", batch_size=2, seq_len=256, lora_rank=8, kernels="cpu")
    lora, head = estimate(spec, st), estimate(spec, replace(st, unfrozen_parameters=("lm_head",)))
    vh = spec.vocab * spec.hidden
    assert head.trainable_params - lora.trainable_params == vh
    ms, ls = head.phase_components["optimizer_step"], lora.phase_components["optimizer_step"]
    assert ms["weights"] - ls["weights"] == 2 * vh      # the bf16 copy beside the frozen original
    assert ms["gradients"] - ls["gradients"] == 2 * vh  # its bf16 gradient
    assert ms["optimizer"] - ls["optimizer"] == 4 * vh  # AdamW's two bf16 moments


@pytest.mark.parametrize("arch,prec,ckpt,pats", [
    ("llama", "bf16-pure", False, ("lm_head",)),
    ("llama", "bf16-amp", True, ("embed_tokens", "lm_head")),
    ("gpt2", "fp32", False, ("ln_f",)),
])
def test_simulated_lora_with_modules_to_save_within_5_percent(arch, prec, ckpt, pats):
    from planner.measure.simulate import measure
    st = Settings(precision=prec, batch_size=2, seq_len=256, lora_rank=8, grad_checkpointing=ckpt, kernels="cpu",
                  unfrozen_parameters=pats)
    m = measure(SMALL[arch], st)
    est = estimate(ModelSpec.from_config(measured_config(SMALL[arch])), st)
    assert m.trainable_params == est.trainable_params
    assert abs(est.peak_bytes / m.peak_bytes - 1) < 0.05, (est.phases, m.phases)


# ---------------------------------------------------------------- under FSDP2 and ZeRO

@pytest.mark.parametrize("strategy", ["fsdp", "zero1", "zero2", "zero3"])
def test_sharded_engines_keep_state_for_what_trains_only(strategy):
    """Gradients, the fp32 master (ZeRO) and the optimizer state cover the trainable parameters
    only, sharded over the ranks; the frozen ones cost their weights."""
    spec = ModelSpec.from_config(SMALL["llama"])
    st = Settings(precision="bf16-amp", batch_size=2, seq_len=256, gpus=2, strategy=strategy, kernels="cpu")
    frozen = replace(st, unfrozen_parameters=(r"layers\.2\.", r"model\.norm", "lm_head"))
    full, top = estimate(spec, st), estimate(spec, frozen)
    t, total = top.trainable_params, full.trainable_params
    opt_full, opt_top = (e.phase_components["optimizer_step"]["optimizer"] for e in (full, top))
    assert opt_top == pytest.approx(opt_full * t / total, rel=1e-6)   # AdamW (and ZeRO's master) on the shards of t
    grads = [e.phase_components["optimizer_step"]["gradients"] for e in (full, top)]
    assert grads[1] == pytest.approx(grads[0] * t / total, rel=1e-6)
    assert top.phase_components["model"]["weights"] == full.phase_components["model"]["weights"]


@pytest.mark.parametrize("strategy,arch,ckpt,pats", [
    ("fsdp", "llama", False, (r"layers\.2\.", r"model\.norm", "lm_head")),
    ("fsdp", "llama", True, (r"layers\.[12]\.",)),
    ("fsdp-grad-op", "gpt2", False, (r"h\.2\.", "ln_f")),
])
def test_fsdp2_world_of_8_partly_frozen_within_5_percent(strategy, arch, ckpt, pats):
    """FSDP2 at world size 8 on torch's fake process group, through accelerate's fsdp2_prepare_model."""
    from planner.measure.distributed import measure_fake
    st = Settings(precision="bf16-amp", batch_size=2, seq_len=256, strategy=strategy, gpus=8, grad_checkpointing=ckpt,
                  kernels="cpu", unfrozen_parameters=pats)
    m = measure_fake(SMALL[arch], st)
    est = estimate(ModelSpec.from_config(measured_config(SMALL[arch])), st)
    assert abs(est.peak_bytes / m["peak_bytes"] - 1) < 0.05, (est.phases, m["phases"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy,rank,pats", [
    ("zero3", 0, (r"layers\.2\.", r"model\.norm", "lm_head")),
    ("zero2", 8, ("lm_head",)),
])
def test_two_gloo_ranks_partly_frozen_within_5_percent(strategy, rank, pats):
    """DeepSpeed on two gloo ranks (torchrun), each rank's peak against the estimate: ZeRO-3
    releases the frozen blocks after their forward (they have no backward)."""
    from planner.measure.distributed import launch
    st = Settings(precision="bf16-amp", batch_size=2, seq_len=256, strategy=strategy, gpus=2, lora_rank=rank,
                  kernels="cpu", unfrozen_parameters=pats)
    est = estimate(ModelSpec.from_config(measured_config(SMALL["llama"])), st)
    for r in launch(SMALL["llama"], st, "torchrun"):
        assert abs(est.peak_bytes / r["peak_bytes"] - 1) < 0.05, (est.phases, r["phases"])
