"""Multi-GPU and multi-node memory: strategy options and their errors, the per-GPU model's
structure (what sharding divides, what stays whole), and the --strategy all comparison. The
measured accuracy of every strategy is asserted in tests/test_accuracy.py (distributed suite)."""
import json
from dataclasses import replace

import pytest
from helpers import run_plan

from planner.contract import PlanError, Settings
from planner.distributed import fsdp_units, zero3_gathered_at_loss, zero_persistent_params
from planner.estimate import estimate
from planner.measure.validate import SMALL
from planner.resolve import catalog
from planner.spec import ModelSpec, count_params


def spec_of(model_id):
    return ModelSpec.from_config(catalog()[model_id]["config"])


LLAMA8B = spec_of("meta-llama/Meta-Llama-3-8B")
BF16_8 = Settings(precision="bf16-amp", gpus=8, seq_len=2048, grad_checkpointing=True)


@pytest.mark.parametrize("strategy,offload,nodes,message", [
    ("ddp", "optimizer", 1, "needs a sharded strategy"),
    ("fsdp", "optimizer", 1, "offloads parameters, gradients and optimizer state together"),
    ("fsdp", "nvme", 1, "cannot offload to NVMe"),
    ("zero2", "params", 1, "only under ZeRO-3"),
    ("fsdp-hybrid", "none", 1, "needs --nodes 2"),
])
def test_impossible_combinations_exit_2_with_one_line(strategy, offload, nodes, message):
    r = run_plan("estimate", "gpt2", "--dtype", "bf16", "--gpus", "2", "--nodes", str(nodes), "--strategy", strategy,
             "--offload", offload)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sharding_divides_model_states_by_the_shard_group():
    """Full fine-tuning, bf16 mixed precision: FSDP keeps fp32 shards (accelerate upcasts), so
    weights + gradients + Adam are 16 bytes/param over the shard group in the optimizer step;
    hybrid shards over the GPUs of one node only."""
    pc = count_params(LLAMA8B)
    for strategy, nodes, gpus, group in (("fsdp", 1, 8, 8), ("fsdp", 2, 8, 16), ("fsdp-hybrid", 2, 8, 8)):
        est = estimate(LLAMA8B, replace(BF16_8, strategy=strategy, nodes=nodes, gpus=gpus, optimizer="adamw-fused"))
        states = est.phase_components["optimizer_step"]
        per_param = (states["weights"] + states["gradients"] + states["optimizer"]) / pc.total
        assert per_param == pytest.approx(16 / group, rel=0.01), (strategy, nodes, per_param)


def test_zero_model_states_match_deepspeeds_own_arithmetic():
    """DeepSpeed's estimator (stage_1_and_2.py / stage3.py) counts 2 bytes/param of bf16 params
    plus 18/N for ZeRO-2 (without the fp32 gradients, which exist only in the step: 14/N before
    it), and 16/N + the 2/N bf16 partition for ZeRO-3."""
    pc = count_params(LLAMA8B)
    z2 = estimate(LLAMA8B, replace(BF16_8, strategy="zero2")).phase_components["forward"]
    assert (z2["weights"] + z2["optimizer"]) / pc.total == pytest.approx(2 + 12 / 8, rel=0.01)
    z3 = estimate(LLAMA8B, replace(BF16_8, strategy="zero3")).phase_components["model"]
    assert z3["weights"] / pc.total == pytest.approx(2 / 8, rel=0.01)


def test_more_sharding_never_costs_more_memory_per_gpu():
    peaks = {s: estimate(LLAMA8B, replace(BF16_8, strategy=s)).peak_bytes
             for s in ("ddp", "fsdp-no-shard", "zero1", "zero2", "zero3", "fsdp")}
    assert peaks["fsdp"] < peaks["zero2"] <= peaks["zero1"] < peaks["ddp"]
    assert peaks["zero3"] < peaks["zero2"]


