"""The memory model: bytes on one GPU for a steady-state training step.

`estimate(spec, settings)` is a pure function. The step it models is the one torch runs in
`loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`
with the optimizer state already allocated (the second and later steps), `use_cache=False`, and
`peak_bytes` is what `torch.cuda.max_memory_allocated()` reports for it.

Activations are counted tensor by tensor: each small function below names the tensors autograd
saves for one op (the `derivatives.yaml` formulas of the op, and PyTorch's rule that a saved
input is only kept when the other input needs a gradient), per token, and what the transformers
module feeds it. They were checked op by op with `torch.autograd.graph.saved_tensors_hooks` and
against torch's MemTracker on whole steps (tests/test_accuracy.py, tables/accuracy.csv).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .contract import HEAD_LOSSES, PlanError, Settings, shard_size
from .precision import BNB_MIN_8BIT_SIZE, BNB_OPT_BLOCK, RECIPES, quantized_weight_bytes
from .spec import ModelSpec, ParamCount, count_params, named_params, owning_modules

# ---------------------------------------------------------------- model states

def lora_targets(spec: ModelSpec, st: Settings) -> list[tuple]:
    """The per-block linears LoRA wraps: PEFT's `all-linear` (every linear but the output head),
    or the comma-separated module names, matched on the last name component as PEFT does."""
    pc = count_params(spec)
    shapes = pc.linear_shapes + pc.expert_shapes
    if st.lora_targets == "all-linear":
        return list(shapes)
    wanted = {t.strip() for t in st.lora_targets.split(",") if t.strip()}
    return [s for s in shapes if s[0] in wanted or s[0].split(".")[-1] in wanted]


def lora_params(spec: ModelSpec, st: Settings) -> int:
    """LoRA adds A (rank x in) and B (out x rank) per targeted linear, per block."""
    if not st.lora:
        return 0
    return spec.layers * sum(n * st.lora_rank * (i + o) for _, i, o, n in lora_targets(spec, st))


def weight_bytes(spec: ModelSpec, pc: ParamCount, st: Settings) -> float:
    """Bytes of the stored model: every parameter in the recipe's storage dtype.

    QLoRA/int8 bases: the block linears are stored as bitsandbytes stores them; embeddings, the
    head and norms stay unquantised and `prepare_model_for_kbit_training` upcasts them to fp32.
    LoRA adapters are fp32: PEFT upcasts adapter weights (`autocast_adapter_dtype=True`).
    """
    rc = RECIPES[st.precision]
    adapters = 4 * lora_params(spec, st)
    ms = modules_to_save(spec, st)
    if ms is not None:  # PEFT keeps the original module and a trainable copy of it
        adapters += ms.params * ms.nbytes
    if st.quant == "none":  # master copies (MS-AMP); with freezing, of the trainable parameters only
        master = trainable_params(spec, pc, st) if st.unfrozen_parameters else pc.total
        return pc.total * rc.weight + adapters + master * rc.master
    qbytes, qparams = 0.0, 0
    for _, i, o, n in pc.linear_shapes:
        qbytes += n * quantized_weight_bytes(i * o, st.quant, o)
        qparams += n * i * o
    qbytes *= spec.layers
    qparams *= spec.layers
    return qbytes + 4 * (pc.total - qparams) + adapters


@dataclass(frozen=True)
class Freezing:
    """What trains under `unfrozen_parameters` (Axolotl's key: parameters whose names match one of
    the regexes train, every other one is frozen). `lowest`: where backward stops, the lowest
    trainable place (-1 the embeddings, a block index, `layers` the final norm or the head)."""
    trainable: int
    shapes: tuple        # the shapes of the trainable tensors
    lowest: int
    blocks: frozenset    # the blocks with a trainable parameter
    final_norm: bool     # the final norm trains
    head: bool           # the output head (a tied head: the embedding; an encoder: pooler or classifier) trains
    embeddings: bool
    names: frozenset = frozenset()  # (name, block) of the blocks' trainable parameters
    sizes: tuple = ()    # (block, elements) of each trainable tensor, block as in `lowest`

    def trainable_in(self, *blocks: int) -> int:
        """Trainable parameters in these places (-1 the embeddings, `layers` the final norm and head)."""
        return sum(n for b, n in self.sizes if b in blocks)

    def block_trains(self, block: int) -> frozenset:
        """The trainable modules of one block, by their last name (`gate_proj`, `input_layernorm`)."""
        return frozenset(n.rsplit(".", 2)[-2] for n, b in self.names if b == block)


_HEAD = re.compile(r"^(lm_head\.|classifier\.|bert\.pooler\.)")


def freezing(spec: ModelSpec, st: Settings) -> Freezing | None:
    """The trainable parameters `st.unfrozen_parameters` select, by the names transformers gives
    them (spec.named_params; `re.search` as Axolotl and the builder match them); None without
    freezing. A pattern set matching nothing is refused."""
    if not st.unfrozen_parameters or st.lora:
        return None
    names = named_params(spec)
    if names is None:
        raise PlanError(f"{{unfrozen_parameters}}: the parameter names of {spec.model_type} with experts are not "
                        "modelled", "unfrozen_parameters")
    pats = [re.compile(p) for p in st.unfrozen_parameters]
    train = [(n, shape, b) for n, shape, b in names if any(p.search(n) for p in pats)]
    if not train:
        raise PlanError(f"{{unfrozen_parameters}} {' '.join(st.unfrozen_parameters)} matches no parameter of "
                        f"{spec.model_type} (names like {names[1][0]})", "unfrozen_parameters")
    top = spec.layers
    emb = any(b == -1 for _, _, b in train)
    head = any(b == top and _HEAD.search(n) for n, _, b in train) or (spec.tied and not spec.is_encoder and emb)
    return Freezing(trainable=sum(math.prod(s) for _, s, _ in train), shapes=tuple(s for _, s, _ in train),
                    lowest=min(b for _, _, b in train), blocks=frozenset(b for _, _, b in train if 0 <= b < top),
                    final_norm=any(b == top and not _HEAD.search(n) for n, _, b in train), head=head, embeddings=emb,
                    names=frozenset((n, b) for n, _, b in train if 0 <= b < top),
                    sizes=tuple((b, math.prod(shape)) for _, shape, b in train))


@dataclass(frozen=True)
class ModulesToSave:
    """LoRA with `unfrozen_parameters`: the modules owning a matching parameter become PEFT's
    `modules_to_save`. PEFT's ModulesToSaveWrapper (peft/utils/other.py, `update`) keeps the
    original module, frozen, and trains a `copy.deepcopy` of it, in the original's dtype; the
    module gets no adapter. Axolotl's adapter-plus-full-modules key is `lora_modules_to_save`,
    passed to the same LoraConfig field. Modelled for modules outside the blocks (embeddings,
    final norm, head, pooler, classifier)."""
    modules: tuple       # module names, as model.named_modules() gives them
    params: int          # parameters of the trainable copies
    shapes: tuple
    nbytes: int          # bytes per element of a copy: the base's storage dtype (fp32 when the base is NF4:
                         # prepare_model_for_kbit_training upcasts every module it does not quantise)
    head: bool           # the output head trains (an encoder's pooler or classifier: tiny, per sequence)
    final_norm: bool
    embeddings: bool


def modules_to_save(spec: ModelSpec, st: Settings) -> ModulesToSave | None:
    """The modules `st.unfrozen_parameters` names under LoRA (see ModulesToSave); None without
    LoRA or without freezing. A module inside a block is refused: PEFT leaves it without
    adapters and trains its copy, which the block's activation model does not count."""
    if not (st.lora and st.unfrozen_parameters):
        return None
    names = named_params(spec)
    if names is None:
        raise PlanError(f"{{unfrozen_parameters}}: the parameter names of {spec.model_type} with experts are not "
                        "modelled", "unfrozen_parameters")
    mods = owning_modules((n for n, _, _ in names), st.unfrozen_parameters)
    if not mods:
        raise PlanError(f"{{unfrozen_parameters}} {' '.join(st.unfrozen_parameters)} matches no parameter of "
                        f"{spec.model_type} (names like {names[1][0]})", "unfrozen_parameters")
    train = [(n, shape, b) for n, shape, b in names if n.rsplit(".", 1)[0] in mods]
    inside = sorted({n.rsplit(".", 1)[0] for n, _, b in train if 0 <= b < spec.layers})
    if inside:
        raise PlanError(f"{{unfrozen_parameters}} with {{lora_rank}}: {inside[0]} is inside a block; PEFT's "
                        "modules_to_save would train a copy of it without adapters, which is not modelled: name "
                        "modules outside the blocks (embeddings, final norm, head), or freeze without LoRA",
                        "unfrozen_parameters")
    top = spec.layers
    return ModulesToSave(modules=tuple(sorted(mods)), params=sum(math.prod(s) for _, s, _ in train),
                         shapes=tuple(s for _, s, _ in train),
                         nbytes=4 if st.quant != "none" else RECIPES[st.precision].weight,
                         head=any(b == top and _HEAD.search(n) for n, _, b in train),
                         final_norm=any(b == top and not _HEAD.search(n) for n, _, b in train),
                         embeddings=any(b == -1 for _, _, b in train))


def trainable_params(spec: ModelSpec, pc: ParamCount, st: Settings) -> int:
    fz = freezing(spec, st)
    if fz is not None:
        return fz.trainable
    if st.lora:
        ms = modules_to_save(spec, st)
        return lora_params(spec, st) + (ms.params if ms else 0)
    return pc.total


def trainable_bytes(spec: ModelSpec, pc: ParamCount, st: Settings) -> float:
    """Bytes of every trainable parameter in its own dtype: fp32 LoRA adapters, PEFT's
    modules_to_save copies in the base's dtype, else the recipe's storage dtype."""
    ms = modules_to_save(spec, st)
    if ms is not None:
        return 4 * lora_params(spec, st) + ms.nbytes * ms.params
    return _param_dtype_bytes(st) * trainable_params(spec, pc, st)


def grad_bytes(spec: ModelSpec, pc: ParamCount, st: Settings) -> float:
    """One gradient per trainable parameter, in the parameter's dtype (fp32 for LoRA adapters)."""
    if st.lora:
        return trainable_bytes(spec, pc, st)
    return RECIPES[st.precision].grad * trainable_params(spec, pc, st)


def _trainable_tensors(spec: ModelSpec, pc: ParamCount, st: Settings) -> list[tuple[int, int]]:
    """(elements, count) of the trainable tensors, for optimizers whose state depends on shape."""
    fz = freezing(spec, st)
    if fz is not None:
        return [(math.prod(s), 1) for s in fz.shapes]
    if st.lora:
        r = st.lora_rank
        ms = modules_to_save(spec, st)
        return [(r * i, n * spec.layers) for _, i, o, n in lora_targets(spec, st)] + \
               [(r * o, n * spec.layers) for _, i, o, n in lora_targets(spec, st)] + \
               [(math.prod(s), 1) for s in (ms.shapes if ms else ())]
    out = [(i * o, n * spec.layers) for _, i, o, n in pc.linear_shapes]
    rest = pc.total - spec.layers * sum(i * o * n for _, i, o, n in pc.linear_shapes)
    out.append((spec.vocab * spec.hidden, 1 if pc.tied or spec.is_encoder else 2))
    rest -= sum(e * c for e, c in out[-1:])
    out.append((rest, 1))  # biases and norms: small tensors, counted as one lump
    return out


def _param_dtype_bytes(st: Settings) -> float:
    return 4 if st.lora else RECIPES[st.precision].weight


