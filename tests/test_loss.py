"""The loss option (issue 17): standard, Liger's fused linear cross-entropy, Cut Cross-Entropy,
torchtune's chunked cross-entropy and TRL's chunked log-probability head (issue 20), each
modelled from what its library keeps (planner/memory.py: loss_bytes), echoed in JSON and the
recipe, and the chunked one and TRL's torch tiles measured."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from helpers import run_plan

from planner.contract import UNMEASURED_FUSED, Loss, PlanError, Settings
from planner.estimate import estimate
from planner.memory import TRL_TOKEN_TILE, TRL_VOCAB_TILE, liger_flce_chunk_rows, loss_bytes
from planner.resolve import catalog
from planner.spec import ModelSpec


def _spec(name: str) -> ModelSpec:
    return ModelSpec.from_config(catalog()[name]["config"])


LLAMA3 = "meta-llama/Meta-Llama-3-8B"


def test_liger_chunks_rows_so_a_chunk_of_logits_is_about_the_input():
    # Llama-3: V = 128256, H = 4096, inc_factor = cdiv(V, H) = 32; 4 x 4096 tokens -> 512 rows
    spec = _spec(LLAMA3)
    assert liger_flce_chunk_rows(spec, Settings(batch_size=4, seq_len=4096)) == 512
    # a power of two, never above the tokens
    assert liger_flce_chunk_rows(spec, Settings(batch_size=1, seq_len=20)) == 1
    assert liger_flce_chunk_rows(spec, Settings(batch_size=1, seq_len=100)) == 4


@pytest.mark.parametrize("loss", ["liger-flce", "cce"])
def test_fused_losses_never_build_the_logits(loss):
    spec = _spec("google/gemma-2-2b")
    st = Settings(precision="bf16-amp", batch_size=4, seq_len=4096)
    tv = st.tokens * spec.vocab
    std, fused = loss_bytes(spec, st), loss_bytes(spec, replace(st, loss=loss))
    assert std.forward > 2 * 4 * tv          # the fp32 copy and the log-softmax, B x S x vocab each
    # no B x S x vocab tensor: what more tokens add grows with the hidden size, not the vocabulary
    longer = replace(st, seq_len=8192)
    std2, fused2 = loss_bytes(spec, longer), loss_bytes(spec, replace(longer, loss=loss))
    for phase in ("forward", "backward", "saved"):
        assert getattr(fused2, phase) - getattr(fused, phase) < 0.05 * (getattr(std2, phase) - getattr(std, phase))
    a, b = estimate(spec, st), estimate(spec, replace(st, loss=loss))
    assert b.components["logits"] < a.components["logits"] / 10
    assert any(UNMEASURED_FUSED in n for n in b.notes)


def test_liger_keeps_the_gradients_it_computes_in_the_forward():
    spec = _spec(LLAMA3)
    st = Settings(precision="bf16-pure", batch_size=1, seq_len=2048, loss="liger-flce")
    lg = loss_bytes(spec, st)
    grad_input, grad_weight = 2 * st.tokens * spec.hidden, 2 * spec.vocab * spec.hidden
    assert lg.saved == grad_input + grad_weight
    lora = loss_bytes(spec, replace(st, lora_rank=16))  # a frozen head: no grad_weight
    assert lora.saved == grad_input


def test_chunked_with_one_chunk_is_the_standard_forward_and_more_chunks_cut_the_upcast():
    spec = _spec(LLAMA3)
    st = Settings(precision="bf16-pure", batch_size=2, seq_len=4096, lora_rank=16)
    std = loss_bytes(spec, st)
    one = loss_bytes(spec, replace(st, loss="chunked", loss_chunks=1))
    assert one.forward == std.forward and one.saved == std.saved
    eight = loss_bytes(spec, replace(st, loss="chunked"))
    tv = st.tokens * spec.vocab
    assert eight.saved == std.saved            # eager: every chunk's fp32 log-softmax is kept
    assert std.forward - eight.forward == 4 * tv - 4 * tv // 8
    assert std.backward - eight.backward == 8 * tv - 8 * tv // 8


def test_encoders_refuse_a_causal_lm_loss():
    spec = ModelSpec.from_config(catalog()["bert-base-cased"]["config"])
    with pytest.raises(PlanError, match="classification head"):
        estimate(spec, Settings(seq_len=128, loss="chunked"))


def test_chunked_loss_measured_within_5_percent_and_below_the_standard():
    """A real step of the small Llama under MemTracker (fake tensors), with torchtune's loss."""
    import importlib.util
    if importlib.util.find_spec("torchtune") is None:
        pytest.skip("torchtune not installed")
    from planner.measure.builder import measured_config
    from planner.measure.simulate import measure
    from planner.measure.validate import SMALL
    cfg = SMALL["llama"]
    spec = ModelSpec.from_config(measured_config(cfg))
    st = Settings(kernels="cpu", precision="bf16-amp", batch_size=2, seq_len=256)
    chunked = replace(st, loss="chunked")
    m_std, m_chunked = measure(cfg, st), measure(cfg, chunked)
    assert m_chunked.peak_bytes < m_std.peak_bytes
    est = estimate(spec, chunked).peak_bytes
    assert abs(est - m_chunked.peak_bytes) / m_chunked.peak_bytes < 0.05


