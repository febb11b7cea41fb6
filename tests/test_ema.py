"""EMA of the weights (issue 21): `--ema` and the recipe's `ema_decay`, torch's AveragedModel with
get_ema_multi_avg_fn over the trainable parameters, counted as one copy of them in their storage
dtype and measured by the simulator on real CPU tensors."""
from dataclasses import replace

import pytest

from planner.contract import PlanError, Settings
from planner.estimate import estimate
from planner.measure.builder import build_model, make_ema, measured_config
from planner.measure.validate import SMALL
from planner.recipe import from_dict, settings
from planner.spec import ModelSpec


@pytest.mark.parametrize("prec,rank,per_param", [("bf16-amp", 0, 4), ("bf16-pure", 0, 2), ("bf16-pure", 8, 4)])
def test_ema_is_one_copy_of_the_trainable_parameters_in_every_phase(prec, rank, per_param):
    spec = ModelSpec.from_config(SMALL["llama"])
    st = Settings(precision=prec, lora_rank=rank, batch_size=2, seq_len=256)
    base, ema = estimate(spec, st), estimate(spec, replace(st, ema=True))
    copy = per_param * base.trainable_params + 8
    assert {k: ema.phases[k] - base.phases[k] for k in base.phases} == {k: copy for k in base.phases}
    assert ema.components["weights"] - base.components["weights"] == copy


def test_make_ema_copies_the_trainable_parameters_alone_and_averages_them():
    import torch
    model, _ = build_model(SMALL["llama"], Settings(precision="fp32", lora_rank=4))
    averaged, live, names = make_ema(model, decay=0.5)
    assert names and all("lora_" in n for n in names)
    assert sum(p.numel() for p in averaged.parameters()) == sum(p.numel() for p in live)
    averaged.update_parameters(live)  # the first update copies
    with torch.no_grad():
        for p in live:
            p.add_(2.0)
    averaged.update_parameters(live)  # then 0.5 * old + 0.5 * new
    for a, p in zip(averaged.module, live, strict=True):
        assert torch.allclose(a, p - 1.0)


def test_simulated_ema_step_within_5_percent():
    from planner.measure.simulate import measure
    st = Settings(precision="bf16-amp", batch_size=2, seq_len=256, grad_checkpointing=True, kernels="cpu", ema=True)
    m = measure(SMALL["llama"], st, fake=False)
    est = estimate(ModelSpec.from_config(measured_config(SMALL["llama"])), st)
    assert abs(est.peak_bytes / m.peak_bytes - 1) < 0.05, (est.phases, m.phases)


def test_recipe_and_refusals():
    assert settings(from_dict({"base_model": "x", "ema_decay": 0.999})).ema
    assert not settings(from_dict({"base_model": "x"})).ema
    with pytest.raises(PlanError, match="DDP"):
        estimate(ModelSpec.from_config(SMALL["llama"]), Settings(seq_len=256, ema=True, gpus=2, strategy="fsdp"))
