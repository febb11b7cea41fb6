"""`plan train --auto` on the derived route (issue 16): a model whose model_type has no formula is
planned from coefficients measured on its transformers module, trained on this CPU, its measured
step checked against the same route's prediction, and saved loadable. Before 2026-11-30 the run
trained but reported "no prediction: no hand-written formula for model_type 'qwen3'"."""
import json

import pytest
from helpers import alpaca, run_plan

from planner.measure.derived import proxy_spec
from trainer.measure import model_spec

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)
EXTRA = {"qwen3": {},
         "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
         "gemma3_text": dict(sliding_window=32, query_pre_attn_scalar=16)}
"""Small widths, random weights; gemma3_text's sliding window (32) is shorter than the rows (48
tokens), so its sliding and full layers differ."""


def tiny_model(path, model_type: str, tok) -> None:
    """A 2-layer model of `model_type` at width 64 with SmolLM2's tokenizer, saved as a user's
    fine-tuned checkpoint would be (save_pretrained, the tokenizer beside it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **SMALL, **EXTRA[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_a_run_is_predicted_on_the_route_and_config_it_was_planned_with(tmp_path):
    """The trainer's prediction reads the loaded model's config: a model_type without a formula
    takes the derived route, keyed by the same config as the config.json its plan read (so the
    run finds the plan's coefficients in the cache); one with a formula stays on the formula."""
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("qwen3", vocab_size=512, **SMALL)
    cfg.save_pretrained(tmp_path)
    spec = model_spec(AutoConfig.from_pretrained(tmp_path))
    planned = proxy_spec(json.loads((tmp_path / "config.json").read_text()))
    assert spec.extra["derived"].key() == planned.extra["derived"].key()
    llama = model_spec(AutoConfig.for_model("llama", vocab_size=512, **SMALL))
    assert llama.model_type == "llama" and "derived" not in llama.extra


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(EXTRA))
def test_train_auto_plans_trains_and_predicts_on_the_derived_route(model_type, tok, tmp_path):
    """`plan train --auto DIR --data FILE --max-steps 2` on this CPU, a fresh derived cache: the
    plan comes from the derived route, the measured step's peak is within 2% of its prediction
    (the tiny models measured -0.1% to +0.6% on 2026-11-30), the run's prediction used the plan's
    coefficients (one config in the cache), and the saved model loads with its parameters."""
    from planner import gpus as G
    if G.detect()[0]:
        pytest.skip("NVML sees a GPU here: --auto plans for it")
    from transformers import AutoModelForCausalLM
    tiny_model(tmp_path / "model", model_type, tok)
    xdg, out = tmp_path / "xdg", tmp_path / "run"
    r = run_plan("train", "--auto", tmp_path / "model", "--data", alpaca(tmp_path / "a.jsonl"), "--out", out,
                 "--max-steps", 2, env={"XDG_CACHE_HOME": str(xdg)}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "no prediction" not in r.stderr, r.stderr[-3000:]
    assert "route derived" in (out / "PLAN.md").read_text()
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["finished"] and rep["predicted"] is not None
    assert any("derived" in n for n in rep["predicted"]["notes"]), rep["predicted"]["notes"]
    assert abs(rep["total_error_pct"]) < 2, rep["comparison"]
    assert len({f.name.rsplit("-", 1)[0] for f in (xdg / "plan" / "derived").glob("*.json")}) == 1
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.model_type == model_type
    assert sum(p.numel() for p in model.parameters()) == rep["params"]


@pytest.mark.slow
def test_train_auto_fine_tunes_an_encoder_without_formula_as_a_classifier(tok, tmp_path):
    """ModernBERT (no causal-LM class) on the derived route: `plan train --auto` with
    classification data plans, trains its sequence-classification head on this CPU and predicts
    the measured step, the optimizer's state as the formulas file it (2026-11-30: peak +0.0%)."""
    from planner import gpus as G
    if G.detect()[0]:
        pytest.skip("NVML sees a GPU here: --auto plans for it")
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    cfg = AutoConfig.for_model("modernbert", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                               pad_token_id=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               cls_token_id=tok.bos_token_id, sep_token_id=tok.eos_token_id, local_attention=64)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with open(tmp_path / "cls.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"text": f"number {i}", "label": "even" if i % 2 == 0 else "odd"}) + "\n")
    out = tmp_path / "run"
    r = run_plan("train", "--auto", tmp_path / "model", "--data", tmp_path / "cls.jsonl", "--data-format",
                 "classification", "--out", out, "--max-steps", 2, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")},
                 timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "route derived" in r.stderr and "no prediction" not in r.stderr, r.stderr[-3000:]
    rep = json.loads((out / "run_report.json").read_text())
    rows = {row["what"]: row["error_pct"] for row in rep["comparison"]}
    assert abs(rep["total_error_pct"]) < 2 and abs(rows["optimizer"]) < 1, rows
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.num_labels == 2
