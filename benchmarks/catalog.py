"""Every catalog model through `plan recommend` and `plan emit-config` (issue 16's done-when).

For each entry of `plan models` (tables/models.json), as a user would run them (subprocesses):

1. `plan recommend MODEL --gpu GPU --gpus N --host-ram H --json`, first on one GPU. When nothing
   fits, the one line must say so (exit 2, "nothing fits ...") and name the GPUs or nodes it
   would fit with (`--gpus N`, `--gpus 8 --nodes M`); the sweep follows that hint once. The
   route the plans carry must be the one the model_type takes (formula where plan has one,
   derived otherwise), the first plan must fit its budget, and its model states must not be
   below what the weights alone take (`floor_bytes`). `plan estimate MODEL --dtype bf16 --json`
   must count the catalog's parameters within 1% (MoE experts, tied heads, encoders' heads).
2. The same command again, for the time once derived (the coefficients cached).
   A model whose one-GPU plan offloads (host RAM, NVMe) is asked again on `--then-gpus` GPUs
   (8, a node: row `asked` 8), the same way.
3. `plan emit-config MODEL --gpu GPU ... --out TMP` (recommend's best plan), its accelerate.yaml
   read by accelerate's own `ClusterConfig.from_yaml_file`, deepspeed.json by DeepSpeed's
   `DeepSpeedConfig`, recipe.yaml by plan's recipe schema; the recipe's plan must be
   recommend's first (method, strategy, offload, micro-batch, accumulation, checkpointing).

Rows go to tables/catalog_plans.csv as each model finishes; a rerun skips the models already
there with status ok or refused (`--retry` reruns the others too, `--rerun` all of them;
`--only REGEX` limits the models).
`first_s` is the first recommend's wall time: a first derivation when the cache is cold
(`cold` yes), which a fresh XDG_CACHE_HOME makes so.

Usage: HF_HUB_OFFLINE=1 nice -n 19 python benchmarks/catalog.py [--gpu H100-SXM] [--host-ram 256]
       [--out tables/catalog_plans.csv] [--only REGEX] [--retry | --rerun] [--timeout 3600]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["model", "asked", "model_type", "route", "gpus", "nodes", "method", "rank", "strategy", "offload",
          "precision", "micro", "accum", "ckpt", "techniques", "needed_gib", "budget_gib", "fits", "cold", "first_s",
          "cached_s", "emit_s", "status", "error"]
HINT = re.compile(r"--gpus (\d+)(?: --nodes (\d+))?")
STATE_BYTES = {"bf16-amp": 16, "fp16-amp": 16, "fp32": 16, "bf16-pure": 2}
"""Bytes per parameter the model states take at least, per precision (full fine-tuning: fp32
weights, gradients and AdamW's two moments; LoRA on a 16-bit base: the base weights)."""


def plan_cmd(*args: str, timeout: float) -> tuple[int, str, str, float]:
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:.0f} s", time.perf_counter() - t
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t


def last_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("note:")]
    return lines[-1] if lines else ""


def expected_route(name: str) -> tuple[str, str, bool]:
    """(model_type, route the model should take, whether its derived coefficients are cached)."""
    from planner.resolve import resolve
    from planner.spec import ModelSpec, UnsupportedArchitecture
    cfg = resolve(name).config
    try:
        ModelSpec.from_config(cfg)
        return cfg.get("model_type", "?"), "formula", False
    except UnsupportedArchitecture:
        from planner.measure.derived import Derived
        return cfg.get("model_type", "?"), "derived", Derived(cfg).derived_before()


def floor_bytes(plan: dict, params: int) -> int:
    """The least a plan's GPU can hold: its model states' floor (STATE_BYTES) divided over the
    GPUs a sharding strategy spreads them on; 0 with offload or a 16-bit-free recipe."""
    if plan["offload"] != "none" or plan["precision"] not in STATE_BYTES or plan["method"] == "qlora":
        return 0
    per = 2 if plan["method"] == "lora" else STATE_BYTES[plan["precision"]]
    if plan["method"] == "full" and "8-bit optimizer state" in plan["techniques"]:
        per -= 6  # AdamW's two fp32 moments in one byte each
    world = plan["gpus"] * plan["nodes"]
    shards = {"ddp": 1, "fsdp-no-shard": 1, "zero1": 1, "zero2": 1}.get(plan["strategy"], world)
    if plan["strategy"] == "fsdp-hybrid":
        shards = plan["gpus"]
    if plan["method"] == "lora":
        return params * per // shards
    if plan["strategy"] in ("zero1",):   # weights and gradients whole, moments sharded
        return params * 8 + params * (per - 8) // world
    if plan["strategy"] in ("zero2", "fsdp-grad-op"):
        return params * 4 + params * (per - 4) // world
    return params * per // shards


