"""Run the loss cases of the validation matrix and merge their rows into tables/validation.csv."""
import sys
import time

import pandas as pd

from planner.measure.validate import loss_cases, run_case

rows = []
for case in loss_cases():
    t = time.perf_counter()
    r = run_case(case)
    rows.append(r)
    print(f"{r['case']:70s} {r['predicted']:>12,d} {r['measured']:>12,d} {r['error_pct']:+6.2f}% "
          f"({time.perf_counter() - t:.1f} s)", flush=True)
if len(sys.argv) > 1:
    path = sys.argv[1]
    df = pd.read_csv(path, keep_default_na=False)
    new = pd.DataFrame(rows)[["case", "predicted", "measured", "error_pct", "method"]]
    new["ranks"] = ""
    df = pd.concat([df[~df.case.isin(new.case)], new], ignore_index=True)
    df.to_csv(path, index=False)
