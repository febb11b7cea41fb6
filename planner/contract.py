"""The contract every layer speaks: the choices, the settings of one run, and the error for a run
that cannot be.

Every list of choices is an Enum here, defined once; the CLI's `--help`, the recipe's schema,
the option checks and the formulas derive from these. Settings keep plain strings (the Enum
values), so a Settings is what JSON and the recipe hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum


class Choice(str, Enum):
    """A choice whose value is the string users type."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Precision(Choice):
    """Precision recipes (bytes per element in planner/precision.py: RECIPES)."""
    FP32 = "fp32"
    FP16_AMP = "fp16-amp"
    BF16_AMP = "bf16-amp"
    BF16_PURE = "bf16-pure"
    FP8_AO = "fp8-ao"
    FP8_TE = "fp8-te"
    MSAMP_O1 = "msamp-o1"
    MSAMP_O2 = "msamp-o2"
    MSAMP_O3 = "msamp-o3"


class Dtype(Choice):
    """`--dtype`: the short names, each one precision recipe (DTYPE_TO_RECIPE)."""
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"


DTYPE_TO_RECIPE = {"fp32": "fp32", "fp16": "fp16-amp", "bf16": "bf16-amp", "fp8": "fp8-ao"}
"""`--dtype fp8` is torchao's float8 training: accelerate's first choice for `mixed_precision="fp8"`
when torchao is installed (AO, then TE, then MS-AMP), and the FP8 route measured here."""

FP8_LIBRARIES = {"fp8-ao": "torchao", "fp8-te": "transformer-engine"}
"""The FP8 precision recipes -> the library whose linears compute in FP8 (accelerate's
`fp8_backend` AO and TE; planner/memory.py counts what each keeps)."""
UNMEASURED_TE = "unmeasured: Transformer Engine needs CUDA to install and to run (its FP8 GEMMs)"
"""What the estimate says of fp8-te: modelled from TransformerEngine's source, not measured here."""
MSAMP_NOTE = ("MS-AMP is no longer maintained (accelerate deprecates it and will remove it): modelled from "
              "accelerate's table of its states, unmeasured; use fp8-ao (torchao) or fp8-te (Transformer Engine)")
"""What the estimate says of the MS-AMP recipes."""


def precision_validation(precision: str) -> str:
    """Whether a precision recipe's formulas are measured here ("measured"), or why not."""
    if precision == "fp8-te":
        return UNMEASURED_TE
    if precision.startswith("msamp"):
        return "unmeasured: " + MSAMP_NOTE
    return "measured"


class Optimizer(Choice):
    """Optimizers the estimate counts and the builder (planner/measure/builder.py: make_optimizer)
    builds; each is measured (tables/validation.csv)."""
    ADAMW = "adamw"
    ADAMW_FUSED = "adamw-fused"
    ADAMW_8BIT = "adamw-8bit"
    ADAMW_32BIT = "adamw-32bit"
    SGD = "sgd"
    SGD_MOMENTUM = "sgd-momentum"
    ADAFACTOR = "adafactor"
    LION = "lion"
    LION_8BIT = "lion-8bit"
    LBFGS = "lbfgs"  # torch.optim.LBFGS, one closure evaluation per step (max_iter=1), `lbfgs_history` pairs


BNB_OPTIMIZERS = ("adamw-8bit", "adamw-32bit", "lion", "lion-8bit")
"""The bitsandbytes optimizers, the ones with paged variants."""

OPTIMIZER_NAMES = {
    "adamw_torch": ("adamw", False), "adamw_torch_fused": ("adamw-fused", False),
    "adamw_bnb_8bit": ("adamw-8bit", False), "adamw_8bit": ("adamw-8bit", False),
    "paged_adamw_8bit": ("adamw-8bit", True), "paged_adamw_32bit": ("adamw-32bit", True),
    "lion_8bit": ("lion-8bit", False), "lion_32bit": ("lion", False),
    "paged_lion_8bit": ("lion-8bit", True), "paged_lion_32bit": ("lion", True),
    "adafactor": ("adafactor", False), "sgd": ("sgd", False),
}
"""The names users type (HF Trainer's `optim`, Axolotl's `optimizer`) -> (the Optimizer the
formulas count, paged). The one place they are mapped: the CLI, the recipe and the builder
read it through `optimizer_choice`. `paged_*` are bitsandbytes' paged optimizers: the state is
allocated in CUDA unified memory, which the driver moves to host RAM only under memory pressure,
so the GPU holds the same state as the unpaged optimizer."""

