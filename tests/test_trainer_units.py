"""The trainer's resilience and bookkeeping without launching processes: the batches of each
optimizer step, checkpoints chosen and their state, the out-of-memory back-off, skipped steps,
the loss watchdog. (tests/test_resilience.py runs the same behaviour through `plan train`.)"""

from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import pytest

from trainer.checkpoint import STATE_FILE, check_resumable, latest_checkpoint
from trainer.resilience import (
    OutOfMemory,
    RunStopped,
    agreed_oom,
    back_off,
    bad_loss_count,
    gradient_is_usable,
    injected_nan_steps,
    injected_oom,
    prediction_fields,
    split_rows,
    stop_reason,
)
from trainer.state import CHECKPOINT_KEYS, RunState, due, optimizer_steps, steps_in_epoch, steps_in_run


def epochs_of(n: int, calls: list | None = None):
    """`epoch_batches` over a loader of `n` batches named (epoch, index); records its calls."""
    def epoch_batches(epoch: int, skip: int):
        if calls is not None:
            calls.append((epoch, skip))
        return [(epoch, i) for i in range(skip, n)]
    return epoch_batches


# ---------------------------------------------------------------- batches of each optimizer step

def test_optimizer_steps_group_batches_and_cross_epochs_dropping_a_short_group():
    st = RunState()
    seen = []
    for group in optimizer_steps(epochs_of(5), st, accumulation=2, total_steps=5):
        seen.append((st.step, st.epoch, st.batch_in_epoch, group))
    # 5 batches an epoch: two groups, the fifth batch dropped, the next epoch starts a new group
    assert seen == [(1, 0, 2, [(0, 0), (0, 1)]), (2, 0, 4, [(0, 2), (0, 3)]),
                    (3, 1, 2, [(1, 0), (1, 1)]), (4, 1, 4, [(1, 2), (1, 3)]),
                    (5, 2, 2, [(2, 0), (2, 1)])]
    assert (st.step, st.epoch, st.batch_in_epoch) == (5, 2, 2)  # stopped mid-epoch: no epoch advance


def test_optimizer_steps_resume_where_a_checkpoint_left_off():
    calls: list = []
    full = [g for g in optimizer_steps(epochs_of(4), RunState(), 1, total_steps=6)]
    st = RunState(step=3, epoch=0, batch_in_epoch=3)  # saved after step 3
    rest = list(optimizer_steps(epochs_of(4, calls), st, 1, total_steps=6))
    assert rest == full[3:]
    assert calls == [(0, 3), (1, 0)]  # the first epoch skips the batches already taken


def test_optimizer_steps_after_a_checkpoint_at_the_end_of_an_epoch():
    st = RunState(step=2, epoch=0, batch_in_epoch=4)
    groups = list(optimizer_steps(epochs_of(4), st, 2, total_steps=3))
    assert groups == [[(1, 0), (1, 1)]] and st.epoch == 1


def test_optimizer_steps_yield_nothing_when_the_run_is_done():
    st = RunState(step=4)
    assert list(optimizer_steps(epochs_of(4), st, 1, total_steps=4)) == []


def test_step_counts_and_due_actions():
    assert steps_in_epoch(loader_batches=10, world=2, accumulation=2) == 3  # 5 a rank, groups of 2, rounded up
    assert steps_in_epoch(1, 4, 8) == 1
    assert steps_in_run(None, 1.5, 3) == 5 and steps_in_run(7, 3, 100) == 7
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8]
    assert not due(10, 5, 10)  # the last step: the end of the run saves and evaluates
    assert not any(due(s, None, 10) for s in range(1, 11))


# ---------------------------------------------------------------- checkpoints and run state

