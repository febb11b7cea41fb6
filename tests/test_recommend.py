"""plan gpus / recommend / emit-config: the catalog, the search, the step-time model, the configs
(parsed by accelerate's and DeepSpeed's own loaders, and launched), and the scenario test against
measured peaks."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from planner.cli import app
from planner.contract import Settings
from planner.estimate import estimate
from planner.gpus import GPUError, catalog, detect, lookup
from planner.recommend import Request, recommend
from planner.resolve import resolve
from planner.spec import ModelSpec
from planner.speed import CommBytes, comm_bytes, step_time, train_flops_per_token

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
LLAMA3 = "meta-llama/Meta-Llama-3-8B"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def spec_of(model):
    return ModelSpec.from_config(resolve(model).config)


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


# ------------------------------------------------------------------ catalog

def test_catalog_has_the_gpus_the_issue_names_with_sources():
    names = {g.name for g in catalog()}
    for want in ("B200", "H200", "H100-SXM", "H100-PCIe", "A100-40GB", "A100-80GB", "L40S", "L4", "A10G",
                 "RTX-6000-Ada", "RTX-4090", "RTX-3090", "V100-16GB", "V100-32GB", "T4", "MI300X"):
        assert want in names
    assert len(names) >= 15
    for g in catalog():
        assert g.memory_bytes > 10 * 2**30 and g.peak_tflops > 0 and g.mem_bw_gbs > 0 and g.pcie_gbs > 0
        assert g.source
    # no bf16 on Volta and Turing: the planner trains those in fp16
    assert not lookup("T4").bf16 and not lookup("V100-16GB").bf16 and lookup("A100-80GB").bf16
    assert lookup("H100-SXM").memory_bytes == 81559 * 2**20  # as nvidia-smi reports it


def test_catalog_memory_is_what_nvml_reports_and_says_where_each_figure_comes_from():
    """memory_mib is NVML's `memory.total` (MiB): a reading cites where it was seen (an issue
    `owner/repo#N`, a file `owner/repo path`, or this project's own measurement under tables/);
    a row without one keeps the datasheet's decimal GB and says that no reading was found.
    memory_gb stays the marketing figure."""
    import csv
    import re
    cited = re.compile(r"^(nvidia-smi|rocm-smi|NVML|measured here)\b.*"
                       r"([\w.-]+/[\w.-]+(#\d+| \S+)|tables/\S+)")
    none_found = re.compile(r"^datasheet \d+ GB \(decimal\); no (citable )?(nvidia-smi|rocm-smi|NVML) "
                            r"reading found")
    with open(ROOT / "tables" / "gpus.csv", newline="", encoding="utf-8") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    for name, r in rows.items():
        src, mib, gb = r["memory_mib_source"], int(r["memory_mib"]), int(r["memory_gb"])
        decimal_mib = gb * 10**9 // 2**20
        if none_found.match(src):
            assert mib == decimal_mib, (name, mib, decimal_mib)
        else:
            assert cited.match(src), f"{name}: memory_mib_source cites no nvidia-smi/NVML/rocm-smi reading " \
                                     f"and does not say none was found: {src!r}"
            # a reading is above the decimal-GB conversion and at most the binary GiB
            assert decimal_mib < mib <= gb * 1024, (name, mib, decimal_mib, gb * 1024)
    # measured on this project's H200 (nvidia-smi 143771 MiB; NVML 150754820096 bytes)
    assert int(rows["H200"]["memory_mib"]) == 143771 == 150754820096 // 2**20
    assert lookup("H200").memory_bytes == 143771 * 2**20
    assert rows["H200"]["memory_gb"] == "141"


def test_lookup_forgives_spelling_and_reads_nvml_names():
    assert lookup("rtx 4090").name == lookup("RTX-4090").name == lookup("NVIDIA GeForce RTX 4090").name == "RTX-4090"
    assert lookup("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert lookup("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    with pytest.raises(GPUError, match="ambiguous"):
        lookup("H100")
    with pytest.raises(GPUError, match="unknown GPU"):
        lookup("GTX-480")


def test_no_driver_is_said_clearly(monkeypatch):
    import pynvml

    def boom():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setattr(pynvml, "nvmlInit", boom)
    found, note = detect()
    assert found == [] and "no NVIDIA driver" in note
    code, out, _ = run("gpus")
    assert code == 0 and "RTX-4090" in out and "H100-SXM" in out and "no NVIDIA driver" in out
    code, out, err = run("recommend", LLAMA3, "--gpu", "auto")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "no NVIDIA driver" in err


def test_gpu_auto_uses_what_nvml_reports(monkeypatch):
    import planner.gpus as gpus
    monkeypatch.setattr(gpus, "detect", lambda: ([{"index": i, "name": "NVIDIA GeForce RTX 4090", "uuid": f"GPU-{i}",
                                                   "memory_bytes": 24564 * 2**20} for i in range(2)], ""))
    g = gpus.resolve_gpu("auto")
    assert (g.name, g.count, g.memory_bytes, g.bf16_tflops) == ("RTX-4090", 2, 24564 * 2**20, 165)


# ------------------------------------------------------------------ step-time model

def test_flops_per_token_full_lora_checkpointing():
    s = spec_of(LLAMA3)
    full = train_flops_per_token(s, Settings(seq_len=2048))
    # 6N plus attention: N = 7.5B matmul parameters (blocks and head; the embedding is a lookup)
    assert 6 * 7.5e9 < full < 6 * 7.5e9 + 12 * 32 * 2048 * 4096 * 1.01
    lora = train_flops_per_token(s, Settings(seq_len=2048, lora_rank=16))
    assert 0.6 * full < lora < 0.75 * full  # no frozen weight gradients: 4N instead of 6N
    ckpt = train_flops_per_token(s, Settings(seq_len=2048, grad_checkpointing=True))
    assert ckpt == pytest.approx(full * 4 / 3, rel=0.01)  # one more forward


def test_communication_volumes():
    s = spec_of(LLAMA3)
    n = 8_030_261_248
    ddp = comm_bytes(s, Settings(gpus=8, strategy="ddp"))
    assert ddp.step[0] == pytest.approx(2 * 7 / 8 * 4 * n) and ddp.micro == (0.0, 0.0)
    z3 = comm_bytes(s, Settings(gpus=8, strategy="zero3"))
    assert z3.micro[0] == pytest.approx(3 * 7 / 8 * 2 * n)  # gather twice, reduce-scatter once, in bf16
    z2 = comm_bytes(s, Settings(gpus=8, strategy="zero2"))
    assert z2.micro[0] == pytest.approx(7 / 8 * 2 * n) and z2.step[0] == pytest.approx(7 / 8 * 2 * n)
    across = comm_bytes(s, Settings(gpus=8, nodes=2, strategy="zero3"))
    assert across.micro[0] == 0 and across.micro[1] == pytest.approx(3 * 15 / 16 * 2 * n)
    assert comm_bytes(s, Settings()) == CommBytes(micro=(0.0, 0.0), step=(0.0, 0.0))


def test_step_time_is_monotone_in_what_it_models():
    s = spec_of(LLAMA3)
    h100, l4 = lookup("H100-SXM"), lookup("L4")
    st = Settings(seq_len=2048, lora_rank=16, precision="bf16-pure")
    assert step_time(s, st, l4, 4).total > step_time(s, st, h100, 4).total
    assert step_time(s, st, h100, 8).total == pytest.approx(2 * step_time(s, st, h100, 4).total, rel=0.05)
    off = Settings(seq_len=2048, strategy="zero2", offload="optimizer")
    on = Settings(seq_len=2048, strategy="zero2")
    assert step_time(s, off, h100, 1).optimizer > 10 * step_time(s, on, h100, 1).optimizer


# ------------------------------------------------------------------ the search

def test_llama3_on_a_4090_is_lora_or_qlora_with_checkpointing_and_keeps_the_global_batch():
    req = Request(gpu=lookup("RTX-4090"), seq_len=2048, global_batch=64)
    plans = recommend(spec_of(LLAMA3), req)
    best = plans[0]
    assert best.method in ("lora", "qlora") and best.settings.grad_checkpointing and not best.offload
    assert best.settings.lora_rank in (16, 32) and best.settings.lora_alpha == 2 * best.settings.lora_rank
    assert best.settings.batch_size * best.accumulation == 64
    for p in plans:
        assert p.estimate.needed_bytes <= req.budget_for(p.settings)
        assert p.global_batch == 64
        assert estimate(spec_of(LLAMA3), p.settings).device_bytes == p.estimate.device_bytes
    offloads = [p.offload for p in plans]
    assert offloads == sorted(offloads)  # every plan without offload comes first


def test_full_fine_tuning_is_preferred_when_it_fits():
    plans = recommend(spec_of("HuggingFaceTB/SmolLM2-135M"), Request(gpu=lookup("H100-SXM"), seq_len=2048))
    assert plans[0].method == "full" and plans[0].settings.batch_size > 8 and plans[0].accumulation == 1


def test_multi_gpu_70b_shards():
    req = Request(gpu=lookup("H100-SXM"), gpus=8, seq_len=4096, global_batch=64)
    best = recommend(spec_of("meta-llama/Llama-3.1-70B"), req)[0]
    assert best.settings.strategy in ("fsdp", "zero3") and best.global_batch == 64
    assert best.estimate.needed_bytes <= req.budget_for(best.settings)


def test_recommend_cli_json_and_table():
    code, out, _ = run("recommend", LLAMA3, "--gpu", "RTX-4090", "--global-batch", "64", "--seq-len", "2048", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["gpu"] == "RTX-4090" and d["plans"] and d["budget_bytes"] < d["memory_bytes"]
    p = d["plans"][0]
    assert p["micro_batch"] * p["gradient_accumulation"] == 64 and p["needed_bytes"] <= d["budget_bytes"]
    assert p["tokens_per_s"] > 0 and p["epoch_seconds"] > 0 and p["why"]
    code, out, _ = run("recommend", LLAMA3, "--gpu", "RTX-4090", "--global-batch", "64")
    assert code == 0 and "MFU of 40%" in out and "tokens/s" in out


def test_nothing_fits_names_the_smallest_change():
    # (Llama-3-8B LoRA at 8192 on a T4 fits since the search tries a fused loss: tests/test_loss.py)
    code, out, err = run("recommend", "meta-llama/Llama-3.1-8B", "--gpu", "T4", "--method", "lora",
                         "--seq-len", "32768")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "nothing fits" in err and "--seq-len 16384" in err


@pytest.mark.parametrize("args, msg", [
    (["--gpu", "H100"], "ambiguous"),
    (["--gpu", "RTX-4090", "--global-batch", "63", "--gpus", "2"], "not a multiple"),
    (["--gpu", "RTX-4090", "--method", "dpo"], "unknown --method"),
    (["--gpu", "RTX-4090", "--margin", "1.5"], "--margin"),
    (["--gpu", "RTX-4090", "--gpus", "0"], "--gpus"),
])
def test_recommend_bad_input_is_one_line(args, msg):
    code, out, err = run("recommend", LLAMA3, *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and msg in err


@pytest.mark.slow
def test_recommend_scenarios_against_measured_peaks(tmp_path):
    """The recommended micro-batch is >= 90% of the largest that measurably fits, and none, measured,
    exceeds the GPU (12 small configs on artificial GPU sizes; the simulator's peak is the truth)."""
    from planner.measure.validate import run_recommend
    rows = run_recommend(str(tmp_path), echo=lambda *_: None)
    assert len(rows) >= 10
    for r in rows:
        assert r["fits_gpu"], r
        assert r["ratio"] is not None and r["ratio"] >= 0.9, r
        assert r["strategy"] == "ddp" and r["offload"] == "none"


# ------------------------------------------------------------------ emit-config

ALPACA_LINE = '{"instruction": "say hi", "input": "", "output": "hi"}\n'

EMIT = [
    ("ddp1", ["--strategy", "ddp"]),
    ("ddp2", ["--strategy", "ddp", "--gpus", "2"]),
    ("fsdp", ["--strategy", "fsdp", "--gpus", "8", "--grad-checkpointing"]),
    ("gradop", ["--strategy", "fsdp-grad-op", "--gpus", "8"]),
    ("hybrid", ["--strategy", "fsdp-hybrid", "--gpus", "8", "--nodes", "2", "--main-process-ip", "10.0.0.1"]),
    ("noshard", ["--strategy", "fsdp-no-shard", "--gpus", "4"]),
    ("fsdpoff", ["--strategy", "fsdp", "--gpus", "8", "--offload", "all"]),
    ("z1", ["--strategy", "zero1", "--gpus", "4"]),
    ("z2off", ["--strategy", "zero2", "--gpus", "4", "--offload", "optimizer", "--grad-accum", "8"]),
    ("z3", ["--strategy", "zero3", "--gpus", "8", "--nodes", "2", "--main-process-ip", "10.0.0.1",
            "--batch-size", "2"]),
    ("z3all", ["--strategy", "zero3", "--gpus", "8", "--offload", "all"]),
    ("z3nvme", ["--strategy", "zero3", "--gpus", "8", "--offload", "nvme"]),
    ("qlora", ["--lora-rank", "16", "--quant", "nf4", "--grad-checkpointing"]),
    ("lora", ["--lora-rank", "16", "--precision", "bf16-pure", "--gpus", "2", "--strategy", "zero2"]),
]


@pytest.mark.parametrize("name, args", EMIT, ids=[e[0] for e in EMIT])
def test_emitted_configs_parse_with_the_launchers_own_loaders(tmp_path, monkeypatch, name, args):
    from accelerate.commands.config.config_args import ClusterConfig

    from planner.recipe import load
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(ALPACA_LINE)
    out = tmp_path / name
    code, stdout, err = run("emit-config", LLAMA3, "--out", name, "--data", "train.jsonl", *args)
    assert code == 0, err
    cfg = ClusterConfig.from_yaml_file(str(out / "accelerate.yaml"))
    recipe = load(str(out / "recipe.yaml"))
    world = recipe.plan.gpus * recipe.plan.nodes
    assert cfg.num_processes == world and cfg.num_machines == recipe.plan.nodes
    assert recipe.plan.expected.device_bytes > recipe.plan.expected.peak_bytes > 0
    assert recipe.datasets[0].path == "../train.jsonl"  # relative to the plan directory
    st = recipe.plan.strategy
    expected_type = {"ddp": "MULTI_GPU" if world > 1 else "NO"}.get(
        st, "FSDP" if st.startswith("fsdp") else "DEEPSPEED")
    assert cfg.distributed_type.value == expected_type
    if st.startswith("fsdp"):
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_reshard_after_forward"] == (st != "fsdp-grad-op")
        assert cfg.fsdp_config["fsdp_offload_params"] == (recipe.plan.offload == "all")
    if st.startswith("zero"):
        from deepspeed.runtime import config as ds_config
        from deepspeed.runtime.config import DeepSpeedConfig
        # DeepSpeedConfig reads the world from the process group: answer as rank 0 of `world`
        monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
        ds_path = cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_path == "deepspeed.json"  # relative: accelerate opens it from the working directory
        ds_path = out / ds_path
        mpu = SimpleNamespace(get_data_parallel_world_size=lambda: world)
        ds = DeepSpeedConfig(json.loads(Path(ds_path).read_text()), mpu=mpu)
        assert ds.zero_optimization_stage == int(st[-1])
        assert ds.train_micro_batch_size_per_gpu == recipe.micro_batch_size
        assert ds.gradient_accumulation_steps == recipe.gradient_accumulation_steps
        assert ds.train_batch_size == recipe.micro_batch_size * recipe.gradient_accumulation_steps * world
        off = recipe.plan.offload
        assert (ds.zero_config.offload_optimizer is not None) == (off in ("optimizer", "all", "nvme"))
        if st == "zero3":
            assert (ds.zero_config.offload_param is not None) == (off in ("all", "nvme"))
    if cfg.num_machines > 1:
        assert cfg.main_process_ip == "10.0.0.1" and cfg.main_process_port == 29500
    assert (out / "PLAN.md").read_text().startswith(f"# Plan: {LLAMA3}")


def test_emit_from_recommendation(tmp_path):
    code, out, err = run("emit-config", LLAMA3, "--gpu", "RTX-4090", "--global-batch", "64", "--out", tmp_path / "r")
    assert code == 0, err
    from planner.recipe import load
    r = load(str(tmp_path / "r" / "recipe.yaml"))
    assert r.adapter in ("lora", "qlora") and r.micro_batch_size * r.gradient_accumulation_steps == 64
    assert r.plan.gpu == "RTX-4090" and r.gradient_checkpointing
    assert "Why:" in (tmp_path / "r" / "PLAN.md").read_text()


def test_emit_never_overwrites_without_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "recipe.yaml").write_text("mine\n")
    code, stdout, err = run("emit-config", LLAMA3, "--out", out)
    assert code == 2 and "recipe.yaml" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "recipe.yaml").read_text() == "mine\n" and not (out / "accelerate.yaml").exists()
    code, stdout, err = run("emit-config", LLAMA3, "--out", out, "--force")
    assert code == 0 and (out / "recipe.yaml").read_text() != "mine\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("args, msg", [
    (["--strategy", "ddp", "--offload", "all"], "needs a sharded strategy"),
    (["--gpus", "8", "--nodes", "2", "--strategy", "fsdp"], "--main-process-ip"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--from-recommendation"], "needs --gpu"),
    (["--data-format", "sharegpt"], "--data-format"),
])
def test_emit_bad_input_is_one_line(tmp_path, args, msg):
    code, out, err = run("emit-config", LLAMA3, "--out", tmp_path / "x", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err
    assert not (tmp_path / "x").exists()


def test_emit_into_a_file_path_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, out, err = run("emit-config", LLAMA3, "--out", f)
    assert code == 2 and "not a directory" in err


def _launch(config: Path, out: Path) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                        str(ROOT / "tests" / "scripts" / "launch_steps.py"), str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.slow
def test_emitted_ddp_and_fsdp2_configs_launch_two_processes(tmp_path):
    """`accelerate launch --config_file` of emitted configs: two gloo processes complete steps."""
    model = "HuggingFaceTB/SmolLM2-135M"
    assert run("emit-config", model, "--gpus", "2", "--out", tmp_path / "ddp")[0] == 0
    ranks = _launch(tmp_path / "ddp" / "accelerate.yaml", tmp_path / "ddp_run")
    for r in ranks:
        assert r["world"] == 2 and r["ddp"] and not r["dtensor"] and r["mixed_precision"] == "bf16"
        assert len(r["losses"]) == 3 and all(0 < x < 20 for x in r["losses"])
    assert ranks[0]["losses"] == ranks[1]["losses"]  # one model, kept in sync by DDP

    assert run("emit-config", model, "--gpus", "2", "--strategy", "fsdp-grad-op", "--out", tmp_path / "fsdp")[0] == 0
    ranks = _launch(tmp_path / "fsdp" / "accelerate.yaml", tmp_path / "fsdp_run")
    for r in ranks:
        assert r["world"] == 2 and r["dtensor"] and not r["ddp"]
        assert r["local_numel"] * 2 == pytest.approx(r["total_numel"], rel=0.01)  # each rank holds half
        assert r["reshard_after_forward"] is False  # grad-op, read from the emitted YAML
        assert len(r["losses"]) == 3 and all(0 < x < 20 for x in r["losses"])


# ------------------------------------------------------------------ recommend within the limits users have

def test_host_ram_defaults_to_this_machines(monkeypatch):
    """70B full fine-tuning on one RTX 4090 needs 1,314 GiB of host RAM: not a plan on a machine
    with 64 GiB unless --host-ram says the training node has it."""
    import planner.cli.common as common
    monkeypatch.setattr(common, "local_host_ram", lambda: 64 * 2**30)
    code, out, err = run("recommend", "meta-llama/Llama-3.1-70B", "--gpu", "RTX-4090", "--top", "50", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["host_ram_bytes"] == 64 * 2**30
    assert d["plans"] and all(p["cpu_bytes"] <= 64 * 2**30 for p in d["plans"])
    code, out, err = run("recommend", "meta-llama/Llama-3.1-70B", "--gpu", "RTX-4090", "--top", "50", "--json",
                         "--host-ram", "2000")
    d = json.loads(out)
    assert d["host_ram_bytes"] == 2000 * 2**30 and max(p["cpu_bytes"] for p in d["plans"]) > 64 * 2**30
    code, out, err = run("recommend", "meta-llama/Llama-3.1-70B", "--gpu", "RTX-4090")
    assert "Host RAM 64 GiB per node: this machine's" in out


def test_nvme_needs_are_shown(monkeypatch):
    import planner.cli.common as common
    monkeypatch.setattr(common, "local_host_ram", lambda: 2000 * 2**30)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run("recommend", "meta-llama/Llama-3.1-70B", "--gpu", "RTX-4090", "--top", "50")
    assert code == 0, err
    header = [c.strip() for c in next(line for line in out.splitlines() if "┃" in line and "NVMe" in line)
              .split("┃")]
    row = [c.strip() for c in next(line for line in out.splitlines() if "│ nvme" in line).split("│")]
    assert row[header.index("NVMe")] not in ("-", "")  # the NVMe GiB of the NVMe plan
    code, out, err = run("recommend", "HuggingFaceTB/SmolLM2-135M", "--gpu", "H100-SXM")
    assert not [line for line in out.splitlines() if "┃" in line and "NVMe" in line]  # no NVMe plan: no column


def test_default_global_batch_is_8_per_gpu():
    code, out, err = run("recommend", LLAMA3, "--gpu", "A100-80GB", "--gpus", "4", "--json")
    d = json.loads(out)
    assert d["global_batch"] == 32 and all(p["global_batch"] == 32 for p in d["plans"])
    code, out, err = run("recommend", "HuggingFaceTB/SmolLM2-135M", "--gpu", "H100-SXM", "--json")
    d = json.loads(out)
    assert all(p["micro_batch"] * p["gradient_accumulation"] == 8 for p in d["plans"])
    code, out, err = run("recommend", "HuggingFaceTB/SmolLM2-135M", "--gpu", "H100-SXM")
    assert "Global batch 8: the default" in " ".join(out.split())


def test_nothing_fits_for_want_of_host_ram_says_so():
    code, out, err = run("recommend", "meta-llama/Llama-3.2-3B", "--gpu", "RTX-4090", "--method", "full",
                         "--host-ram", "4")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a plan fits the GPU but needs" in err and "GiB of host RAM per node, more than the 4 GiB allowed" in err
