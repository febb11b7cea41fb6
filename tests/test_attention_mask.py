"""A micro-batch with an attention mask (padded rows, or packed rows whose position ids restart):
transformers then gives SDPA an explicit 4-D mask, which torch saves per block as an additive
copy, and repeats GQA's k and v (planner/memory.py: sdpa_mask_bytes). `plan train` on
SmolLM2-135M LoRA (benchmarks/train_vs_hf.py's job) predicted 4,095.4 MiB for a 4 x 512 packed
step that measured 4,390.9 (-6.7%), and 2,332.2 for a 4 x 256 padded one that measured 2,449.6
(-4.8%): the simulator's step, which feeds full unmasked rows, was exact."""
from dataclasses import replace

import pytest

from planner.contract import Settings
from planner.data import attention_masked
from planner.estimate import estimate
from planner.measure.builder import measured_config
from planner.measure.simulate import measure
from planner.measure.validate import SMALL
from planner.spec import ModelSpec


def test_attention_masked_answers_as_transformers_decides():
    import torch
    from transformers.masking_utils import find_packed_sequence_indices
    full = torch.ones(2, 8, dtype=torch.long)
    padded = full.clone()
    padded[1, 5:] = 0
    assert not attention_masked({"input_ids": full, "attention_mask": full})
    assert attention_masked({"input_ids": full, "attention_mask": padded})
    one = torch.arange(8).expand(2, 8)
    two = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))])  # packed: restarts in the first row
    padded_tail = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], list(range(8))])  # planner.data.pack's padding
    for pos in (one, two, padded_tail):
        assert attention_masked({"position_ids": pos}) == (find_packed_sequence_indices(pos) is not None)


CASES = [("llama", dict(precision="fp32", lora_rank=16)),       # GQA 4:2, the benchmark's recipe
         ("mistral", dict(precision="bf16-amp")),                 # GQA 8:2 under autocast
         ("qwen2", dict(precision="bf16-amp")),                   # one k/v head: autocast's cast copies k
         ("qwen2", dict(precision="fp32", lora_rank=16)),         # one k/v head: repeat_kv is a view
         ("bert", dict(precision="fp32")),                        # an encoder: the mask alone
         ("llama", dict(precision="fp32", grad_checkpointing=True))]


@pytest.mark.parametrize("model,kw", CASES, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in CASES])
def test_a_masked_step_keeps_what_the_estimate_adds(model, kw):
    """The simulator's step with one padded token against the same step unpadded: the memory
    the mask adds, measured, is what the estimate adds, and the masked peak is as close as the
    plain one."""
    st = Settings(batch_size=2, seq_len=256, kernels="cpu", **kw)
    spec = ModelSpec.from_config(measured_config(SMALL[model]))
    plain, masked = (replace(st, attention_mask=m) for m in (False, True))
    m0, m1 = measure(SMALL[model], plain).peak_bytes, measure(SMALL[model], masked).peak_bytes
    e0, e1 = estimate(spec, plain).peak_bytes, estimate(spec, masked).peak_bytes
    assert abs((e1 - e0) - (m1 - m0)) <= max(0.05 * abs(m1 - m0), 0.2 * 2**20), (e1 - e0, m1 - m0)
    assert abs(e1 / m1 - 1) <= 0.02, (e1, m1)


def test_a_recipe_is_planned_with_its_mask_and_the_measured_step_as_it_ran():
    from planner.recipe import from_dict, settings
    recipe = from_dict({"base_model": "x", "sample_packing": True})
    assert settings(recipe).attention_mask  # a recipe's rows are padded or packed
    assert not settings(recipe, attention_mask=False).attention_mask
    assert not Settings().attention_mask  # plan estimate and the accuracy table: full rows
