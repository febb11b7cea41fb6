"""The FP8 cases of tables/validation.csv (`_run_cases.py fp8`), their measured peak against the
fp8-ao estimate and against the bf16-amp estimate, which is how `--dtype fp8` was costed before
FP8 was modelled: python tests/scripts/fp8_against_bf16.py [tables/validation.csv]"""
import sys
from dataclasses import replace

import pandas as pd

from planner.estimate import estimate
from planner.measure.builder import measured_config
from planner.measure.validate import SMALL, fp8_cases
from planner.resolve import catalog, resolve
from planner.spec import ModelSpec

rows = pd.read_csv(sys.argv[1] if len(sys.argv) > 1 else "tables/validation.csv", keep_default_na=False)
rows = rows.set_index("case")
for c in fp8_cases():
    if c.name not in rows.index:
        continue
    cfg = resolve(c.model).config if c.source == "weights" else SMALL.get(c.model) or catalog()[c.model]["config"]
    spec = ModelSpec.from_config(measured_config(cfg))
    measured = int(rows.loc[c.name, "measured"])
    as_bf16 = estimate(spec, replace(c.settings, precision="bf16-amp")).peak_bytes
    print(f"{c.name:58s} {measured:>15,d}  fp8-ao {float(rows.loc[c.name, 'error_pct']):+6.2f}%  "
          f"as bf16-amp {100 * (as_bf16 - measured) / measured:+6.2f}%")
