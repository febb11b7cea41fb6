"""L-BFGS (issue 21): `--optimizer lbfgs` with `--lbfgs-history N`, counted from torch.optim.LBFGS's
state (2N + 2 flat vectors of every trainable element) and measured on real CPU tensors."""
from dataclasses import replace

import pytest

from planner.contract import PlanError, Settings
from planner.estimate import estimate
from planner.measure.builder import measured_config
from planner.measure.validate import SMALL
from planner.recipe import RecipeError, from_dict
from planner.spec import ModelSpec


def test_state_grows_by_two_flat_vectors_per_history_pair():
    spec = ModelSpec.from_config(SMALL["llama"])
    st = Settings(precision="fp32", batch_size=2, seq_len=256, optimizer="lbfgs", lbfgs_history=10)
    a, b = estimate(spec, st), estimate(spec, replace(st, lbfgs_history=11))
    n = a.trainable_params
    assert b.components["optimizer"] - a.components["optimizer"] == 2 * 4 * n + 2 * 4
    assert a.phase_components["optimizer_step"]["optimizer"] == 22 * 4 * n + 4 * 21
    # the default history (100) dwarfs AdamW's two moments
    default = estimate(spec, replace(st, lbfgs_history=100))
    adamw = estimate(spec, replace(st, optimizer="adamw"))
    assert default.components["optimizer"] > 100 * adamw.components["optimizer"]


def test_simulated_lbfgs_step_within_5_percent():
    from planner.measure.simulate import measure
    st = Settings(precision="fp32", batch_size=1, seq_len=64, kernels="cpu", optimizer="lbfgs", lbfgs_history=2)
    m = measure(SMALL["llama"], st, fake=False)
    est = estimate(ModelSpec.from_config(measured_config(SMALL["llama"])), st)
    assert abs(est.peak_bytes / m.peak_bytes - 1) < 0.05, (est.phases, m.phases)


def test_fake_tensors_and_the_trainer_refuse_it():
    from planner.measure.simulate import measure
    with pytest.raises(PlanError, match="real tensors"):
        measure(SMALL["llama"], Settings(seq_len=256, optimizer="lbfgs"))
    with pytest.raises(RecipeError, match="closure"):
        from_dict({"base_model": "x", "optimizer": "lbfgs"})
