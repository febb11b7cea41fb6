"""Per-parameter learning rates (issue 21): the recipe's `parameter_groups` (regex -> lr, weight
decay) and LoRA+ (`loraplus_lr_ratio`, PEFT's create_loraplus_optimizer) in the trainer's optimizer."""
from types import SimpleNamespace

import pytest

from planner.contract import Settings
from planner.measure.builder import build_model
from planner.measure.validate import SMALL
from planner.recipe import RecipeError, from_dict
from trainer import train as T
from trainer.model import param_groups


def _lrs(opt_groups, model) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g.get("lr"), g["weight_decay"]) for g in opt_groups for p in g["params"]}


def test_first_matching_group_sets_lr_and_decay_the_rest_keep_the_recipes():
    model, _ = build_model(SMALL["llama"], Settings(precision="fp32"), meta=True)
    r = from_dict({"base_model": "x", "learning_rate": 1e-4, "weight_decay": 0.01, "parameter_groups": [
        {"regex": r"embed_tokens", "lr": 1e-5, "weight_decay": 0.0},
        {"regex": r"layers\.2\.", "lr": 3e-4}, {"regex": r"layers\.", "lr": 2e-4}]})
    got = _lrs(param_groups(model, r.weight_decay, r.learning_rate, r.parameter_groups), model)
    assert got["model.embed_tokens.weight"] == (1e-5, 0.0)
    assert got["model.layers.2.mlp.up_proj.weight"] == (3e-4, 0.01)       # the first match, not layers\.
    assert got["model.layers.2.input_layernorm.weight"] == (3e-4, 0.0)    # 1-D: no decay, the group's lr
    assert got["model.layers.0.self_attn.q_proj.weight"] == (2e-4, 0.01)
    assert got["lm_head.weight"] == (1e-4, 0.01) and got["model.norm.weight"] == (1e-4, 0.0)
    assert len(got) == sum(1 for _ in model.parameters())


def test_loraplus_puts_lora_b_at_lr_times_ratio():
    model, _ = build_model(SMALL["llama"], Settings(precision="fp32", lora_rank=4))
    r = from_dict({"base_model": "x", "adapter": "lora", "learning_rate": 1e-4, "loraplus_lr_ratio": 16,
                   "optimizer": "adamw"})
    opt = T.Trainer._setup_optimizer(SimpleNamespace(recipe=r), model)
    got = _lrs(opt.param_groups, model)
    b = [v for n, v in got.items() if "lora_B" in n]
    a = [v for n, v in got.items() if "lora_A" in n]
    assert b and a and {lr for lr, _ in b} == {1.6e-3} and {lr for lr, _ in a} == {1e-4}


@pytest.mark.parametrize("recipe, message", [
    ({"loraplus_lr_ratio": 16}, "adapter"),
    ({"adapter": "lora", "loraplus_lr_ratio": 16, "parameter_groups": [{"regex": "x", "lr": 1e-4}]}, "choose one"),
    ({"parameter_groups": [{"regex": "(", "lr": 1e-4}]}, "regular expression"),
    ({"parameter_groups": [{"regex": "x", "lr": 0}]}, "lr"),
])
def test_bad_groups_are_one_line(recipe, message):
    with pytest.raises(RecipeError, match=message):
        from_dict({"base_model": "x", **recipe})
