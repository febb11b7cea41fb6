"""Dump every prediction a refactor must keep, one line per case, to compare two commits byte for byte:

    python tests/scripts/dump_predictions.py before.tsv      # on the old commit (a git worktree)
    python tests/scripts/dump_predictions.py after.tsv       # on the new one
    cmp before.tsv after.tsv

The lines: the full Estimate of every validation-matrix case; every plan of every recommend
scenario; recommend on three GPUs for five catalog models; and a grid of 720 settings for every
catalog model (errors included, as their one line). Modules are looked up under their current
names and the names they had before planner/measure/ and planner/contract.py (commit 79c8fb8),
so the same script runs on both sides.
"""
import dataclasses
import importlib
import itertools
import json
import sys


def first(*names):
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(names)


validate = first("planner.validate", "planner.measure.validate")
builder = first("planner.simulate", "planner.measure.builder")
memory = first("planner.memory")
spec_m = first("planner.spec")
resolve_m = first("planner.resolve")
rec_m = first("planner.recommend")
gpus_m = first("planner.gpus")
Settings = memory.Settings if hasattr(memory, "Settings") else first("planner.contract").Settings
estimate = memory.estimate if hasattr(memory, "estimate") else first("planner.estimate").estimate
ModelSpec = spec_m.ModelSpec


def plain(o):
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {f.name: plain(getattr(o, f.name)) for f in dataclasses.fields(o)}
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    return o


def plans(found) -> list:
    return [{"settings": p.settings, "acc": p.accumulation, "est": p.estimate, "time": p.time, "notes": p.notes}
            for p in found]


def main(out_path: str) -> None:
    out = open(out_path, "w")

    def write(key, value):
        out.write(key + "\t" + json.dumps(plain(value), sort_keys=True, default=str) + "\n")

    for case in validate.matrix():
        if case.source == "weights":
            cfg = resolve_m.resolve(case.model).config
        elif case.source == "catalog" or case.model not in validate.SMALL:
            cfg = resolve_m.catalog()[case.model]["config"]
        else:
            cfg = validate.SMALL[case.model]
        write("case " + case.name, estimate(ModelSpec.from_config(builder.measured_config(cfg)), case.settings))
    for sc in validate.RECOMMEND_SCENARIOS:
        spec = ModelSpec.from_config(builder.measured_config(validate.SMALL[sc[0]]))
        gpu = gpus_m.GPU(name=f"{sc[3]}MiB", memory_bytes=sc[3] * 2**20, bf16_tflops=100, fp16_tflops=100,
                         fp8_tflops=0, mem_bw_gbs=1000, nvlink_gbs=0, pcie_gbs=32)
        req = rec_m.Request(gpu=gpu, seq_len=sc[2], method=sc[1], margin=validate.RECOMMEND_MARGIN, global_batch=sc[4])
        write(f"rec {sc}", plans(rec_m.recommend(spec, req)))
    cat = resolve_m.catalog()
    grid = [dict(precision=p, lora_rank=r, grad_checkpointing=c, strategy=s, gpus=g, offload=o, quant=q, optimizer=opt)
            for p, r, c, (s, g, o), q, opt in itertools.product(
                ("fp32", "bf16-amp", "bf16-pure", "fp8-te", "msamp-o2"), (0, 16), (False, True),
                (("ddp", 1, "none"), ("ddp", 8, "none"), ("fsdp", 8, "none"), ("fsdp-grad-op", 8, "none"),
                 ("fsdp-hybrid", 8, "none"), ("zero2", 8, "optimizer"), ("zero3", 8, "all"), ("zero3", 8, "nvme"),
                 ("fsdp", 8, "all")),
                ("none", "nf4"), ("adamw", "adamw-8bit", "adafactor"))]
    for mid in sorted(cat):
        try:
            spec = ModelSpec.from_config(cat[mid]["config"])
        except spec_m.UnsupportedArchitecture:  # no formula yet (qwen3, gpt_oss, ...): nothing to predict
            continue
        for kw in grid:
            try:
                write(f"cat {mid} {kw}", estimate(spec, Settings(**kw)))
            except ValueError as e:  # PlanError on both sides
                write(f"cat {mid} {kw}", "ERR " + str(e))
    for mid in ("meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.1-70B", "Qwen/Qwen2.5-7B", "google/gemma-2-2b",
                "openai-community/gpt2"):
        spec = ModelSpec.from_config(cat[mid]["config"])
        for name, n in (("RTX-4090", 1), ("H100-SXM", 8), ("A100-40GB", 1)):
            for gb in (None, 64):
                req = rec_m.Request(gpu=gpus_m.resolve_gpu(name), gpus=n, global_batch=gb,
                                    seq_len=min(2048, spec.max_positions))
                write(f"rgpu {mid} {name} {n} {gb}", plans(rec_m.recommend(spec, req)))
    out.close()


if __name__ == "__main__":
    main(sys.argv[1])
