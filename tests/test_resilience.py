"""What `plan train` loses when things go wrong: a SIGKILL mid-run, a SIGTERM, an out-of-memory
error, a NaN. Real runs of a 2-layer Llama through `plan train` (accelerate launch, CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import run_plan, start_plan
from test_train import metrics, needs_smollm2, recipe

from trainer.train import latest_checkpoint, split_rows


def wait_for(cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended first:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it (the launcher runs accelerate in its own
    process group, so the launcher's group alone would leave the trainer running)."""
    import psutil
    procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    for q in procs:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def weights(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "final" / "model.safetensors"))


def report(out: Path) -> dict:
    return json.loads((out / "run_report.json").read_text())


def same_weights(a: dict, b: dict, tol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tol, f"weights differ by {worst}"
    return worst


# ---------------------------------------------------------------- checkpoints

def test_only_complete_checkpoints_are_resumed_from(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-4", True), ("checkpoint-6", False),
                           (".tmp-checkpoint-8", True), ("checkpoint-x", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"


def test_split_rows_keeps_every_row_in_order():
    import torch
    b = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(10).view(5, 2)}
    parts = split_rows([b, b], 2)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2, 3, 2]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts[:2]]), b["input_ids"])


@pytest.mark.slow
@needs_smollm2
def test_sigkill_mid_run_then_resume_ends_as_an_uninterrupted_run(tiny, tmp_path):
    kw = dict(max_steps=60, save_steps=10, gradient_accumulation_steps=1, micro_batch_size=2, num_epochs=5)
    ref_out = tmp_path / "ref"
    r = run_plan("train", recipe(tiny, ref_out, **kw))
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "killed"
    path = recipe(tiny, out, **kw)
    p = start_plan("train", path, start_new_session=True)
    wait_for(lambda: (out / "checkpoint-20" / "trainer_state.json").exists(), p)
    kill_tree(p.pid)  # the node goes away: no handler runs, nothing is left running
    p.wait()
    assert not (out / "final").exists()
    done = {int(m["step"]) for m in metrics(out)}
    assert 20 <= max(done) < 60, f"killed at step {max(done)}"
    (out / ".tmp-checkpoint-30").mkdir(exist_ok=True)  # a checkpoint being written when it died

    r = run_plan("train", path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "checkpoint-" in r.stderr
    a, b = report(ref_out), report(out)
    assert abs(a["final_loss"] - b["final_loss"]) <= 1e-5 * max(1.0, abs(a["final_loss"]))
    same_weights(weights(ref_out), weights(out))


@pytest.mark.slow
@needs_smollm2
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny, tmp_path):
    out = tmp_path / "term"
    path = recipe(tiny, out, max_steps=400, gradient_accumulation_steps=1, micro_batch_size=2, num_epochs=20)
    p = start_plan("train", path, start_new_session=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3, p)
    p.send_signal(signal.SIGTERM)  # to the launcher, which passes it to the trainer
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err[-3000:]
    assert "stopped by SIGTERM" in " ".join(err.split()) and "Traceback" not in err
    ck = latest_checkpoint(out)
    assert ck is not None and not (out / "final").exists()
    step = json.loads((ck / "trainer_state.json").read_text())["step"]
    assert 3 <= step < 400


# ---------------------------------------------------------------- OOM back-off and NaN