def check_emitted(out: Path, plan: dict) -> str | None:
    """accelerate's, DeepSpeed's and plan's own parsers over the written files; None when they
    read and agree with the plan, else what does not."""
    from accelerate.commands.config.config_args import ClusterConfig

    from planner.recipe import load
    cfg = ClusterConfig.from_yaml_file(str(out / "accelerate.yaml"))
    recipe = load(str(out / "recipe.yaml"))
    world = recipe.plan.gpus * recipe.plan.nodes
    if cfg.num_processes != world or cfg.num_machines != recipe.plan.nodes:
        return f"accelerate.yaml: {cfg.num_processes} processes on {cfg.num_machines} machines, recipe {world}"
    st = recipe.plan.strategy
    want = {"ddp": "MULTI_GPU" if world > 1 else "NO"}.get(st, "FSDP" if st.startswith("fsdp") else "DEEPSPEED")
    if cfg.distributed_type.value != want:
        return f"accelerate.yaml: distributed_type {cfg.distributed_type.value}, plan {st}"
    if st.startswith("zero"):
        from deepspeed.runtime import config as ds_config
        from deepspeed.runtime.config import DeepSpeedConfig
        ds_config.dist.get_rank = lambda *a, **k: 0  # DeepSpeedConfig asks the process group: rank 0 of `world`
        ds = DeepSpeedConfig(json.loads((out / cfg.deepspeed_config["deepspeed_config_file"]).read_text()),
                             mpu=SimpleNamespace(get_data_parallel_world_size=lambda: world))
        if ds.zero_optimization_stage != int(st[-1]) or ds.train_micro_batch_size_per_gpu != plan["micro_batch"]:
            return "deepspeed.json: stage or micro-batch differs from the plan"
    got = (recipe.plan.strategy, recipe.plan.offload, recipe.micro_batch_size, recipe.gradient_accumulation_steps,
           bool(recipe.gradient_checkpointing), recipe.adapter or "full", recipe.lora_r if recipe.adapter else 0)
    exp = (plan["strategy"], plan["offload"], plan["micro_batch"], plan["gradient_accumulation"],
           plan["grad_checkpointing"], plan["method"], plan["lora_rank"] or 0)
    return None if got == exp else f"recipe.yaml {got} is not recommend's first plan {exp}"