OptimizerName = Choice("OptimizerName", {**{m.name: m.value for m in Optimizer},
                                         **{f"USERS_{k.upper()}": k for k in OPTIMIZER_NAMES
                                            if k not in Optimizer.values()}})
"""Every name `--optimizer` and the recipe's `optimizer` accept: the contract's and users' names."""

DERIVED_NOTE = ("route derived: no formula for this model_type; the memory from coefficients measured on its "
                "transformers module (planner/measure/derived.py)")
"""What a plan of a model without a formula says of where its memory figures come from (recommend's
table, emit-config's PLAN.md, plan train --auto)."""

PAGED_NOTE = ("paged optimizer (bitsandbytes): the GPU holds the same state; paging moves it to host RAM only under "
              "memory pressure, so it is counted on the GPU")


def optimizer_name(optimizer: str, paged: bool) -> str:
    """The name a recipe writes for an optimizer: the contract's, or the paged variant's users' name."""
    if not paged:
        return optimizer
    return next(k for k, v in OPTIMIZER_NAMES.items() if v == (optimizer, True))


def optimizer_choice(name: str) -> tuple[str, bool]:
    """(the Optimizer value, paged) for any name users type; an unknown name is returned as it is
    (the option checks refuse it with the list)."""
    return OPTIMIZER_NAMES.get(name, (name, False))


class Loss(Choice):
    """The loss over the output head, each modelled from what its library keeps
    (planner/memory.py: loss_bytes): transformers' cross-entropy over the whole logits; Liger
    Kernel's fused linear cross-entropy (logits one chunk of rows at a time, Triton); Apple's Cut
    Cross-Entropy (no logits, a log-sum-exp per row, Triton); torchtune's CEWithChunkedOutputLoss
    (the head and the fp32 upcast per chunk of positions, plain torch; `loss_chunks` chunks);
    TRL's chunked log-probability head (`add_fused_lm_head`, what TRL's SFTTrainer runs: the head
    in tiles of 4096 tokens x 32768 vocabulary entries, a Triton kernel on CUDA, torch ops on CPU)."""
    STANDARD = "standard"
    LIGER_FLCE = "liger-flce"
    CCE = "cce"
    CHUNKED = "chunked"
    TRL = "trl"


FUSED_LOSSES = ("liger-flce", "cce")
"""Losses whose kernel multiplies the head itself and never builds the logits: Triton, CUDA only."""
HEAD_LOSSES = (*FUSED_LOSSES, "trl")
"""Losses that take the head's weight and the hidden states and never build the B x S x vocab
logits: the fused ones, and TRL's chunked log-probability head (which also runs on CPU)."""
UNMEASURED_FUSED = "unmeasured on CPU: needs CUDA (Triton kernel)"
"""What the estimate says of a fused loss: its formula is read from the library's source, and
its kernel cannot run on this CPU-only machine."""


def loss_unmeasured(st: Settings) -> bool:
    """Whether the loss's modelled path runs a Triton kernel, which this CPU-only machine cannot
    measure: the fused losses always, TRL's head on CUDA kernels (its CPU path is torch ops)."""
    return st.loss in FUSED_LOSSES or (st.loss == "trl" and st.kernels == "cuda")
LOSS_CHUNKS = 8
"""torchtune's default `num_output_chunks` (CEWithChunkedOutputLoss)."""

ACTIVATION_OFFLOAD = "activation_offload"
"""The one name of activation offloading: the Settings field, `--activation-offload`, and the
recommend technique's settings. Modelled on TRL's `OffloadActivations` through
`get_act_offloading_ctx_manager` (trl/models/activation_offloading.py), what Axolotl's
`activation_offloading: true` and TRL's `SFTConfig(activation_offloading=True)` run, a copy of
torchtune's `enable_activation_offloading` (torchtune/training/_activation_offloading.py);
planner/memory.py: offloaded_activations."""
UNMEASURED_OFFLOAD = ("the GPU-side bytes under activation offloading are unmeasured: TRL's and torchtune's "
                      "OffloadActivations create CUDA streams when built and skip tensors that are not on a GPU, so "
                      "they cannot run on a CPU; what they move to host RAM is measured (tables/validation.csv)")
"""What the estimate says of activation offloading on a machine without a CUDA GPU."""


class Quant(Choice):
    """The stored base of a LoRA run: unquantised, bitsandbytes LLM.int8 or NF4 (QLoRA)."""
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class Strategy(Choice):
    DDP = "ddp"
    FSDP = "fsdp"
    FSDP_GRAD_OP = "fsdp-grad-op"
    FSDP_HYBRID = "fsdp-hybrid"
    FSDP_NO_SHARD = "fsdp-no-shard"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"


