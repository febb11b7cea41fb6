"""The derived route (planner/measure/derived.py), measured: its agreement with the formulas and
with the full-model simulator, its linearity in the layer count, and its speed.

1. Families with a formula (llama, qwen2): derived against formula, a few settings (target 1%).
2. Families without one (qwen3, gemma3_text, olmo2): derived against the simulator's full step
   on fake tensors at full width and full depth, or DEPTH layers (target 2%).
3. Linearity: the fit from 1 and 2 layers against a measured 3-layer step.
4. Speed, in a fresh cache: the first derivation of Qwen3-32B (plan estimate --dtype bf16, a
   subprocess), the same estimate once derived, plan recommend once derived (target 30 s,
   1 s, 2 s); and the full simulator at full depth (estimate --exact) in the same run, for the
   ratio.

Usage: HF_HUB_OFFLINE=1 python benchmarks/derived.py [DEPTH] [speed]   (DEPTH: 0 for each model's own, the
default; `speed`: part 4 only)
"""
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from planner.contract import Settings
from planner.estimate import estimate
from planner.measure.derived import Derived, proxy_spec, reduced
from planner.measure.simulate import measure
from planner.resolve import resolve
from planner.spec import ModelSpec

DEPTH = int(sys.argv[1]) if len(sys.argv) > 1 else 0
SPEED_ONLY = "speed" in sys.argv[2:]
SETTINGS = {
    "bf16-amp full": Settings(precision="bf16-amp", seq_len=2048),
    "bf16-pure LoRA r16 ckpt 2x4096": Settings(precision="bf16-pure", lora_rank=16, lora_alpha=32, seq_len=4096,
                                               batch_size=2, grad_checkpointing=True),
    "fp32 full ckpt 4x1024": Settings(precision="fp32", seq_len=1024, batch_size=4, grad_checkpointing=True),
}


def err(a: float, b: float) -> str:
    return f"{a / b - 1:+.3%}"


def against_formula(name: str) -> None:
    cfg = resolve(name).config
    spec, derived = ModelSpec.from_config(cfg), proxy_spec(cfg)
    for label, st in SETTINGS.items():
        f, d = estimate(spec, st), estimate(derived, st)
        print(f"| {name} ({cfg['model_type']}) | {label} | formula | {f.peak_bytes / 2**30:,.2f} | "
              f"{d.peak_bytes / 2**30:,.2f} | {err(d.peak_bytes, f.peak_bytes)} | "
              + " ".join(err(d.phases[k], f.phases[k]) for k in ("forward", "backward", "optimizer_step")) + " |")


def against_simulator(name: str) -> None:
    cfg = resolve(name).config
    cfg = reduced(cfg, DEPTH, {}) if DEPTH else cfg
    depth = DEPTH or cfg["num_hidden_layers"]
    spec = proxy_spec(cfg)
    for label, st in SETTINGS.items():
        d = estimate(spec, replace(st, kernels="cpu"))
        t = time.perf_counter()
        m = measure(cfg, replace(st, kernels="cpu"))
        sim_s = time.perf_counter() - t
        print(f"| {name} ({cfg['model_type']}, {depth} layers) | {label} | simulator ({sim_s:.0f} s) | "
              f"{m.peak_bytes / 2**30:,.2f} | {d.peak_bytes / 2**30:,.2f} | {err(d.peak_bytes, m.peak_bytes)} | "
              + " ".join(err(d.phases[k], m.phases[k]) for k in ("forward", "backward", "optimizer_step")) + " |")


def linearity(name: str) -> None:
    cfg3 = reduced(resolve(name).config, 3, {})
    st = SETTINGS["bf16-amp full"]
    d = Derived(cfg3).estimate(replace(st, kernels="cpu"))
    m = measure(cfg3, replace(st, kernels="cpu"))
    print(f"linearity, {name} at 3 layers (fit from 1 and 2): peak {err(d.peak_bytes, m.peak_bytes)}, phases "
          + " ".join(err(d.phases[k], m.phases[k]) for k in ("forward", "backward", "optimizer_step")))


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[2:])}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return time.perf_counter() - t


def speed(name: str = "Qwen/Qwen3-32B") -> None:
    env = {**os.environ, "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="plan-derived-bench-"), "HF_HUB_OFFLINE": "1"}
    plan = [sys.executable, "-m", "planner"]
    first = timed(plan + ["estimate", name, "--dtype", "bf16", "--json"], env)
    again = min(timed(plan + ["estimate", name, "--dtype", "bf16", "--json"], env) for _ in range(3))
    # one H200: LoRA on the bf16 base fits; the derived route plans one GPU or DDP, no sharding
    rec = [*plan, "recommend", name, "--gpu", "H200", "--json"]
    rec_first = timed(rec, env)
    rec_again = min(timed(rec, env) for _ in range(3))
    exact = timed(plan + ["estimate", name, "--dtype", "bf16", "--exact", "--json"], env)
    print(f"speed, {name} (subprocess wall, fresh cache): first derivation (estimate --dtype bf16) {first:.1f} s; "
          f"estimate once derived {again:.2f} s; recommend (1 x H200) deriving its classes {rec_first:.1f} s, once "
          f"derived {rec_again:.2f} s; the full simulator (estimate --exact, all 64 layers, one step) {exact:.1f} s: "
          f"the estimate once derived is {exact / again:,.0f}x faster, the first derivation {exact / first:.1f}x")


if __name__ == "__main__":
    if SPEED_ONLY:
        speed()
        raise SystemExit
    print("| model | settings | against | reference GiB | derived GiB | peak | forward backward optimizer_step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m in ("meta-llama/Meta-Llama-3-8B", "Qwen/Qwen2.5-7B"):
        against_formula(m)
    for m in ("Qwen/Qwen3-8B", "google/gemma-3-4b-pt", "allenai/OLMo-2-1124-7B"):
        against_simulator(m)
    linearity("Qwen/Qwen3-8B")
    speed()
