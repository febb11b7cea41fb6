"""Pure-function checks of the memory model against counts that follow from the definitions."""
import pytest

from planner.contract import PlanError, Settings
from planner.estimate import estimate
from planner.resolve import catalog
from planner.spec import ModelSpec, count_params


def spec(mid):
    return ModelSpec.from_config(catalog()[mid]["config"])


def test_llama3_8b_bf16_pure_adamw_matches_the_measured_80_3_gb():
    # MemTracker under FakeTensorMode measured 80.3 GB for this step (issue 2): weights, grads,
    # two AdamW moments in bf16 and the foreach AdamW sqrt temporary, 2 bytes each.
    est = estimate(spec("meta-llama/Meta-Llama-3-8B"), Settings(precision="bf16-pure", seq_len=2048, kernels="cpu"))
    n = 8_030_261_248
    assert est.phases["optimizer_step"] == pytest.approx(10 * n, rel=1e-6)
    assert est.peak_bytes == pytest.approx(80.3e9, rel=0.002)


def test_cuda_counts_the_cublas_workspace_the_allocator_holds():
    # measured on an H100: max_memory_allocated includes 64 MiB of cuBLAS workspace from the
    # first matmul on (tables/gpu/traces_expandable.npz); the CPU step has none
    from planner.memory import CUBLAS_WORKSPACE_BYTES
    s = spec("meta-llama/Meta-Llama-3-8B")
    cuda = estimate(s, Settings(precision="bf16-pure", seq_len=2048))
    cpu = estimate(s, Settings(precision="bf16-pure", seq_len=2048, kernels="cpu"))
    assert cuda.phases["optimizer_step"] - cpu.phases["optimizer_step"] == CUBLAS_WORKSPACE_BYTES
    assert cuda.phases["model"] == cpu.phases["model"]


def test_accumulation_keeps_every_gradient_through_the_next_micro_steps():
    s = spec("meta-llama/Llama-3.2-1B")
    one = estimate(s, Settings(precision="bf16-amp", seq_len=1024))
    two = estimate(s, Settings(precision="bf16-amp", seq_len=1024, accumulation=2))
    grads = 4 * one.params
    assert two.phases["forward"] - one.phases["forward"] == grads
    assert two.phases["optimizer_step"] == one.phases["optimizer_step"]


def test_fused_adamw_has_no_step_temporary():
    s = spec("meta-llama/Meta-Llama-3-8B")
    foreach = estimate(s, Settings(precision="bf16-pure"))
    fused = estimate(s, Settings(precision="bf16-pure", optimizer="adamw-fused"))
    assert foreach.phases["optimizer_step"] - fused.phases["optimizer_step"] == 2 * 8_030_261_248


def test_lora_trains_only_adapters():
    s = spec("meta-llama/Meta-Llama-3-8B")
    est = estimate(s, Settings(precision="bf16-amp", lora_rank=16))
    # all-linear: per block q,k,v,o,gate,up,down: r * (in + out)
    h, kv, i = 4096, 1024, 14336
    per_block = 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert est.trainable_params == 32 * per_block


def test_nf4_base_layout():
    s = spec("meta-llama/Meta-Llama-3-8B")
    st = Settings(precision="bf16-amp", lora_rank=16, quant="nf4")
    est = estimate(s, st)
    pc = count_params(s)
    block_linear = pc.attention + pc.mlp  # llama has no biases: all of it is quantised
    n_linears = 7 * 32
    # nf4: half a byte per weight + one uint8 absmax per 64 + one fp32 per 256 blocks (per tensor);
    # embeddings, head and norms upcast to fp32; adapters fp32
    expected = (block_linear / 2 + block_linear / 64 + 4 * block_linear / 64 / 256
                + 4 * (pc.total - block_linear) + 4 * est.trainable_params + pc.buffers_bytes)
    assert est.components["weights"] == pytest.approx(expected, rel=1e-4, abs=4 * n_linears)
    assert est.components["weights"] < 0.5 * pc.total * 2  # under half the bf16 model despite fp32 embeddings/head


def test_activations_grow_with_tokens_and_shrink_with_checkpointing():
    s = spec("HuggingFaceTB/SmolLM2-135M")
    a = estimate(s, Settings(batch_size=1, seq_len=1024)).phases["forward"]
    b = estimate(s, Settings(batch_size=2, seq_len=1024)).phases["forward"]
    c = estimate(s, Settings(batch_size=2, seq_len=1024, grad_checkpointing=True)).phases["forward"]
    assert b > a and c < b


@pytest.mark.parametrize("kw,msg", [
    (dict(batch_size=0), "--batch-size"), (dict(seq_len=-1), "--seq-len"), (dict(lora_rank=100000), "exceeds"),
    (dict(quant="nf4"), "add --lora-rank"), (dict(precision="fp64"), "unknown precision"),
    (dict(seq_len=10 ** 7), "maximum"), (dict(optimizer="adam9"), "unknown optimizer"),
])
def test_impossible_plans_are_rejected(kw, msg):
    with pytest.raises(PlanError, match=msg):
        estimate(spec("HuggingFaceTB/SmolLM2-135M"), Settings(**kw))
