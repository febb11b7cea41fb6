"""Recommended plans against the GPU: today's `plan recommend` for each fit-test scenario, scored
against what the H200 measured (tables/gpu/fit.csv: which micro-batches of the plan's settings
ran under each card's memory and which ran out). Each first plan must be one that ran, and the
next micro-batch up must have run out of memory or have needed the margin the plan keeps."""

import csv
import json
from pathlib import Path

import pytest

from planner.gpus import lookup
from planner.margin import MARGIN_FLOOR, UNMEASURED_MARGIN, evidence
from planner.measure.fit import SCENARIOS, SEQ_LEN, runnable
from planner.recommend import Request, recommend
from planner.resolve import catalog
from planner.spec import ModelSpec

FIT = Path(__file__).resolve().parent.parent / "tables" / "gpu" / "fit.csv"
ROWS = {(r["model"], r["gpu_played"]): r for r in csv.DictReader(open(FIT))} if FIT.exists() else {}


@pytest.mark.parametrize("model,gpu,method,optimizer", SCENARIOS,
                         ids=[f"{m.split('/')[1]}-{g}" for m, g, *_ in SCENARIOS])
def test_the_first_plan_ran_on_the_gpu_and_the_next_micro_batch_up_did_not_fit(model, gpu, method, optimizer):
    row = ROWS.get((model, gpu))
    assert row is not None, "no GPU measurement for this scenario: run python -m planner.measure.gpu suite tables/gpu"
    req = Request(gpu=lookup(gpu), method=method, optimizer=optimizer, seq_len=SEQ_LEN)
    plans = recommend(ModelSpec.from_config(catalog()[model]["config"]), req)
    assert plans and runnable(plans[0]), "the first plan needs an engine the fit test does not run"
    st = plans[0].settings
    tested = (row["precision"], int(row["lora_rank"]), row["quant"], row["grad_checkpointing"] == "True")
    assert (st.precision, st.lora_rank, st.quant, st.grad_checkpointing) == tested, \
        "the plan changed since the GPU measured it: rerun the GPU suite (tables/gpu)"
    tries = {int(m): t for m, t in json.loads(row["tries"]).items()}
    # memory grows with the micro-batch: a micro-batch ran if it or a larger one did
    assert any(t["ok"] for m, t in tries.items() if m >= st.batch_size), \
        f"micro-batch {st.batch_size} ran out of memory on the GPU"
    up = tries.get(st.batch_size + 1)
    assert up is not None, "the next micro-batch up was not measured"
    if up["ok"]:  # it ran: only within the margin the plan keeps
        device = up["reserved_peak"] + int(row["outside_allocator"])
        assert device >= req.gpu.memory_bytes * (1 - req.margin_for(st)), (device, req.margin_for(st))


def test_margins_come_from_the_measurements_of_each_kind():
    from planner.contract import Settings
    qlora = evidence(Settings(lora_rank=16, lora_alpha=32, quant="nf4", grad_checkpointing=True))
    assert qlora.cases >= 2 and MARGIN_FLOOR <= qlora.margin < UNMEASURED_MARGIN
    assert qlora.margin == pytest.approx(MARGIN_FLOOR - min(qlora.low, 0), abs=1e-3)
    assert "H200" in qlora.gpu and "kept free" in qlora.line()
    sharded = evidence(Settings(lora_rank=16, lora_alpha=32, strategy="zero3", gpus=8))
    assert sharded.cases == 0 and sharded.margin == UNMEASURED_MARGIN and "not been measured" in sharded.line()
