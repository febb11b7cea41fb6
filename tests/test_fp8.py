"""FP8 training (issue 17): torchao's float8 (fp8-ao, `--dtype fp8`) and Transformer Engine
(fp8-te) counted from what their modules keep, MS-AMP said to be unmaintained, the plans written
for accelerate's FP8 backends, and torchao's step measured against the estimate."""
import importlib.util
import json
import sys
from dataclasses import replace

import pytest

from planner import cli
from planner.contract import DTYPE_TO_RECIPE, MSAMP_NOTE, UNMEASURED_TE, PlanError, Settings
from planner.estimate import estimate
from planner.memory import fp8_converts, fp8_te_linears, fp8_te_meta_bytes
from planner.resolve import resolve
from planner.spec import ModelSpec, count_params

L8 = "meta-llama/Meta-Llama-3-8B"


def plan(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`plan ARGS` in this process: (status, stdout, stderr)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["plan", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


def spec_of(model: str) -> ModelSpec:
    return ModelSpec.from_config(resolve(model).config)


def test_dtype_fp8_is_torchao_float8():
    assert DTYPE_TO_RECIPE["fp8"] == "fp8-ao"


def test_torchao_keeps_no_weight_copy_where_autocast_caches_one():
    """bf16 autocast caches a bf16 copy of every linear weight for the forward; torchao's
    Float8Linear keeps a view of the fp32 weight. At the forward's peak (the loss) the two differ
    by exactly the converted linears' bf16 copies: all block linears but block 0's first."""
    spec = spec_of(L8)
    st = Settings(precision="bf16-amp", batch_size=4, seq_len=4096)
    bf16, ao = estimate(spec, st), estimate(spec, replace(st, precision="fp8-ao"))
    shapes = count_params(spec).linear_shapes
    assert all(fp8_converts(spec, "torchao", n, i, o) for n, i, o, _ in shapes)
    converted = spec.layers * sum(i * o * k for _, i, o, k in shapes) - shapes[0][1] * shapes[0][2]
    fwd = "forward"
    assert bf16.phase_components[fwd]["activations"] - ao.phase_components[fwd]["activations"] == 2 * converted
    assert ao.peak_bytes < bf16.peak_bytes  # here the step's peak is where FP8 keeps less
    assert any("fp8-ao: torchao float8" in n for n in ao.notes)


def test_transformer_engine_keeps_fp8_inputs_weights_and_amax_history():
    spec = spec_of(L8)
    st = Settings(precision="fp8-te", batch_size=4, seq_len=4096)
    te, bf16, ao = (estimate(spec, st), estimate(spec, replace(st, precision="bf16-amp")),
                    estimate(spec, replace(st, precision="fp8-ao")))
    # every block linear and the head become te.Linear: 32 x 7 + 1, each with 5 amax histories of 1024 fp32
    assert fp8_te_linears(spec) == 32 * 7 + 1
    assert fp8_te_meta_bytes(spec, st) == 225 * 5 * 4 * 1025
    assert te.phases["model"] - bf16.phases["model"] == fp8_te_meta_bytes(spec, st)
    # per block: te.Linear saves one FP8 byte per input value of each linear where autocast saves bf16
    # copies (and the MLP product down_proj reads), and an FP8 weight with its transpose (2 bytes a
    # value) where autocast caches a bf16 copy; torchao keeps the bf16 inputs and no weight
    fwd = {k: e.phase_components["forward"]["activations"] for k, e in (("te", te), ("bf16", bf16), ("ao", ao))}
    h, i, t, n = spec.hidden, spec.intermediate, st.tokens, spec.layers
    per_token = 2 * (3 * h + 2 * h + i) - (3 * h + h + 2 * h + i)  # bf16 copies and the product, less FP8 inputs
    head_input = t * h * (2 - 1)  # the head: an FP8 input where autocast keeps a bf16 copy
    assert fwd["bf16"] - fwd["te"] == n * t * per_token + head_input
    assert fwd["ao"] < fwd["te"] < fwd["bf16"] or fwd["te"] < fwd["ao"] < fwd["bf16"]
    assert any(UNMEASURED_TE in n for n in te.notes)


def test_msamp_says_it_is_no_longer_maintained():
    est = estimate(spec_of(L8), Settings(precision="msamp-o2"))
    assert any(MSAMP_NOTE in n for n in est.notes)


@pytest.mark.parametrize("kw, what", [(dict(lora_rank=8), "--lora-rank"),
                                      (dict(gpus=8, strategy="fsdp"), "--strategy fsdp"),
                                      (dict(unfrozen_parameters=("lm_head",)), "--unfrozen-parameters")])
def test_fp8_outside_what_is_modelled_is_one_line(kw, what):
    with pytest.raises(PlanError, match=f"fp8-ao with {what}.* is not modelled"):
        estimate(spec_of(L8), Settings(precision="fp8-ao", **kw))


def test_cli_fp8(monkeypatch, capsys):
    code, out, err = plan(monkeypatch, capsys, "estimate", L8, "--dtype", "fp8", "--json")
    assert code == 0 and json.loads(out)["precision"] == "fp8-ao"
    assert json.loads(out)["precision_validation"] == "measured"
    code, out, err = plan(monkeypatch, capsys, "estimate", L8, "--precision", "fp8-te", "--json")
    assert code == 0 and json.loads(out)["precision_validation"] == UNMEASURED_TE
    code, out, err = plan(monkeypatch, capsys, "estimate", L8, "--precision", "fp8-te", "--exact")
    assert code == 2 and err.strip().splitlines()[-1] == f"error: --precision fp8-te: {UNMEASURED_TE}; drop --exact " \
        "for the formula"
    code, out, err = plan(monkeypatch, capsys, "estimate", L8, "--dtype", "fp8", "--lora-rank", "8")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --precision fp8-ao with --lora-rank")


def test_emit_writes_accelerates_fp8_backend(tmp_path, monkeypatch, capsys):
    import yaml
    code, out, err = plan(monkeypatch, capsys, "emit-config", "HuggingFaceTB/SmolLM2-135M", "--precision", "fp8-ao",
                          "--out", str(tmp_path / "ao"))
    assert code == 0, err
    acc = yaml.safe_load((tmp_path / "ao" / "accelerate.yaml").read_text())
    rec = yaml.safe_load((tmp_path / "ao" / "recipe.yaml").read_text())
    assert acc["mixed_precision"] == "fp8"
    assert acc["fp8_config"] == {"backend": "AO", "enable_fsdp_float8_all_gather": False}
    assert rec["fp8"] is True and rec["bf16"] is True and rec["plan"]["precision"] == "fp8-ao"
    code, out, err = plan(monkeypatch, capsys, "emit-config", "HuggingFaceTB/SmolLM2-135M", "--precision", "fp8-te",
                          "--out", str(tmp_path / "te"))
    assert code == 0, err
    acc = yaml.safe_load((tmp_path / "te" / "accelerate.yaml").read_text())
    assert acc["mixed_precision"] == "fp8" and acc["fp8_config"] == {"backend": "TE"}
    code, out, err = plan(monkeypatch, capsys, "emit-config", "HuggingFaceTB/SmolLM2-135M", "--precision", "msamp-o1",
                          "--out", str(tmp_path / "ms"))
    assert code == 2 and "MS-AMP is no longer maintained" in err


def test_recipe_fp8_key_is_torchao_and_the_trainer_refuses_what_cannot_run(monkeypatch):
    from planner.recipe import RecipeError, from_dict, precision
    from trainer.train import fp8_recipe_handler
    r = from_dict({"base_model": "x", "fp8": True}, "test")
    assert precision(r) == "fp8-ao"
    with pytest.raises(Exception, match="fp8: true .* without an adapter"):
        from_dict({"base_model": "x", "fp8": True, "adapter": "lora"}, "test")
    with pytest.raises(RecipeError, match="^plan.precision fp8-te: Transformer Engine runs on a CUDA GPU"):
        fp8_recipe_handler("fp8-te", cuda=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(RecipeError, match=r"^fp8: true needs torchao: pip install --no-deps 'torchao>=0.10'$"):
        fp8_recipe_handler("fp8-ao", cuda=False)
    assert fp8_recipe_handler("bf16-amp", cuda=False) == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao (pip install --no-deps torchao)")
@pytest.mark.parametrize("arch, ckpt, opt", [("llama", False, "adamw"), ("phi3", True, "sgd")])
def test_torchao_step_within_5_percent(arch, ckpt, opt):
    """A real training step of the small config converted by accelerate's convert_model_to_fp8_ao
    (fake tensors, MemTracker) against the estimate, every phase."""
    from planner.measure.builder import measured_config
    from planner.measure.simulate import measure
    from planner.measure.validate import SMALL
    st = Settings(precision="fp8-ao", batch_size=2, seq_len=256, grad_checkpointing=ckpt, optimizer=opt,
                  kernels="cpu")
    m = measure(SMALL[arch], st)
    est = estimate(ModelSpec.from_config(measured_config(SMALL[arch])), st)
    for phase, measured in m.phases.items():
        assert abs(est.phases[phase] - measured) <= 0.05 * measured, (phase, est.phases[phase], measured)
