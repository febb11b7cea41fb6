"""Predicted peak against torch's MemTracker on real training steps: fake tensors for the small
and 1B-8B configs, real CPU tensors for the real-weight models (tables/validation.csv,
tables/accuracy.csv; `plan validate` rewrites both).

- accuracy suite (the plan-estimate matrix): every case within 5%;
- distributed suite (every strategy: FSDP2 at world size 8 on a fake process group, DDP, FSDP2
  and ZeRO-1/2/3 on two real gloo ranks): every case within 5% on its worst rank;
- whole validation matrix: median |error| at most 3%, maximum at most 8%.
"""
import statistics

import pytest

from planner.measure.validate import REAL, real_weights_path

pytestmark = pytest.mark.slow  # every test reads the whole validation matrix (several minutes)


def test_matrix_is_as_wide_as_promised(validation_results):
    cases = [c for c, _ in validation_results.values()]
    archs = {c.model for c in cases if c.source == "small"}
    assert len(cases) >= 80
    assert {"llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox", "mixtral", "bert"} <= archs
    assert {c.settings.optimizer for c in cases} >= {"adamw", "adamw-fused", "sgd", "sgd-momentum", "adafactor"}


def test_accuracy_suite_every_case_within_5_percent(validation_results):
    off = {n: r["error_pct"] for n, (c, r) in validation_results.items()
           if c.suite == "accuracy" and abs(r["error_pct"]) > 5}
    assert not off, off


def test_validation_median_3_max_8_percent(validation_results):
    errs = [abs(r["error_pct"]) for _, r in validation_results.values()]
    assert statistics.median(errs) <= 3, statistics.median(errs)
    assert max(errs) <= 8, max(validation_results.items(), key=lambda kv: abs(kv[1][1]["error_pct"]))[0]


def test_fake_step_matches_real_step_of_real_weights(validation_results):
    """The fake-tensor measurement is the real one: for each real pretrained model of REAL, its
    real CPU step (measured in the matrix) and the fake step of its config agree within 1% (the
    technique cases on real weights, in the extra suite, are checked against the estimate)."""
    from planner.measure.simulate import measure
    from planner.resolve import resolve
    real_cases = [(c, r) for c, r in validation_results.values() if c.source == "weights" and c.suite == "accuracy"]
    installed = [p for p, rel, _ in REAL if real_weights_path(p, rel)]
    assert len(real_cases) == len(installed)
    if not installed:
        pytest.skip("no real-weight package installed")
    for c, r in real_cases:
        fake = measure(resolve(c.model).config, c.settings, fake=True).peak_bytes
        assert abs(fake - r["measured"]) <= 0.01 * r["measured"], (c.name, r["measured"], fake)


def test_distributed_suite_every_strategy_within_5_percent_per_rank(validation_results):
    dist = [(c, r) for c, r in validation_results.values() if c.suite == "distributed"]
    assert {c.settings.strategy for c, _ in dist} == {"ddp", "fsdp", "fsdp-grad-op", "fsdp-hybrid", "fsdp-no-shard",
                                                      "zero1", "zero2", "zero3"}
    assert {c.source for c, _ in dist} == {"fake-world", "torchrun", "accelerate"}
    assert any(c.settings.gpus * c.settings.nodes == 8 and c.model == "meta-llama/Meta-Llama-3-8B" for c, _ in dist)
    for c, r in dist:
        if c.source != "fake-world":
            assert len(r["ranks"].split(";")) == 2, c.name
    off = {c.name: r["error_pct"] for c, r in dist if abs(r["error_pct"]) > 5}
    assert not off, off


@pytest.mark.parametrize("arch, precision", [("llama", "bf16-amp"), ("gpt2", "fp32")])
def test_gradient_accumulation_is_measured_as_the_formula_counts_it(arch, precision):
    """With accumulation the simulator runs two micro-steps before the optimizer step, so the
    second forward and backward run with every gradient alive; the formula counts the same
    (measured 2026-11-29: +0.14% and -0.01%). With checkpointing the forward at the loss is
    under-counted (llama bf16-amp: -6.5% with accumulation 4), not yet found: not asserted here."""
    from planner.contract import Settings
    from planner.estimate import estimate
    from planner.measure.builder import measured_config
    from planner.measure.simulate import measure
    from planner.measure.validate import SMALL
    from planner.spec import ModelSpec
    st = Settings(precision=precision, batch_size=2, seq_len=256, kernels="cpu", accumulation=4)
    measured = measure(SMALL[arch], st, fake=True).peak_bytes
    one = measure(SMALL[arch], Settings(precision=precision, batch_size=2, seq_len=256, kernels="cpu"), fake=True)
    assert measured > one.peak_bytes  # the gradients alive through the micro-steps show in the measurement
    predicted = estimate(ModelSpec.from_config(measured_config(SMALL[arch])), st).peak_bytes
    assert abs(predicted - measured) / measured < 0.01
