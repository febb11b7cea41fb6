"""plan recommend and emit-config with the seed documents' techniques (issue 21): partial
freezing (`--unfrozen-parameters`; with LoRA, PEFT's modules_to_save), EMA (`--ema`) and
L-BFGS (`--optimizer lbfgs`): searched with them, each plan's explanation says what they cost,
and emit-config's recipe carries them."""
import json
from dataclasses import replace

import pytest
import yaml
from typer.testing import CliRunner

from planner.cli import app
from planner.contract import EMA_DECAY, PlanError
from planner.estimate import estimate
from planner.gpus import lookup
from planner.memory import ema_bytes
from planner.recipe import from_dict, settings
from planner.recommend import Request, recommend
from planner.resolve import resolve
from planner.spec import ModelSpec, count_params

runner = CliRunner()
LLAMA3 = "meta-llama/Meta-Llama-3-8B"
TOP = (r"model\.layers\.(2[4-9]|3[01])\.", r"model\.norm", "lm_head")  # Llama-3-8B's upper 8 blocks and head


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def spec():
    return ModelSpec.from_config(resolve(LLAMA3).config)


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def test_partial_freezing_plans_say_what_trains_and_fit_more(spec):
    req = Request(gpu=lookup("H100-SXM"), global_batch=8, method="full")
    frozen = recommend(spec, replace(req, unfrozen_parameters=TOP))
    assert frozen and all(p.settings.unfrozen_parameters == TOP for p in frozen)
    best = frozen[0]
    assert best.notes[0] == "partial fine-tune: only --unfrozen-parameters train"
    assert any("parameters train; backward stops at block 24" in n for n in best.notes)
    assert best.estimate.trainable_params < count_params(spec).total / 3
    # full fine-tuning of 8B needs offload on one 80 GB GPU; the upper quarter trains without it
    assert not best.offload
    assert all(p.offload for p in recommend(spec, req))
    # these kinds have not been measured on a GPU: the unmeasured margin, said so
    assert any("unfrozen_parameters has not been measured on a GPU" in n for n in best.notes)


def test_lora_with_unfrozen_parameters_is_modules_to_save(spec):
    req = Request(gpu=lookup("A100-80GB"), global_batch=8, method="lora", unfrozen_parameters=("lm_head",))
    plans = recommend(spec, req)
    assert plans
    line = next(n for n in plans[0].notes if n.startswith("unfrozen_parameters with LoRA"))
    assert "lm_head train whole beside the adapters" in line and "modules_to_save" in line
    plain = estimate(spec, replace(plans[0].settings, unfrozen_parameters=()))
    assert plans[0].estimate.trainable_params - plain.trainable_params == spec.vocab * spec.hidden


def test_a_block_module_under_lora_or_a_pattern_matching_nothing_is_one_line(spec):
    with pytest.raises(PlanError, match="inside a block"):
        recommend(spec, Request(gpu=lookup("H100-SXM"), method="lora", unfrozen_parameters=(r"layers\.3\.mlp",)))
    with pytest.raises(PlanError, match="matches no parameter"):
        recommend(spec, Request(gpu=lookup("H100-SXM"), unfrozen_parameters=("classifier",)))
    # under --method auto a block module still plans the partial fine-tune; LoRA cannot take it
    plans = recommend(spec, Request(gpu=lookup("H200"), global_batch=8, unfrozen_parameters=(r"layers\.31\.",)))
    assert plans and {p.method for p in plans} == {"full"}


def test_ema_costs_one_copy_of_the_trainable_parameters(spec):
    req = Request(gpu=lookup("A100-80GB"), global_batch=8, method="lora")
    plain, ema = recommend(spec, req), recommend(spec, replace(req, ema=True))
    st = ema[0].settings
    assert st.ema and not plain[0].settings.ema
    copy = ema_bytes(spec, count_params(spec), st)
    assert copy == 4 * ema[0].estimate.trainable_params + 8  # fp32 adapters
    line = next(n for n in ema[0].notes if n.startswith("EMA:"))
    assert f"+{copy / 2**30:,.2f} GiB" in line and "one copy of the" in line
    same = estimate(spec, replace(st, ema=False))
    assert ema[0].estimate.peak_bytes - same.peak_bytes == copy


