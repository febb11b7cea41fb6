"""Activation offloading (issue 17): TRL's OffloadActivations as Axolotl's `activation_offloading: true`
runs it. What it moves to host RAM is measured on real CPU steps; the GPU side is not (see
planner/measure/offload.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import assert_one_clear_line, run_plan

from planner.contract import UNMEASURED_OFFLOAD, PlanError, Settings
from planner.estimate import estimate
from planner.gpus import lookup
from planner.recommend import Request, technique_sets
from planner.resolve import catalog
from planner.spec import ModelSpec

LLAMA3 = "meta-llama/Meta-Llama-3-8B"


def _spec(name: str = LLAMA3) -> ModelSpec:
    return ModelSpec.from_config(catalog()[name]["config"])


def test_offload_moves_the_saved_activations_to_host_and_says_the_gpu_side_is_unmeasured():
    st = Settings(precision="bf16-pure", lora_rank=16, seq_len=4096)
    plain, off = estimate(_spec(), st), estimate(_spec(), replace(st, activation_offload=True))
    assert plain.cpu_bytes == 0 and off.cpu_bytes > 10 * 2**30  # 32 blocks' saved tensors at 4096 tokens
    assert off.phases["backward"] < plain.phases["backward"] - 8 * 2**30
    assert off.components["weights"] == plain.components["weights"]
    assert any(UNMEASURED_OFFLOAD in n for n in off.notes)


def test_with_checkpointing_only_the_blocks_inputs_and_the_loss_move():
    st = Settings(precision="bf16-pure", lora_rank=16, seq_len=4096, grad_checkpointing=True)
    spec = _spec()
    off = estimate(spec, replace(st, activation_offload=True))
    inputs = spec.layers * 4096 * spec.hidden * 2
    log_softmax = 4 * 4096 * spec.vocab
    assert inputs + log_softmax <= off.cpu_bytes < inputs + log_softmax + 2**30  # plus the final norm's tensors
    assert off.peak_bytes < estimate(spec, st).peak_bytes


def test_refused_where_not_modelled():
    with pytest.raises(PlanError, match="activation.offload"):
        estimate(_spec(), Settings(activation_offload=True, gpus=8, strategy="zero3"))


def test_recommend_searches_it_on_a_gpu_not_on_a_cpu():
    gpu_sets = technique_sets(Request(gpu=lookup("RTX-4090")))
    assert any("activation offload" in s for s in gpu_sets)
    from planner.gpus import host_machine
    assert not any("activation offload" in s for s in technique_sets(Request(gpu=host_machine())))


def test_host_bytes_measured_within_5_percent():
    """A real CPU step of a small llama with checkpointing and of one without: the library's rule
    applied to what autograd saves (planner/measure/offload.py) against the estimate's cpu_bytes."""
    from planner.measure.validate import Case, run_case
    for ckpt, lora in ((True, 0), (False, 8)):
        st = Settings(precision="bf16-pure" if lora else "fp32", lora_rank=lora, lora_alpha=16 if lora else None,
                      grad_checkpointing=ckpt, batch_size=2, seq_len=256, kernels="cpu", activation_offload=True)
        row = run_case(Case("llama", st, "small-real", suite="extra"))
        assert abs(row["error_pct"]) < 5, row


def test_recipe_and_emitted_plan_turn_it_on(tmp_path):
    from planner.recipe import from_dict, settings
    assert settings(from_dict({"base_model": "x", "activation_offloading": True})).activation_offload
    assert not settings(from_dict({"base_model": "x"})).activation_offload
    r = run_plan("emit-config", LLAMA3, "--gpus", "1", "--lora-rank", "16", "--dtype", "bf16", "--grad-checkpointing",
                 "--activation-offload", "--out", str(tmp_path / "p"), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "activation_offloading: true" in (tmp_path / "p" / "recipe.yaml").read_text()
    assert "get_act_offloading_ctx_manager" in (tmp_path / "p" / "PLAN.md").read_text()
    r = run_plan("emit-config", LLAMA3, "--gpus", "1", "--lora-rank", "16", "--out", str(tmp_path / "q"),
                 env={"HF_HUB_OFFLINE": "1"})
    assert "activation_offloading" not in (tmp_path / "q" / "recipe.yaml").read_text()


def test_trainer_refuses_it_on_cpu_in_one_line():
    from planner.recipe import ModelError, from_dict
    from trainer.model import load_model
    with pytest.raises(ModelError, match="runs on a CUDA GPU"):
        load_model(from_dict({"base_model": "x", "activation_offloading": True}), cuda=False)


def test_cli_bad_combination_is_one_line():
    r = run_plan("estimate", LLAMA3, "--gpus", "2", "--strategy", "fsdp", "--activation-offload",
                 env={"HF_HUB_OFFLINE": "1"})
    assert_one_clear_line(r, "error:")