def test_offload_moves_states_to_host_ram_and_nvme():
    base = replace(BF16_8, strategy="zero3")
    on_gpu = estimate(LLAMA8B, base)
    opt = estimate(LLAMA8B, replace(base, offload="optimizer"))
    both = estimate(LLAMA8B, replace(base, offload="all"))
    nvme = estimate(LLAMA8B, replace(base, offload="nvme"))
    assert on_gpu.cpu_bytes == 0 and opt.cpu_bytes > 0 and both.cpu_bytes > opt.cpu_bytes
    assert both.peak_bytes < opt.peak_bytes < on_gpu.peak_bytes
    assert nvme.nvme_bytes == both.cpu_bytes and nvme.cpu_bytes < both.cpu_bytes
    # host RAM per node: 8 ranks' fp32 master, Adam moments and fp32 gradients (16 B/param / 8 each)
    assert opt.cpu_bytes == pytest.approx(16 * count_params(LLAMA8B).total, rel=0.01)


def test_zero3_keeps_small_models_gathered_whole_and_big_ones_only_near_the_head():
    small = ModelSpec.from_config(SMALL["llama"])
    assert zero3_gathered_at_loss(small, count_params(small)) == count_params(small).total
    pc = count_params(LLAMA8B)
    u = fsdp_units(LLAMA8B, pc)
    assert zero3_gathered_at_loss(LLAMA8B, pc) == u.kept  # head + final norm: 2 x 525M > 1e9
    assert 0 < zero_persistent_params(LLAMA8B, pc) < 0.001 * pc.total


def test_fsdp_units_cover_every_parameter():
    for model_id in ("meta-llama/Meta-Llama-3-8B", "openai-community/gpt2", "bert-base-cased", "Qwen/Qwen2.5-0.5B"):
        s = spec_of(model_id)
        pc = count_params(s)
        for version in (1, 2):
            u = fsdp_units(s, pc, version)
            assert s.layers * u.block + u.embed + u.kept == pc.total


def test_strategy_all_compares_every_strategy_as_json():
    r = run_plan("estimate", "meta-llama/Llama-3.1-70B", "--gpus", "8", "--nodes", "2", "--strategy", "all",
             "--grad-checkpointing", "--json")
    assert r.returncode == 0, r.stderr
    objs = json.loads(r.stdout)
    pairs = {(o["strategy"], o["offload"]) for o in objs}
    assert {("ddp", "none"), ("fsdp", "none"), ("fsdp-grad-op", "none"), ("fsdp-hybrid", "none"),
            ("fsdp-no-shard", "none"), ("zero1", "none"), ("zero2", "none"), ("zero3", "none"),
            ("fsdp", "all"), ("zero2", "optimizer"), ("zero3", "all"), ("zero3", "nvme")} <= pairs
    for o in objs:
        assert o["precision"] == "bf16-amp" and o["device_bytes"] > o["peak_bytes"] > 0
        assert sum(o["components"].values()) == o["peak_bytes"]


def test_strategy_all_table_shows_what_fits():
    r = run_plan("estimate", "meta-llama/Llama-3.1-70B", "--gpus", "8", "--strategy", "all", "--grad-checkpointing")
    assert r.returncode == 0, r.stderr
    assert "zero3" in r.stdout and "fsdp-no-shard" in r.stdout and "host/node" in r.stdout
    rows = {tuple(line.split("│")[1:3]): line for line in r.stdout.splitlines() if line.count("│") > 8}
    ddp = next(v for k, v in rows.items() if k[0].strip() == "ddp")
    offloaded = next(v for k, v in rows.items() if k[0].strip() == "zero3" and k[1].strip() == "all")
    assert "none" in ddp.split("│")[-2] and "80" in offloaded.split("│")[-2]


def test_quantised_base_cannot_be_zero3_partitioned():
    with pytest.raises(PlanError, match="ZeRO-3 cannot partition"):
        estimate(LLAMA8B, replace(BF16_8, strategy="zero3", lora_rank=16, quant="nf4"))