def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name, complete in (("checkpoint-9", True), ("checkpoint-10", True), ("checkpoint-12", False),
                           (".tmp-checkpoint-14", True), ("checkpoint-final", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"  # by number, not by name


def test_run_state_round_trips_through_trainer_state_json():
    st = RunState(step=6, epoch=1, batch_in_epoch=3, micro_split=2, skipped_steps=1, tokens=99,
                  oom_events=[{"step": 2}], bad_loss_steps=1)
    fields = json.loads(json.dumps(st.checkpoint_fields("abc", 2)))
    assert tuple(fields) == CHECKPOINT_KEYS
    assert fields == {"step": 6, "epoch": 1, "batch_in_epoch": 3, "recipe_hash": "abc", "world_size": 2,
                      "micro_split": 2, "skipped_steps": 1}
    back = RunState.from_checkpoint(fields)
    assert (back.step, back.epoch, back.batch_in_epoch, back.micro_split, back.skipped_steps) == (6, 1, 3, 2, 1)
    assert back.tokens == 0 and back.oom_events == []  # this process's run counts afresh
    old = RunState.from_checkpoint({"step": 2, "epoch": 0, "batch_in_epoch": 4})  # before the back-off existed
    assert (old.micro_split, old.skipped_steps) == (1, 0)


def test_run_state_losses():
    st = RunState()
    assert st.first_loss is st.last_loss is st.mean_loss is None
    for loss in (3.0, 2.0, 1.0):
        st.record_step(loss, tokens=10)
    assert (st.first_loss, st.last_loss, st.mean_loss, st.tokens) == (3.0, 1.0, 2.0, 30)


def test_a_checkpoint_of_another_recipe_or_world_size_is_refused(tmp_path):
    from planner.recipe import RecipeError
    fields = RunState(step=2).checkpoint_fields("abc", 2)
    check_resumable(tmp_path, fields, "abc", 2)
    with pytest.raises(RecipeError, match="different recipe"):
        check_resumable(tmp_path, fields, "xyz", 2)
    with pytest.raises(RecipeError, match="written by 2 processes, resuming with 1"):
        check_resumable(tmp_path, fields, "abc", 1)


# ---------------------------------------------------------------- out of memory

def test_split_rows_cuts_each_batch_into_consecutive_rows():
    import torch
    b = {"input_ids": torch.arange(12).view(3, 4), "labels": torch.arange(12).view(3, 4)}
    assert split_rows([b], 1) == [b]
    parts = split_rows([b, b], 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 1, 2, 1]
    assert torch.equal(torch.cat([p["labels"] for p in parts[2:]]), b["labels"])
    assert [p["input_ids"].shape[0] for p in split_rows([b], 4)] == [1, 1, 1]  # never an empty micro-batch


def test_ranks_agree_on_an_out_of_memory_error():
    never = lambda flag: pytest.fail("no all-reduce without DDP")  # noqa: E731
    assert agreed_oom(False, "forward", ddp=False, world=1, rank_sum=never) is None
    one = agreed_oom(True, "forward", ddp=False, world=1, rank_sum=never)
    assert (one.ranks, one.phase, one.recoverable) == (1, "forward", True)
    sharded = agreed_oom(True, "backward", ddp=False, world=2, rank_sum=never)  # FSDP/DeepSpeed: stop
    assert not sharded.recoverable
    # DDP: this rank is fine, the other one ran out; both raise, both know how many ranks
    other = agreed_oom(False, "forward", ddp=True, world=2, rank_sum=lambda flag: flag + 1.0)
    assert (other.ranks, other.recoverable) == (1, True)
    assert agreed_oom(False, "forward", ddp=True, world=2, rank_sum=lambda flag: flag) is None


def _backoff(e=None, rows=4, split=1, accumulation=2, world=1, enabled=True):
    e = e or OutOfMemory(1, "forward", recoverable=True)
    return back_off(e, step=3, shape=(rows, 64), split=split, accumulation=accumulation, world=world,
                    enabled=enabled, sharding="FSDP")


def test_back_off_halves_the_micro_batch_and_doubles_accumulation():
    b = _backoff()
    assert b.split == 2
    assert b.event == {"step": 3, "phase": "forward", "ranks": 1, "micro_batch": [4, 2], "accumulation": [2, 4],
                       "seq_len": 64}
    assert "micro-batch 4 -> 2, accumulation 2 -> 4 (global batch unchanged); retrying step 3" in b.message
    again = _backoff(rows=2, split=b.split, accumulation=4)
    assert (again.split, again.event["micro_batch"], again.event["accumulation"]) == (4, [2, 1], [4, 8])
    assert _backoff(rows=3).event["micro_batch"] == [3, 2]  # rounded up, as split_rows cuts
    two = _backoff(e=OutOfMemory(1, "backward", True), world=2)
    assert "(micro-batch 4 x 64 tokens, 1 of 2 ranks)" in two.message


@pytest.mark.parametrize("kw, message", [
    ({"enabled": False}, "oom_backoff is off"),
    ({"e": OutOfMemory(1, "forward", recoverable=False), "world": 2}, "under FSDP with 2 ranks the step cannot be"),
    ({"rows": 1}, "nothing left to halve"),
])
def test_back_off_stops_when_it_cannot_help(kw, message):
    with pytest.raises(RunStopped, match=message):
        _backoff(**kw)


def test_prediction_fields_of_a_back_off():
    assert prediction_fields(None, 10) == {}
    pred = {"peak_bytes": 5, "device_bytes": 8}
    assert prediction_fields(pred, None) == {"predicted_peak_bytes": 5, "predicted_device_bytes": 8}
    low = prediction_fields(pred, 10)
    assert low["device_total_bytes"] == 10 and low["prediction_low_by_at_least_pct"] == 25.0
    assert "prediction_low_by_at_least_pct" not in prediction_fields(pred, 8)


def test_fault_injection_is_off_unless_set(monkeypatch):
    import torch
    monkeypatch.delenv("PLAN_INJECT_OOM_ROWS", raising=False)
    monkeypatch.delenv("PLAN_INJECT_NAN_STEPS", raising=False)
    injected_oom(1000, 0)
    assert injected_nan_steps() == set()
    monkeypatch.setenv("PLAN_INJECT_NAN_STEPS", "3, 4,")
    assert injected_nan_steps() == {3, 4}
    monkeypatch.setenv("PLAN_INJECT_OOM_ROWS", "2")
    monkeypatch.setenv("PLAN_INJECT_OOM_RANK", "1")
    injected_oom(4, 0)  # another rank's error
    injected_oom(2, 1)  # not over the limit
    with pytest.raises(torch.OutOfMemoryError):
        injected_oom(3, 1)


# ---------------------------------------------------------------- NaN steps, watchdog, signals

def test_a_non_finite_gradient_norm_skips_the_step():
    assert gradient_is_usable(1.5) and gradient_is_usable(0.0) and gradient_is_usable(None)
    assert not gradient_is_usable(float("nan")) and not gradient_is_usable(float("inf"))


def test_the_watchdog_counts_bad_losses_in_a_row():
    count = 0
    counts = []
    for loss in (5.0, 0.5, 2.0, float("nan"), 3.0, 0.1):
        count = bad_loss_count(loss, count, threshold=1.0)
        counts.append(count)
    assert counts == [1, 0, 1, 2, 3, 0]
    assert bad_loss_count(1e9, 0, threshold=None) == 0 and bad_loss_count(math.inf, 2, None) == 3


def test_stop_reasons():
    kw = dict(threshold=0.001, patience=2)
    assert stop_reason(1.0, 1, 1, signalled=False, signal_name=None, **kw) is None
    why = stop_reason(1.0, 2, 2, signalled=False, signal_name=None, **kw)
    assert why.startswith("loss watchdog: the loss was above loss_watchdog_threshold=0.001 for 2 steps in a row "
                          "(step 2, loss 1)")
    nan = stop_reason(float("nan"), 5, 3, signalled=False, signal_name=None, threshold=None, patience=3)
    assert "not finite for 3 steps" in nan
    # a signal comes first, named on the rank that got it
    assert stop_reason(1.0, 4, 2, True, "SIGTERM", **kw).startswith("stopped by SIGTERM at step 4")
    assert "a signal to another rank" in stop_reason(1.0, 4, 0, True, None, **kw)


# ---------------------------------------------------------------- the step, with a toy model

class _Acc:
    """What the step needs of accelerate's Accelerator, for one process."""
    process_index = 0
    device = "cpu"

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        import torch
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _toy_trainer(tmp_path, monkeypatch, micro_batch_size=4):
    """A Trainer set up by hand around a one-embedding model whose loss is a token-summed squared
    error over `num_items_in_batch` (as transformers' causal LM losses)."""
    import torch

    import trainer.train as T

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(16, 1)

        def forward(self, input_ids, labels, num_items_in_batch):
            err = (self.emb(input_ids).squeeze(-1)[:, 1:] - labels[:, 1:].float()) ** 2
            return SimpleNamespace(loss=(err * (labels[:, 1:] != -100)).sum() / num_items_in_batch)

    monkeypatch.setattr(T, "predict", lambda *a, **k: (None, []))
    recipe = SimpleNamespace(output_dir=str(tmp_path), gradient_accumulation_steps=2, max_grad_norm=1.0,
                             oom_backoff=True, micro_batch_size=micro_batch_size)
    t = T.Trainer(recipe, "toy.yaml")
    t.acc = _Acc()
    t.proc = T.Processes(cuda=False, mixed_precision="no", world=1, main=False, fsdp_cpu=False, fsdp=False,
                         deepspeed=False, ddp=False)
    t.data = T.Data(train=None, val=None, classify=False, classes=None, stats={})
    t.model = Toy()
    t.opt = torch.optim.SGD(t.model.parameters(), lr=0.1)
    t.sched = torch.optim.lr_scheduler.LambdaLR(t.opt, lambda s: 1.0)
    t.state.step = 1
    return t


def _batches(rows=4):
    import torch
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 16, (rows, 6), generator=g),
             "labels": torch.randint(0, 5, (rows, 6), generator=g)} for _ in range(2)]


