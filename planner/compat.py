"""`--compat accelerate`: accelerate's `estimate-memory` table, computed by accelerate's own code.

accelerate builds the bare `AutoModel` (no task head) on the meta device and counts weights only
(`accelerate/commands/estimate.py`): this calls the same `calculate_maximum_sizes`,
`estimate_training_usage` and `convert_bytes`, so the numbers are identical, for comparison with
`plan estimate`.
"""

from __future__ import annotations


def accelerate_table(config: dict) -> list[dict]:
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes, convert_bytes
    from transformers import AutoConfig, AutoModel

    cfg = dict(config)
    mt = cfg.pop("model_type")
    with init_empty_weights():
        model = AutoModel.from_config(AutoConfig.for_model(mt, **cfg))
    total, largest = calculate_maximum_sizes(model)
    rows = []
    for dtype, div in (("float32", 1), ("float16", 2), ("int8", 4), ("int4", 8)):
        stages = estimate_training_usage(total, dtype)
        peak = max(stages.values())
        rows.append({
            "dtype": dtype, "largest_layer": largest[0] / div, "total_size": total / div, "training_stages": stages,
            "training_peak": peak if peak != -1 else None,
            "largest_layer_str": convert_bytes(largest[0] / div), "total_size_str": convert_bytes(total / div),
            "training_str": convert_bytes(peak) if peak != -1 else "N/A",
            "stages_str": {k: convert_bytes(v) for k, v in stages.items()} if peak != -1 else None,
        })
    return rows
