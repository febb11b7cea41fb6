"""The CLI's options: choices come from the contract's Enums, options reach the right Settings
fields through the one conversion, an option left out is None (not "given"), and a bad choice is
one line with status 2."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from planner import cli
from planner.cli import estimate as estimate_module
from planner.cli.options import flag, given, to_request, to_settings
from planner.contract import (
    Attention,
    Dtype,
    Loss,
    Offload,
    Optimizer,
    OptimizerName,
    PlanError,
    Precision,
    Quant,
    Settings,
    Strategy,
)
from planner.gpus import lookup

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plan(*args: str, module: str = "planner") -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS`, offline, plain (wide, uncoloured) help."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS")}
    env.update(HF_HUB_OFFLINE="1", TERMINAL_WIDTH="400", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300)


def one_line_status_2(r: subprocess.CompletedProcess, *mentions: str) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip() == ""
    for m in mentions:
        assert m in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def config(tmp_path) -> str:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(TINY))
    return str(p)


def command(name: str):
    return typer.main.get_command(cli.app).commands[name]


# ---------------------------------------------------------------- choices from the contract

def test_estimate_help_lists_every_choice_of_the_contract():
    r = plan("estimate", "--help")
    assert r.returncode == 0, r.stderr
    words = set(re.findall(r"[\w.-]+", ANSI.sub("", r.stdout)))
    for enum in (Precision, Dtype, Optimizer, Strategy, Quant, Offload, Attention):
        missing = [v for v in enum.values() if v not in words]
        assert not missing, f"{enum.__name__}: {missing} not in estimate --help"
    assert "all" in words


def test_choice_options_are_the_contracts_enums():
    """Each choice option offers exactly its Enum's values (estimate's --strategy also `all`,
    --method also `auto`)."""
    def choices(cmd: str, name: str) -> list[str]:
        param = next(p for p in command(cmd).params if p.name == name)
        return [str(c) for c in param.type_descriptor.choices]
    assert choices("estimate", "precision") == list(Precision.values())
    assert choices("estimate", "optimizer") == list(OptimizerName.values())  # ours, then HF Trainer's / Axolotl's
    assert choices("recommend", "optimizer") == ["auto", *OptimizerName.values()]
    assert choices("estimate", "loss") == list(Loss.values())
    assert choices("estimate", "strategy") == [*Strategy.values(), "all"]
    assert choices("emit-config", "strategy") == list(Strategy.values())
    assert choices("recommend", "method") == ["auto", "full", "lora", "qlora"]


def test_an_optimizer_outside_the_contract_is_one_line_status_2(config):
    """The command line refuses an optimizer outside the Enum as any value outside a choice,
    before planning anything (every listed one builds: tests/test_structure.py)."""
    line = one_line_status_2(plan("estimate", config, "--optimizer", "adamq"), "--optimizer", "adamq")
    assert line == f"error: unknown --optimizer 'adamq'; choose one of {', '.join(OptimizerName.values())}"


def test_all_is_a_strategy_of_estimate_only(config, tmp_path):
    one_line_status_2(plan("emit-config", config, "--strategy", "all", "--out", str(tmp_path / "plan"),
                           module="planner.cli"), "--strategy")
    assert not (tmp_path / "plan").exists()


def test_usage_errors_are_one_line_in_process_too(config):
    """The app itself answers click's usage errors (tests and tools that invoke it directly)."""
    r = CliRunner().invoke(cli.app, ["estimate", config, "--batchsize", "2"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "--batchsize" in r.stderr
    r = CliRunner().invoke(cli.app, ["recommend", config, "--gpu", "a100-80gb", "--method", "dpo"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: unknown --method 'dpo'; choose one of auto, full, lora, qlora"
    r = CliRunner().invoke(cli.app, ["estimate", config, "--attn", "\x1e"])  # a line separator to splitlines()
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        "error: unknown --attn '\\x1e'; choose one of sdpa, flash, eager"]


# ---------------------------------------------------------------- options -> Settings

GIVEN = {"precision": Precision.FP8_TE, "optimizer": Optimizer.SGD, "batch_size": 3, "seq_len": 96, "lora_rank": 8,
         "lora_alpha": 4.0, "lora_dropout": 0.25, "lora_targets": "q_proj,v_proj", "quant": Quant.NF4,
         "grad_checkpointing": True, "attn": Attention.EAGER, "gpus": 4, "nodes": 2, "strategy": Strategy.ZERO3,
         "offload": Offload.NVME, "fsdp_version": 1}


def test_each_option_reaches_its_settings_field_as_a_plain_value():
    st = to_settings({**GIVEN, "model": "x", "as_json": True, "compat": None})
    for name, value in GIVEN.items():
        got = getattr(st, name)
        assert got == getattr(value, "value", value), name
        assert type(got) in (str, int, float, bool), f"{name}: {type(got)} (Settings hold plain values)"
    assert dataclasses.asdict(st) == {**dataclasses.asdict(Settings()),
                                      **{k: getattr(v, "value", v) for k, v in GIVEN.items()}}


def test_options_left_out_keep_the_settings_defaults():
    assert to_settings({name: None for name in GIVEN}) == Settings()
    assert to_settings({}) == Settings()


def test_dtype_stands_for_its_recipe_and_precision_wins():
    assert to_settings({"dtype": Dtype.FP16}).precision == "fp16-amp"
    assert to_settings({"dtype": Dtype.FP16, "precision": Precision.BF16_PURE}).precision == "bf16-pure"
    assert to_settings({"dtype": Dtype.FP16}, precision="fp32", seq_len=7) == Settings(precision="fp32", seq_len=7)


def test_the_command_line_reaches_the_settings(monkeypatch, config):
    """Parsed by click, then converted: every estimate option named like a Settings field."""
    seen = {}
    monkeypatch.setattr(estimate_module, "run", lambda options, exact: seen.update(options, exact=exact))
    args = ["estimate", config, "--precision", "fp8-te", "--optimizer", "sgd", "--batch-size", "3", "--seq-len", "96",
            "--lora-rank", "8", "--lora-alpha", "4", "--lora-dropout", "0.25", "--lora-targets", "q_proj,v_proj",
            "--quant", "nf4", "--grad-checkpointing", "--attn", "eager", "--gpus", "4", "--nodes", "2",
            "--strategy", "zero3", "--offload", "nvme", "--fsdp-version", "1", "--exact"]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert seen["exact"] is True and seen["model"] == config
    assert to_settings(seen) == to_settings(GIVEN)


def test_simulate_takes_the_estimate_options_but_compat_and_exact():
    names = {p.name for p in command("estimate").params}
    assert {p.name for p in command("simulate").params} == names - {"compat", "exact"}


def test_request_takes_the_search_options():
    g = lookup("a100-80gb")
    req = to_request({"method": cli.options.MethodOrAuto.LORA, "margin": 0.2, "optimizer": Optimizer.SGD,
                      "global_batch": None, "top": 5, "model": "x"}, gpu=g, gpus=2)
    assert (req.method, req.margin, req.optimizer, req.global_batch, req.gpus) == ("lora", 0.2, "sgd", None, 2)


# ---------------------------------------------------------------- given = not None

def test_an_option_left_out_is_not_given():
    options = {"batch_size": None, "quant": Quant.NF4, "grad_checkpointing": None, "lora_rank": 0, "strategy": None}
    assert given(options, ["batch_size", "quant", "grad_checkpointing", "lora_rank", "strategy", "absent"]) == \
        ["quant", "lora_rank"]


def test_left_out_options_parse_as_none(monkeypatch, config):
    seen = {}
    monkeypatch.setattr(estimate_module, "run", lambda options, exact: seen.update(options))
    assert CliRunner().invoke(cli.app, ["estimate", config]).exit_code == 0
    assert given(seen, set(seen) - {"model", "exact", "as_json", "sim_seconds", "sim_memory"}) == []


def test_emit_config_refuses_an_explicit_option_given_at_its_default_beside_from_recommendation(config, tmp_path):
    """Given is `is not None`: --batch-size 1 is as explicit as --batch-size 64. (Beside a plain
    --gpu, explicit options write the explicit plan for that GPU: tests/test_emit.py.)"""
    r = CliRunner().invoke(cli.app, ["emit-config", config, "--gpu", "a100-80gb", "--from-recommendation",
                                     "--batch-size", "1", "--grad-checkpointing", "--out", str(tmp_path / "plan")])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("error: --batch-size, --grad-checkpointing: explicit-plan options")
    assert not (tmp_path / "plan").exists()


def test_flags_are_named_as_plan_errors_render_them():
    for name in ("seq_len", "batch_size", "lora_targets", "grad_accum"):
        assert flag(name) == str(PlanError("{" + name + "}"))


# ---------------------------------------------------------------- the entry points

def test_python_m_planner_cli_and_the_console_script_run_main():
    r = plan("gpus", "--json", module="planner.cli")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["catalog"]
    from importlib.metadata import entry_points
    scripts = [e for e in entry_points(group="console_scripts") if e.name == "plan"]
    if not scripts:
        pytest.skip("plan-memory is not installed (no console script)")
    assert scripts[0].value == "planner.cli:main" and scripts[0].load() is cli.main


def test_dtype_bf16_has_one_meaning_in_estimate_and_recommend():
    """--dtype bf16 with --lora-rank is LoRA on a bf16 base (bf16-pure), as recommend plans it:
    the same shape gives the same bytes in both (before, estimate assumed an fp32 base: 60.17
    GiB against recommend's 36.49 for Llama-3-8B r16). Full fine-tuning and QLoRA keep bf16-amp."""
    import json

    from planner.contract import Settings
    from planner.estimate import estimate
    from planner.gpus import lookup
    from planner.recommend import Request, _method_settings
    from planner.resolve import resolve
    from planner.spec import ModelSpec
    runner = CliRunner()
    args = ["estimate", "meta-llama/Meta-Llama-3-8B", "--dtype", "bf16", "--json"]
    lora = json.loads(runner.invoke(cli.app, [*args, "--lora-rank", "16"]).stdout)
    assert lora["precision"] == "bf16-pure"
    st = _method_settings("lora", 16, Request(gpu=lookup("H100-SXM")), lookup("H100-SXM"))
    spec = ModelSpec.from_config(resolve("meta-llama/Meta-Llama-3-8B").config)
    assert st.precision == "bf16-pure" and lora["peak_bytes"] == estimate(spec, st).peak_bytes
    assert json.loads(runner.invoke(cli.app, args).stdout)["precision"] == "bf16-amp"
    qlora = json.loads(runner.invoke(cli.app, [*args, "--lora-rank", "16", "--quant", "nf4"]).stdout)
    assert qlora["precision"] == "bf16-amp"
    assert Settings().precision == "bf16-amp"