def test_a_step_retried_after_an_oom_back_off_ends_as_the_step_without_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PLAN_INJECT_OOM_ROWS", raising=False)
    monkeypatch.delenv("PLAN_INJECT_NAN_STEPS", raising=False)
    plain = _toy_trainer(tmp_path, monkeypatch)
    loss, norm, tokens = plain.optimizer_step(_batches(), meter=None)
    monkeypatch.setenv("PLAN_INJECT_OOM_ROWS", "1")  # only 1-row forwards fit: two back-offs
    monkeypatch.delenv("PLAN_INJECT_OOM_RANK", raising=False)
    backed = _toy_trainer(tmp_path, monkeypatch)
    loss2, norm2, tokens2 = backed.optimizer_step(_batches(), meter=None)
    assert [e["micro_batch"] for e in backed.state.oom_events] == [[4, 2], [2, 1]]
    assert backed.state.micro_split == 4 and backed.accumulation == 8
    assert loss2 == pytest.approx(loss, rel=1e-6) and norm2 == pytest.approx(norm, rel=1e-5) and tokens2 == tokens == 48
    assert plain.state.label_tokens == backed.state.label_tokens == 40  # the first label of each row is not a target
    import torch
    assert torch.allclose(plain.model.emb.weight, backed.model.emb.weight, atol=1e-6)


