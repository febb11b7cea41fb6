"""Measured per-rank memory of a distributed training step: the ground truth for the sharding
formulas in planner/distributed.py.

One process is one rank. It builds the real transformers model, wraps it as the strategy says
and runs a warm-up step and a measured step under torch's MemTracker, entered before the model
is built so every tensor the rank allocates is seen (the strategy's flat buffers, all-gather
outputs, reduce-scatter inputs, gradient buckets included). It reports the peak of live tensor
bytes per phase, on every rank.

- ddp: torch's DistributedDataParallel with its defaults, as accelerate wraps a model for DDP.
- fsdp, fsdp-grad-op, fsdp-hybrid, fsdp-no-shard: FSDP2 through accelerate's own
  `fsdp2_prepare_model` (its wrap layout: every `_no_split_modules` block, the input embedding,
  the final norm and head together with `reshard_after_forward=False`, the root; trainable
  parameters upcast to fp32 under mixed precision, `MixedPrecisionPolicy(bf16, bf16)`).
  accelerate enables FSDP only on GPU backends, so the worker calls that function with the
  plugin and mesh an `accelerate launch` would set up.
- zero1, zero2, zero3: `deepspeed.initialize` with the config accelerate builds (bf16, the
  buckets accelerate's `auto` fills from the hidden size, the client AdamW).

Two ways to run:
- real: `torchrun --nproc-per-node 2 -m planner.measure.distributed CASE_JSON OUT_DIR` (or `accelerate
  launch --cpu --num_processes 2 -m planner.measure.distributed ...`), gloo, real CPU tensors; each rank
  writes OUT_DIR/rank{N}.json.
- fake: `measure_fake(cfg, st)`, FSDP strategies only: one process is rank 0 of a world of
  gpus x nodes ranks on torch's fake process group (FakeStore), on fake tensors, so an 8B model
  at world size 8 runs in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, replace

from ..contract import FSDP, ZERO, Settings, world_size
from ..emit import deepspeed_config
from ..precision import RECIPES
from .builder import build_model, make_optimizer, mesh_for, train_step, unpacked_sequences, wrap_fsdp2


def _phase_peaks(tracker, step) -> dict:
    """Run `step(snap)` and return the peak of live bytes in each phase it marks."""
    from .tracker import PhaseRecorder

    record = PhaseRecorder(tracker)
    record("model")  # resets the peak to the live bytes now, at the step's start
    # steady state: model states and persistent buffers
    record.phases["start"] = int(tracker.get_tracker_snapshot("current")[record.dev]["Total"])
    step(record)
    return record.phases


def run_rank(cfg: dict, st: Settings, world: int, fake_mode=None) -> dict:
    """Build, wrap, warm up, measure. The process group must already be initialised."""
    import torch
    import torch.distributed as dist

    from .tracker import Tracker

    rc = RECIPES[st.precision]
    zero = st.strategy in ZERO
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if rc.autocast and not zero else contextlib.nullcontext()
    tracker = Tracker()
    torch.manual_seed(0)
    mesh = mesh_for(st, world) if st.strategy in FSDP else None  # outside fake mode: it reads ranks
    with unpacked_sequences(), (fake_mode or contextlib.nullcontext()):
        with tracker if fake_mode is None else contextlib.nullcontext():
            if fake_mode is not None:  # built on meta, sharded, then materialised as fake tensors
                model, config = build_model(cfg, st, fake_mode=None, meta=True)
            else:
                model, config = build_model(cfg, replace(st, precision="bf16-pure") if zero and rc.compute == 2 else st)
            if st.strategy == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            elif st.strategy in FSDP:
                model = wrap_fsdp2(model, st, mesh)
                if fake_mode is not None:
                    model.to_empty(device="cpu")
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = make_optimizer(trainable, st.optimizer)
            if zero:
                import deepspeed
                model, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                        config=deepspeed_config(st, config.hidden_size, world))
            ids = torch.randint(0, config.vocab_size, (st.batch_size, st.seq_len))

            def step(snap=lambda phase: None):
                train_step(model, opt, dict(input_ids=ids, labels=ids), amp, snap, engine=model if zero else None)

            step()
            if fake_mode is not None:
                # tensors from here on are all fake: track what exists, then the step. torch's
                # FSDPMemTracker gives the same figures except that it misses a tied embedding's
                # unsharded gradient (GPT-2 fp32 with checkpointing: 2,051,072 B low, where a real
                # two-rank run and this tracker agree to the byte), so the plain tracker measures.
                tracker.track_external(model, opt, ids)
                with tracker:
                    phases = _phase_peaks(tracker, step)
            else:
                tracker.reset_mod_stats()  # MemTracker's per-module stats hold one iteration
                phases = _phase_peaks(tracker, step)
    rank = dist.get_rank()
    return {"rank": rank, "world": world, "strategy": st.strategy, "phases": phases,
            "peak_bytes": max(phases[k] for k in ("forward", "backward", "optimizer_step"))}


def measure_fake(cfg: dict, st: Settings) -> dict:
    """Rank 0 of a gpus x nodes world of FSDP2 on torch's fake process group, fake tensors."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if st.strategy not in FSDP:
        raise ValueError(f"fake-world measurement covers FSDP2 only, not {st.strategy}")
    world = world_size(st)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        return run_rank(cfg, st, world, fake_mode=FakeTensorMode())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cfg: dict, st: Settings, launcher: str = "torchrun", timeout: int = 600) -> list[dict]:
    """Run the step on `gpus` real CPU ranks (gloo) with torchrun or `accelerate launch`
    (its multi-process launcher, torchrun underneath); return each rank's report."""
    import subprocess
    import tempfile

    world = world_size(st)
    case = json.dumps({"config": cfg, "settings": asdict(st)})
    port = str(_free_port())
    with tempfile.TemporaryDirectory() as out:
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                   "--master-addr", "127.0.0.1", "--master-port", port]
        elif launcher == "accelerate":
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(world),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port]
        else:
            raise ValueError(f"unknown launcher {launcher}")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        r = subprocess.run(cmd + ["-m", "planner.measure.distributed", case, out], capture_output=True, text=True,
                           env=env, timeout=timeout)
        if r.returncode != 0:
            # a rank's own exception ("[rank0]: ValueError: ..."), not the launcher's ChildFailedError
            lines = r.stderr.splitlines()
            cause = [ln for ln in lines if ln.startswith("[rank") and "Error" in ln and "File " not in ln][-1:] \
                or [ln for ln in lines if "Error" in ln][-1:] or lines[-1:]
            raise RuntimeError(f"{launcher} run of {st.strategy} failed (exit {r.returncode}): {' '.join(cause)}")
        return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(world)]


def main(argv: list[str] | None = None) -> None:
    """The torchrun / accelerate-launch entry point: CASE_JSON (model config and settings) OUT_DIR.
    Ends the process once the rank's report is written."""
    import torch.distributed as dist

    args = argv if argv is not None else sys.argv[1:]
    case = json.loads(args[0])
    out_dir = args[1]
    st = Settings(**case["settings"])
    if st.strategy in ZERO:
        import deepspeed
        import deepspeed.ops
        # DeepSpeed's CPU shared-memory allreduce op is a JIT-built C++ fast path (minutes to
        # build) whose buffers are not torch tensors; gloo carries the collectives instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    try:
        res = run_rank(case["config"], st, dist.get_world_size())
        res["settings"] = asdict(st)
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, f".rank{res['rank']}.json")
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, os.path.join(out_dir, f"rank{res['rank']}.json"))
    finally:
        dist.destroy_process_group()
    # The result is on disk and the process group is gone: end here, without interpreter
    # teardown, where a native thread of the comm stack (gloo / DeepSpeed) sometimes aborts the
    # process ("terminate called without an active exception", SIGABRT) after a complete
    # measurement. A rank that fails before this point still exits with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