def optimizer_state_bytes(spec: ModelSpec, pc: ParamCount, st: Settings) -> float:
    """Optimizer state per trainable parameter.

    adamw / adamw-fused: exp_avg and exp_avg_sq, `zeros_like(param)` so in the parameter dtype
    (torch.optim.AdamW). sgd: none at momentum 0; sgd-momentum: one buffer. lion: bitsandbytes'
    Lion, one fp32 momentum whatever the parameter dtype.
    adamw-8bit: bitsandbytes AdamW8bit, two uint8 states plus one fp32 absmax per 256 values, fp32
    states for tensors under 4096 elements. adafactor: transformers' Adafactor, factored second
    moment (a row and a column vector) for matrices, a full one for vectors.
    MS-AMP recipes store the moments as their table says.
    """
    n = trainable_params(spec, pc, st)
    p = _param_dtype_bytes(st)
    rc = RECIPES[st.precision]
    if st.optimizer in ("adamw", "adamw-fused"):
        if rc.state is not None and not st.lora:
            return n * (rc.state + rc.state2)
        return 2 * trainable_bytes(spec, pc, st)
    if st.optimizer == "sgd":
        return 0
    if st.optimizer == "sgd-momentum":
        return trainable_bytes(spec, pc, st)
    if st.optimizer == "lion":
        # bitsandbytes' Lion (a 32-bit Optimizer1State) keeps one fp32 `state1` per parameter,
        # whatever the parameter's dtype (bitsandbytes/optim/optimizer.py:681, 0.50)
        return 4 * n
    if st.optimizer in ("adamw-8bit", "lion-8bit"):
        return bnb_8bit_state_bytes(spec, pc, st, states=2 if st.optimizer == "adamw-8bit" else 1)
    if st.optimizer == "adamw-32bit":
        # bitsandbytes' 32-bit AdamW (Optimizer2State, optim_bits=32): two fp32 states whatever
        # the parameter dtype (bitsandbytes/optim/optimizer.py, `get_state_buffer(p,
        # dtype=torch.float32)`; measured on CPU, bitsandbytes 0.50)
        return 8 * n
    if st.optimizer == "lbfgs":
        return lbfgs_state_bytes(spec, pc, st)
    if st.optimizer == "adafactor":
        total = 0.0
        fz = freezing(spec, st)
        if fz is not None:  # a factored second moment (rows + columns) for matrices, a full one otherwise
            total = sum(s[0] + s[1] if len(s) == 2 else math.prod(s) for s in fz.shapes)
        elif st.lora:
            for _, i, o, nn_ in lora_targets(spec, st):
                total += nn_ * spec.layers * ((st.lora_rank + i) + (o + st.lora_rank))
            ms = modules_to_save(spec, st)
            total += sum(s[0] + s[1] if len(s) == 2 else math.prod(s) for s in (ms.shapes if ms else ())) \
                * (ms.nbytes if ms else 0) / p
        else:
            for _, i, o, nn_ in pc.linear_shapes:
                total += nn_ * spec.layers * (i + o)
            rest = pc.total - spec.layers * sum(i * o * c for _, i, o, c in pc.linear_shapes)
            emb_mats = (1 if pc.tied or spec.is_encoder else 2)
            rest -= emb_mats * spec.vocab * spec.hidden
            total += emb_mats * (spec.vocab + spec.hidden) + rest
        return total * p
    raise PlanError(f"unknown {{optimizer}} '{st.optimizer}'", "optimizer")


def lbfgs_state_bytes(spec: ModelSpec, pc: ParamCount, st: Settings) -> float:
    """torch.optim.LBFGS's state once its history is full (`lbfgs_history` steps that pass its
    curvature test), all in `state[params[0]]` (torch/optim/lbfgs.py:521-528): `old_dirs` and
    `old_stps`, `history_size` flat vectors each (y = flat_grad - prev_flat_grad and s = d * t,
    :397-411), the direction `d` and `prev_flat_grad` (:438), each a vector of every trainable
    element in the gradients' dtype (`_gather_flat_grad`'s `torch.cat`, :297); and 0-d tensors:
    `ro` and `al` per pair (:411, :421) and `H_diag`."""
    n = trainable_params(spec, pc, st)
    return (2 * st.lbfgs_history + 2) * _param_dtype_bytes(st) * n + 4 * (2 * st.lbfgs_history + 1)