def test_a_step_with_a_nan_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.delenv("PLAN_INJECT_OOM_ROWS", raising=False)
    monkeypatch.setenv("PLAN_INJECT_NAN_STEPS", "1")
    t = _toy_trainer(tmp_path, monkeypatch)
    before = t.model.emb.weight.detach().clone()
    loss, norm, _ = t.optimizer_step(_batches(), meter=None)
    assert math.isnan(loss) and math.isnan(norm)
    assert t.state.skipped_steps == 1 and t.sched.last_epoch == 0  # no optimizer or scheduler step
    assert t.model.emb.weight.grad is None and bool((t.model.emb.weight == before).all())


def test_an_oom_at_one_row_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAN_INJECT_OOM_ROWS", "0")
    monkeypatch.delenv("PLAN_INJECT_OOM_RANK", raising=False)
    monkeypatch.delenv("PLAN_INJECT_NAN_STEPS", raising=False)
    t = _toy_trainer(tmp_path, monkeypatch, micro_batch_size=1)
    with pytest.raises(RunStopped, match="the micro-batch is 1 row, nothing left to halve"):
        t.optimizer_step(_batches(rows=1), meter=None)


# ------------------------------------------------------------------ safe resume

class _OneProcess:
    """What the Checkpointer reads of accelerate's Accelerator, for one process."""
    is_main_process = True
    num_processes = 1
    process_index = 0

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def _saved_run(tmp_path, width: int = 4):
    import torch
    from transformers import get_scheduler

    from trainer.checkpoint import Checkpointer
    recipe = SimpleNamespace(model_dump=lambda mode: {"base_model": "tiny"})
    model = torch.nn.Linear(width, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    model(torch.ones(1, width)).sum().backward()
    opt.step()
    ck = Checkpointer(_OneProcess(), tmp_path, recipe, fsdp=False, cuda=False)
    ck.save(RunState(step=3), model, opt, sched)
    return ck, model, opt, sched


def test_a_checkpoint_resumes_weights_only(tmp_path):
    ck, model, opt, sched = _saved_run(tmp_path)
    path, state = ck.load_latest(model, opt, sched)
    assert path.name == "checkpoint-3" and state.step == 3
    assert json.loads((path / STATE_FILE).read_text())["model_digest"]


def test_a_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    import os

    import torch

    from planner.recipe import RecipeError
    ck, model, opt, sched = _saved_run(tmp_path)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"lr_lambdas": [Payload()]}, tmp_path / "checkpoint-3" / "scheduler.pt")
    with pytest.raises(RecipeError, match="cannot be resumed"):
        ck.load_latest(model, opt, sched)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_or_a_damaged_state_is_refused(tmp_path):
    import torch
    from transformers import get_scheduler

    from planner.recipe import RecipeError
    ck, _, _, _ = _saved_run(tmp_path, width=4)
    other = torch.nn.Linear(8, 2)
    opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(RecipeError, match="another model"):
        ck.load_latest(other, opt, get_scheduler("constant", opt))
    (tmp_path / "checkpoint-3" / STATE_FILE).write_text("[1, 2]")
    with pytest.raises(RecipeError, match="not a checkpoint's state"):
        ck.load_latest(other, opt, get_scheduler("constant", opt))
