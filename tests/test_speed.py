"""recommend's offload speed model against published figures (planner/speed.py): offload copies
at the bandwidth DeepSpeed reaches, parameter fetches not hidden behind compute, and the
throughput ZeRO-Offload and ZeRO-3 NVMe offload reported for a 10B model on one V100."""

from __future__ import annotations

import pytest

from planner.contract import Settings
from planner.gpus import lookup
from planner.resolve import catalog
from planner.spec import ModelSpec
from planner.speed import OFFLOAD_LINK_EFFICIENCY, offload_bytes, step_time, train_flops_per_token

# a 10.3B GPT-2 (hidden 4096, 50 layers): the shape of ZeRO-Offload's 10B single-GPU model
GPT2_10B = ModelSpec.from_config({"model_type": "gpt2", "n_embd": 4096, "n_layer": 50, "n_head": 32,
                                  "vocab_size": 50257, "n_positions": 1024})
V100 = lookup("V100-32GB")


def tflops(spec, st, gpu) -> float:
    return train_flops_per_token(spec, st) * st.tokens / step_time(spec, st, gpu, 1).total / 1e12


def test_offload_copies_run_at_the_bandwidth_deepspeed_reaches():
    """deepspeedai/DeepSpeed#6695: about 12 bytes per parameter at 16 GB/s on a 32 GB/s link."""
    assert OFFLOAD_LINK_EFFICIENCY * lookup("RTX-4090").pcie_gbs == pytest.approx(16)


def test_parameter_fetches_are_not_hidden_behind_compute():
    spec = ModelSpec.from_config(catalog()["meta-llama/Meta-Llama-3-8B"]["config"])
    gpu = lookup("RTX-4090")
    st = Settings(precision="bf16-pure", lora_rank=32, lora_alpha=64, strategy="zero3", offload="all",
                  grad_checkpointing=True)
    t = step_time(spec, st, gpu, 4)
    fetch, _ = offload_bytes(spec, st)
    assert fetch == 3 * 2 * 8_030_261_248  # 16-bit partition, forward, recompute and backward
    fetch_s = fetch / (gpu.pcie_gbs * 1e9 * OFFLOAD_LINK_EFFICIENCY)
    assert t.exposed >= 4 * fetch_s
    assert t.total >= 4 * (t.compute / 4 + fetch_s)


def test_lora_with_full_zero3_offload_is_slower_than_qlora_on_the_gpu():
    """The issue: LoRA with ZeRO-3 offloading everything was predicted faster than QLoRA on the
    GPU (1,919 against 1,275 tokens/s for Llama-3-8B on an RTX 4090, global batch 64)."""
    spec = ModelSpec.from_config(catalog()["meta-llama/Meta-Llama-3-8B"]["config"])
    gpu = lookup("RTX-4090")
    lora = dict(lora_rank=32, lora_alpha=64)
    qlora = Settings(precision="bf16-amp", quant="nf4", batch_size=2, grad_checkpointing=True, **lora)
    for micro, ckpt in ((1, False), (4, True)):
        off = Settings(precision="bf16-pure", strategy="zero3", offload="all", batch_size=micro,
                       grad_checkpointing=ckpt, **lora)
        per_token_off = step_time(spec, off, gpu, 64 // micro).total / (64 * 2048)
        per_token_q = step_time(spec, qlora, gpu, 32).total / (64 * 2048)
        assert per_token_off > per_token_q, (micro, ckpt)


def test_zero_offload_10b_on_one_v100_near_the_published_40_tflops():
    """ZeRO-Offload (Ren et al., USENIX ATC 2021, abstract): 40 TFLOPs on one V100 for a 10B model
    with the optimizer offloaded (ZeRO-2). The paper's batch is not in the abstract: at 16 to 32
    sequences of 1024 tokens the model gives 35 to 42."""
    for batch in (16, 32):
        st = Settings(precision="fp16-amp", strategy="zero2", offload="optimizer", batch_size=batch, seq_len=1024,
                      grad_checkpointing=True)
        assert 40 * 0.85 <= tflops(GPT2_10B, st, V100) <= 40 * 1.1, batch


def test_zero3_nvme_offload_far_below_zero2():
    """deepspeedai/DeepSpeed#1130: ZeRO-3 with NVMe offload of a 10B model ran at 2.3 TFLOPs per
    V100 where ZeRO-2 ran at 30-40. The model puts NVMe offload at least 5x below ZeRO-2 (it does
    not model the blocking copies that issue found, so it stays above 2.3)."""
    for batch in (4, 8):
        z2 = Settings(precision="fp16-amp", strategy="zero2", batch_size=batch, seq_len=1024, grad_checkpointing=True)
        nvme = Settings(precision="fp16-amp", strategy="zero3", offload="nvme", batch_size=batch, seq_len=1024,
                        grad_checkpointing=True)
        assert tflops(GPT2_10B, z2, V100) > 5 * tflops(GPT2_10B, nvme, V100) > 2.3
