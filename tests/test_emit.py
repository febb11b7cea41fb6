"""plan emit-config writes configs that run where they land (issue 19, item 4): every plan
decision in accelerate.yaml and the recipe (or PLAN.md's line for a user's script), paths
relative to the plan directory, fp16 on a GPU without bf16, only the keys that apply, the data
checked, normal file modes, DeepSpeed's non-defaults explained, and a warning for an explicit
plan that does not fit its GPU."""

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from planner.cli import app

L8 = "meta-llama/Meta-Llama-3-8B"
L70 = "meta-llama/Llama-3.1-70B"
ALPACA = '{"instruction": "say hi", "input": "", "output": "hi"}\n'


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(ALPACA)


def emit(*args):
    r = CliRunner().invoke(app, ["emit-config", *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


def files(out):
    out = Path(out)
    acc = yaml.safe_load((out / "accelerate.yaml").read_text())
    rec = yaml.safe_load((out / "recipe.yaml").read_text())
    ds = json.loads((out / "deepspeed.json").read_text()) if (out / "deepspeed.json").exists() else None
    return acc, rec, ds, (out / "PLAN.md").read_text()


def test_fsdp_checkpointing_reaches_accelerate_yaml_and_the_recipe():
    code, _, err = emit(L70, "--gpus", "8", "--strategy", "fsdp", "--grad-checkpointing", "--lora-rank", "16",
                        "--precision", "bf16-pure", "--out", "ck")
    assert code == 0, err
    acc, rec, _, md = files("ck")
    assert acc["fsdp_config"]["fsdp_activation_checkpointing"] is True and rec["gradient_checkpointing"] is True
    assert "fsdp_activation_checkpointing: true" in md and "do not also call" in md
    assert emit(L70, "--gpus", "8", "--strategy", "fsdp", "--out", "nock")[0] == 0
    assert files("nock")[0]["fsdp_config"]["fsdp_activation_checkpointing"] is False


def test_recommended_fsdp_plan_that_checkpoints_says_so_in_accelerate_yaml():
    """The issue's case: 70B on 8 x H100, where recommend's plan needs checkpointing."""
    code, _, err = emit(L70, "--gpu", "H100-SXM", "--gpus", "8", "--global-batch", "64", "--seq-len", "4096",
                        "--out", "rec")
    assert code == 0, err
    acc, rec, _, _ = files("rec")
    if acc["distributed_type"] == "FSDP":
        assert acc["fsdp_config"]["fsdp_activation_checkpointing"] == rec["gradient_checkpointing"]


def test_plan_train_launch_config_leaves_fsdp_checkpointing_to_the_trainer(tmp_path):
    from planner.launch import write_config
    from planner.recipe import from_dict
    r = from_dict({"base_model": "x", "gradient_checkpointing": True, "output_dir": str(tmp_path / "o"),
                   "plan": {"strategy": "fsdp", "gpus": 2}})
    cfg = yaml.safe_load(write_config(r, None).read_text())
    assert cfg["fsdp_config"]["fsdp_activation_checkpointing"] is False


def test_non_fsdp_checkpointing_gets_the_line_for_a_users_script():
    assert emit(L8, "--lora-rank", "16", "--quant", "nf4", "--grad-checkpointing", "--out", "q")[0] == 0
    md = files("q")[3]
    assert 'gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})' in md
    assert "BitsAndBytesConfig(load_in_4bit=True" in md and "LoraConfig(r=16" in md


def test_paths_are_relative_to_the_plan_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text(ALPACA)
    code, _, err = emit(L70, "--gpus", "8", "--strategy", "zero3", "--offload", "optimizer", "--data",
                        "data/d.jsonl", "--out", "plans/z3")
    assert code == 0, err
    acc, rec, ds, md = files("plans/z3")
    out = tmp_path / "plans" / "z3"
    assert rec["datasets"][0]["path"] == "../../data/d.jsonl" and (out / rec["datasets"][0]["path"]).is_file()
    assert not Path(rec["output_dir"]).is_absolute()
    assert acc["deepspeed_config"]["deepspeed_config_file"] == "deepspeed.json"
    assert "Run it from this directory" in md
    # the directory moves as a whole: from inside it, every path resolves
    moved = tmp_path / "cluster" / "run"
    moved.parent.mkdir()
    (tmp_path / "plans").rename(tmp_path / "cluster" / "plans")
    os.chdir(tmp_path / "cluster" / "plans" / "z3")
    assert Path(acc["deepspeed_config"]["deepspeed_config_file"]).is_file()


def test_an_absolute_data_path_stays_absolute(tmp_path):
    assert emit(L8, "--data", tmp_path / "train.jsonl", "--out", "a")[0] == 0
    assert files("a")[1]["datasets"][0]["path"] == str(tmp_path / "train.jsonl")


def test_a_relative_local_model_is_relative_to_the_plan_directory(tmp_path):
    from planner.resolve import resolve
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(resolve("HuggingFaceTB/SmolLM2-135M").config))
    assert emit("m", "--out", "p/q")[0] == 0
    assert files("p/q")[1]["base_model"] == "../../m"


@pytest.mark.parametrize("model", [L8, "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-1.5B"])
def test_a_gpu_without_bf16_gets_fp16_never_bf16(model):
    code, _, err = emit(model, "--gpu", "T4", "--out", "t4")
    assert code == 0, err
    acc, rec, ds, md = files("t4")
    assert rec["bf16"] is False and rec["fp16"] is True, rec
    assert not rec["plan"]["precision"].startswith("bf16")
    assert acc["mixed_precision"] == "fp16"
    assert ds is None or not ds["bf16"]["enabled"]


def test_explicit_plans_on_a_gpu_without_bf16():
    code, _, err = emit(L8, "--gpu", "T4", "--lora-rank", "16", "--quant", "nf4", "--grad-checkpointing",
                        "--out", "e")
    assert code == 0, err
    acc, rec, _, _ = files("e")
    assert rec["fp16"] is True and rec["bf16"] is False and acc["mixed_precision"] == "fp16"
    assert rec["plan"]["gpu"] == "T4"
    code, out, err = emit(L8, "--gpu", "T4", "--precision", "bf16-pure", "--lora-rank", "16", "--out", "b")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no bf16" in err and not Path("b").exists()


def test_a_full_fine_tune_recipe_has_no_adapter_keys():
    assert emit(L8, "--out", "full")[0] == 0
    rec = files("full")[1]
    assert not {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit", "adapter"} & set(rec)
    assert "loss_watchdog_patience" not in rec  # no watchdog threshold: its patience does not apply
    assert not {"liger_fused_linear_cross_entropy", "cut_cross_entropy", "chunked_cross_entropy",
                "chunked_cross_entropy_num_chunks"} & set(rec)  # the standard loss
    assert emit(L8, "--loss", "chunked", "--loss-chunks", "4", "--out", "chunked")[0] == 0
    rec = files("chunked")[1]
    assert rec["chunked_cross_entropy"] is True and rec["chunked_cross_entropy_num_chunks"] == 4
    assert "liger_fused_linear_cross_entropy" not in rec
    assert emit(L8, "--lora-rank", "8", "--out", "lora")[0] == 0
    assert files("lora")[1]["lora_r"] == 8


@pytest.mark.parametrize("data, msg", [("missing.jsonl", "no such dataset file"), (".", "is a directory"),
                                       ("bad.jsonl", "bad.jsonl")])
def test_data_is_checked(tmp_path, data, msg):
    (tmp_path / "bad.jsonl").write_text('{"text": "no instruction"}\n')
    code, out, err = emit(L8, "--data", data, "--out", "d")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and msg in err, err
    assert err.startswith("error: --data ") and not Path("d").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_have_normal_modes(umask, mode):
    old = os.umask(umask)
    try:
        assert emit(L8, "--strategy", "zero2", "--gpus", "2", "--out", "m")[0] == 0
    finally:
        os.umask(old)
    for p in Path("m").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == mode, p


@pytest.mark.parametrize("args", [["--strategy", "zero3", "--gpus", "8", "--offload", "nvme"],
                                  ["--strategy", "zero2", "--gpus", "4", "--offload", "optimizer"],
                                  ["--strategy", "zero1", "--gpus", "2"]])
def test_every_non_default_deepspeed_setting_is_explained(args):
    """Each value of deepspeed.json that DeepSpeed's own config would not choose (its pydantic
    defaults) is named in PLAN.md with its reason; overlap_comm is DeepSpeed's default."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    assert emit(L8, *args, "--out", "ds")[0] == 0
    _, _, ds, md = files("ds")
    zero = ds["zero_optimization"]
    default = DeepSpeedZeroConfig(stage=zero["stage"])
    name = {(f.alias or n): n for n, f in DeepSpeedZeroConfig.model_fields.items()}
    assert zero["overlap_comm"] == default.overlap_comm
    for k, v in zero.items():
        if k in ("stage", "offload_optimizer", "offload_param"):
            continue
        if getattr(default, name[k]) != v:
            assert f"`{k}: {json.dumps(v)}`" in md, k
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )
    for sub, cls in (("offload_optimizer", DeepSpeedZeroOffloadOptimizerConfig),
                     ("offload_param", DeepSpeedZeroOffloadParamConfig)):
        for k, v in zero.get(sub, {}).items():
            if k != "device" and getattr(cls(), k) != v:
                assert f"`{k}: {json.dumps(v)}`" in md, (sub, k)
    for k in ("zero_allow_untested_optimizer", "steps_per_print", "gradient_clipping"):
        assert f"`{k}: {json.dumps(ds[k])}`" in md


def test_explicit_plan_that_does_not_fit_is_written_with_a_warning():
    """The README's old 70B ZeRO-3 optimizer-offload plan (no checkpointing) needs more than an
    H100 (88.8 GiB per GPU when the issue was filed)."""
    import re
    code, out, err = emit(L70, "--gpus", "8", "--strategy", "zero3", "--offload", "optimizer", "--out", "z3")
    assert code == 0
    m = re.search(r"warning: this plan needs ([\d.,]+) GiB per GPU; H100-SXM \(assumed: no --gpu named\) has "
                  r"79\.6 GiB", err)
    assert m and float(m.group(1).replace(",", "")) > 79.6, err
    assert f"**Warning**: this plan needs {m.group(1)} GiB" in files("z3")[3]
    code, out, err = emit(L70, "--gpu", "A100-40GB", "--gpus", "8", "--strategy", "zero3", "--offload", "optimizer",
                          "--out", "a100")
    assert code == 0 and "--gpu A100-40GB has" in err
    code, out, err = emit(L70, "--gpus", "8", "--strategy", "zero3", "--offload", "all", "--grad-checkpointing",
                          "--out", "fits")
    assert code == 0 and "warning" not in err and "Warning" not in files("fits")[3]


def test_explicit_options_beside_gpu_write_the_explicit_plan_for_that_gpu():
    code, _, err = emit(L8, "--gpu", "A100-80GB", "--gpus", "2", "--strategy", "fsdp", "--batch-size", "3",
                        "--out", "x")
    assert code == 0, err
    acc, rec, _, md = files("x")
    assert rec["micro_batch_size"] == 3 and rec["plan"]["gpu"] == "A100-80GB" and acc["num_processes"] == 2
    assert "(A100-80GB)" in md


def test_an_explicit_lora_plan_without_dtype_is_on_a_bf16_base():
    """No --dtype in an explicit plan means --dtype bf16, whose LoRA is a bf16 base (bf16-pure)."""
    assert emit(L8, "--lora-rank", "16", "--out", "l")[0] == 0
    rec = files("l")[1]
    assert rec["plan"]["precision"] == "bf16-pure" and rec["bf16"] is True
    assert emit(L8, "--out", "f")[0] == 0 and files("f")[1]["plan"]["precision"] == "bf16-amp"


def test_a_deepspeed_accelerate_yaml_leaves_the_precision_to_deepspeed_json():
    """accelerate launch refuses `mixed_precision` beside `deepspeed_config_file` (the plugin's
    "config variables will be ignored" error); the dtype is deepspeed.json's."""
    assert emit(L8, "--strategy", "zero2", "--gpus", "2", "--out", "ds")[0] == 0
    acc, _, ds, _ = files("ds")
    assert "mixed_precision" not in acc and ds["bf16"]["enabled"]


PROBE = """import os
from accelerate.utils import DeepSpeedPlugin
p = DeepSpeedPlugin()
print("stage", p.deepspeed_config["zero_optimization"]["stage"], os.getcwd())
"""


@pytest.mark.slow
def test_an_emitted_deepspeed_config_launches_from_its_directory(tmp_path):
    """accelerate launch --config_file accelerate.yaml, run from the plan directory (moved), reads
    deepspeed.json through its relative path in each of two processes; from elsewhere it cannot."""
    import subprocess
    import sys
    assert emit(L8, "--strategy", "zero2", "--gpus", "2", "--out", "ds")[0] == 0
    moved = tmp_path / "elsewhere" / "ds"
    moved.parent.mkdir()
    (tmp_path / "ds").rename(moved)
    (moved / "probe.py").write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate.yaml", "probe.py"]
    r = subprocess.run(cmd, cwd=moved, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("stage 2") == 2
    r = subprocess.run([*cmd[:4], str(moved / "accelerate.yaml"), str(moved / "probe.py")], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0  # deepspeed.json is relative to the plan directory


@pytest.mark.parametrize("host_ram, plan", [(24, ("lora", "zero3", "nvme")), (256, ("qlora", "fsdp", "all"))])
def test_host_ram_chooses_the_plan_emit_config_writes(host_ram, plan):
    """emit-config takes recommend's --host-ram (GiB per node of the machines the plan runs on, not
    this one's): Llama-3.1-405B on one H100 offloads parameters to NVMe with 24 GiB of host RAM,
    and to host RAM with 256. Before 2026-11-30 emit-config had no --host-ram and wrote the plan
    for this machine's RAM."""
    r = CliRunner().invoke(app, ["recommend", "meta-llama/Llama-3.1-405B", "--gpu", "H100-SXM", "--host-ram",
                                 str(host_ram), "--json"])
    assert r.exit_code == 0, r.stderr
    best = json.loads(r.stdout)["plans"][0]
    assert (best["method"], best["strategy"], best["offload"]) == plan
    code, _, err = emit("meta-llama/Llama-3.1-405B", "--gpu", "H100-SXM", "--host-ram", host_ram, "--out", "h")
    assert code == 0, err
    rec = files("h")[1]
    assert (rec.get("adapter"), rec["plan"]["strategy"], rec["plan"]["offload"]) == (plan[0], *plan[1:])
    assert (rec["micro_batch_size"], rec["gradient_accumulation_steps"]) == (best["micro_batch"],
                                                                              best["gradient_accumulation"])
