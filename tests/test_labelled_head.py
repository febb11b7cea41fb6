"""`plan train`'s loss over the labelled positions only (issue 20, part 7: speed): the head and
the cross-entropy score only the positions whose next token has a label (transformers'
`logits_to_keep` with a boolean mask, planner/measure/builder.py: install_labelled_head). The
loss and the gradients are transformers' own; `Settings.head_tokens` models the memory, measured
on real CPU steps (tables/validation.csv, `python tests/scripts/_run_cases.py head`)."""

from __future__ import annotations

import pytest
import torch

from planner.contract import PlanError, Settings, check_options
from planner.estimate import estimate
from planner.measure.builder import build_model, install_labelled_head, measured_config
from planner.measure.simulate import measure
from planner.measure.validate import SMALL
from planner.spec import ModelSpec


def _batch(vocab: int, prompt: int = 40, seq: int = 64, pad: int = 9):
    """Two rows: a prompt without labels, then labelled tokens; the second row padded at its end."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[1, seq - pad:] = -100
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch, cfg", [
    ("llama", {}),
    ("gemma2", {}),                                       # soft-capped final logits
    ("mixtral", {"output_router_logits": True}),          # the router loss, which the forward adds only with labels
    ("gpt2", {}),                                         # a tied head
])
def test_the_labelled_head_gives_transformers_loss_and_gradients(arch, cfg):
    st = Settings(precision="fp32", batch_size=2, seq_len=64, lora_rank=0)
    batch = _batch(SMALL[arch]["vocab_size"])
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    results = []
    for labelled in (False, True):
        torch.manual_seed(0)
        model, _ = build_model({**SMALL[arch], **cfg}, st)
        if labelled:
            assert install_labelled_head(model)
        loss = model(**batch, num_items_in_batch=n_items).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_class_without_logits_to_keep_keeps_the_standard_loss():
    class Plain(torch.nn.Module):
        def forward(self, input_ids=None, labels=None):
            return input_ids
    assert install_labelled_head(Plain()) is False


@pytest.mark.parametrize("arch, prec, rank, ckpt", [
    ("llama", "fp32", 8, False),
    ("llama", "bf16-pure", 0, True),
    ("gemma2", "bf16-pure", 8, False),
])
def test_the_labelled_head_is_predicted_within_2_percent_on_real_cpu_steps(arch, prec, rank, ckpt):
    st = Settings(kernels="cpu", precision=prec, batch_size=2, seq_len=256, lora_rank=rank, grad_checkpointing=ckpt,
                  head_tokens=51)
    est = estimate(ModelSpec.from_config(measured_config(SMALL[arch])), st)
    m = measure(SMALL[arch], st, fake=False)
    assert abs(est.peak_bytes - m.peak_bytes) / m.peak_bytes < 0.02, (est.peak_bytes, m.peak_bytes)
    # the logits are a tenth of the full ones: the step is smaller than at every position
    full = estimate(ModelSpec.from_config(measured_config(SMALL[arch])), Settings(**{**st.__dict__, "head_tokens": 0}))
    assert est.components["logits"] < full.components["logits"] / 5


@pytest.mark.slow
def test_the_estimate_at_every_position_bounds_every_labelled_head_step():
    """Plans are made at every position (head_tokens 0: the data's labels are not known when a
    plan is made), so a run that scores fewer never needs more than planned, on every case of
    tables/validation.csv's head suite; and each case is within 5%."""
    from dataclasses import replace

    from planner.measure.validate import HEAD_CASES
    for arch, prec, rank, ckpt in HEAD_CASES:
        st = Settings(kernels="cpu", precision=prec, batch_size=2, seq_len=256, lora_rank=rank, grad_checkpointing=ckpt,
                      head_tokens=51)
        spec = ModelSpec.from_config(measured_config(SMALL[arch]))
        m = measure(SMALL[arch], st, fake=False)
        assert estimate(spec, replace(st, head_tokens=0)).peak_bytes > m.peak_bytes, arch
        assert abs(estimate(spec, st).peak_bytes - m.peak_bytes) / m.peak_bytes < 0.05, (arch, prec, rank, ckpt)


@pytest.mark.parametrize("kw, key", [
    ({"batch_size": 2, "seq_len": 8, "head_tokens": 15}, "head_tokens"),    # more than 2 x 7 positions
    ({"head_tokens": -1}, "head_tokens"),
    ({"head_tokens": 5, "loss": "chunked"}, "head_tokens"),
])
def test_impossible_head_tokens_are_one_line(kw, key):
    with pytest.raises(PlanError) as e:
        check_options(Settings(**kw))
    assert e.value.field == key


def test_an_encoder_refuses_head_tokens():
    spec = ModelSpec.from_config(measured_config(SMALL["bert"]))
    with pytest.raises(PlanError, match="classification head"):
        estimate(spec, Settings(batch_size=2, seq_len=64, head_tokens=10))
