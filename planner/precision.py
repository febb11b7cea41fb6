"""Precision recipes, optimizers and quantised bases: bytes per element, from their sources.

Each recipe says how many bytes a parameter, its gradient, a master copy and an activation take.
The FP8 rows name the library whose linears compute in FP8 (torchao's Float8Linear,
Transformer Engine's te.Linear); what those keep is counted in planner/memory.py.
The MS-AMP rows follow the table in accelerate's low-precision training guide
(docs/source/usage_guides/low_precision_training.md), reproduced in shared/seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import FP8_LIBRARIES


@dataclass(frozen=True)
class Recipe:
    name: str
    weight: float       # bytes per stored parameter
    master: float       # bytes per fp32/fp16 master copy kept beside low-precision weights
    grad: float         # bytes per gradient element of a trainable parameter
    compute: int        # bytes per activation element produced by matmuls
    autocast: bool      # weights stay in full precision and torch.autocast casts per op
    state: float | None = None  # optimizer state bytes per moment, None = same dtype as the parameter
    state2: float | None = None  # second moment, where the recipe stores it differently (MS-AMP: FP8 + FP16)
    fp8: str = ""       # the library whose linears compute in FP8 (contract.FP8_LIBRARIES), "" for none


RECIPES = {
    "fp32": Recipe("fp32", 4, 0, 4, 4, False),
    "fp16-amp": Recipe("fp16-amp", 4, 0, 4, 2, True),
    "bf16-amp": Recipe("bf16-amp", 4, 0, 4, 2, True),
    "bf16-pure": Recipe("bf16-pure", 2, 0, 2, 2, False),
    # torchao float8 training as accelerate runs it (mixed_precision fp8, AORecipeKwargs): fp32
    # weights, gradients and Adam states, bf16 autocast, Float8Linear casting per linear
    # (planner/memory.py: fp8_ao_* terms).
    "fp8-ao": Recipe("fp8-ao", 4, 0, 4, 2, True, 4, 4, fp8=FP8_LIBRARIES["fp8-ao"]),
    # Transformer Engine FP8 as accelerate runs it (mixed_precision fp8, TERecipeKwargs): FP32
    # weights and gradients, FP32 Adam states (accelerate table: "Nvidia TE | FP8 | FP32 | FP32 |
    # N/A | FP32 | FP32+FP32"), te.Linear keeping FP8 inputs and weights (planner/memory.py: fp8_te_*).
    "fp8-te": Recipe("fp8-te", 4, 0, 4, 2, True, 4, 4, fp8=FP8_LIBRARIES["fp8-te"]),
    # MS-AMP O1: FP16 weights, FP8 weight gradients, FP32+FP32 optimizer states.
    "msamp-o1": Recipe("msamp-o1", 2, 0, 1, 2, False, 4, 4),
    # MS-AMP O2: as O1 with FP8 first moment and FP16 second moment.
    "msamp-o2": Recipe("msamp-o2", 2, 0, 1, 2, False, 1, 2),
    # MS-AMP O3: FP8 weights, FP16 master weights, FP8 gradients, FP8+FP16 states.
    "msamp-o3": Recipe("msamp-o3", 1, 2, 1, 2, False, 1, 2),
}


# bitsandbytes 8-bit optimizers keep tensors smaller than this in 32-bit state
# (bitsandbytes.optim.optimizer.Optimizer8bit: min_8bit_size=4096) and quantise the rest
# blockwise with one fp32 absmax per 256 values (blocksize 256 in optimizer_update_8bit_blockwise).
BNB_MIN_8BIT_SIZE = 4096
BNB_OPT_BLOCK = 256
# bitsandbytes Linear4bit (NF4): two 4-bit values per byte, blocksize 64, one absmax per block;
# with double quantisation (bnb_4bit_use_double_quant) the absmax is stored as uint8 with one
# fp32 second-level scale per 256 blocks (bitsandbytes.functional.quantize_4bit).
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256


def quantized_weight_bytes(n: int, quant: str, out_features: int, double_quant: bool = True) -> float:
    """Bytes bitsandbytes stores for one linear weight of `n` elements.

    nf4: n/2 packed bytes + absmax per 64 (uint8 with double quantisation, plus one fp32 per 256
    blocks; fp32 without). int8 (LLM.int8, Linear8bitLt): n int8 bytes + one fp32 row scale (SCB)
    per output row.
    """
    if quant == "nf4":
        blocks = -(-n // NF4_BLOCK)
        if double_quant:
            return n / 2 + blocks + 4 * -(-blocks // NF4_NESTED_BLOCK)
        return n / 2 + 4 * blocks
    if quant == "int8":
        return n + 4 * out_features
    raise ValueError(quant)
