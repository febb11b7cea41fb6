"""Optimizers by the names users type (issue 17): HF Trainer's and Axolotl's names mapped onto the
contract's optimizers in one place (contract.OPTIMIZER_NAMES), bitsandbytes' paged variants (the
same state on the GPU), and recommend's search of 8-bit state and a fused loss."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from helpers import run_plan

from planner.contract import (
    OPTIMIZER_NAMES,
    PAGED_NOTE,
    Optimizer,
    OptimizerName,
    PlanError,
    Settings,
    optimizer_choice,
    optimizer_name,
)
from planner.estimate import estimate
from planner.resolve import catalog
from planner.spec import ModelSpec

LLAMA3 = "meta-llama/Meta-Llama-3-8B"
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def _spec(name: str) -> ModelSpec:
    return ModelSpec.from_config(catalog()[name]["config"])


def test_every_users_name_maps_onto_a_contract_optimizer_and_back():
    assert set(OptimizerName.values()) == set(Optimizer.values()) | set(OPTIMIZER_NAMES)
    for name, (opt, paged) in OPTIMIZER_NAMES.items():
        assert opt in Optimizer.values()
        assert optimizer_choice(name) == (opt, paged)
        if paged:  # a recipe writes the paged variant under the users' name, which reads back the same
            assert optimizer_choice(optimizer_name(opt, True)) == (opt, True)
    assert optimizer_choice("adamw") == ("adamw", False)


@pytest.mark.parametrize("name, cls", [("paged_adamw_8bit", "PagedAdamW8bit"), ("paged_adamw_32bit", "PagedAdamW32bit"),
                                       ("lion_8bit", "Lion8bit"), ("paged_lion_32bit", "PagedLion"),
                                       ("adamw_torch_fused", "AdamW")])
def test_the_builder_builds_what_users_name(name, cls):
    import torch

    from planner.measure.builder import make_optimizer
    p = torch.nn.Parameter(torch.zeros(4, 4))
    assert type(make_optimizer([p], name)).__name__ == cls


def test_paging_keeps_the_state_on_the_gpu_and_says_so():
    spec = _spec(LLAMA3)
    st = Settings(precision="bf16-pure", optimizer="adamw-8bit")
    a, b = estimate(spec, st), estimate(spec, replace(st, optimizer_paged=True))
    assert a.phases == b.phases and a.components == b.components
    assert PAGED_NOTE in b.notes and PAGED_NOTE not in a.notes
    with pytest.raises(PlanError, match="no paged variant"):
        estimate(spec, Settings(optimizer="adamw-fused", optimizer_paged=True))


def test_bitsandbytes_state_sizes():
    spec = _spec(LLAMA3)
    pure = Settings(precision="bf16-pure")
    n = estimate(spec, pure).params
    adamw, adamw32 = (estimate(spec, replace(pure, optimizer=o)).components["optimizer"]
                      for o in ("adamw", "adamw-32bit"))
    assert adamw == 4 * n and adamw32 == 8 * n  # torch's moments in bf16, bitsandbytes' 32-bit in fp32
    a8, l8 = (estimate(spec, replace(pure, optimizer=o)).components["optimizer"] for o in ("adamw-8bit", "lion-8bit"))
    assert l8 == pytest.approx(a8 / 2, rel=1e-6)


def test_cli_and_recipe_take_the_users_names():
    r = run_plan("estimate", LLAMA3, "--dtype", "bf16", "--optimizer", "paged_adamw_8bit", "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["optimizer"] == "adamw-8bit" and d["optimizer_paged"] is True and PAGED_NOTE in d["notes"]
    r = run_plan("estimate", LLAMA3, "--dtype", "bf16", "--optimizer", "adamw-8bit", "--json", env=OFFLINE)
    assert json.loads(r.stdout)["peak_bytes"] == d["peak_bytes"]
    from planner.recipe import from_dict, settings
    st = settings(from_dict({"base_model": "x", "optimizer": "paged_lion_8bit"}))
    assert (st.optimizer, st.optimizer_paged) == ("lion-8bit", True)


def test_recommend_tries_8bit_state_and_a_fused_loss_before_qlora_or_offload():
    from planner.gpus import lookup
    from planner.recommend import Request, recommend
    spec = _spec(LLAMA3)
    req = Request(gpu=lookup("T4"), seq_len=8192, method="lora")
    plans = recommend(spec, req)
    assert plans, "nothing fits"
    best = plans[0]
    assert "fused linear cross-entropy" in best.techniques and best.settings.loss == "liger-flce"
    saved = best.saved["fused linear cross-entropy"]
    assert saved > 10 * 2**30  # the logits of 8192 tokens x 128k vocabulary
    assert any("fused linear cross-entropy" in w and f"saves {saved / 2**30:,.1f} GiB" in w for w in best.notes)
    # with the standard loss asked for and fitting, nothing is added
    easy = recommend(spec, replace(req, seq_len=512))
    assert easy[0].techniques == () and easy[0].settings.loss == "standard"
    # --optimizer auto: the 8-bit plans are searched too, ranked after the plain one
    auto = recommend(spec, replace(req, seq_len=512, optimizer="auto"))
    assert auto[0].techniques == () and any("8-bit optimizer state" in p.techniques for p in auto)


def test_recommend_json_names_techniques_and_refuses_estimate_auto():
    r = run_plan("recommend", LLAMA3, "--gpu", "T4", "--method", "lora", "--seq-len", "8192", "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["plans"][0]
    assert "fused linear cross-entropy" in p["techniques"] and p["loss"] == "liger-flce"
    r = run_plan("estimate", LLAMA3, "--optimizer", "auto", env=OFFLINE)
    assert r.returncode == 2 and "--optimizer" in r.stderr
