"""The human output reads at a glance in any terminal: at 80 and at 120 columns no table cuts a
number, a header or a title to `…`, no line runs past the width, and every figure the command's
JSON gives appears in the text, as the table prints it. The real CLI, in-process."""

from __future__ import annotations

import json
import re
import sys

import pytest

from planner import cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
GIB = 2**30


def plan(monkeypatch, capsys, *args: str, columns: int = 80) -> tuple[int, str, str]:
    """`plan ARGS` in this process at COLUMNS=`columns`: (status, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", ["plan", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code or 0, ANSI.sub("", out), err


def g2(n: float) -> str:
    return f"{n / GIB:,.2f}"


def g1(n: float) -> str:
    return f"{n / GIB:,.1f}"


def estimate_figures(objs: list[dict]) -> list[str]:
    """A row per precision: the peak, its phase, each of weights, gradients and states at its
    largest, activations and logits together at their largest, the device figure, the GiB it
    needs (the fits-on line); the phase table of the one --dtype bf16 means, every cell."""
    figures = []
    bf16 = next((o for o in objs if o["precision"] == ("bf16-pure" if o["lora_rank"] and o["quant"] == "none"
                                                       else "bf16-amp")), objs[0])
    for o in objs:
        rows = o["phase_components"].values()
        figures += [o["precision"], f"{o['params']:,}", f"{o['trainable_params']:,}", g2(o["peak_bytes"]),
                    {"optimizer_step": "opt step"}.get(o["peak_phase"], o["peak_phase"])]
        figures += [g2(max(r[k] for r in rows)) for k in ("weights", "gradients", "optimizer")]
        figures += [g2(max(r["activations"] + r["logits"] for r in rows)), g2(o["device_bytes"])]
        figures += [f"{o['precision']} (needs {g1(o['needed_bytes'])} GiB)"]
    figures += [g2(v) for v in bf16["phases"].values()]
    figures += [g2(v) for row in bf16["phase_components"].values() for v in row.values() if v]
    return figures


def strategy_figures(objs: list[dict]) -> list[str]:
    figures = []
    for o in objs:
        c = o["components"]
        figures += [o["strategy"], o["offload"], g1(c["weights"] + c["gradients"] + c["optimizer"])]
        figures += [g1(n) for n in (c["activations"] + c["logits"], c["other"], o["device_bytes"], o["cpu_bytes"],
                                    o["nvme_bytes"]) if n]
    return figures


def recommend_figures(obj: dict) -> list[str]:
    figures = [obj["gpu"]]
    for p in obj["plans"]:
        figures += [p["strategy"], p["offload"], f"{p['micro_batch']} x {p['gradient_accumulation']}",
                    g1(p["device_bytes"]), f"{p['tokens_per_s']:,.0f}"]
        figures += [f"{p['cpu_bytes'] / GIB:,.0f}"] if p["cpu_bytes"] else []
    return figures


def gpus_figures(obj: dict) -> list[str]:
    figures = []
    for g in obj["catalog"]:
        figures += [g["name"], g["interconnect"], f"{g['memory_bytes'] / GIB:,.1f}", f"{g['fp16_tflops']:,.0f}",
                    f"{g['mem_bw_gbs']:,.0f}", f"{g['pcie_gbs']:,.0f}"]
        figures += [f"{g[k]:,.0f}" for k in ("bf16_tflops", "fp8_tflops", "nvlink_gbs") if g[k]]
    return figures


def accelerate_figures(rows: list[dict]) -> list[str]:
    return [r[k] for r in rows for k in ("dtype", "largest_layer_str", "total_size_str", "training_str")]


def deepspeed_figures(rows: list[dict]) -> list[str]:
    from planner.report import gib
    return [gib(r[k]) for r in rows for k in ("cpu_bytes", "gpu_bytes")]


def models_figures(rows: list[dict]) -> list[str]:
    from planner.report import params_short
    return [f for r in rows for f in (r["id"], r["model_type"], params_short(r["params"]))]


L8 = "meta-llama/Meta-Llama-3-8B"
CASES = {
    "estimate": ([L8], estimate_figures),
    "strategy-all": (["meta-llama/Llama-3.1-70B", "--gpus", "8", "--strategy", "all", "--grad-checkpointing"],
                     strategy_figures),
    "qlora-bf16": ([L8, "--lora-rank", "16", "--quant", "nf4", "--dtype", "bf16"],
                   lambda o: estimate_figures([o])),
    "qlora-readme": (["meta-llama/Llama-3.1-8B", "--lora-rank", "16", "--quant", "nf4"], estimate_figures),
    "recommend": (["recommend", L8, "--gpu", "RTX-4090", "--global-batch", "64"], recommend_figures),
    "gpus": (["gpus"], gpus_figures),
    "models": (["models"], models_figures),
    "models-query": (["models", "deepseek"], models_figures),
    "accelerate": ([L8, "--compat", "accelerate"], accelerate_figures),
    "deepspeed": ([L8, "--compat", "deepspeed", "--gpus", "8"], deepspeed_figures),
}


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_figure_whole_within_the_width(monkeypatch, capsys, case, columns):
    args, figures = CASES[case]
    if args[0] not in ("recommend", "gpus", "models"):
        args = ["estimate", *args]
    code, out, _ = plan(monkeypatch, capsys, *args, "--json", columns=columns)
    assert code == 0
    expected = figures(json.loads(out))
    code, text, _ = plan(monkeypatch, capsys, *args, columns=columns)
    assert code == 0
    assert "…" not in text
    long = [line for line in text.splitlines() if len(line) > columns]
    assert not long, long
    missing = [f for f in expected if f not in text]
    assert not missing, f"{missing} not in\n{text}"


def test_qlora_sweep_skips_the_precisions_nf4_cannot_use(monkeypatch, capsys):
    code, out, err = plan(monkeypatch, capsys, "estimate", "meta-llama/Llama-3.1-8B", "--lora-rank", "16",
                          "--quant", "nf4", "--json")
    assert code == 0
    assert [o["precision"] for o in json.loads(out)] == ["fp32", "fp16-amp", "bf16-amp", "bf16-pure"]
    notes = [line for line in err.splitlines() if "skipping" in line]
    assert len(notes) == 1 and "fp8-ao" in notes[0]


def test_recommend_footer_fills_in_the_epoch_size(monkeypatch, capsys):
    """The footer's epoch size is the --samples given, never an unfilled `{req.samples:,}`
    (printed so until 2026-11-30)."""
    code, text, _ = plan(monkeypatch, capsys, "recommend", L8, "--gpu", "H100-SXM", "--samples", "5000",
                         columns=120)
    assert code == 0
    assert "epoch = 5,000 sequences (--samples)" in " ".join(text.split()) and "{" not in text


def test_wide_layout_at_120_narrow_at_80(monkeypatch, capsys):
    _, wide, _ = plan(monkeypatch, capsys, "estimate", L8, columns=120)
    _, narrow, _ = plan(monkeypatch, capsys, "estimate", L8, columns=80)
    assert re.search(r"│ bf16-amp +│ +149\.64 │ opt step +│ +29\.92 │", wide)  # a row for each precision
    assert re.search(r"│ weights GiB +│ +29\.92 │", narrow)  # a column for each precision


# ---------------------------------------------------------------- CLI habits

COMMANDS = ("estimate", "simulate", "recommend", "emit-config", "train", "gpus", "models", "validate")


@pytest.mark.parametrize("command", COMMANDS)
def test_h_is_help_on_every_command(monkeypatch, capsys, command):
    code, short, _ = plan(monkeypatch, capsys, command, "-h", columns=120)
    assert code == 0 and "Usage: plan " + command in short
    _, long, _ = plan(monkeypatch, capsys, command, "--help", columns=120)
    assert short == long


def test_h_is_help_of_plan_itself(monkeypatch, capsys):
    code, out, _ = plan(monkeypatch, capsys, "-h", columns=120)
    assert code == 0 and "Usage: plan" in out and "--version" in out


def test_version_prints_the_distribution_version(monkeypatch, capsys):
    from importlib import metadata
    code, out, _ = plan(monkeypatch, capsys, "--version")
    assert code == 0
    try:
        expected = metadata.version("plan-memory")
    except metadata.PackageNotFoundError:
        expected = re.search(r'^version = "(.+)"', open("pyproject.toml").read(), re.M).group(1)
    assert out.strip() == f"plan {expected}"


def test_version_falls_back_to_pyproject(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "version", missing)
    from pathlib import Path
    text = (Path(cli.__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert cli.version() == re.search(r'^version = "(.+)"', text, re.M).group(1)


def test_dtype_and_a_precision_of_another_dtype_is_one_line_status_2(monkeypatch, capsys):
    code, out, err = plan(monkeypatch, capsys, "estimate", L8, "--dtype", "fp16", "--precision", "bf16-pure")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and out == "" and len(lines) == 1
    assert "--dtype fp16" in lines[0] and "--precision bf16-pure" in lines[0]


def test_dtype_and_its_own_recipe_agree(monkeypatch, capsys):
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--dtype", "bf16", "--precision", "bf16-pure", "--json")
    assert code == 0 and json.loads(out)["precision"] == "bf16-pure"
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--dtype", "fp16", "--precision", "fp16-amp", "--json")
    assert code == 0 and json.loads(out)["precision"] == "fp16-amp"


@pytest.mark.parametrize("command, flags", [
    ("estimate", ("--grad-checkpointing", "--exact", "--json")),
    ("recommend", ("--json",)),
    ("emit-config", ("--grad-checkpointing", "--from-recommendation", "--force")),
    ("train", ("--strict",)),
])
def test_boolean_flags_read_as_flags_in_help(monkeypatch, capsys, command, flags):
    _, out, _ = plan(monkeypatch, capsys, command, "--help", columns=200)
    for flag in flags:
        line = next(x for x in out.splitlines() if re.search(rf"{flag}\b", x))
        assert "<bool>" not in line and "BOOLEAN" not in line, line


def test_emit_config_refuses_a_dtype_and_another_dtypes_precision(monkeypatch, capsys, tmp_path):
    code, _, err = plan(monkeypatch, capsys, "emit-config", L8, "--out", str(tmp_path / "out"), "--dtype", "bf16",
                        "--precision", "fp16-amp")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--precision fp16-amp" in err
    assert not (tmp_path / "out").exists()
