"""Run some cases of the validation matrix (loss, optimizer, QLoRA, freezing, LoRA with freezing, sharded
freezing, EMA, L-BFGS, activation-offload, long-sequence, FP8 or labelled-head cases) and merge their rows
into a validation.csv:
python tests/scripts/_run_cases.py SUITE [tables/validation.csv]
SUITE: loss|optimizer|qlora|qlora-derived|freeze|freeze-lora|freeze-sharded|ema|lbfgs|offload|long|fp8|head"""
import sys
import time

import pandas as pd

from planner.measure import validate

cases = {"loss": validate.loss_cases, "optimizer": validate.optimizer_cases,
         "qlora": validate.qlora_cases,
         "qlora-derived": lambda: [c for c in validate.qlora_cases() if c.model in validate.SMALL_DERIVED],
         "freeze": validate.freeze_cases,
         "freeze-lora": validate.lora_freeze_cases, "freeze-sharded": validate.sharded_freeze_cases,
         "ema": validate.ema_cases, "lbfgs": validate.lbfgs_cases,
         "offload": validate.offload_cases, "long": validate.long_cases,
         "fp8": validate.fp8_cases, "head": validate.head_cases}[sys.argv[1]]()
rows = []
for case in cases:
    t = time.perf_counter()
    r = validate.run_case(case)
    rows.append(r)
    print(f"{r['case']:70s} {r['predicted']:>12,d} {r['measured']:>12,d} {r['error_pct']:+6.2f}% "
          f"({time.perf_counter() - t:.1f} s)", flush=True)
if len(sys.argv) > 2:
    path = sys.argv[2]
    df = pd.read_csv(path, keep_default_na=False)
    new = pd.DataFrame(rows)[["case", "predicted", "measured", "error_pct", "method"]]
    new["ranks"] = [r.get("ranks", "") for r in rows]  # distributed cases: each rank's peak
    df = pd.concat([df[~df.case.isin(new.case)], new], ignore_index=True)
    df.to_csv(path, index=False)