class Offload(Choice):
    NONE = "none"
    OPTIMIZER = "optimizer"
    PARAMS = "params"
    ALL = "all"
    NVME = "nvme"


class Attention(Choice):
    SDPA = "sdpa"
    FLASH = "flash"
    EAGER = "eager"


class Method(Choice):
    """What trains: every weight, LoRA adapters on a 16-bit base, or adapters on an NF4 base."""
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class DataFormat(Choice):
    """How a dataset's records read (planner/data.py): instruction/output pairs, chat messages
    (the tokenizer's template), plain text, or text with a label."""
    ALPACA = "alpaca"
    CHAT = "chat"
    COMPLETION = "completion"
    CLASSIFICATION = "classification"


class Kernels(Choice):
    """Whose kernels and autocast op lists the formulas model: the CUDA target, or the CPU the
    simulator measures on."""
    CUDA = "cuda"
    CPU = "cpu"


COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "other")
"""The memory components of an estimate and of a measurement (shared/CONTRACT.md), in the order
tables show them."""
FSDP_VERSIONS = (1, 2)
STRATEGIES = Strategy.values()
FSDP = tuple(s for s in STRATEGIES if s.startswith("fsdp"))
ZERO = tuple(s for s in STRATEGIES if s.startswith("zero"))
QUANT_PRECISIONS = ("bf16-amp", "fp16-amp", "bf16-pure", "fp32")
"""Precisions a bitsandbytes base computes in (its compute dtype and the adapters' autocast)."""
SWEEP_PRECISIONS = ("fp32", "fp16-amp", "bf16-amp", "bf16-pure", "fp8-ao")
"""The rows of `plan estimate` without --dtype or --precision: the precisions users choose
(fp32; fp16 and bf16 autocast over fp32 weights, accelerate's and HF Trainer's mixed precision;
pure bf16, what transformers 5 loads a bf16 checkpoint in and torchtune and Axolotl train in;
torchao's float8, `--dtype fp8`)."""


# ---------------------------------------------------------------- errors

class PlanError(ValueError):
    """Options that describe no possible run: one line naming what to change.

    The text names options as `{field}` (a Settings field, or another option of the same edge,
    such as `{global_batch}`), and each edge words them its own way: `str(err)` gives the CLI's
    flags (`--seq-len`), `err.render(names)` another vocabulary (a recipe's `sequence_len`).
    `field` is the option the error is about, where there is one.
    """

    def __init__(self, text: str, field: str | None = None):
        super().__init__(text)
        self.text = text
        self.field = field

    def render(self, names: Mapping[str, str] | None = None) -> str:
        return self.text.format_map(_Names(names or {}))

    def __str__(self) -> str:
        return self.render()


class _Names(dict):
    def __init__(self, names: Mapping[str, str]):
        super().__init__(names)

    def __missing__(self, key: str) -> str:
        return "--" + key.replace("_", "-")


# ---------------------------------------------------------------- settings

EMA_DECAY = 0.999
"""The EMA's decay when a plan keeps one and names none (`--ema` in emit-config's recipe, the
simulator's `make_ema`); memory does not depend on it."""


