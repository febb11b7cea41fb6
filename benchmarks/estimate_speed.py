"""Time `plan`'s estimate against accelerate's estimate-memory path on the same config, side by side.

accelerate builds the model on the meta device (`init_empty_weights` + `AutoModel.from_config`,
as `create_empty_model` does) and walks it with `calculate_maximum_sizes`; plan evaluates formulas.
Usage: python benchmarks/estimate_speed.py [catalog id ...]
"""
import sys
import time

from planner.contract import Settings
from planner.estimate import estimate
from planner.resolve import catalog
from planner.spec import ModelSpec


def best_of(fn, n):
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def accelerate_path(cfg):
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModel
    c = dict(cfg)
    mt = c.pop("model_type")
    with init_empty_weights():
        model = AutoModel.from_config(AutoConfig.for_model(mt, **c))
    return calculate_maximum_sizes(model)


def main(ids):
    for mid in ids:
        cfg = catalog()[mid]["config"]
        plan_s = best_of(lambda cfg=cfg: estimate(
            ModelSpec.from_config(cfg),
            Settings(precision="bf16-amp", seq_len=min(2048, ModelSpec.from_config(cfg).max_positions))), 20)
        acc_s = best_of(lambda cfg=cfg: accelerate_path(cfg), 3)
        print(f"{mid:35s} plan {plan_s * 1e3:8.2f} ms   accelerate {acc_s * 1e3:9.1f} ms   "
              f"ratio {acc_s / plan_s:8.0f}x")


if __name__ == "__main__":
    main(sys.argv[1:] or ["meta-llama/Llama-3.1-405B", "meta-llama/Meta-Llama-3-8B", "bert-base-cased"])