def sweep_one(name: str, args, asked: int = 1) -> dict:
    from planner.resolve import catalog
    mt, route, cached = expected_route(name)
    row = dict.fromkeys(FIELDS, "")
    row.update(model=name, asked=str(asked), model_type=mt, route=route,
               cold="no" if cached or route == "formula" else "yes")
    gpus, nodes = ["--gpus", str(asked)], []
    base = ["--gpu", args.gpu, "--host-ram", str(args.host_ram)]
    code, out, err, first = plan_cmd("recommend", name, *base, *gpus, "--json", timeout=args.timeout)
    line = last_line(err)
    if code == 2 and line.startswith("error: nothing fits") and HINT.search(line.split("fit with", 1)[-1]):
        m = HINT.search(line.split("fit with", 1)[-1])
        gpus, nodes = ["--gpus", m.group(1)], (["--nodes", m.group(2)] if m.group(2) else [])
        code, out, err, t = plan_cmd("recommend", name, *base, *gpus, *nodes, "--json", timeout=args.timeout)
        first += t
        line = last_line(err)
    row.update(gpus=gpus[1], nodes=nodes[1] if nodes else "1", first_s=f"{first:.1f}")
    if code != 0:
        refused = code == 2 and line.startswith("error: nothing fits") and "\n" not in err.strip().replace(
            "\nnote:", "").strip() and "Traceback" not in err
        row.update(status="refused" if refused else "error", error=line[:300] or f"exit {code}", fits="no")
        return row
    res = json.loads(out)
    plan = res["plans"][0]
    params = catalog()[name].get("params", 0)
    row.update(route=plan["route"], method=plan["method"], rank=plan["lora_rank"] or "", strategy=plan["strategy"],
               offload=plan["offload"], precision=plan["precision"], micro=plan["micro_batch"],
               accum=plan["gradient_accumulation"], ckpt="yes" if plan["grad_checkpointing"] else "no",
               techniques="+".join(plan["techniques"]), needed_gib=f"{plan['needed_bytes'] / 2**30:.1f}",
               budget_gib=f"{res['budget_bytes'] / 2**30:.1f}",
               fits="yes" if plan["needed_bytes"] <= res["budget_bytes"] else "no")
    problems = []
    if plan["route"] != route:
        problems.append(f"route {plan['route']}, expected {route}")
    if row["fits"] != "yes":
        problems.append(f"first plan needs {row['needed_gib']} GiB of {row['budget_gib']}")
    floor = floor_bytes(plan, params)
    if plan["needed_bytes"] < floor:
        problems.append(f"needs {plan['needed_bytes'] / 2**30:.1f} GiB, below the {floor / 2**30:.1f} GiB its "
                        "model states take at least")
    if not plan["tokens_per_s"] > 0:
        problems.append(f"tokens/s {plan['tokens_per_s']}")
    code, out, err, _ = plan_cmd("estimate", name, "--dtype", "bf16", "--json", timeout=args.timeout)
    counted = json.loads(out)["params"] if code == 0 else None
    if counted is None:
        problems.append(f"estimate: {last_line(err) or f'exit {code}'}")
    elif params and abs(counted / params - 1) > 0.01:
        problems.append(f"estimate counts {counted:,} parameters, the catalog {params:,}")
    code, _, err, cached_s = plan_cmd("recommend", name, *base, *gpus, *nodes, "--json", timeout=args.timeout)
    row["cached_s"] = f"{cached_s:.1f}"
    if code != 0:
        problems.append(f"second recommend: {last_line(err)}")
    with tempfile.TemporaryDirectory() as tmp:
        ip = ["--main-process-ip", "10.0.0.1"] if nodes else []
        code, _, err, emit_s = plan_cmd("emit-config", name, *base, *gpus, *nodes, *ip, "--out", f"{tmp}/run",
                                        timeout=args.timeout)
        row["emit_s"] = f"{emit_s:.1f}"
        if code != 0:
            problems.append(f"emit-config: {last_line(err) or f'exit {code}'}")
        else:
            try:
                bad = check_emitted(Path(tmp) / "run", plan)
            except Exception as e:  # noqa: BLE001  any parser's refusal is the finding
                bad = f"{type(e).__name__}: {e}"
            if bad:
                problems.append(bad)
    row.update(status="error" if problems else "ok", error="; ".join(problems)[:300])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default="H100-SXM")
    p.add_argument("--host-ram", type=float, default=256, help="GiB per node offload may use (default 256)")
    p.add_argument("--out", default=str(ROOT / "tables" / "catalog_plans.csv"))
    p.add_argument("--only", default="", help="the models whose id this regular expression finds (any case)")
    p.add_argument("--retry", action="store_true", help="rerun the models whose row is not ok")
    p.add_argument("--rerun", action="store_true", help="rerun every model (a row's first derivation time is kept "
                   "when the rerun finds the cache warm)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    p.add_argument("--then-gpus", type=int, default=8, help="GPUs asked for next where one GPU needs offload "
                   "(default 8, a node)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from planner.resolve import catalog
    out = Path(args.out)
    rows = {}
    if out.exists():
        with open(out, newline="") as f:
            rows = {(r["model"], r.get("asked") or "1"): {**r, "asked": r.get("asked") or "1"}
                    for r in csv.DictReader(f)}
    order = {n: i for i, n in enumerate(sorted(catalog(), key=lambda n: (catalog()[n].get("params", 0), n)))}
    names = [n for n in sorted(catalog(), key=order.get) if re.search(args.only, n, re.IGNORECASE)]
    for name in names:
        for asked in (1, args.then_gpus):
            key = (name, str(asked))
            if asked != 1 and rows.get((name, "1"), {}).get("offload") in (None, "", "none"):
                continue  # one GPU did without offload: no need to ask for more
            if key in rows and not args.rerun and (rows[key]["status"] in ("ok", "refused") or not args.retry):
                continue
            t = time.perf_counter()
            r = sweep_one(name, args, asked)
            old = rows.get(key)
            if old is not None and old["cold"] == "yes" and r["cold"] == "no":  # the first derivation was then
                r.update(cold="yes", first_s=old["first_s"])
            rows[key] = r
            print(f"{name:40} x{asked:<2} {r['route']:8} {r['status']:7} {time.perf_counter() - t:7.1f} s "
                  f"{r['error'][:120]}", flush=True)
            with open(out.with_suffix(".tmp"), "w", newline="") as f:
                w = csv.DictWriter(f, FIELDS)
                w.writeheader()
                for k in sorted(rows, key=lambda k: (order.get(k[0], 1 << 30), int(k[1]))):
                    w.writerow(rows[k])
            out.with_suffix(".tmp").replace(out)
    summary([r for k, r in rows.items() if k[1] == "1"], "one GPU asked for")
    summary([r for k, r in rows.items() if k[1] != "1"], f"{args.then_gpus} GPUs asked for, where one needed offload")


def summary(rows: list[dict], title: str) -> None:
    """Counts per route and status, and the slowest first derivation: at most 80 columns."""
    routes = sorted({r["route"] for r in rows})
    print(title)
    print(f"{'route':10}{'models':>8}{'ok':>6}{'refused':>9}{'error':>7}{'slowest first s':>17}")
    for rt in routes:
        rs = [r for r in rows if r["route"] == rt]
        slow = max(rs, key=lambda r: float(r["first_s"] or 0))
        print(f"{rt:10}{len(rs):>8}{sum(r['status'] == 'ok' for r in rs):>6}"
              f"{sum(r['status'] == 'refused' for r in rs):>9}{sum(r['status'] == 'error' for r in rs):>7}"
              f"{float(slow['first_s'] or 0):>17.1f}")


if __name__ == "__main__":
    main()