@dataclass(frozen=True)
class Settings:
    precision: str = "bf16-amp"
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 2048
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    quant: str = "none"
    grad_checkpointing: bool = False
    attn: str = "sdpa"
    gpus: int = 1
    nodes: int = 1
    strategy: str = "ddp"
    offload: str = "none"
    fsdp_version: int = 2
    # micro-steps per optimizer step: from the second on, every gradient is alive through the
    # forward and backward (accumulated in place)
    accumulation: int = 1
    # Whose kernels and autocast op lists to model: "cuda" (the target) or "cpu" (the machine the
    # simulator measures on). They differ for attention with dropout and for a few autocast ops.
    kernels: str = "cuda"
    # a bitsandbytes optimizer's paged variant (OPTIMIZER_NAMES): the same state on the GPU
    optimizer_paged: bool = False
    # the loss over the output head (Loss), and the chunks of the chunked one
    loss: str = "standard"
    loss_chunks: int = LOSS_CHUNKS
    # partial freezing (Axolotl's `unfrozen_parameters`): regexes searched in parameter names;
    # only matching parameters train, every other one is frozen. Empty: no freezing.
    unfrozen_parameters: tuple[str, ...] = ()
    # an exponential moving average of the trainable parameters (torch's AveragedModel with
    # get_ema_multi_avg_fn): one more copy of them, in their storage dtype
    ema: bool = False
    # torch.optim.LBFGS's history_size: the (y, s) pairs of flat vectors it keeps (its default, 100)
    lbfgs_history: int = 100
    # activation offloading (ACTIVATION_OFFLOAD): the saved activations go to host RAM in the
    # forward and come back in the backward; with checkpointing, the checkpointed blocks' inputs
    activation_offload: bool = False
    # the micro-batch carries an attention mask: padded rows (a 0 in the 2-D mask) or packed rows
    # (position ids that restart). transformers then gives SDPA an explicit 4-D mask and repeats
    # GQA's k and v (planner/memory.py: sdpa_mask_bytes). False: full rows, causal, as the
    # simulator and the accuracy table measure them
    attention_mask: bool = False
    # the positions of a micro-batch the output head and the standard loss score: 0, every one
    # (B x S); k > 0, only the k whose next token has a label, as `plan train` runs its loss
    # (transformers' `logits_to_keep` with a boolean mask: planner/measure/builder.py:
    # install_labelled_head)
    head_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def logit_rows(self) -> int:
        """The rows of logits the head makes: every position, or the `head_tokens` it scores."""
        return self.head_tokens or self.tokens

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0


def world_size(st: Settings) -> int:
    return st.gpus * st.nodes


def shard_size(st: Settings) -> int:
    """Ranks one parameter is split over. FULL_SHARD, SHARD_GRAD_OP and ZeRO shard over the
    world; HYBRID_SHARD shards within a node and replicates across nodes; NO_SHARD (FSDP2: a
    replicate-only mesh) keeps everything whole."""
    if st.strategy == "fsdp-hybrid":
        return st.gpus
    if st.strategy in ("fsdp-no-shard", "ddp"):
        return 1
    return world_size(st)


_CHOICES = {"precision": Precision, "optimizer": Optimizer, "quant": Quant, "attn": Attention,
            "strategy": Strategy, "offload": Offload, "kernels": Kernels, "loss": Loss}


def _check_choice(st: Settings, name: str) -> None:
    enum = _CHOICES[name]
    value = getattr(st, name)
    if value not in enum.values():
        label = "{attn}" if name == "attn" else name
        raise PlanError(f"unknown {label} '{value}'; choose one of {', '.join(enum.values())}", name)


def check_options(st: Settings) -> Settings:
    """Reject options that are impossible for any model, with one clear line."""
    for name in _CHOICES:
        _check_choice(st, name)
    for name in ("batch_size", "seq_len", "gpus", "nodes", "accumulation", "loss_chunks", "lbfgs_history"):
        if getattr(st, name) < 1:
            raise PlanError(f"{{{name}}} must be at least 1, got {getattr(st, name)}", name)
    if st.optimizer_paged and st.optimizer not in BNB_OPTIMIZERS:
        raise PlanError(f"{{optimizer}} {st.optimizer} has no paged variant (bitsandbytes' do: "
                        f"{', '.join(BNB_OPTIMIZERS)})", "optimizer")
    if st.lora_rank < 0:
        raise PlanError(f"{{lora_rank}} must be 0 (full fine-tune) or positive, got {st.lora_rank}", "lora_rank")
    if st.lora_alpha is not None and not (0 < st.lora_alpha < math.inf):
        raise PlanError(f"{{lora_alpha}} must be positive, got {st.lora_alpha:g}", "lora_alpha")
    if not 0 <= st.lora_dropout < 1:
        raise PlanError(f"{{lora_dropout}} must be in [0, 1), got {st.lora_dropout}", "lora_dropout")
    if st.quant != "none" and not st.lora:
        raise PlanError(f"{{quant}} {st.quant} freezes the base weights: add {{lora_rank}} (QLoRA) to train adapters",
                        "quant")
    if st.quant != "none" and st.precision not in QUANT_PRECISIONS:
        raise PlanError(f"{{quant}} {st.quant} cannot be combined with {{precision}} {st.precision}", "quant")
    if not 0 <= st.head_tokens <= st.batch_size * (st.seq_len - 1):
        raise PlanError(f"{{head_tokens}} must be 0 (every position) or at most batch x (seq_len - 1) = "
                        f"{st.batch_size * (st.seq_len - 1)}, the positions a next token follows; got {st.head_tokens}",
                        "head_tokens")
    if st.head_tokens and st.loss != "standard":
        raise PlanError(f"{{head_tokens}} scores the labelled positions with the standard loss; {{loss}} {st.loss} "
                        "runs its own head", "head_tokens")
    check_unfrozen(st)
    check_fp8(st)
    if st.optimizer == "lbfgs" and st.strategy != "ddp":
        raise PlanError(f"{{optimizer}} lbfgs under {{strategy}} {st.strategy} is not modelled: its flat vectors "
                        "span every parameter (one GPU or DDP)", "optimizer")
    if st.activation_offload and st.unfrozen_parameters:
        raise PlanError("{activation_offload} with {unfrozen_parameters} is not modelled", "activation_offload")
    if st.activation_offload and st.strategy != "ddp":
        raise PlanError(f"{{activation_offload}} under {{strategy}} {st.strategy} is not modelled: one GPU or DDP",
                        "activation_offload")
    if st.ema and st.strategy != "ddp":
        raise PlanError(f"{{ema}} under {{strategy}} {st.strategy} is not modelled: one GPU or DDP", "ema")
    check_strategy(st)
    return st


