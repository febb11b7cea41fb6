"""`plan estimate`'s per-precision view answers "which precision fits": a row for each precision
users choose (bf16-pure included), columns that say what they are (the peak and its phase; the
most weights, gradients and states take; the activations and logits at their largest), a "fits
on" line by catalog GPU, and one meaning of `--dtype bf16`, the same in estimate and recommend.
Its JSON echoes every option it estimated with."""

from __future__ import annotations

import json

from test_render import plan

from planner.contract import SWEEP_PRECISIONS, Settings
from planner.estimate import estimate
from planner.gpus import catalog
from planner.recommend import Request, catalog_fits
from planner.resolve import catalog as models
from planner.spec import ModelSpec

L8 = "meta-llama/Meta-Llama-3-8B"
GIB = 2**30


def test_sweep_has_a_row_for_each_precision_users_choose(monkeypatch, capsys):
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--json")
    assert code == 0
    assert [o["precision"] for o in json.loads(out)] == list(SWEEP_PRECISIONS)
    assert SWEEP_PRECISIONS == ("fp32", "fp16-amp", "bf16-amp", "bf16-pure", "fp8-ao")


def test_full_fine_tune_rows_differ_and_show_the_activations(monkeypatch, capsys):
    """The issue: Llama-3-8B's fp32, fp16-amp, bf16-amp and fp8-te rows were identical, with
    activations and logits 0 B (the optimizer step's components). Now the row says the peak is in
    the optimizer step and shows the activation-and-logits peak of the forward and backward."""
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--json")
    rows = {o["precision"]: o for o in json.loads(out)}
    act = {}
    for p, o in rows.items():
        assert o["peak_phase"] == "optimizer_step"
        act[p] = max(r["activations"] + r["logits"] for r in o["phase_components"].values())
        assert act[p] > 10 * GIB
    assert len(set(act.values())) >= 3  # fp32, autocast and pure bf16 keep different activations
    assert rows["bf16-pure"]["peak_bytes"] < rows["bf16-amp"]["peak_bytes"] / 1.9
    code, text, _ = plan(monkeypatch, capsys, "estimate", L8, columns=120)
    assert code == 0
    assert "│ bf16-amp  │ 149.64 │ opt step │   29.92 │ 29.92 │  59.83 │       31.75 │ 150.48 │" in text
    assert "act.+logits" in text and "peak" in text


def test_dtype_bf16_means_what_recommend_plans(monkeypatch, capsys):
    """`--dtype bf16` with LoRA is the bf16 base (bf16-pure), recommend's LoRA; without LoRA,
    and for QLoRA, bf16 autocast (bf16-amp), recommend's full fine-tune and QLoRA. The sweep's
    bold row and phase table are that precision's."""
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--dtype", "bf16", "--lora-rank", "16", "--json")
    one = json.loads(out)
    assert one["precision"] == "bf16-pure"
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--lora-rank", "16", "--json")
    sweep = {o["precision"]: o for o in json.loads(out)}
    assert sweep["bf16-pure"]["peak_bytes"] == one["peak_bytes"]
    code, text, _ = plan(monkeypatch, capsys, "estimate", L8, "--lora-rank", "16", columns=120)
    assert "Bold: --dtype bf16, which is" in text and "bf16-pure here" in text
    assert "bf16-pure: peak of each phase" in text
    for method, precision in (("lora", "bf16-pure"), ("qlora", "bf16-amp"), ("full", "bf16-amp")):
        code, out, _ = plan(monkeypatch, capsys, "recommend", L8, "--gpu", "H100-SXM", "--method", method, "--json")
        assert code == 0
        assert json.loads(out)["plans"][0]["precision"] == precision
        args = ["--lora-rank", "16"] + (["--quant", "nf4"] if method == "qlora" else []) if method != "full" else []
        code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--dtype", "bf16", *args, "--json")
        assert json.loads(out)["precision"] == precision


