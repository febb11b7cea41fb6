"""Measured on a GPU: the estimate's peak and device bytes against CUDA's allocator and NVML.

`python -m planner.measure.gpu OUT.csv` runs each case of `CASES` (public configs from the
catalog, random weights built directly on the GPU) as the estimator models it: a warm-up step,
then a measured step `loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()`.
Per phase it reads `torch.cuda.max_memory_allocated` (what `peak_bytes` predicts); over the step
`max_memory_reserved`; and the process's memory as NVML lists it (what `device_bytes` predicts).
QLoRA cases load the random model through transformers' bitsandbytes NF4 path, as a user does.
Each case runs in its own process so one case's allocator cache cannot pad the next.
"""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
import tempfile

from ..contract import Settings
from ..estimate import estimate
from ..precision import RECIPES
from ..spec import ModelSpec
from .builder import build_model, is_encoder, lora_config, make_optimizer, model_class, nf4_config, train_step

CASES = [
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-amp", batch_size=4, seq_len=2048)),
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-amp", batch_size=4, seq_len=2048, grad_checkpointing=True)),
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-amp", batch_size=4, seq_len=2048, optimizer="adamw-fused")),
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-pure", batch_size=4, seq_len=2048, lora_rank=16)),
    ("meta-llama/Llama-3.2-1B", dict(precision="bf16-amp", batch_size=4, seq_len=2048, lora_rank=16, quant="nf4",
                                     grad_checkpointing=True)),
    ("Qwen/Qwen2.5-0.5B", dict(precision="bf16-amp", batch_size=8, seq_len=1024)),
    ("HuggingFaceTB/SmolLM2-1.7B", dict(precision="bf16-amp", batch_size=2, seq_len=2048, grad_checkpointing=True)),
    ("openai-community/gpt2", dict(precision="fp32", batch_size=8, seq_len=1024)),
    ("bert-base-cased", dict(precision="bf16-amp", batch_size=32, seq_len=512)),
    ("meta-llama/Meta-Llama-3-8B", dict(precision="bf16-pure", batch_size=2, seq_len=2048, lora_rank=16)),
    ("meta-llama/Meta-Llama-3-8B", dict(precision="bf16-pure", batch_size=1, seq_len=4096, lora_rank=16,
                                        grad_checkpointing=True)),
    ("meta-llama/Meta-Llama-3-8B", dict(precision="bf16-amp", batch_size=1, seq_len=2048, lora_rank=16, quant="nf4",
                                        grad_checkpointing=True)),
]


def _build(cfg: dict, st: Settings):
    """The model on the GPU as the settings say; NF4 bases go through from_pretrained with a
    BitsAndBytesConfig and PEFT's `prepare_model_for_kbit_training`, the QLoRA recipe."""
    import torch

    if st.quant == "none":
        return build_model(cfg, st, device="cuda")
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig

    c = dict(cfg)
    config = AutoConfig.for_model(c.pop("model_type"), **c)
    config.use_cache = False
    cls = model_class(config)
    with tempfile.TemporaryDirectory() as tmp:  # random weights saved, then loaded quantised
        with torch.device("cuda"):
            cls.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        torch.cuda.empty_cache()
        model = cls.from_pretrained(tmp, quantization_config=nf4_config(torch.bfloat16), dtype=torch.bfloat16,
                                    device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=st.grad_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(st))
    model.train()
    return model, config


def case_name(model_id: str, st: Settings) -> str:
    return "/".join([model_id, st.precision, f"lora{st.lora_rank}" if st.lora else "full", st.quant,
                     "ckpt" if st.grad_checkpointing else "nockpt", f"b{st.batch_size}s{st.seq_len}", st.optimizer])


def measure_case(model_id: str, settings: dict) -> dict:
    """One case in this process: predicted against measured, as a row."""
    import torch

    from ..gpus import NvmlSampler
    from ..resolve import catalog

    sampler = NvmlSampler().start()  # before CUDA is initialised: the baseline is the idle device
    cfg = catalog()[model_id]["config"]
    st = Settings(**settings)
    est = estimate(ModelSpec.from_config(cfg), st)
    torch.manual_seed(0)
    model, config = _build(cfg, st)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], st.optimizer)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if RECIPES[st.precision].autocast else contextlib.nullcontext()
    ids = torch.randint(0, config.vocab_size, (st.batch_size, st.seq_len), device="cuda")
    labels = torch.zeros(st.batch_size, dtype=torch.long, device="cuda") if is_encoder(config) else ids
    batch = dict(input_ids=ids, labels=labels)
    train_step(model, opt, batch, amp)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    phases, reserved = {}, 0

    def snap(phase):
        nonlocal reserved
        torch.cuda.synchronize()
        phases[phase] = torch.cuda.max_memory_allocated()
        reserved = max(reserved, torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    start = torch.cuda.memory_allocated()
    train_step(model, opt, batch, amp, snap)
    nvml = sampler.stop()
    peak = max(phases.values())
    gpu = torch.cuda.get_device_name(0)
    return {"case": case_name(model_id, st),
            "gpu": gpu, "torch": torch.__version__, "predicted_peak": est.peak_bytes, "allocated_peak": peak,
            "peak_error_pct": round(100 * (est.peak_bytes - peak) / peak, 2),
            "predicted_device": est.device_bytes, "nvml": nvml, "nvml_method": sampler.method,
            "device_error_pct": round(100 * (est.device_bytes - nvml) / nvml, 2),
            "reserved_peak": reserved, "start_allocated": start,
            "predicted_phases": json.dumps(est.phases), "measured_phases": json.dumps(phases)}


def run(out_csv: str, cases=CASES, echo=print) -> list[dict]:
    rows = []
    for model_id, settings in cases:
        proc = subprocess.run([sys.executable, "-m", "planner.measure.gpu", "--case", json.dumps([model_id, settings])],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            echo(f"FAILED {model_id} {settings}: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        echo(f"{row['case']}: peak {row['peak_error_pct']:+.2f}%  device {row['device_error_pct']:+.2f}%  "
             f"reserved/allocated {row['reserved_peak'] / row['allocated_peak']:.3f}  "
             f"nvml-reserved {(row['nvml'] - row['reserved_peak']) / 2**20:,.0f} MiB")
        rows.append(row)
        with open(out_csv, "w", newline="") as f:  # after every case: a run cut short keeps what it measured
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


def rescore(csv_path: str, echo=print) -> None:
    """The measured rows of a run against today's estimate (after a calibration change)."""
    from ..resolve import catalog
    names = {case_name(m, Settings(**kw)): (m, Settings(**kw)) for m, kw in CASES}
    for r in csv.DictReader(open(csv_path)):
        model_id, st = names[r["case"]]
        e = estimate(ModelSpec.from_config(catalog()[model_id]["config"]), st)
        pk, nv = int(r["allocated_peak"]), int(r["nvml"])
        echo(f"{r['case']:78s} peak {100 * (e.peak_bytes - pk) / pk:+6.2f}%  "
             f"device {100 * (e.device_bytes - nv) / nv:+6.2f}%")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rescore"]:
        rescore(argv[1])
        return 0
    if argv[:1] == ["--case"]:
        model_id, settings = json.loads(argv[1])
        print(json.dumps(measure_case(model_id, settings)))
        return 0
    run(argv[0] if argv else "tables/validation_gpu.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