@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """A 4-step run, micro-batch 4 x accumulation 2, nothing injected."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run_plan("train", recipe(tiny, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
@needs_smollm2
def test_injected_oom_halves_the_micro_batch_and_keeps_the_global_batch(tiny, reference, tmp_path):
    out = tmp_path / "oom"
    r = run_plan("train", recipe(tiny, out), env={"PLAN_INJECT_OOM_ROWS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = report(out)
    assert [(e["micro_batch"], e["accumulation"]) for e in rep["oom_backoff"]] == [([4, 2], [2, 4]), ([2, 1], [4, 8])]
    assert rep["oom_backoff"][0]["step"] == 1 and rep["oom_backoff"][0]["predicted_peak_bytes"] > 0
    assert rep["micro_batch_size"] == 1 and rep["gradient_accumulation_steps"] == 8
    assert "micro-batch 4 -> 2, accumulation 2 -> 4" in " ".join(r.stderr.split())  # rich wraps lines
    # the same samples per optimizer step: the same losses and weights as without the error
    got = [m["loss"] for m in metrics(out) if "loss" in m]
    want = [m["loss"] for m in metrics(reference) if "loss" in m]
    assert got == pytest.approx(want, rel=1e-4)
    same_weights(weights(reference), weights(out), tol=1e-4)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("accum", [2, 1], ids=["in-a-no-sync-micro-step", "in-the-synchronising-micro-step"])
def test_oom_on_one_rank_of_two_backs_off_on_both(tiny, tmp_path, accum):
    """Rank 1 alone runs out of memory; both ranks halve together and end where a run without
    the error ends. With accumulation 1 the error hits DDP's gradient-synchronising forward."""
    ref, out = tmp_path / "ref2", tmp_path / "oom2"
    r = run_plan("train", recipe(tiny, ref, gradient_accumulation_steps=accum), "--num-processes", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_plan("train", recipe(tiny, out, gradient_accumulation_steps=accum), "--num-processes", "2",
                 env={"PLAN_INJECT_OOM_ROWS": "2", "PLAN_INJECT_OOM_RANK": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = report(out)
    assert rep["world_size"] == 2
    assert [(e["micro_batch"], e["ranks"]) for e in rep["oom_backoff"]] == [([4, 2], 1)]
    assert rep["micro_batch_size"] == 2 and rep["gradient_accumulation_steps"] == 2 * accum
    got = [m["loss"] for m in metrics(out) if "loss" in m]
    assert got == pytest.approx([m["loss"] for m in metrics(ref) if "loss" in m], rel=1e-4) and len(got) == 4
    same_weights(weights(ref), weights(out), tol=1e-4)


@pytest.mark.slow
@needs_smollm2
def test_oom_at_micro_batch_one_stops_with_one_line(tiny, tmp_path):
    out = tmp_path / "oom-stop"
    r = run_plan("train", recipe(tiny, out, micro_batch_size=1), env={"PLAN_INJECT_OOM_ROWS": "0"})
    assert r.returncode == 1
    assert "nothing left to halve" in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert not (out / "final").exists()


@pytest.mark.slow
@needs_smollm2
def test_nan_gradient_skips_the_step_and_counts_it(tiny, reference, tmp_path):
    out = tmp_path / "nan"
    r = run_plan("train", recipe(tiny, out), env={"PLAN_INJECT_NAN_STEPS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert report(out)["skipped_steps"] == 1
    m = {x["step"]: x for x in metrics(out) if "loss" in x}
    assert m[2]["loss"] is None and m[2]["grad_norm"] is None  # not finite: null in the JSON
    ref = {x["step"]: x for x in metrics(reference) if "loss" in x}
    assert m[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-6)
    assert all(m[s]["loss"] is not None for s in (3, 4))  # the weights stayed finite


@pytest.mark.slow
@needs_smollm2
def test_loss_watchdog_stops_with_a_checkpoint(tiny, tmp_path):
    out = tmp_path / "watch"
    r = run_plan("train", recipe(tiny, out, max_steps=10, loss_watchdog_threshold=0.001, loss_watchdog_patience=2))
    assert r.returncode == 1
    err = " ".join(r.stderr.split())
    assert "loss watchdog" in err and "(step 2," in err and "Traceback" not in err
    assert latest_checkpoint(out).name == "checkpoint-2" and not (out / "final").exists()
    out = tmp_path / "watch-nan"
    r = run_plan("train", recipe(tiny, out, max_steps=10), env={"PLAN_INJECT_NAN_STEPS": "3,4,5"})
    assert r.returncode == 1 and "not finite for 3 steps" in " ".join(r.stderr.split())
    assert latest_checkpoint(out).name == "checkpoint-5"