def test_fits_on_names_the_catalog_gpus_recommend_would_fit():
    spec = ModelSpec.from_config(models()[L8]["config"])
    for precision in SWEEP_PRECISIONS:  # LoRA, but FP8, which is modelled for full fine-tuning only
        lora = {} if precision.startswith("fp8") else {"lora_rank": 16, "lora_alpha": 32}
        st = Settings(precision=precision, **lora)
        est = estimate(spec, st)
        names = [g.name for g in catalog_fits(est, st)]
        for g in catalog():
            budget = Request(gpu=g).budget_for(st)
            expected = g.computes_in(precision) and est.needed_bytes <= budget
            assert (g.name in names) == expected, (precision, g.name)
        if precision.startswith("bf16"):
            assert "T4" not in names and "V100-32GB" not in names  # no bf16 tensor cores
        if precision.startswith("fp8"):
            assert "A100-80GB" not in names  # no FP8 tensor cores
    # a full fine-tune of 8B in bf16 autocast needs about 155 GiB: only the 180 GB-class GPUs
    st = Settings(precision="bf16-amp")
    assert [g.name for g in catalog_fits(estimate(spec, st), st)] == ["MI300X", "B200"]


def test_fits_on_line_in_the_text(monkeypatch, capsys):
    code, text, _ = plan(monkeypatch, capsys, "estimate", L8, columns=80)
    assert code == 0
    assert "fits on (catalog GPUs" in text
    assert "  bf16-amp (needs 154.9 GiB): MI300X, B200" in text
    code, text, _ = plan(monkeypatch, capsys, "estimate", "meta-llama/Llama-3.2-1B", "--lora-rank", "8", "--dtype",
                         "bf16", "--batch-size", "1", "--seq-len", "512", columns=80)
    line = text[text.index("  bf16-pure (needs"):]
    assert "RTX-4090" in line and "T4" not in line.split("\n\n")[0]


ECHOED = {"strategy": "zero3", "offload": "optimizer", "gpus": 8, "nodes": 2, "lora_rank": 16, "lora_alpha": 8.0,
          "lora_dropout": 0.05, "lora_targets": "q_proj,v_proj", "grad_checkpointing": True, "attn": "eager",
          "batch_size": 2, "seq_len": 1024, "optimizer": "adamw-fused", "loss": "chunked", "loss_chunks": 4}


def test_json_echoes_every_option(monkeypatch, capsys):
    args = []
    for k, v in ECHOED.items():
        args += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--dtype", "bf16", *args, "--json")
    assert code == 0
    o = json.loads(out)
    for k, v in ECHOED.items():
        assert o[k] == v, k
    assert o["precision"] == "bf16-pure" and o["quant"] == "none" and o["fsdp_version"] is None
    # the contract's keys, in its order, before the echoed ones
    contract = ["model", "architecture", "params", "trainable_params", "precision", "optimizer", "batch_size",
                "seq_len", "peak_bytes", "device_bytes", "components", "phases", "cpu_bytes", "nvme_bytes", "method"]
    assert list(o)[:len(contract)] == contract
    assert o["cpu_bytes"] > 0  # the optimizer offload's host RAM
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--strategy", "fsdp", "--gpus", "4",
                        "--lora-rank", "8", "--quant", "nf4", "--json")
    for o in json.loads(out):
        assert (o["strategy"], o["gpus"], o["nodes"], o["fsdp_version"]) == ("fsdp", 4, 1, 2)
        assert (o["lora_rank"], o["lora_alpha"], o["quant"], o["lora_targets"]) == (8, 16.0, "nf4", "all-linear")
        assert o["grad_checkpointing"] is False and o["offload"] == "none"
    code, out, _ = plan(monkeypatch, capsys, "estimate", L8, "--lora-rank", "8", "--dtype", "bf16",
                        "--grad-checkpointing", "--activation-offload", "--json")
    o = json.loads(out)
    assert o["activation_offload"] is True and o["offload"] == "none" and o["cpu_bytes"] > 0
