"""Predicted peak against torch's MemTracker on real training steps (fake tensors, CPU kernels).

Every case must be within 5%. Cases the model does not yet get within 5% are listed in
KNOWN_OFF with what is wrong; they are strict xfails, so fixing one turns CI red until the list
is updated. The full table with errors is tables/accuracy.csv (python -m planner.validate).
"""
import pytest

from planner.validate import matrix, run_case

# case name prefix -> why the estimate is off (measured with python -m planner.validate)
KNOWN_OFF = {
    "llama/fp32/lora8/ckpt": "checkpointing: backward temporaries of the recomputed block over-counted",
    "qwen2/fp32/full/ckpt": "checkpointing: backward temporaries of the recomputed block over-counted",
    "gemma2/fp32/full/ckpt": "checkpointing: backward temporaries of the recomputed block over-counted",
    "gemma2/fp32/lora8/ckpt": "checkpointing: backward temporaries of the recomputed block over-counted",
    "gpt2/fp32/lora8/nockpt": "CPU SDPA math path with frozen q/k/v: kept tensors not modelled",
    "gpt2/fp32/lora8/ckpt": "CPU SDPA math path with frozen q/k/v: kept tensors not modelled",
    "gpt2/bf16-pure/full/nockpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "gpt2/bf16-pure/full/ckpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "gpt2/bf16-pure/lora8/nockpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "gpt2/bf16-pure/lora8/ckpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "gpt2/bf16-amp/full/nockpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "gpt2/bf16-amp/full/ckpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "gpt2/bf16-amp/lora8/nockpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "gpt2/bf16-amp/lora8/ckpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "bert/fp32/full/nockpt": "CPU SDPA math path: bidirectional mask and kept tensors not fully modelled",
    "bert/fp32/lora8/nockpt": "CPU SDPA math path with frozen q/k/v: kept tensors not modelled",
    "bert/bf16-pure/full/nockpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "bert/bf16-pure/full/ckpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "bert/bf16-pure/lora8/nockpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "bert/bf16-pure/lora8/ckpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "bert/bf16-amp/full/nockpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "bert/bf16-amp/lora8/nockpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
    "bert/bf16-amp/lora8/ckpt": "CPU SDPA math path (explicit mask) in 16-bit: fp32 upcasts inside the CPU kernel not modelled",
}


def _known(name):
    return next((why for k, why in KNOWN_OFF.items() if name.startswith(k)), None)


@pytest.mark.parametrize("case", matrix(), ids=lambda c: c.name)
def test_peak_within_5_percent(case):
    why = _known(case.name)
    r = run_case(case)
    if why:
        if abs(r["error_pct"]) <= 5:
            pytest.fail(f"{case.name} is now within 5% ({r['error_pct']:+.2f}%): remove it from KNOWN_OFF")
        pytest.xfail(f"{why} ({r['error_pct']:+.2f}%)")
    assert abs(r["error_pct"]) <= 5, f"{case.name}: predicted {r['predicted']:,} measured {r['measured']:,}"


def test_real_weights_smollm2_real_step_matches_fake_step():
    """The fake-tensor measurement is the real one: a real CPU step of SmolLM2-135M's architecture
    (random weights, 2 layers) gives the same MemTracker peak as the fake step."""
    from planner.memory import Settings
    from planner.resolve import catalog
    from planner.simulate import measure
    cfg = dict(catalog()["HuggingFaceTB/SmolLM2-135M"]["config"], num_hidden_layers=2)
    st = Settings(precision="bf16-pure", batch_size=1, seq_len=128, kernels="cpu")
    real = measure(cfg, st, fake=False).peak_bytes
    fake = measure(cfg, st, fake=True).peak_bytes
    assert abs(real - fake) <= 0.01 * real
