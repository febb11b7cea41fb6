"""`--compat deepspeed` gives the numbers DeepSpeed's own ZeRO estimators give, to the byte."""
import json

import pytest
from helpers import run_plan

from planner.compat import deepspeed_table, ds_largest_module_params
from planner.resolve import catalog
from planner.spec import FAMILIES, ModelSpec, count_params

SETUPS = [(1, 1), (8, 1), (8, 4), (4, 2)]


@pytest.mark.parametrize("model_id", sorted(k for k, e in catalog().items() if e["config"]["model_type"] in FAMILIES))
def test_deepspeed_tables_match_deepspeed(model_id):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    spec = ModelSpec.from_config(catalog()[model_id]["config"])
    pc = count_params(spec)
    largest = ds_largest_module_params(spec, pc)
    for gpus, nodes in SETUPS:
        for row in deepspeed_table(spec, pc, gpus, nodes):
            if row["stage"] == "zero2":
                want = estimate_zero2_model_states_mem_needs(pc.total, gpus, nodes,
                                                             cpu_offload=row["offload_optimizer"])
            else:
                want = estimate_zero3_model_states_mem_needs(
                    pc.total, largest, gpus, nodes, cpu_offload=row["offload_optimizer"],
                    cpu_offload_params=row["offload_param"], zero_init=row["zero_init"])[:2]
            assert (row["cpu_bytes"], row["gpu_bytes"]) == tuple(want), (gpus, nodes, row)


def test_compat_deepspeed_cli():
    r = run_plan("estimate", "meta-llama/Llama-3.1-70B", "--compat", "deepspeed", "--gpus", "8", "--nodes", "2",
                 "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [r["stage"] for r in rows] == ["zero2"] * 2 + ["zero3"] * 6
    r = run_plan("estimate", "gpt2", "--compat", "nonsense")
    assert r.returncode == 2 and "deepspeed" in r.stderr