def check_fp8(st: Settings) -> None:
    """The FP8 recipes (FP8_LIBRARIES) are modelled for full fine-tuning on one GPU or DDP: the
    FP8 modules of a LoRA base, a partly frozen model or a sharded one keep other tensors."""
    if st.precision not in FP8_LIBRARIES:
        return
    what = ("{lora_rank}" if st.lora else "{unfrozen_parameters}" if st.unfrozen_parameters else
            f"{{strategy}} {st.strategy}" if st.strategy != "ddp" else
            "{activation_offload}" if st.activation_offload else None)
    if what:
        raise PlanError(f"{{precision}} {st.precision} with {what} is not modelled: FP8 training is modelled for "
                        "full fine-tuning on one GPU or DDP", "precision")


def check_unfrozen(st: Settings) -> None:
    """`unfrozen_parameters`: regular expressions that compile, not under FSDP1 (FSDP2 and ZeRO
    shard only what trains: planner/distributed.py). With LoRA they name PEFT's
    `modules_to_save` (planner/memory.py: modules_to_save)."""
    import re
    for pat in st.unfrozen_parameters:
        try:
            re.compile(pat)
        except re.error as e:
            raise PlanError(f"{{unfrozen_parameters}} '{pat}' is not a regular expression ({e})",
                            "unfrozen_parameters") from None
    if st.unfrozen_parameters and st.strategy.startswith("fsdp") and st.fsdp_version == 1:
        raise PlanError("{unfrozen_parameters} under {fsdp_version} 1 is not modelled: FSDP1 flattens a unit's "
                        "frozen and trainable parameters into one FlatParameter; use --fsdp-version 2",
                        "unfrozen_parameters")


def check_strategy(st: Settings) -> None:
    """Combinations the engines do not offer, each with the one that does."""
    if st.strategy == "ddp" and st.offload != "none":
        raise PlanError(f"{{offload}} {st.offload} needs a sharded strategy: DDP keeps everything on the GPU "
                        "(use {strategy} zero2 {offload} optimizer, or fsdp {offload} all)", "offload")
    if st.strategy in FSDP and st.offload == "optimizer":
        raise PlanError("FSDP offloads parameters, gradients and optimizer state together: use {offload} all "
                        "(or DeepSpeed {strategy} zero2/zero3 {offload} optimizer)", "offload")
    if st.strategy in FSDP and st.offload == "nvme":
        raise PlanError("FSDP cannot offload to NVMe: use {strategy} zero3 {offload} nvme", "offload")
    if st.strategy in ("zero1", "zero2") and st.offload in ("params", "all"):
        raise PlanError(f"{{offload}} {st.offload}: DeepSpeed offloads parameters only under ZeRO-3 "
                        f"(use {{strategy}} zero3, or {{offload}} optimizer with {st.strategy})", "offload")
    if st.fsdp_version not in FSDP_VERSIONS:
        raise PlanError(f"{{fsdp_version}} must be 1 or 2, got {st.fsdp_version}", "fsdp_version")
    if st.strategy == "fsdp-hybrid" and st.nodes < 2:
        raise PlanError("{strategy} fsdp-hybrid shards within a node and replicates across nodes: "
                        "it needs {nodes} 2 or more", "nodes")
    if st.strategy == "zero3" and st.quant != "none":
        raise PlanError("ZeRO-3 cannot partition bitsandbytes 4/8-bit weights: use zero2 or FSDP for QLoRA", "quant")