def test_cli_echoes_the_loss_in_json():
    shape = ("--precision", "bf16-amp", "--lora-rank", "16", "--batch-size", "2", "--seq-len", "8192")
    r = run_plan("estimate", LLAMA3, *shape, "--loss", "chunked", "--loss-chunks", "4", "--json",
                 env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["loss"], d["loss_chunks"], d["loss_validation"]) == ("chunked", 4, "measured")
    r = run_plan("estimate", LLAMA3, *shape, "--loss", "liger-flce", "--json", env={"HF_HUB_OFFLINE": "1"})
    d2 = json.loads(r.stdout)
    assert d2["loss"] == "liger-flce" and d2["loss_validation"] == UNMEASURED_FUSED
    assert d2["peak_bytes"] < d["peak_bytes"] - 8 * 2 * 8192 * 128256  # at least the chunks' fp32 log-softmax


@pytest.mark.parametrize("loss", [m.value for m in Loss])
def test_recipe_keys_round_trip(loss):
    from planner.recipe import from_dict, recipe_loss_keys, settings
    st = Settings(loss=loss, loss_chunks=4)
    r = from_dict({"base_model": "x", **recipe_loss_keys(st)})
    got = settings(r)
    assert got.loss == loss
    if loss == "chunked":
        assert got.loss_chunks == 4


def test_emitted_recipe_turns_the_loss_on(tmp_path):
    r = run_plan("emit-config", LLAMA3, "--gpus", "1", "--loss", "cce", "--out", str(tmp_path / "p"),
                 env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "p" / "recipe.yaml").read_text()
    assert "cut_cross_entropy: true" in text


def test_a_missing_loss_library_is_one_line_naming_what_to_install(monkeypatch):
    import sys

    from planner.measure.builder import LossLibraryMissing, _fused_loss, torchtune_chunked_loss
    monkeypatch.setitem(sys.modules, "torchtune", None)
    with pytest.raises(LossLibraryMissing, match=r"pip install torchtune"):
        torchtune_chunked_loss()
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    with pytest.raises(LossLibraryMissing, match=r"needs cut-cross-entropy \(pip install cut-cross-entropy\)"):
        _fused_loss(Settings(loss="cce"))


def test_liger_without_triton_says_where_it_runs():
    import importlib.util
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is not None:
        pytest.skip("needs liger-kernel installed without Triton (this CPU machine)")
    from planner.measure.builder import LossLibraryMissing, _fused_loss
    with pytest.raises(LossLibraryMissing, match="needs Triton on a CUDA GPU"):
        _fused_loss(Settings(loss="liger-flce"))


# ---------------------------------------------------------------- TRL's chunked log-prob head

def test_trl_tiles_are_the_installed_trls():
    pytest.importorskip("trl")
    from trl.kernels import chunked_logprob
    from trl.trainer import utils
    assert (TRL_TOKEN_TILE, TRL_VOCAB_TILE) == (chunked_logprob.TOKEN_CHUNK_SIZE, utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def test_trl_head_never_builds_the_logits_and_its_cpu_tiles_cost_more_than_triton():
    spec = _spec(LLAMA3)
    st = Settings(precision="bf16-amp", batch_size=4, seq_len=4096, lora_rank=16, loss="trl")
    cuda, cpu = loss_bytes(spec, st), loss_bytes(spec, replace(st, kernels="cpu"))
    # past one tile of rows, more tokens add per-row bytes only (no B x S x vocab tensor)
    longer = replace(st, seq_len=8192)
    std, std2 = loss_bytes(spec, replace(st, loss="standard")), loss_bytes(spec, replace(longer, loss="standard"))
    for phase in ("forward", "backward", "saved"):
        grew = getattr(loss_bytes(spec, longer), phase) - getattr(cuda, phase)
        assert 0 < grew < 0.05 * (getattr(std2, phase) - getattr(std, phase))
    # the torch fold's fp32 tile temporaries (TRL_BACKWARD_TILE_BYTES per element) exist on CPU only
    assert cpu.backward - cuda.backward >= 29 * TRL_TOKEN_TILE * TRL_VOCAB_TILE
    assert any("loss trl" in n and UNMEASURED_FUSED in n for n in estimate(spec, st).notes)
    assert any("loss trl" in n and "measured" in n for n in estimate(spec, replace(st, kernels="cpu")).notes)


@pytest.mark.parametrize("vocab, batch, seq, precision, rank", [
    (33000, 2, 64, "bf16-amp", 8),  # two vocabulary tiles (32768 + 232): autocast's per-tile casts, LoRA
    (2000, 3, 1400, "fp32", 0),     # two token tiles (4096 + 101 rows), the head trained
])
def test_trl_head_formula_against_a_real_cpu_step(vocab, batch, seq, precision, rank):
    """A training step on real CPU tensors under MemTracker of a small Llama whose forward TRL's
    own add_fused_lm_head patched, as SFTTrainer does (planner.measure.builder.install_trl_head):
    ChunkedLogProbFunction's torch tiles, which set the step's peak."""
    pytest.importorskip("trl")
    from planner.measure.builder import measured_config
    from planner.measure.simulate import measure
    from planner.measure.validate import SMALL
    cfg = {**SMALL["llama"], "vocab_size": vocab, "max_position_embeddings": max(seq, 1024)}
    st = Settings(kernels="cpu", precision=precision, batch_size=batch, seq_len=seq, lora_rank=rank, loss="trl")
    spec = ModelSpec.from_config(measured_config(cfg))
    measured = measure(cfg, st, fake=False).peak_bytes
    predicted = estimate(spec, st).peak_bytes
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)
    assert loss_bytes(spec, st).backward > 0.5 * measured  # the head's tiles, not the model, are measured here