def bnb_8bit_state_bytes(spec: ModelSpec, pc: ParamCount, st: Settings, states: int) -> float:
    """bitsandbytes' 8-bit optimizers (AdamW8bit: two states, Lion8bit: one): per state a uint8
    value and an fp32 absmax per block of 256 values; tensors under 4096 elements keep fp32 states
    (`min_8bit_size`). The paged variants allocate the same buffers in unified memory."""
    total = 0.0
    for elems, count in _trainable_tensors(spec, pc, st):
        if elems < BNB_MIN_8BIT_SIZE:
            total += count * states * 4 * elems
        else:
            total += count * states * (elems + 4 * -(-elems // BNB_OPT_BLOCK))
    return total


def ema_bytes(spec: ModelSpec, pc: ParamCount, st: Settings) -> float:
    """The EMA weights (`--ema`, the recipe's `ema_decay`): torch's `AveragedModel` over the
    trainable parameters (the builder's `make_ema`: a ParameterList of them) deep-copies them
    (torch/optim/swa_utils.py:280, `self.module = deepcopy(model)`), so one copy of each in its
    storage dtype (fp32 under autocast and for LoRA adapters, bf16 under pure bf16), and an int64
    `n_averaged` (:284). The update, `get_ema_multi_avg_fn` (:77), is `torch._foreach_lerp_` in place,
    and `update_parameters` passes the live parameters without copying them (:312, `.to` their own
    device): no temporaries. Alive in every phase. Measured on CPU (tables/validation.csv, `ema` cases)."""
    if not st.ema:
        return 0
    return trainable_bytes(spec, pc, st) + 8


def optimizer_step_temp_bytes(spec: ModelSpec, pc: ParamCount, st: Settings) -> float:
    """Transient memory inside `optimizer.step()`.

    torch's foreach AdamW (the CUDA default) computes `exp_avg_sq.sqrt()` for the whole parameter
    group at once (`torch._foreach_sqrt` in torch/optim/adam.py `_multi_tensor_adam`): one extra
    copy of every trainable parameter. The fused kernel and bitsandbytes (AdamW8bit, Lion) update
    in place (Lion on CPU measured: no live bytes above the step's start). transformers' Adafactor
    loops over tensors and upcasts: about three fp32 copies of the largest tensor.
    """
    if st.optimizer == "adamw":
        return trainable_bytes(spec, pc, st)
    if st.optimizer == "lbfgs":
        # the new flat gradient, y and s exist before the oldest pair is dropped (lbfgs.py:362,
        # 396-405): three flat vectors over the state; later q and r reach the same count
        return 3 * _param_dtype_bytes(st) * trainable_params(spec, pc, st)
    if st.optimizer == "adafactor":
        largest = max(e for e, _ in _trainable_tensors(spec, pc, st))
        return 3 * 4 * largest
    return 0


# ---------------------------------------------------------------- activations

class _Saved:
    """Tallies bytes per token of the tensors autograd keeps, counting each storage once."""

    def __init__(self) -> None:
        self.per_token = 0.0
        self.per_layer = 0.0  # bytes independent of tokens (autocast weight copies)
        self.input: _T | None = None  # the block's input, when counting a block
        self.mlp_mark: tuple[float, float] | None = None  # (per_token, per_layer) where a block's MLP side starts
        self.linears = 0  # linears counted so far (the first is block 0's first under torchao FP8)

    def new(self, elems: float, nbytes: float) -> "_T":
        return _T(self, elems, nbytes)

    def add(self, elems: float, nbytes: float) -> None:
        self.per_token += elems * nbytes


class _T:
    """One activation tensor per token: `elems` values of `nbytes` each."""

    def __init__(self, owner: _Saved, elems: float, nbytes: float):
        self.owner, self.elems, self.nbytes, self.saved = owner, elems, nbytes, False

    def keep(self) -> "_T":
        if not self.saved:
            self.saved = True
            self.owner.per_token += self.elems * self.nbytes
        return self


@dataclass(frozen=True)
class _Ctx:
    spec: ModelSpec
    st: Settings
    compute: int        # bytes of a matmul output
    stream: int         # bytes of the residual stream
    amp: bool           # fp32 weights cast per op by autocast
    lora: frozenset     # names of LoRA-wrapped linears
    full: bool          # every weight trainable
    adapter: int = 4    # bytes of a LoRA adapter weight as the matmul sees it
    trains: frozenset | None = None  # partial freezing: the block's trainable modules by last name (None: `full`)
    fp8: str = ""       # the library whose linears compute in FP8 (precision.Recipe.fp8), "" for none
    first: bool = False  # this block holds the model's first linear (block 0)


def _trains(c: _Ctx, name: str | None) -> bool:
    """Whether a module's weight trains: every one when `full`, unless partial freezing names them."""
    return c.full and (c.trains is None or name is None or name in c.trains)


def _ctx(spec: ModelSpec, st: Settings) -> _Ctx:
    """What the step computes in. Two engines hand every parameter (LoRA adapters included) to
    the step in 16-bit whatever it is stored in: FSDP's MixedPrecisionPolicy all-gathers them in
    bf16 and casts each unit's inputs, and DeepSpeed with bf16/fp16 casts the module itself.
    Autocast then finds nothing to cast, and the step computes as pure bf16 does."""
    rc = RECIPES[st.precision]
    names = frozenset(n for n, *_ in lora_targets(spec, st)) if st.lora else frozenset()
    if rc.compute == 2 and st.quant == "none" and (
            (rc.autocast and st.strategy.startswith("fsdp")) or st.strategy.startswith("zero")):
        return _Ctx(spec, st, 2, 2, False, names, not st.lora, adapter=2)
    amp = rc.autocast
    stream = 4 if amp or st.quant != "none" else rc.compute
    return _Ctx(spec, st, rc.compute, stream, amp, names, not st.lora, adapter=2 if amp else 4, fp8=rc.fp8)


def fp8_converts(spec: ModelSpec, fp8: str, name: str, fan_in: int, fan_out: int, first: bool = False) -> bool:
    """Whether an FP8 recipe swaps this block linear for its FP8 module, as accelerate converts
    them: only `nn.Linear` (GPT-2's Conv1D and the MoE experts' 3-D weights stay as they are) whose
    sizes are both multiples of 16 (accelerate/utils/ao.py:63-67 `filter_linear_layers`;
    utils/transformer_engine.py:50 `convert_model`). torchao's filter also leaves the model's first
    linear (block 0's first, `first`) and its last (the head) as nn.Linear (ao.py:140-142,
    `find_first_last_linear_layers`); Transformer Engine's converts them too."""
    if not fp8 or spec.family == "gpt2" or name.startswith("expert_") or fan_in % 16 or fan_out % 16:
        return False
    return not (fp8 == "torchao" and first and name == count_params(spec).linear_shapes[0][0])


def fp8_ao_linear(c: _Ctx, acc: _Saved, x: _T, fan_in: int, fan_out: int) -> _T:
    """A trainable torchao `Float8Linear` (torchao 0.18, tensorwise dynamic scaling, the default
    recipe) under bf16 autocast. Its autograd function saves `input_hp` and `weight_hp_t`
    (torchao/float8/float8_linear.py:45): the input as its forward passes it, and a transposed
    view of the fp32 parameter, so no weight copy is kept (autocast's nn.Linear keeps a cached
    bf16 copy of it). The forward casts the input to the autocast dtype first (:258-262), one bf16
    copy per call of an fp32 input, as autocast does for nn.Linear; it asks
    `torch.is_autocast_enabled()`, which sees CUDA's autocast only, so on CPU kernels the input
    is kept as it comes (an fp32 residual-stream norm output, once for every linear reading it).
    The FP8 casts of input, weight and gradients (`hp_tensor_to_float8_dynamic`, :56, :113,
    :131, :185) are made and freed inside the op: not kept. The output is in the input's dtype
    (bf16)."""
    if c.st.kernels == "cuda" and x.nbytes != 2:
        acc.add(fan_in, 2)
    else:
        x.keep()
    return acc.new(fan_out, c.compute)


def fp8_te_linear(c: _Ctx, acc: _Saved, x: _T, fan_in: int, fan_out: int) -> _T:
    """A trainable Transformer Engine `te.Linear` under `fp8_autocast` with accelerate's default
    recipe (DelayedScaling, HYBRID; TransformerEngine 2.x, transformer_engine/pytorch/module/linear.py).
    The input is quantized to FP8 with row-wise and column-wise (transposed) data (:425-436);
    after the forward GEMM the row-wise data is dropped and the column-wise FP8 copy is saved for
    the weight-gradient GEMM (:609-621): one byte per input value, per call. The weight is
    quantized every forward (no workspace cached across micro-batches: `is_first_microbatch` is
    None as accelerate calls it, :1958), with row-wise and column-wise usage (:464-489), and the
    FP8 weight is saved for the input-gradient GEMM (`wt_save = weightmat`, :643): two bytes per
    weight value (data and its transpose, as on Hopper) alive from the forward to the block's
    backward, also under checkpointing's recompute. The output is in the activation dtype (bf16
    under autocast)."""
    acc.add(fan_in, 1)
    acc.per_layer += 2 * fan_in * fan_out
    return acc.new(fan_out, c.compute)


def _linear(c: _Ctx, acc: _Saved, name: str, x: _T, fan_in: int, fan_out: int) -> _T:
    """A linear layer (nn.Linear, or GPT-2's Conv1D) on input x.

    Trainable weight: autograd keeps the input (the grad of W needs it); under autocast it keeps a
    bf16 copy of the input made for this call, and the bf16 weight copy, which autocast caches for
    the whole forward. Frozen weight: the input is not kept; under autocast the transient bf16
    weight copy is kept (the grad of the input needs it). A LoRA-wrapped frozen linear adds PEFT's
    branch: the input cast to the adapter dtype (fp32, or bf16 under autocast) and the rank-r
    output of A, plus a dropout mask when lora_dropout > 0.
    """
    st = c.st
    first = acc.linears == 0
    acc.linears += 1
    if _trains(c, name) and fp8_converts(c.spec, c.fp8, name, fan_in, fan_out, c.first and first):
        return (fp8_ao_linear if c.fp8 == "torchao" else fp8_te_linear)(c, acc, x, fan_in, fan_out)
    if _trains(c, name):
        if c.amp:
            acc.per_layer += 2 * fan_in * fan_out
            x.keep() if x.nbytes == 2 else acc.add(fan_in, 2)
        else:
            x.keep()
        return acc.new(fan_out, c.compute)
    if c.amp and st.quant == "none":
        acc.per_layer += 2 * fan_in * fan_out
    if name in c.lora:
        adapter = c.adapter
        if st.lora_dropout > 0:
            # PEFT drops out the input after casting it to the fp32 adapter dtype: the mask is a
            # bool on CUDA, fp32 noise on CPU; lora_A keeps the dropped input (a bf16 copy under autocast)
            acc.add(fan_in, (1 if st.kernels == "cuda" else 4) + adapter)
        elif x.nbytes == adapter:
            x.keep()
        else:
            acc.add(fan_in, adapter)
        acc.add(st.lora_rank, adapter)
    return acc.new(fan_out, c.stream if st.quant != "none" else c.compute)


def _norm(c: _Ctx, acc: _Saved, x: _T, name: str | None = None) -> _T:
    """RMSNorm or LayerNorm of x (h values per token).

    RMSNorm computes in fp32: `pow` keeps the fp32 input (x itself when already fp32), `rsqrt`
    keeps one fp32 value per token, and when the weight trains its multiply keeps the normalised
    tensor (llama: cast back to the input dtype; gemma: fp32 before the `(1 + w)` scale).
    LayerNorm (`native_layer_norm`) keeps its input plus fp32 mean and rstd per token.
    """
    h = c.spec.hidden
    if c.spec.norm == "layer":
        x.keep()
        acc.add(1, 8)
        return acc.new(h, 4 if c.amp else x.nbytes)
    if x.nbytes == 4:
        x.keep()
    else:
        acc.add(h, 4)
    acc.add(1, 4)
    if _trains(c, name):
        acc.add(h, 4 if c.spec.norm == "rms_gemma" else x.nbytes)
    return acc.new(h, x.nbytes)


def _dropout(c: _Ctx, acc: _Saved, p: float, elems: float) -> None:
    """Dropout on the residual stream in training keeps its mask: CUDA's `native_dropout` a bool
    (one byte per value), the CPU kernel a scaled noise tensor in the stream's dtype."""
    if p > 0:
        acc.add(elems, 1 if c.st.kernels == "cuda" else c.stream)


def _attention_core(c: _Ctx, acc: _Saved, q: _T | None, k: _T | None, v: _T | None, qkv: _T | None) -> _T:
    """Scaled dot-product attention after the projections (and rotary embedding).

    SDPA / flash (the memory-efficient kernels transformers uses by default): keeps q, k, v,
    the output and an fp32 log-sum-exp per head and token; no seq x seq matrix, and GQA runs
    without repeating k and v. Eager (transformers' `eager_attention_forward`): keeps q, the
    repeated k and v, the fp32 softmax output and its cast back to the compute dtype (seq x seq
    per head), plus gemma2's tanh soft-capping output and the dropout mask. SDPA on CPU kernels
    with attention dropout (BERT's and GPT-2's 0.1 in training) has no fused kernel and runs the
    math one, in fp32: see `_attention_math_dropout`.
    """
    s, st, e = c.spec, c.st, c.compute
    if not eager_attention(s, st) and st.kernels == "cpu" and s.attn_dropout > 0:
        return _attention_math_dropout(c, acc, v, qkv)
    if qkv is not None:
        qkv.keep()
    for t in (q, k, v):
        if t is not None:
            t.keep()
    out = acc.new(s.q_dim, e).keep()
    if eager_attention(s, st):
        seq = st.seq_len
        rep = s.heads // s.kv_heads
        if rep > 1:  # repeat_kv makes full-width copies that matmul keeps instead of k and v
            acc.add(2 * s.q_dim - 2 * s.kv_dim, e)
        acc.add(s.heads * seq, 4 + (0 if e == 4 else e))
        if s.attn_softcap:
            acc.add(s.heads * seq, e)
        if s.attn_dropout > 0:
            acc.add(s.heads * seq, 1 + e)
    else:
        acc.add(s.heads, 4)
        if st.attention_mask and st.attn == "sdpa":
            sdpa_mask_bytes(c, acc)
    return out


def sdpa_mask_bytes(c: _Ctx, acc: _Saved) -> None:
    """What SDPA given an attention mask (padded or packed rows: `Settings.attention_mask`) keeps
    more per block. Checked with saved_tensors_hooks on F.scaled_dot_product_attention (real
    SmolLM2-135M, torch 2.13 CPU, transformers 5.24, 4 x 512 packed: 300.0 MiB more, all of
    MemTracker's difference between the same step with and without position ids):

    - GQA's k and v repeated to the query heads: transformers passes `enable_gqa` only without a
      mask (transformers/integrations/sdpa_attention.py:51, `use_gqa_in_sdpa`) and otherwise
      calls `repeat_kv` (line 126); SDPA keeps the full-width copies instead of k and v. With one
      k/v head (multi-query) `repeat_kv`'s reshape of the expanded tensor is a view: no copy
      (measured: Qwen2-shaped, 7 heads over 1), but under autocast SDPA's bf16 cast of rotary's
      fp32 k makes one, full-width (v comes out of its linear in bf16 already).
    - the mask as an additive tensor in the query's dtype, one per call (per token: a row of seq
      values). transformers builds a boolean batch x 1 x seq x seq mask (masking_utils.py
      `sdpa_mask`; skipped only where nothing is padded, line 354, and no packed row restarts its
      positions, `find_packed_sequence_indices`, line 761); torch's SDPA converts it with
      `convert_boolean_attn_mask` (aten/src/ATen/native/transformers/attention.cpp), and its flash
      CPU kernel (and CUDA's memory-efficient one, as `attn_bias`) saves that copy for backward.

    Flash-attention-2 unpads instead (no mask, no repeat); eager attention counts its own."""
    s, e = c.spec, c.compute
    if 1 < s.kv_heads < s.heads:
        acc.add(2 * (s.q_dim - s.kv_dim), e)
    elif s.kv_heads == 1 < s.heads and c.amp:
        acc.add(s.q_dim - s.kv_dim, e)
    acc.add(c.st.seq_len, e)


def _attention_math_dropout(c: _Ctx, acc: _Saved, v: _T | None, qkv: _T | None) -> _T:
    """CPU SDPA with dropout: torch's `_scaled_dot_product_attention_math` in fp32 keeps scaled
    fp32 copies of q and k, v (itself when already fp32, else an fp32 copy; a slice of GPT-2's
    fused qkv keeps the whole qkv), and three fp32 seq x seq values per head: the softmax
    output, the CPU dropout's scaled noise and the dropped probabilities. Counted from the
    tensors autograd saves (saved_tensors_hooks on F.scaled_dot_product_attention, torch 2.13
    CPU). The output is not kept here; the output projection keeps it if it needs it."""
    s, e = c.spec, c.compute
    acc.add(2 * s.q_dim, 4)
    keep_v = qkv if qkv is not None else v
    if e == 4 and keep_v is not None:
        keep_v.keep()
    else:
        acc.add(s.q_dim, 4)
    acc.add(s.heads * c.st.seq_len, 3 * 4)
    return acc.new(s.q_dim, e)


def eager_attention(s: ModelSpec, st: Settings) -> bool:
    return st.attn == "eager" or (s.needs_eager and st.attn != "flash")


def _mlp_act(c: _Ctx, acc: _Saved, g: _T) -> _T:
    """The activation on the MLP's first projection. SiLU / exact GELU / tanh-GELU kernels keep
    their input. GPT-2's `gelu_new` is written in Python (NewGELUActivation) and keeps `tanh`'s
    output, `0.5 * x` and `1 + tanh(...)`; on CUDA, autocast runs its `pow` in fp32, which makes
    that chain fp32 and the result needs a bf16 copy for the next matmul."""
    i = g.elems
    g.keep()
    if c.spec.act == "gelu_new":
        if c.amp and c.st.kernels == "cuda":
            acc.add(i, 4 + 2 + 4)
            acc.add(i, 2)  # bf16 copy of the fp32 result, kept by the next linear
            return _Consumed(acc, i)
        acc.add(i, 3 * g.nbytes)
    return acc.new(i, g.nbytes)


class _Consumed(_T):
    """A tensor whose kept copy was already counted (keep() is a no-op)."""

    def __init__(self, owner: _Saved, elems: float):
        super().__init__(owner, elems, 2)
        self.saved = True


def _block(c: _Ctx) -> _Saved:
    """Bytes per token (and per layer) one transformer block keeps for backward."""
    s = c.spec
    acc = _Saved()
    h, i = s.hidden, s.intermediate
    x = acc.input = acc.new(h, c.stream)
    if s.family == "bert":  # post-LN encoder block
        q = _linear(c, acc, "query", x, h, h)
        k = _linear(c, acc, "key", x, h, h)
        v = _linear(c, acc, "value", x, h, h)
        a = _attention_core(c, acc, q, k, v, None)
        o = _linear(c, acc, "dense", a, h, h)
        _dropout(c, acc, s.hidden_dropout, h)
        y = _norm(c, acc, acc.new(h, max(c.stream, o.nbytes)))
        g = _linear(c, acc, "intermediate.dense", y, h, i)
        a2 = _mlp_act(c, acc, g)
        _linear(c, acc, "output.dense", a2, i, h)
        _dropout(c, acc, s.hidden_dropout, h)
        _norm(c, acc, acc.new(h, max(c.stream, o.nbytes)))
        return acc
    y = _norm(c, acc, x, "input_layernorm" if s.family in ("llama", "gemma2") else None)
    if s.family == "gpt2":
        qkv = _linear(c, acc, "c_attn", y, h, 3 * h)
        a = _attention_core(c, acc, None, None, None, qkv)
        _linear(c, acc, "c_proj", a, h, h)
        _dropout(c, acc, s.hidden_dropout, h)
        y2 = _norm(c, acc, acc.new(h, c.stream))
        g = _linear(c, acc, "c_fc", y2, h, i)
        _linear(c, acc, "c_proj", _mlp_act(c, acc, g), i, h)
        _dropout(c, acc, s.hidden_dropout, h)
        return acc
    if s.family in ("gpt_neox", "falcon"):
        fused = s.q_dim + 2 * s.kv_dim
        qkv = _linear(c, acc, "query_key_value", y, h, fused)
        rot = acc.new(s.q_dim + s.kv_dim, c.compute)  # q and k rebuilt by the partial rotary cat
        a = _attention_core(c, acc, rot, None, None, qkv)
        _linear(c, acc, "dense", a, s.q_dim, h)
        y2 = y if s.family == "falcon" else _norm(c, acc, x)
        g = _linear(c, acc, "dense_h_to_4h", y2, h, i)
        _linear(c, acc, "dense_4h_to_h", _mlp_act(c, acc, g), i, h)
        return acc
    if s.model_type == "phi3":  # llama with fused qkv_proj and gate_up_proj
        qkv = _linear(c, acc, "qkv_proj", y, h, s.q_dim + 2 * s.kv_dim)
        # rotary rebuilds q and k; v stays a view of the fused output, which SDPA then keeps whole
        a = _attention_core(c, acc, acc.new(s.q_dim, c.compute), acc.new(s.kv_dim, c.compute), None, qkv)
        _linear(c, acc, "o_proj", a, s.q_dim, h)
        y2 = _norm(c, acc, acc.new(h, c.stream))
        _linear(c, acc, "gate_up_proj", y2, h, 2 * i).keep()  # SiLU keeps the gate half, the mul the up half
        acc.new(i, c.compute).keep()                           # SiLU output, kept by the mul
        _linear(c, acc, "down_proj", acc.new(i, c.compute), i, h)
        return acc
    # llama family: pre-norm, rotary attention, gated MLP
    q = _linear(c, acc, "q_proj", y, h, s.q_dim)
    k = _linear(c, acc, "k_proj", y, h, s.kv_dim)
    v = _linear(c, acc, "v_proj", y, h, s.kv_dim)
    # rotary embedding builds new q and k (in the stream dtype under autocast, and SDPA then keeps
    # bf16 copies of the same size), `cos`/`sin` muls keep only cos and sin
    a = _attention_core(c, acc, acc.new(s.q_dim, c.compute), acc.new(s.kv_dim, c.compute), v, None)
    o = _linear(c, acc, "o_proj", a, s.q_dim, h)
    if s.norms_per_layer == 4:
        _norm(c, acc, o, "post_attention_layernorm")
    acc.mlp_mark = (acc.per_token, acc.per_layer)
    y2 = _norm(c, acc, acc.new(h, c.stream), "pre_feedforward_layernorm" if s.norms_per_layer == 4 else
               "post_attention_layernorm")
    if s.experts:
        k_ = s.top_k
        acc.add(s.experts, 4 + c.compute)  # router logits and fp32 routing softmax
        acc.add(k_ * h, c.compute)           # tokens gathered per chosen expert
        # PEFT adapts the 3-D expert weights themselves (W + BA): their grouped matmuls then keep
        # their inputs for the weight gradient, as in full fine-tuning, and the merged weights
        adapted = {n for n, *_ in count_params(s).expert_shapes} & c.lora
        acc.per_layer += c.compute * s.experts * h * i * (2 * ("gate_up_proj" in adapted) + ("down_proj" in adapted))
        for _ in range(k_):
            x_e = acc.new(h, c.compute)
            if "gate_up_proj" in adapted:
                x_e.keep()
            g = _linear(c, acc, "expert_gate", x_e, h, i)
            u = _linear(c, acc, "expert_up", x_e, h, i)
            _mlp_act(c, acc, g).keep()
            u.keep()
            m = acc.new(i, c.compute)
            if "down_proj" in adapted:
                m.keep()
            _linear(c, acc, "expert_down", m, i, h)
        acc.add(k_ * (h + 1), c.compute)      # expert outputs scaled by routing weights
        return acc
    g = _linear(c, acc, "gate_proj", y2, h, i)
    u = _linear(c, acc, "up_proj", y2, h, i)
    _mlp_act(c, acc, g).keep()
    u.keep()
    m = acc.new(i, c.compute)  # kept only if down_proj trains or wraps it (see _linear)
    _linear(c, acc, "down_proj", m, i, h)
    if s.norms_per_layer == 4:
        _norm(c, acc, acc.new(h, c.compute), "post_feedforward_layernorm")
    return acc


def _model_level(c: _Ctx, head: bool = True, ms: ModulesToSave | None = None) -> float:
    """Bytes per token kept outside the blocks: embedding-side ops, rotary cos/sin, final norm, and
    (`head`) what the output head keeps. `ms`: under LoRA, PEFT's modules_to_save copies that
    train (a trained final norm keeps its normalised input; a trained head its input)."""
    s = c.spec
    trained_head, norm_c = (ms.head, replace(c, full=ms.final_norm)) if ms is not None else (c.full, c)
    acc = _Saved()
    h = s.hidden
    if s.family == "bert":
        _norm(c, acc, acc.new(h, c.stream))
        _dropout(c, acc, s.hidden_dropout, h)
        return acc.per_token
    if s.family == "gpt2":
        _dropout(c, acc, s.extra.get("embd_pdrop", 0.0), h)
    else:
        acc.add(2 * s.head_dim, c.stream)  # cos and sin
    y = _norm(norm_c, acc, acc.new(h, c.stream))
    if not head:
        pass
    elif c.st.loss in HEAD_LOSSES:
        _fused_head_inputs(replace(c, full=trained_head), acc, y)
    elif trained_head or s.family != "bert":
        _head_positions(c, acc)
        if trained_head and c.amp:
            # autocast's bf16 copy of the head weight and of its input; Transformer Engine converts
            # the head too: its FP8 weight and transpose, and the FP8 column-wise input (fp8_te_linear)
            acc.per_layer += 2 * s.vocab * h
            _head_input(c, acc, y, 1 if c.fp8 == "transformer-engine" and fp8_converts(s, c.fp8, "lm_head", h, s.vocab)
                        else 2)
        elif trained_head:
            _head_input(c, acc, y)
        elif c.amp:  # the frozen head in fp32 (also a QLoRA base's: prepare_model_for_kbit_training upcasts it)
            acc.per_layer += 2 * s.vocab * h
    return acc.per_token + acc.per_layer / max(c.st.tokens, 1)


def _head_positions(c: _Ctx, acc: _Saved) -> None:
    """With `head_tokens`, the index vectors of the kept positions: transformers' boolean
    `hidden_states[mask]` (modeling_utils.py:5122, slice_logits_to_keep) is an `aten.index` whose
    backward keeps the mask's nonzero coordinates, two int64 vectors (IndexBackward0)."""
    if c.st.head_tokens:
        acc.per_layer += 2 * 8 * c.st.head_tokens


def _head_input(c: _Ctx, acc: _Saved, y: _T, nbytes: float | None = None) -> None:
    """What a trained head keeps of its input: the final norm's output itself (`nbytes` None) or
    its autocast cast, at every position; with `head_tokens`, the gathered rows of the kept
    positions, a copy (`_head_positions`), or their cast."""
    k = c.st.head_tokens
    if k:
        acc.per_layer += k * c.spec.hidden * (y.nbytes if nbytes is None else nbytes)
    elif nbytes is None:
        y.keep()
    else:
        acc.add(c.spec.hidden, nbytes)


@dataclass(frozen=True)
class Logits:
    """Bytes of the logits and the loss: kept for backward, alive at the forward's peak (the
    log-softmax), at the start of backward, and the logits' gradient."""
    saved: float
    forward: float
    backward: float
    grad: float = 0


def logits_bytes(spec: ModelSpec, st: Settings) -> Logits:
    """The output head's logits and cross-entropy, `st.logit_rows` x vocab values: every position
    (B x S), or the `head_tokens` positions with a label that `plan train` scores (transformers'
    `slice_logits_to_keep` with a boolean mask, transformers/modeling_utils.py:5120-5122, 5.24:
    one row per kept position; the loss over them is the same cross-entropy,
    planner/measure/builder.py: install_labelled_head).

    transformers' ForCausalLMLoss upcasts the logits (`logits.float()`) and `cross_entropy` keeps
    the fp32 log-softmax output for backward. In the forward, at the log-softmax, the logits, their
    fp32 copy and the log-softmax output are alive together. At the start of backward, the kept
    log-softmax output, the dense NLL gradient and the log-softmax gradient (all fp32) coexist.
    Gemma-2's final soft-capping keeps its tanh output too.
    """
    if spec.is_encoder:
        return Logits(saved=0, forward=0, backward=0)
    tv = st.logit_rows * spec.vocab
    rc = RECIPES[st.precision]
    e = 4 if st.quant != "none" and not rc.autocast else rc.compute
    saved = 4 * tv + (e * tv if spec.final_softcap else 0)
    fwd = saved + e * tv + (4 * tv if e != 4 else 0)
    bwd = saved + 8 * tv
    return Logits(saved=saved, forward=fwd, backward=bwd, grad=e * tv)


def _fused_head_inputs(c: _Ctx, acc: _Saved, y: _T) -> None:
    """What a fused loss keeps of the head's inputs (the head weight and the final norm's output),
    in place of the nn.Linear head's saved input.

    Liger's `LigerFusedLinearCrossEntropyFunction` saves only the gradients it computed in the
    forward (see `liger_flce_bytes`), not its input; under autocast the bf16 copy of an fp32
    head weight its chunk matmuls make is cached by autocast for the forward. Cut Cross-Entropy
    saves `e` (the hidden states) and `c` (the weight) for its backward (cut_cross_entropy/cce.py:78,
    `ctx.save_for_backward(e, c, lse, ...)`); its kernels take 16-bit `e` only (cce_backward.py:
    "Backwards requires embeddings to be bf16 or fp16"), so under autocast the caller's casts of
    both are what it keeps. TRL's `ChunkedLogProbFunction` saves its own copy of the hidden states
    (or, one row on CPU, a view of them) and the weight itself, counted with its loss
    (`trl_logprob_bytes`); its casts are explicit `.to(compute_dtype)` per tile, which autocast
    does not cache, so nothing is kept here.
    """
    h, v = c.spec.hidden, c.spec.vocab
    if c.st.loss == "trl":
        return
    if c.st.loss == "cce":
        if c.amp:
            acc.add(h, 2)
            acc.per_layer += 2 * v * h
        else:
            y.keep()
    elif c.amp and c.full:
        acc.per_layer += 2 * v * h


def _loss_dtypes(spec: ModelSpec, st: Settings) -> tuple[int, int]:
    """(bytes of a logit as the head's matmul returns it, bytes of the head's input)."""
    rc = RECIPES[st.precision]
    e = 4 if st.quant != "none" and not rc.autocast else rc.compute
    return e, _ctx(spec, st).stream


def liger_flce_chunk_rows(spec: ModelSpec, st: Settings) -> int:
    """Rows (tokens) of logits Liger's fused linear cross-entropy materialises at a time: the
    tokens split so that a chunk's logits are about as large as the input (`inc_factor =
    cdiv(V, H)`, `chunk_size = next_power_of_2(cdiv(BT, inc_factor))`, at most BT;
    liger_kernel/ops/fused_linear_cross_entropy.py:103-105, liger-kernel 0.8.5)."""
    bt = st.tokens
    inc = -(-spec.vocab // spec.hidden)
    rows = -(-bt // inc)
    return min(1 << (rows - 1).bit_length(), bt)


def liger_flce_bytes(spec: ModelSpec, st: Settings) -> Logits:
    """Liger Kernel's fused linear cross-entropy (`LigerFusedLinearCrossEntropyFunction`,
    liger_kernel/ops/fused_linear_cross_entropy.py, liger-kernel 0.8.5).

    The forward computes the gradients too: it allocates `grad_input = zeros_like(_input)` (line
    108) and, when the head trains, `grad_weight = zeros_like(weight)` (line 116, the weight's
    dtype), plus an fp32 `loss_1d` per token (line 125); then for each chunk of
    `liger_flce_chunk_rows` tokens it builds the chunk's logits in the matmul's dtype (line 168),
    the Triton kernel overwrites them with their gradient in place (line 247), and
    `grad_logits_chunk @ weight` fills the chunk's rows of grad_input (line 312). Only
    grad_input and grad_weight are kept for backward (returned as they are for a loss of grad
    1.0). No B x S x vocab tensor exists.
    """
    e, x = _loss_dtypes(spec, st)
    rows = liger_flce_chunk_rows(spec, st)
    h, v = spec.hidden, spec.vocab
    grad_input = st.tokens * h * x
    grad_weight = v * h * RECIPES[st.precision].weight if _ctx(spec, st).full else 0
    saved = grad_input + grad_weight
    fwd = saved + 4 * st.tokens + rows * v * e + rows * h * e
    return Logits(saved=saved, forward=fwd, backward=saved, grad=0)


def cce_bytes(spec: ModelSpec, st: Settings) -> Logits:
    """Apple's Cut Cross-Entropy (`LinearCrossEntropyFunction`, cut_cross_entropy/cce.py,
    cut-cross-entropy 25.1.1).

    The forward never builds the logits: its kernel keeps an fp32 log-sum-exp per row
    (cce_lse_forward.py:168), the int32 indices of the rows with a label (utils.py:38,
    `_build_flat_valids`; shifting drops the last position, so they always exist), and, with
    the default `filter_eps="auto"`, an fp32 average logit per vocabulary entry
    (cce_lse_forward.py:176); the indexed dot adds an fp32 value per row (indexed_dot.py:101).
    The backward allocates `de = zeros_like(e)` and, when the head trains, `dc =
    zeros_like(c, dtype=e.dtype)` (cce_backward.py:272-276), both 16-bit; under autocast the
    casts of e and c made before the call turn them into fp32 gradients. The hidden states and
    the weight it saves are counted with the model level (`_fused_head_inputs`).
    """
    _, x = _loss_dtypes(spec, st)
    c = _ctx(spec, st)
    h, v, t = spec.hidden, spec.vocab, st.tokens
    saved = 4 * t + 4 * t + 4 * v
    bwd = saved + 2 * t * h + (2 * v * h if c.full else 0)
    if c.amp:
        bwd += 4 * t * h + (4 * v * h if c.full else 0)
    return Logits(saved=saved, forward=saved + 4 * t, backward=bwd, grad=0)


def chunked_ce_bytes(spec: ModelSpec, st: Settings) -> Logits:
    """torchtune's `CEWithChunkedOutputLoss` (torchtune/modules/loss/ce_chunked_output_loss.py,
    torchtune 0.6.1) with its chunked head (`TransformerDecoder.chunked_output`: the output
    projection per chunk of positions), run eagerly as the trainer and the simulator run it.

    Each chunk's logits come out of the head in the matmul's dtype and all of them are alive
    until the loss is summed (the list of chunks, line 74). `compute_cross_entropy` (line 41)
    upcasts one chunk at a time (`logits.float()`), and `cross_entropy`'s log-softmax keeps its
    fp32 output for backward: in eager mode every chunk's, so the kept bytes equal the standard
    loss's; what chunking removes is the fp32 copy of the whole logits in the forward and, in
    the backward, the dense fp32 gradients, which exist for one chunk at a time. (Compiled, as
    torchtune recommends, `compute_cross_entropy` keeps other tensors: not modelled.)
    """
    e, _ = _loss_dtypes(spec, st)
    c = _ctx(spec, st)
    tv = st.tokens * spec.vocab
    per_row = -(-st.seq_len // min(st.loss_chunks, st.seq_len))
    chunks = -(-st.seq_len // per_row)
    chunk = st.batch_size * per_row * spec.vocab
    saved = 4 * tv + (e * tv if spec.final_softcap else 0)
    if c.amp and not c.full and st.quant == "none":
        # a frozen fp32 head is cast by autocast at every call, uncached, and each chunk's matmul
        # keeps its copy for the input's gradient: one copy more per chunk than the standard head
        saved += (chunks - 1) * 2 * spec.vocab * spec.hidden
    fwd = saved + e * tv + (4 * chunk if e != 4 else 0)
    bwd = saved + 8 * chunk
    if c.full:
        # the head (its autocast copy under autocast) is used once per chunk: autograd sums its
        # weight gradients in a buffer, so from the second chunk's backward on a head-sized sum and
        # that chunk's addend coexist, while one chunk's log-softmax has been freed
        bwd += max(0, 2 * c.compute * spec.vocab * spec.hidden - 4 * chunk)
    return Logits(saved=saved, forward=fwd, backward=bwd, grad=e * chunk)


TRL_TOKEN_TILE = 4096
"""Rows (tokens) of one tile of TRL's chunked log-probability head: `TOKEN_CHUNK_SIZE`
(trl/kernels/chunked_logprob.py:31, TRL 1.16)."""
TRL_VOCAB_TILE = 32768
"""Columns (vocabulary entries) of one tile, the `chunk_size` TRL passes: `_CHUNKED_LOGPROB_CHUNK_SIZE`
(trl/trainer/utils.py:1506, TRL 1.16)."""
TRL_FORWARD_TILE_BYTES = 13
"""Bytes per tile element the torch fold of the forward (`_forward_tile`,
trl/kernels/chunked_logprob.py:211-254) holds at its peak with SFTTrainer's outputs (log_probs,
entropy, is_top1): the fp32 logits `z` (:235, the transform's products), the bool
`before_target` (:241), `e = exp(z - max)` (:245) with either its argument or `e * z` (:248)."""
TRL_BACKWARD_TILE_BYTES = 29
"""Bytes per tile element the torch fold of the backward (`_backward_tile`, :257-296) holds at
its peak without an entropy gradient (SFTTrainer logs the entropy detached): fp32 `y`, `z`,
`log_p`, `p` and `grad` (:276-285), the bool `is_target` (:288), and `is_target.float()` with
`is_target.float() - p`, or that difference with its product by the log-prob gradient (:289).
A final soft-capping (Gemma-2) keeps its fp32 `tanh` too (:278): TRL_SOFTCAP_TILE_BYTES more."""
TRL_SOFTCAP_TILE_BYTES = 4


def _head_trains(spec: ModelSpec, st: Settings) -> bool:
    """Whether the output head's weight takes a gradient: full fine-tuning, a partially frozen
    model whose head matches, or LoRA with the head among the modules to save."""
    fz, ms = freezing(spec, st), modules_to_save(spec, st)
    if fz is not None:
        return fz.head
    if ms is not None:
        return ms.head
    return not st.lora


def trl_logprob_bytes(spec: ModelSpec, st: Settings) -> Logits:
    """TRL's chunked log-probability head (TRL 1.16), what `SFTTrainer` trains through: its
    `__init__` patches the model's forward with `add_fused_lm_head(model, outputs=("log_probs",
    "entropy", "is_top1"))` (trl/trainer/sft_trainer.py:1144) and `compute_loss` calls
    `model(**inputs, fused_lm_head=True)` (:1611), whose loss is the sum of `-log_probs` over
    the labelled tokens.

    The patched forward (trl/trainer/utils.py:1548-1698) runs the backbone and slices its output
    `last_hidden_state[:, :-1]` (:1618): N = B x (S - 1) rows, all assumed labelled. On CUDA
    (`_use_triton`, :1642) only labelled rows are scored, through the copy `hidden_states[mask]`
    (:1645); elsewhere every row, through `hidden_states.reshape(-1, H)` (:1645), a copy of the
    non-contiguous slice, a view of it for one row. `ChunkedLogProbFunction.forward`
    (trl/kernels/chunked_logprob.py:311-391) allocates seven fp32 per-row statistics (:340-346)
    and one tile buffer `mm_buf` of min(N, TRL_TOKEN_TILE) x TRL_VOCAB_TILE in the compute dtype
    (:347, the autocast dtype or the hidden states'), whatever the vocabulary; per token chunk
    `hidden[...].to(compute_dtype)` (:352) and per vocabulary chunk `weight[...].to(compute_dtype)`
    (:356, freed after the matmul) copy where the dtypes differ (autocast: explicit casts, not
    autocast's cached ones). The Triton fold (`_forward_kernel`) works in place; the torch fold
    (`_forward_tile`) holds TRL_FORWARD_TILE_BYTES per tile element (a soft-capping transform's
    own temporaries stay below it). The forward saves the hidden
    states, the weight, the int64 targets (`labels[mask]` on CUDA, `labels.clamp(min=0)` on CPU:
    a copy; :1648), `log_z` and `entropy` (:386); the caller's `masked_fill` (CPU) keeps `~mask`
    (trl/trainer/utils.py:1660; on CUDA `masked_scatter` keeps the mask, :1658).
    The final norm's output (`last_hidden_state`) is alive until the head returns.

    The backward (:393-465) allocates `grad_hidden` in fp32 (:406) and, when the head trains,
    `grad_weight` in fp32 (:410), the tile buffer again (:413), the same per-tile casts (:420,
    :423; `w_chunk` alive through the tile), and folds each tile into its gradient: in place on
    Triton, TRL_BACKWARD_TILE_BYTES per element in torch (`_backward_tile`). `_addmm_fp32` (:52)
    accumulates without copies on CUDA (`out_dtype`, torch >= 2.8) and in fp32; on CPU in 16 bits
    it upcasts the tile and the weight chunk (or the hidden chunk for `grad_weight`). At the end
    `grad_hidden.to(hidden.dtype)` and `grad_weight.to(weight.dtype)` (:456-457) copy where those
    are 16-bit. The slice's backward then builds the B x S x H gradient of the final norm's output.
    No B x S x vocab tensor exists.
    """
    e, x = _loss_dtypes(spec, st)
    c = _ctx(spec, st)
    h, v, b, s = spec.hidden, spec.vocab, st.batch_size, st.seq_len
    cuda = st.kernels == "cuda"
    n = b * (s - 1)                                # rows scored
    rows, cols = min(n, TRL_TOKEN_TILE), min(v, TRL_VOCAB_TILE)
    wb = 4 if c.amp or st.quant != "none" else e   # the head weight's dtype (fp32 under autocast, QLoRA's upcast)
    fz = freezing(spec, st)
    hidden_grad = fz is None or fz.lowest < spec.layers or fz.final_norm
    head = _head_trains(spec, st)

    y = b * s * h * x                              # the final norm's output
    copy = n * h * x if cuda or b > 1 else 0       # hidden_states[mask], or the reshape's copy
    saved = (copy or y) + n * (8 + 4 + 4 + 1)      # hidden, targets, log_z, entropy, ~mask
    buf = rows * TRL_VOCAB_TILE * e
    chunk_h = rows * h * e if x != e else 0
    chunk_w = cols * h * e if wb != e else 0
    fold_fwd = 0 if cuda else TRL_FORWARD_TILE_BYTES * rows * cols
    fwd = (y if copy else 0) + saved + n + 7 * 4 * n + buf + chunk_h + max(chunk_w, fold_fwd)

    g_hidden = 4 * n * h if hidden_grad else 0
    g_weight = 4 * v * h if head else 0
    held = saved + 4 * n + g_hidden + g_weight + buf + chunk_h + chunk_w   # 4n: the log-probs' gradient
    fold_bwd = 0 if cuda else (TRL_BACKWARD_TILE_BYTES + (TRL_SOFTCAP_TILE_BYTES if spec.final_softcap else 0)) \
        * rows * cols
    upcast = 0 if cuda or e == 4 else max(4 * rows * cols + 4 * cols * h if hidden_grad else 0,
                                          4 * rows * cols + 4 * rows * h if head else 0)
    end = held + (n * h * x if hidden_grad and x != 4 else 0) + (v * h * wb if head and wb != 4 else 0)
    after = (n * h * x + y + (b * (s - 1) * h * x if cuda else 0)) if hidden_grad else 0
    bwd = max(held + max(fold_bwd, upcast), end, after)
    return Logits(saved=saved, forward=fwd, backward=bwd, grad=0)


def loss_logit_elems(spec: ModelSpec, st: Settings) -> int:
    """The 16-bit logits the loss upcasts at once, whose freed hole SLACK_LOGITS counts: all of them
    for transformers' loss and for the chunked one (every chunk's 16-bit logits are alive while
    each is upcast; its allocator slack is not measured), one chunk of rows for Liger, none for
    Cut Cross-Entropy (no logits) nor for TRL's head (its one tile buffer, the same size in the
    forward and the backward, takes back the block it left; unmeasured on CUDA)."""
    if st.loss in ("cce", "trl"):
        return 0
    if st.loss == "liger-flce":
        return liger_flce_chunk_rows(spec, st) * spec.vocab
    return st.logit_rows * spec.vocab


def loss_bytes(spec: ModelSpec, st: Settings) -> Logits:
    """The logits and loss term for `st.loss` (contract.Loss); an encoder's task head has none."""
    if spec.is_encoder or st.loss == "standard":
        return logits_bytes(spec, st)
    return {"liger-flce": liger_flce_bytes, "cce": cce_bytes, "chunked": chunked_ce_bytes,
            "trl": trl_logprob_bytes}[st.loss](spec, st)


@dataclass(frozen=True)
class Activations:
    """Activation bytes of a step (the logits apart).

    kept: what the blocks and the model level keep for backward; layer: what one block keeps;
    recompute: what a checkpointed block holds again while its backward runs (0 without
    checkpointing); layer_grads: the gradients alive inside one block's backward;
    first_grads: those at the start of a block's backward, before any weight gradient;
    mask: eager attention's 4-D float mask."""
    kept: float
    layer: float
    recompute: float
    layer_grads: float
    mask: float
    first_grads: float
    autocast_cache: float = 0  # alive to the forward's end only (see activation_bytes)
    fp8_cast: float = 0        # inside one FP8 linear's backward (fp8_ao_cast_bytes)
    fp8_cast_fwd: float = 0    # inside one FP8 linear's forward
    frozen_forward: float = 0  # partial freezing: a frozen block's forward below the trainable ones
    offload_stash: float = 0  # activation offloading: offloaded tensors still on the GPU, in the forward only


def merged_expert_grad(c: _Ctx) -> float:
    """LoRA on a MoE's 3-D expert weights: PEFT adapts the weights themselves (W + BA, `_block`),
    so the grouped matmul's weight gradient is a merged-weight-sized tensor, which autograd then
    turns into B's and A's. In a recomputed block's backward the fused gate-and-up projection's,
    the larger, is alive at the block's peak (a small Mixtral, LoRA r8 with checkpointing: -6.4%
    without it, tables/validation.csv)."""
    s = c.spec
    if not s.experts or "gate_up_proj" not in ({n for n, *_ in count_params(s).expert_shapes} & c.lora):
        return 0
    return c.compute * s.experts * s.hidden * 2 * s.intermediate


def activation_bytes(spec: ModelSpec, st: Settings) -> Activations:
    """Activations kept for backward (without the logits), and what one block adds on top.

    `layer_grads`: the gradients alive inside one block's backward on top of what it keeps: the
    residual-stream gradient and the MLP-wide gradient (checked with MemTracker on every family).
    With checkpointing (non-reentrant `torch.utils.checkpoint`, as transformers enables it) each
    block keeps only its input; backward recomputes one block at a time, which then holds its
    saved tensors again (less the input, which is the same storage) and two MLP-wide and two
    stream-wide gradients, the recompute's forward intermediates included.
    """
    fz = freezing(spec, st)
    if fz is not None:
        return partial_activation_bytes(spec, st, fz)
    c = _ctx(spec, st)
    blk = _block(c)
    per_layer = blk.per_token * st.tokens + blk.per_layer
    model_level = _model_level(c, ms=modules_to_save(spec, st)) * st.tokens
    if c.fp8 == "torchao":  # block 0's first linear stays nn.Linear (fp8_converts): kept as autocast keeps it
        b0 = _block(replace(c, first=True))
        model_level += (b0.per_token - blk.per_token) * st.tokens + b0.per_layer - blk.per_layer
    stream_in = c.stream * spec.hidden * st.tokens
    mask = 0
    if eager_attention(spec, st):  # the 4-D float mask transformers builds for eager attention
        n_masks = 2 if spec.model_type == "gemma2" else 1
        mask = n_masks * st.batch_size * st.seq_len * st.seq_len * c.stream
    if st.grad_checkpointing:
        kept = spec.layers * stream_in + model_level
        recompute = per_layer - (stream_in if blk.input.saved else 0)
        grads = st.tokens * (2 * c.compute * spec.intermediate + 2 * c.stream * spec.hidden) + merged_expert_grad(c)
        if c.amp and st.lora and st.quant == "none":
            # PEFT casts an adapter's input to the fp32 adapter dtype before autocast casts it back
            # to bf16: during the recompute the fp32 copy of the widest adapter input is alive
            grads += st.tokens * 4 * max(i for _, i, _, _ in lora_targets(spec, st))
        # at the start of the block's backward, before any weight gradient: the gradients of the
        # block output and of the last MLP projection's input (one stream-, one MLP-wide)
        first = st.tokens * (c.compute * spec.intermediate + c.stream * spec.hidden)
        # autocast caches the bf16 copy of every trainable weight it casts until the autocast region
        # exits, the end of the forward: with checkpointing nothing else keeps them, yet all of them
        # are alive at the loss (H200: 1.87 GiB missing on Llama-3.2-1B, 3.03 on SmolLM2-1.7B)
        cache = 2 * autocast_cached_elems(spec, st) if c.full and c.amp else 0
        return Activations(kept=kept, layer=per_layer, recompute=recompute, layer_grads=grads, mask=mask,
                           first_grads=first, autocast_cache=cache, fp8_cast=fp8_ao_cast_bytes(spec, st, True),
                           fp8_cast_fwd=fp8_ao_cast_bytes(spec, st, False))
    grads = st.tokens * (c.compute * spec.intermediate + c.stream * spec.hidden) + merged_expert_grad(c)
    return Activations(kept=spec.layers * per_layer + model_level, layer=per_layer, recompute=0,
                       layer_grads=grads, mask=mask, first_grads=grads, fp8_cast=fp8_ao_cast_bytes(spec, st, True),
                       fp8_cast_fwd=fp8_ao_cast_bytes(spec, st, False))


def fp8_ao_cast_bytes(spec: ModelSpec, st: Settings, backward: bool) -> float:
    """The transient of one FP8 cast inside a torchao Float8Linear (torchao 0.18, eager): each
    cast of input, weight or gradient (`hp_tensor_to_float8_dynamic`, float8_scaling_utils.py:29)
    builds `tensor.to(float32) * scale` and its clamp, two fp32 copies, before the FP8 result
    (float8_training_tensor.py:153-154, float8_utils.py:136-137): 9 bytes per value at the
    moment the FP8 copy is written. The largest cast is of the widest tensor a converted linear
    casts: in the forward its input (tokens x in) or weight (in x out, :56, :73); in the backward
    also its output gradient (tokens x out, :113, :167). It happens inside a block's forward and
    backward, on top of what is alive there. Compiled (`torch.compile`), as torchao recommends,
    the casts fuse: not modelled. 0 for other recipes."""
    if RECIPES[st.precision].fp8 != "torchao":
        return 0
    t = st.tokens
    widest = [max(t * i, t * o if backward else 0, i * o) for name, i, o, _ in count_params(spec).linear_shapes
              if fp8_converts(spec, "torchao", name, i, o)]
    return 9 * max(widest, default=0)


OFFLOAD_MIN_BYTES = 1024
"""`min_offload_size`: a saved tensor under this many bytes stays on the GPU (TRL
trl/models/activation_offloading.py:128 and :241; torchtune _activation_offloading.py:71 and :150)."""
OFFLOAD_STASH = 5
"""`max_fwd_stash_size`: an offloaded tensor stays on the GPU until this many later tensors are
packed, while its copy runs on the side stream (TRL :129 and :276-283; torchtune :70 and :157)."""


def offloaded_activations(spec: ModelSpec, st: Settings, act: Activations, logits: Logits) -> tuple[Activations, float]:
    """Activations under activation offloading, as the GPU holds them, and the bytes moved to
    pinned host RAM per micro-step: TRL's `OffloadActivations` through
    `get_act_offloading_ctx_manager` with streams (trl/models/activation_offloading.py, TRL's
    main of 2026-07; Axolotl's `activation_offloading: true`, src/axolotl/core/trainers/mixins/
    activation_checkpointing.py:113-139; torchtune's `OffloadActivations`, the same hooks).

    What moves (its pack hook, :208-354): every tensor autograd saves of at least
    OFFLOAD_MIN_BYTES that is not a parameter's storage (`update_model_params`, :559-589, called by
    the manager at :708), once per storage while its GPU copy is still stashed (:228-233). So the
    blocks' saved tensors move, the autocast copies of weights included, rotary cos/sin once per
    block, and the loss's saved tensors. What stays: the output head's saved tensors (the manager
    wraps `lm_head` in a `NoOpManager`, :713-760) and rotary cos/sin, whose GPU tensor the later
    packs of the same storage keep (:228-233); parameters; autocast's cached copies of the
    trainable weights until the forward ends (`autocast_cache`); the OFFLOAD_STASH last offloaded
    tensors, whose copies have not been waited on, up to the loss's (the logits, counted as before).

    Checkpointing (non-reentrant): the checkpoint saves each block's input through the hooks
    outside it (`_CheckpointFrame.save_inputs`, torch/utils/checkpoint.py:842-847, called at :1701
    before `_checkpoint_hook` is pushed), so the inputs move; the recomputed block's tensors go to
    the checkpoint's own hook and stay on the GPU.

    Backward: the unpack hook brings a tensor back when its node runs and makes the compute
    stream wait for the copy (:456-470); a node's tensors are freed when the next node runs
    (:535-542). One block's saved tensors (`layer`) are counted as brought back at once, an upper
    bound (two nodes' at a time in the library). The GPU-side figure is unmeasured
    (contract.UNMEASURED_OFFLOAD); the host bytes are measured (tests/scripts/_run_cases.py offload).
    """
    if not st.activation_offload:
        return act, 0.0
    c = _ctx(spec, st)
    tokens = st.tokens
    ms = modules_to_save(spec, st)
    model_level = _model_level(c, ms=ms) * tokens
    head = model_level - _model_level(c, head=False, ms=ms) * tokens
    rotary = 0 if spec.family in ("gpt2", "bert") else 2 * spec.head_dim * c.stream * tokens
    resident = head + rotary
    host = max(act.kept - resident, 0.0) + logits.saved
    cache = act.autocast_cache
    if not st.grad_checkpointing:
        host += (spec.layers - 1) * rotary  # cos/sin packed again in every block (once per stash)
        if c.full and c.amp:  # the cached bf16 weight copies stay on the GPU to the forward's end
            cache += spec.layers * _block(c).per_layer
    stash = OFFLOAD_STASH * tokens * max(spec.intermediate * c.compute, spec.hidden * 4)
    gpu = replace(act, kept=resident, recompute=act.layer, autocast_cache=cache, offload_stash=stash)
    return gpu, host


def activation_host_bytes(spec: ModelSpec, st: Settings) -> float:
    """Pinned host bytes activation offloading holds at the end of the forward (`offloaded_activations`)."""
    return offloaded_activations(spec, st, activation_bytes(spec, st), loss_bytes(spec, st))[1]


def autocast_cached_elems(spec: ModelSpec, st: Settings) -> int:
    """Block linear weights whose bf16 copy autocast casts and caches for the forward (full
    fine-tuning under autocast): every one, but those an FP8 recipe converts (`fp8_converts`),
    which autocast never sees (torchao's Float8Linear casts its fp32 weight to FP8 itself;
    te.Linear keeps its FP8 weight as a saved tensor, freed with checkpointing's forward)."""
    fp8 = RECIPES[st.precision].fp8
    shapes = count_params(spec).linear_shapes
    per = sum(i * o * n for name, i, o, n in shapes if not fp8_converts(spec, fp8, name, i, o))
    first = [(i * o * n) for name, i, o, n in shapes[:1] if fp8_converts(spec, fp8, name, i, o)
             and not fp8_converts(spec, fp8, name, i, o, first=True)]
    return spec.layers * per + sum(first)


def fp8_te_linears(spec: ModelSpec) -> int:
    """te.Linear modules accelerate's `convert_model` makes: the block linears `fp8_converts`
    admits, in every block, and the head."""
    shapes = count_params(spec).linear_shapes
    head = int(fp8_converts(spec, "transformer-engine", "lm_head", spec.hidden, spec.vocab))
    return spec.layers * sum(n for name, i, o, n in shapes if fp8_converts(spec, "transformer-engine", name, i, o)) \
        + head


TE_AMAX_HISTORY = 1024
"""accelerate's TERecipeKwargs default `amax_history_len` (utils/dataclasses.py:428-429), TE's
DelayedScaling default too (transformer_engine/common/recipe/__init__.py:255)."""


def fp8_te_meta_bytes(spec: ModelSpec, st: Settings) -> int:
    """Transformer Engine's delayed-scaling state, per te.Linear (one GEMM): three forward FP8
    tensors (input, weight, output) and two backward ones (grad output, grad input)
    (transformer_engine/pytorch/module/base.py:1139), each with an fp32 `amax_history` of
    `amax_history_len` rows and an fp32 scale (`set_meta_tensor`, :1106-1152). Alive for the
    whole run, counted with the weights. 0 for other recipes."""
    if RECIPES[st.precision].fp8 != "transformer-engine":
        return 0
    return fp8_te_linears(spec) * 5 * 4 * (TE_AMAX_HISTORY + 1)


def partial_activation_bytes(spec: ModelSpec, st: Settings, fz: Freezing) -> Activations:
    """Activations under partial freezing (`unfrozen_parameters`).

    Autograd records an op only when one of its inputs needs a gradient: below the lowest trainable
    parameter (`fz.lowest`) the input needs none, so nothing is kept there. From there up, a block
    with a trainable parameter keeps what a fully trained block keeps (`_block`), less its input,
    which needs no gradient in the lowest one (its first norm keeps nothing of it); a frozen block
    above keeps what a frozen block whose input needs a gradient keeps (the LoRA base's rule in
    `_linear` and `_norm`: no weight gradient, so no saved inputs for it). Rotary cos/sin, the final
    norm and the head's input are kept when the gradient reaches them. With checkpointing, the
    blocks from the lowest trainable one up keep their inputs. `frozen_forward`: the live bytes
    inside a frozen block's forward (`frozen_forward_bytes`), the forward's peak when little trains.
    Measured: tables/validation.csv (`unfrozen` cases), the MiniLM head-only example.
    """
    c = _ctx(spec, st)
    tokens, top = st.tokens, spec.layers
    stream_in = c.stream * spec.hidden * tokens
    named = spec.family != "bert"  # the block's modules by name (a BERT block trains whole or not at all)

    def blk(b: int) -> _Saved:
        if b not in fz.blocks:
            return _block(replace(c, full=False))
        return _block(replace(c, trains=fz.block_trains(b) if named else None))

    def kept(b: int) -> float:
        acc = blk(b)
        if b != fz.lowest:
            return acc.per_token * tokens + acc.per_layer
        # the lowest block's input needs no gradient: nothing before its first trainable module is
        # kept; a block whose MLP side alone trains keeps only that side
        attn_side = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "input_layernorm"}
        if spec.norms_per_layer == 4:
            attn_side.add("post_attention_layernorm")
        if acc.mlp_mark is not None and not fz.block_trains(b) & attn_side:
            return (acc.per_token - acc.mlp_mark[0]) * tokens + acc.per_layer - acc.mlp_mark[1]
        return acc.per_token * tokens + acc.per_layer - (stream_in if acc.input.saved else 0)

    above = range(max(fz.lowest, 0), top)
    model_level = _model_level_partial(c, fz) * tokens
    mask = 0
    if eager_attention(spec, st) and above:
        mask = (2 if spec.model_type == "gemma2" else 1) * st.batch_size * st.seq_len * st.seq_len * c.stream
    transient = frozen_forward_bytes(spec, st) if fz.lowest > 0 else 0
    if not above:
        return Activations(kept=model_level, layer=0, recompute=0, layer_grads=0, mask=mask, first_grads=0,
                           frozen_forward=transient)
    full = activation_bytes(spec, replace(st, unfrozen_parameters=()))
    last = blk(top - 1)
    per_last = last.per_token * tokens + last.per_layer
    if st.grad_checkpointing:
        recompute = per_last - (stream_in if last.input.saved else 0)
        grads = full.layer_grads if (top - 1) in fz.blocks else \
            tokens * (c.compute * spec.intermediate + c.stream * spec.hidden)
        return Activations(kept=len(above) * stream_in + model_level, layer=per_last, recompute=recompute,
                           layer_grads=grads, mask=mask, first_grads=full.first_grads,
                           autocast_cache=full.autocast_cache * len(fz.blocks) / top, frozen_forward=transient)
    return Activations(kept=sum(kept(b) for b in above) + model_level, layer=per_last, recompute=0,
                       layer_grads=full.layer_grads, mask=mask, first_grads=full.first_grads,
                       frozen_forward=transient)


def _model_level_partial(c: _Ctx, fz: Freezing) -> float:
    """`_model_level` under partial freezing, per token: the embedding side only when the
    embeddings train; rotary cos/sin when a block's attention does; the final norm's saved tensors
    when the gradient reaches it or its weight trains; the head's input when the head trains."""
    s = c.spec
    if fz.lowest == -1:
        return _model_level(replace(c, full=fz.head))
    acc = _Saved()
    h = s.hidden
    if s.family == "bert":
        return 0.0
    below = fz.lowest >= s.layers  # nothing under the final norm needs a gradient
    if s.family != "gpt2" and not below:
        acc.add(2 * s.head_dim, c.stream)  # cos and sin
    y = acc.new(h, c.stream)
    if not below:
        y = _norm(replace(c, full=fz.final_norm), acc, y)
    elif fz.final_norm:
        acc.add(h, 4 if s.norm == "rms_gemma" else y.nbytes)  # the weight's multiply keeps the normalised input
    if fz.head or not below:
        _head_positions(c, acc)
    if c.st.loss in HEAD_LOSSES:
        _fused_head_inputs(replace(c, full=fz.head), acc, y)
    elif fz.head:
        if c.amp:
            acc.per_layer += 2 * s.vocab * h
            _head_input(c, acc, y, 2)
        else:
            _head_input(c, acc, y)
    elif c.amp and not (below and not fz.final_norm):
        acc.per_layer += 2 * s.vocab * h  # the frozen head's autocast copy, kept for its input's gradient
    return acc.per_token + acc.per_layer / max(c.st.tokens, 1)


def frozen_forward_bytes(spec: ModelSpec, st: Settings) -> float:
    """Live activation bytes inside the forward of a block that keeps nothing (below the lowest
    trainable parameter, where autograd records nothing): its input and the residual, and the
    widest point, the MLP (the first projection's output and its activation: two MLP-wide tensors;
    gated: the activation, the up projection and their product, three), or CPU SDPA's math kernel
    under attention dropout (scores, the scaled noise and the dropped probabilities: three fp32
    seq x seq values per head, plus q, k, v). Measured: the MiniLM head-only step (simulator, attention
    dropout 0: the MLP; `plan train`, dropout 0.1: the attention)."""
    c = _ctx(spec, st)
    h, i, t = spec.hidden, spec.intermediate, st.tokens
    mlp = (3 if spec.gated_mlp else 2) * i * c.compute + 3 * h * c.stream
    attn = 0
    if st.kernels == "cpu" and spec.attn_dropout > 0 and not eager_attention(spec, st):
        # plus the expanded fp32 mask of a padded batch, one row of seq values per token
        attn = 3 * spec.heads * st.seq_len * 4 + 3 * spec.q_dim * 4 + 3 * h * c.stream + st.seq_len * 4
    return t * max(mlp, attn)


# ---------------------------------------------------------------- overheads

CUDA_CONTEXT_BYTES = 764 * 2**20
"""What NVML counts for a training process beyond the caching allocator's reservation: the CUDA
context, loaded kernels, cuBLAS handles. Measured as NVML's per-process figure minus
`torch.cuda.memory_reserved()` after each case: 758-764 MiB on an H200 (torch 2.11.0+cu130,
driver 580.159.04, 2026-11-29, tables/gpu/validation_gpu_expandable.csv, outside_allocator
column) and 742-758 MiB on an H100 80GB HBM3 (2026-11-23)."""
CUBLAS_WORKSPACE_BYTES = 64 * 2**20

# Fragmentation of the caching allocator with expandable segments. Fitted to the reserved peak of
# the simulator's whole runs (model, warm-up step, measured step) replayed through
# planner/allocator.py over a grid of Llama-3.2-1B, Qwen2.5-0.5B, SmolLM2-360M, GPT-2 and TinyLlama-1.1B
# steps: full and LoRA, with and without checkpointing, 4k and 16k tokens
# (`python -m planner.measure.replay --grid tables/allocator_grid.csv`). Those replays give the
# H200's reserved peaks (tests/test_allocator.py); the terms are checked against both: the grid
# within -1.6% to +1.9% but GPT-2 (up to +15%), the H200's NVML figures within -1.2% to +2.4%.
SLACK_LOGITS = 1.15
"""Per byte of the 16-bit logits, where the loss upcasts them (`logits.float()` in transformers'
ForCausalLMLoss): the 16-bit logits are freed once the fp32 copy exists, and their hole is too
small for the backward's fp32 vocabulary-wide blocks (grid: 1.04-1.28x the 16-bit logits without
checkpointing; none where the logits are fp32 already, GPT-2 in fp32)."""
SLACK_LOGITS_LORA_CHECKPOINTED = 2.1
"""The same, for LoRA on a 16-bit base with checkpointing: the first step's backward takes cuBLAS's
second workspace (autograd's thread) inside the region the freed logits leave, and from the next
step on the fp32 logits and their gradient no longer fit side by side in it (the H200's
Llama-3.2-3B 8 x 2048 trace, event 7076: 2.07x; grid: 2.03-2.39x on Llama-3.2-1B, Qwen2.5-0.5B and
SmolLM2-360M; GPT-2 keeps 1.09-1.26x, over-counted by up to 15%)."""
SLACK_BASE = 100 * 2**20
SLACK_CHECKPOINTED_GRADS = 0.6
"""Per byte of the blocks' gradients, full fine-tuning with checkpointing: each block's gradients
are allocated between its recomputed activations and pin the holes they leave (grid and the H200's
full checkpointed cases within 2.1% with this and SLACK_LOGITS; 1.0 over-counted SmolLM2-1.7B's
8-bit-Adam step by 13%)."""
SLACK_NF4_HEAD = 0.6
"""QLoRA: per byte of autocast's bf16 copy of the fp32 head, alive from the forward's end into
backward (the two H200 QLoRA traces: 1.22 GiB of slack on Llama-3-8B where the logits' share is
0.66 GiB; on Llama-3.2-1B the term over-counts by 0.3 GiB, 1.7% of the step)."""


def allocator_slack(spec: ModelSpec, pc: ParamCount, st: Settings) -> float:
    """Bytes the caching allocator (`expandable_segments:True`, as `plan train` runs) holds beyond
    the live tensors at the backward's peak: free blocks too small or too scattered
    for the next requests. See SLACK_* for the terms and their evidence; the optimizer step adds
    none (its states and temporaries reuse the activations' freed space)."""
    if spec.is_encoder:  # no vocabulary-wide loss (bert on the H200: 1.3% over the peak)
        return SLACK_BASE
    rc = RECIPES[st.precision]
    e = 4 if st.quant != "none" and not rc.autocast else rc.compute  # the logits' dtype, as logits_bytes has it
    per_byte = SLACK_LOGITS_LORA_CHECKPOINTED if st.lora and st.grad_checkpointing and st.quant == "none" \
        else SLACK_LOGITS
    slack = SLACK_BASE + (per_byte * loss_logit_elems(spec, st) * e if e < 4 else 0)
    if not st.lora and st.grad_checkpointing:
        slack += SLACK_CHECKPOINTED_GRADS * rc.grad * pc.largest_layer * spec.layers / shard_size(st)
    if st.quant != "none" and rc.autocast:
        slack += SLACK_NF4_HEAD * 2 * spec.vocab * spec.hidden
    return slack


PRESSURE_SLACK = 0.03
"""What a step needs beyond its live bytes when memory is short, per byte of the peak. Short of
memory, the caching allocator returns its free pages and retries (`release_cached_blocks` in
CUDACachingAllocator.cpp) before it raises, so a step runs in much less than the high-water mark
a roomy GPU shows: what stays is the 20 MiB pages the live blocks touch. Replays: at most 1.7%
over the peak; the H200 fit tests: a Llama-3.2-1B step whose peak was 2.2% under the cap ran out
of memory (tables/gpu/fit.csv)."""


def needed_bytes(phases: dict) -> int:
    """The least GPU memory the step runs in: its peak, the pages the allocator cannot return
    (PRESSURE_SLACK) and the CUDA context. `plan recommend` fits plans by this figure."""
    return int(max(phases.values()) * (1 + PRESSURE_SLACK) + CUDA_CONTEXT_BYTES)


def device_bytes(phases: dict, slack: float) -> int:
    """Per-process GPU memory as NVML reports it where memory is plentiful: the caching allocator's
    high-water mark plus the CUDA context (CUDA_CONTEXT_BYTES). With memory to spare the allocator
    returns nothing during training, so its high-water mark is the largest of each phase's live
    bytes (and SLACK_BASE), the backward's with the allocator's slack on top (`allocator_slack`:
    the holes are made at the loss and by the backward's own allocations)."""
    backward = phases.get("backward", 0) + slack
    return int(max(max(phases.values()) + SLACK_BASE, backward) + CUDA_CONTEXT_BYTES)


# ---------------------------------------------------------------- the estimate

@dataclass(frozen=True)
class StepParts:
    """The pieces of one GPU's step the phases are composed of (bytes)."""
    weights: float      # stored parameters and buffers (and the EMA copy, `ema_bytes`)
    grads: float        # every trainable parameter's gradient
    optimizer: float    # optimizer state
    opt_temp: float     # transient inside optimizer.step()
    act: Activations
    logits: Logits
    head_grad: float    # the head's weight gradient, alive from the start of backward
    block_wgrad: float  # a checkpointed block's weight gradients, alive in its backward


def step_parts(spec: ModelSpec, pc: ParamCount, st: Settings) -> StepParts:
    c = _ctx(spec, st)
    rc = RECIPES[st.precision]
    fz = freezing(spec, st)
    logits = loss_bytes(spec, st)
    act = offloaded_activations(spec, st, activation_bytes(spec, st), logits)[0]
    if fz is not None:
        return StepParts(
            weights=weight_bytes(spec, pc, st) + pc.buffers_bytes + ema_bytes(spec, pc, st),
            grads=grad_bytes(spec, pc, st),
            optimizer=optimizer_state_bytes(spec, pc, st), opt_temp=optimizer_step_temp_bytes(spec, pc, st),
            act=act, logits=logits,
            head_grad=rc.grad * spec.vocab * spec.hidden if fz.head and not spec.is_encoder else 0,
            block_wgrad=rc.grad * pc.largest_layer if (spec.layers - 1) in fz.blocks and st.grad_checkpointing else 0)
    ms = modules_to_save(spec, st)
    return StepParts(
        weights=weight_bytes(spec, pc, st) + pc.buffers_bytes + ema_bytes(spec, pc, st) + fp8_te_meta_bytes(spec, st),
        grads=grad_bytes(spec, pc, st),
        optimizer=optimizer_state_bytes(spec, pc, st), opt_temp=optimizer_step_temp_bytes(spec, pc, st),
        act=act, logits=logits,
        head_grad=0 if spec.is_encoder else rc.grad * spec.vocab * spec.hidden if c.full else
        ms.nbytes * spec.vocab * spec.hidden if ms is not None and ms.head else 0,
        block_wgrad=rc.grad * pc.largest_layer if c.full and st.grad_checkpointing else 0)


@dataclass
class ActivationPhases:
    """Activation-side components (activations, logits) at the forward's and the backward's
    peak, and whether each peak is inside the last block rather than at the loss."""
    forward: dict
    backward: dict
    fwd_in_block: bool
    bwd_in_block: bool


def activation_phases(p: StepParts) -> ActivationPhases:
    """Activation-side bytes at each phase's peak, on top of the model states.

    Forward peaks at the loss, or (checkpointing) inside the last block, which holds its
    intermediates. Backward peaks either at its start (the loss gradient over the logits, every
    activation still kept) or inside the last block (its recompute under checkpointing, its
    activation gradients; the head's weight gradient and, checkpointed full fine-tuning, the
    block's exist by then): `fwd_in_block` and `bwd_in_block` say which. The weight gradients
    are left to the caller, which knows where they live (whole, or unsharded before a
    reduce-scatter).
    """
    act, lg = p.act, p.logits
    at_loss, at_fwd_loss = lg.backward, lg.forward
    in_fwd_block = act.recompute + act.offload_stash + act.fp8_cast_fwd
    in_block = act.recompute + act.layer_grads + p.block_wgrad + p.head_grad + act.fp8_cast
    fwd_block = in_fwd_block > at_fwd_loss
    bwd_block = in_block > at_loss
    forward = {"activations": act.kept + act.mask + act.autocast_cache + (in_fwd_block if fwd_block else 0),
               "logits": 0 if fwd_block else at_fwd_loss}
    if act.frozen_forward > sum(forward.values()):  # partial freezing: the peak is in a frozen block's forward
        forward = {"activations": act.frozen_forward + act.mask, "logits": 0}
    return ActivationPhases(
        forward=forward,
        backward={"activations": act.kept + (act.recompute + act.layer_grads + act.fp8_cast if bwd_block else 0),
                  "logits": 0 if bwd_block else at_loss},
        fwd_in_block=fwd_block, bwd_in_block=bwd_block)


def replicated_phases(spec: ModelSpec, pc: ParamCount, st: Settings, notes: list) -> tuple[dict, dict]:
    """One GPU, or DDP: every GPU holds the whole model, its gradients and optimizer state.

    DDP (`gradient_as_bucket_view=False`, its default and accelerate's) allocates flat gradient
    buckets at wrap time, one more copy of the gradients alive in every phase. With gradient
    accumulation, micro-steps after the first run forward and backward with every gradient
    already allocated. Also returns the components at the end of backward (every gradient
    allocated, the activations freed), which can exceed the backward's peak at its start."""
    p = step_parts(spec, pc, st)
    w, g, o = p.weights, p.grads, p.optimizer
    buckets = g if st.gpus * st.nodes > 1 else 0
    if buckets:
        notes.append("DDP gradient buckets: one extra copy of the gradients, in every phase")
    a = activation_phases(p)
    base = {"weights": w, "optimizer": o}
    phase_comp = {
        "model": {"weights": w, "other": buckets},
        "forward": {**base, **a.forward, "gradients": g if st.accumulation > 1 else 0, "other": buckets},
        "backward": {**base, **a.backward, "other": buckets,
                     "gradients": g if st.accumulation > 1 else p.head_grad + p.block_wgrad if a.bwd_in_block else 0},
        "optimizer_step": {**base, "gradients": g, "other": buckets + p.opt_temp},
    }
    fz = freezing(spec, st)
    tied_head_grad = spec.vocab * spec.hidden * RECIPES[st.precision].grad \
        if pc.tied and not st.lora and (fz is None or fz.embeddings) else 0
    end_bw = {"weights": w, "optimizer": o, "gradients": g + tied_head_grad, "other": buckets}
    return phase_comp, end_bw