def test_lbfgs_is_planned_on_one_gpu_and_ddp_only_and_says_its_state(spec):
    req = Request(gpu=lookup("H100-SXM"), gpus=8, global_batch=64, method="lora", optimizer="lbfgs",
                  lbfgs_history=10)
    plans = recommend(spec, req)
    assert plans and {p.settings.strategy for p in plans} == {"ddp"}
    line = next(n for n in plans[0].notes if n.startswith("L-BFGS, history 10"))
    assert "22 flat vectors" in line and "AdamW's two moments" in line
    with pytest.raises(PlanError, match="lbfgs-history must be at least 1"):
        recommend(spec, replace(req, lbfgs_history=0))


def test_recommend_cli_takes_them_and_json_keeps_them():
    code, out, err = run("recommend", LLAMA3, "--gpu", "H200", "--global-batch", "8", "--method", "lora", "--ema",
                         "--unfrozen-parameters", "lm_head", "--json", "--top", "1")
    assert code == 0, err
    p = json.loads(out)["plans"][0]
    assert p["unfrozen_parameters"] == ["lm_head"] and p["ema"] is True
    assert any(w.startswith("EMA: +") for w in p["why"])
    code, out, err = run("recommend", LLAMA3, "--gpu", "H200", "--unfrozen-parameters", "(")
    assert code == 2 and "not a regular expression" in err and len(err.strip().splitlines()) == 1


def test_emit_config_recipe_carries_them(tmp_path):
    out = tmp_path / "plan"
    code, stdout, err = run("emit-config", LLAMA3, "--gpu", "A100-80GB", "--method", "lora", "--ema",
                            "--unfrozen-parameters", "lm_head", "--unfrozen-parameters", r"model\.norm", "--out", out)
    assert code == 0, err
    r = yaml.safe_load((out / "recipe.yaml").read_text())
    assert r["unfrozen_parameters"] == ["lm_head", r"model\.norm"] and r["ema_decay"] == EMA_DECAY
    st = settings(from_dict(r))
    assert st.unfrozen_parameters == ("lm_head", r"model\.norm") and st.ema and st.lora
    md = (out / "PLAN.md").read_text()
    assert "modules_to_save" in md and "EMA: +" in md and "AveragedModel" in md
    # a full fine-tune's recipe: freezing without an adapter
    code, _, err = run("emit-config", LLAMA3, "--gpu", "H100-SXM", "--method", "full", "--unfrozen-parameters",
                       TOP[0], "--out", tmp_path / "partial")
    assert code == 0, err
    r = yaml.safe_load((tmp_path / "partial" / "recipe.yaml").read_text())
    assert r["unfrozen_parameters"] == [TOP[0]] and "adapter" not in r and "ema_decay" not in r


def test_emit_config_refuses_lbfgs_in_one_line(tmp_path):
    code, _, err = run("emit-config", "gpt2", "--gpu", "A100-80GB", "--optimizer", "lbfgs", "--out", tmp_path / "x")
    assert code == 2 and "plan train cannot run it" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_the_speed_model_stops_the_backward_where_freezing_does(spec):
    """Partial freezing: input gradients (and the recompute) from the lowest trainable block up,
    weight gradients for what trains; everything unfrozen is full fine-tuning's 6N."""
    from planner.contract import Settings
    from planner.speed import train_flops_per_token
    for ckpt in (False, True):
        st = Settings(seq_len=2048, grad_checkpointing=ckpt)
        full = train_flops_per_token(spec, st)
        assert train_flops_per_token(spec, replace(st, unfrozen_parameters=(".",))) == pytest.approx(full, rel=1e-3)
        top = train_flops_per_token(spec, replace(st, unfrozen_parameters=TOP))
        head = train_flops_per_token(spec, replace(st, unfrozen_parameters=("lm_head",)))
        assert head < top < full
