"""The model as the memory model sees it: a normalised shape read from a Hugging Face config.

`ModelSpec.from_config` turns any supported `config.json` dict into one flat description
(hidden size, heads, MLP kind, norms, vocabulary ...), and `count_params` counts its
parameters per part with the same arithmetic the transformers classes use to build their
modules. Pure functions: a dict in, numbers out, no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SpecError(ValueError):
    """A config that cannot describe a model: names the field at fault."""


class UnsupportedArchitecture(SpecError):
    """A well-formed config of an architecture without a hand-written formula: the simulator
    measures it instead (planner/measure/simulate.py)."""


# model_type -> family whose hand-written formulas apply. Anything else falls back to
# counting on the meta device (planner.metacount).
FAMILIES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "phi3": "llama",
    "mixtral": "llama", "gemma2": "gemma2", "gemma": "gemma2",
    "gpt2": "gpt2", "gpt_neox": "gpt_neox", "falcon": "falcon", "bert": "bert",
}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int
    tied: bool
    gated_mlp: bool            # gate_proj * act(up_proj) (llama) vs act(fc1) (gpt2)
    norm: str                  # "rms" (llama), "rms_gemma" ((1+w) scaling), "layer"
    norms_per_layer: int
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    experts: int = 0           # MoE: experts per layer (0 = dense)
    top_k: int = 0
    hidden_dropout: float = 0.0
    attn_dropout: float = 0.0
    final_softcap: float = 0.0  # gemma2 final_logit_softcapping
    attn_softcap: float = 0.0   # gemma2 attn_logit_softcapping (forces eager attention)
    type_vocab: int = 0         # bert token_type embeddings
    learned_positions: bool = False
    parallel_block: bool = False  # attention and MLP read the same normed input (neox, falcon)
    act: str = "silu"
    num_labels: int = 2
    encoder: bool = False       # a model without a formula that trains with a classification head (derived route)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def is_encoder(self) -> bool:
        """Trains with a sequence-classification head, no vocabulary-wide loss: bert, and a model
        without a formula that transformers builds so (ModernBERT; planner/measure/derived.py)."""
        return self.family == "bert" or self.encoder

    @property
    def needs_eager(self) -> bool:
        """Gemma-2's attention soft-capping is not supported by SDPA (transformers sets
        `_supports_sdpa = False`), so its attention runs eagerly unless flash-attention is used."""
        return self.attn_softcap > 0

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelSpec":
        mt = cfg.get("model_type")
        if not mt:
            raise SpecError("config has no 'model_type'")
        if not isinstance(mt, str):
            raise SpecError(f"'model_type' must be a string, got {mt!r}")
        fam = FAMILIES.get(mt)
        if fam is None:
            raise UnsupportedArchitecture(f"no hand-written formula for model_type '{mt}'")
        g = _Getter(cfg)
        if fam == "gpt2":
            h = g.pos("n_embd", "hidden_size")
            return cls(mt, fam, vocab=g.pos("vocab_size"), hidden=h, layers=g.pos("n_layer", "num_hidden_layers"),
                       heads=g.pos("n_head", "num_attention_heads"), kv_heads=g.pos("n_head", "num_attention_heads"),
                       head_dim=h // g.pos("n_head", "num_attention_heads"), intermediate=cfg.get("n_inner") or 4 * h,
                       max_positions=g.pos("n_positions", "max_position_embeddings"),
                       tied=cfg.get("tie_word_embeddings", True),
                       gated_mlp=False, norm="layer", norms_per_layer=2, qkv_bias=True, out_bias=True, mlp_bias=True,
                       hidden_dropout=g.frac("resid_pdrop", 0.1), attn_dropout=g.frac("attn_pdrop", 0.1),
                       learned_positions=True, act=cfg.get("activation_function", "gelu_new"),
                       extra={"embd_pdrop": g.frac("embd_pdrop", 0.1)})
        h = g.pos("hidden_size")
        heads = g.pos("num_attention_heads")
        head_dim = cfg.get("head_dim") or h // heads
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise SpecError(f"'head_dim' must be a positive integer, got {head_dim!r}")
        if fam == "bert":
            return cls(mt, fam, vocab=g.pos("vocab_size"), hidden=h, layers=g.pos("num_hidden_layers"), heads=heads,
                       kv_heads=heads, head_dim=head_dim, intermediate=g.pos("intermediate_size"),
                       max_positions=g.pos("max_position_embeddings"), tied=False, gated_mlp=False, norm="layer",
                       norms_per_layer=2, qkv_bias=True, out_bias=True, mlp_bias=True,
                       hidden_dropout=g.frac("hidden_dropout_prob", 0.1),
                       attn_dropout=g.frac("attention_probs_dropout_prob", 0.1),
                       type_vocab=cfg.get("type_vocab_size", 2), learned_positions=True,
                       act=cfg.get("hidden_act", "gelu"),
                       num_labels=cfg.get("num_labels", 2) if "id2label" not in cfg else len(cfg["id2label"]))
        if fam == "gpt_neox":
            return cls(mt, fam, vocab=g.pos("vocab_size"), hidden=h, layers=g.pos("num_hidden_layers"), heads=heads,
                       kv_heads=heads, head_dim=head_dim, intermediate=g.pos("intermediate_size"),
                       max_positions=g.pos("max_position_embeddings"), tied=cfg.get("tie_word_embeddings", False),
                       gated_mlp=False, norm="layer", norms_per_layer=2, qkv_bias=cfg.get("attention_bias", True),
                       out_bias=cfg.get("attention_bias", True), mlp_bias=True,
                       hidden_dropout=g.frac("hidden_dropout", 0.0), attn_dropout=g.frac("attention_dropout", 0.0),
                       parallel_block=cfg.get("use_parallel_residual", True), act=cfg.get("hidden_act", "gelu"))
        if fam == "falcon":
            if cfg.get("new_decoder_architecture") or cfg.get("alibi") or not cfg.get("parallel_attn", True):
                raise SpecError("falcon: only the falcon-7b layout (multi_query, parallel_attn, rotary) has a formula")
            kv = 1 if cfg.get("multi_query", True) else heads
            bias = bool(cfg.get("bias", False))
            return cls(mt, fam, vocab=g.pos("vocab_size"), hidden=h, layers=g.pos("num_hidden_layers"), heads=heads,
                       kv_heads=kv, head_dim=head_dim, intermediate=cfg.get("ffn_hidden_size") or 4 * h,
                       max_positions=cfg.get("max_position_embeddings", 2048),
                       tied=cfg.get("tie_word_embeddings", True),
                       gated_mlp=False, norm="layer", norms_per_layer=1, qkv_bias=bias, out_bias=bias, mlp_bias=bias,
                       hidden_dropout=g.frac("hidden_dropout", 0.0), attn_dropout=g.frac("attention_dropout", 0.0),
                       parallel_block=True, act="gelu")
        kv = cfg.get("num_key_value_heads") or heads
        if not isinstance(kv, int) or kv <= 0 or heads % kv:
            raise SpecError(f"'num_key_value_heads' must divide num_attention_heads ({heads}), got {kv!r}")
        experts = cfg.get("num_local_experts", 0) or 0
        common = dict(vocab=g.pos("vocab_size"), hidden=h, layers=g.pos("num_hidden_layers"), heads=heads, kv_heads=kv,
                      head_dim=head_dim, intermediate=g.pos("intermediate_size"),
                      max_positions=g.pos("max_position_embeddings"), gated_mlp=True,
                      attn_dropout=g.frac("attention_dropout", 0.0))
        if fam == "gemma2":
            return cls(mt, fam, tied=cfg.get("tie_word_embeddings", True), norm="rms_gemma",
                       norms_per_layer=4 if mt == "gemma2" else 2, qkv_bias=cfg.get("attention_bias", False),
                       out_bias=cfg.get("attention_bias", False), mlp_bias=False,
                       final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
                       attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
                       act=cfg.get("hidden_activation") or cfg.get("hidden_act", "gelu_pytorch_tanh"), **common)
        qkv_bias = mt == "qwen2" or bool(cfg.get("attention_bias", False))
        return cls(mt, fam, tied=cfg.get("tie_word_embeddings", mt == "qwen2" and False), norm="rms", norms_per_layer=2,
                   qkv_bias=qkv_bias, out_bias=bool(cfg.get("attention_bias", False)) and mt != "qwen2",
                   mlp_bias=bool(cfg.get("mlp_bias", False)), experts=experts,
                   top_k=cfg.get("num_experts_per_tok", 0) if experts else 0, act=cfg.get("hidden_act", "silu"),
                   **common)


class _Getter:
    def __init__(self, cfg: dict):
        self.cfg = cfg

    def pos(self, *names: str) -> int:
        for n in names:
            if n in self.cfg and self.cfg[n] is not None:
                v = self.cfg[n]
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise SpecError(f"'{n}' must be a positive integer, got {v!r}")
                return v
        raise SpecError(f"config is missing '{names[0]}'")

    def frac(self, name: str, default: float) -> float:
        v = self.cfg.get(name, default)
        if v is None:
            return 0.0
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise SpecError(f"'{name}' must be a probability in [0, 1), got {v!r}")
        return float(v)


@dataclass(frozen=True)
class ParamCount:
    """Parameters per part. `total` is what `sum(p.numel() for p in model.parameters())` gives."""
    embeddings: int
    attention: int
    mlp: int
    norms: int
    head: int           # untied lm_head, or the encoder's pooler + classifier
    tied: bool
    buffers_bytes: int
    largest_layer: int  # parameters of one transformer block
    linear_shapes: tuple  # per block: ((name, in, out, count), ...) for LoRA and quantisation
    # per block, MoE experts stored as 3-D parameters (transformers >= 5): bitsandbytes leaves them
    # unquantised; PEFT wraps them with ParamWrapper, a rank-r pair per expert (gate_up as two)
    expert_shapes: tuple = ()

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.norms + self.head

    def as_dict(self) -> dict:
        return {"total": self.total, "embeddings": self.embeddings, "attention": self.attention, "mlp": self.mlp,
                "norms": self.norms, "head": self.head, "tied_embeddings": self.tied,
                "buffers_bytes": self.buffers_bytes, "largest_layer": self.largest_layer}


def _lin(i: int, o: int, bias: bool) -> int:
    return i * o + (o if bias else 0)


def count_params(s: ModelSpec) -> ParamCount:
    """Count parameters module by module, as the transformers classes define them.

    Per block: q/k/v/o projections (k and v are `kv_heads * head_dim` wide under GQA), the MLP
    (three matrices when gated, two otherwise; MoE: `experts` copies plus an `hidden x experts`
    router) and `norms_per_layer` norm weights (LayerNorm adds a bias). Embeddings add learned
    positions and token types where the family has them; the head is an untied `vocab x hidden`
    matrix, or for encoders the pooler and classifier of ...ForSequenceClassification.
    """
    h, i = s.hidden, s.intermediate
    ln = 2 * h if s.norm == "layer" else h
    experts = ()
    if s.family == "falcon":
        qkv = _lin(h, s.q_dim + 2 * s.kv_dim, s.qkv_bias)
        lin = (("query_key_value", h, s.q_dim + 2 * s.kv_dim, 1), ("dense", s.q_dim, h, 1),
               ("dense_h_to_4h", h, i, 1), ("dense_4h_to_h", i, h, 1))
        attn = qkv + _lin(s.q_dim, h, s.out_bias)
        mlp = _lin(h, i, s.mlp_bias) + _lin(i, h, s.mlp_bias)
    elif s.family in ("gpt2", "gpt_neox"):
        names = ("c_attn", "c_proj", "c_fc", "c_proj") if s.family == "gpt2" else (
            "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
        lin = ((names[0], h, 3 * h, 1), (names[1], h, h, 1), (names[2], h, i, 1), (names[3], i, h, 1))
        attn = _lin(h, 3 * h, s.qkv_bias) + _lin(h, h, s.out_bias)
        mlp = _lin(h, i, True) + _lin(i, h, True)
    else:
        lin = [("q_proj", h, s.q_dim, 1), ("k_proj", h, s.kv_dim, 1), ("v_proj", h, s.kv_dim, 1),
               ("o_proj", s.q_dim, h, 1)]
        attn = _lin(h, s.q_dim, s.qkv_bias) + 2 * _lin(h, s.kv_dim, s.qkv_bias) + _lin(s.q_dim, h, s.out_bias)
        if s.family == "bert":
            lin = [("query", h, h, 1), ("key", h, h, 1), ("value", h, h, 1), ("dense", h, h, 1),
                   ("intermediate.dense", h, i, 1), ("output.dense", i, h, 1)]
            mlp = _lin(h, i, True) + _lin(i, h, True)
        elif s.experts:
            n = s.experts
            lin += [("gate", h, n, 1)]  # the router
            experts = (("gate_up_proj", h, 2 * i, 2 * n), ("down_proj", i, h, n))
            mlp = n * 3 * h * i + h * n
        else:
            lin += [("gate_proj", h, i, 1), ("up_proj", h, i, 1), ("down_proj", i, h, 1)]
            mlp = 2 * _lin(h, i, s.mlp_bias) + _lin(i, h, s.mlp_bias)
        if s.model_type == "phi3":  # fused projections: qkv_proj and gate_up_proj
            lin = [("qkv_proj", h, s.q_dim + 2 * s.kv_dim, 1), ("o_proj", s.q_dim, h, 1),
                   ("gate_up_proj", h, 2 * i, 1), ("down_proj", i, h, 1)]
        lin = tuple(lin)
    norms_block = s.norms_per_layer * ln
    block = attn + mlp + norms_block
    emb = s.vocab * h
    if s.learned_positions:
        emb += s.max_positions * h
    emb += s.type_vocab * h
    final_norm = ln
    if s.family == "bert":
        final_norm = ln  # embeddings.LayerNorm; bert has no final norm
        head = _lin(h, h, True) + _lin(h, s.num_labels, True)
    else:
        head = 0 if s.tied else s.vocab * h
    return ParamCount(embeddings=emb, attention=s.layers * attn, mlp=s.layers * mlp,
                      norms=s.layers * norms_block + final_norm, head=head, tied=s.tied,
                      buffers_bytes=_buffers_bytes(s), largest_layer=block, linear_shapes=lin, expert_shapes=experts)


def _buffers_bytes(s: ModelSpec) -> int:
    """Registered buffers: rotary `inv_freq` (+ its `original_inv_freq` copy) in fp32 for rotary
    models, bert's int64 `position_ids` and `token_type_ids`. Small, but counted."""
    if s.family == "bert":
        return 2 * 8 * s.max_positions
    if s.family == "gpt2":
        return 0
    rot = s.head_dim // 2
    if s.family == "gpt_neox":
        rot = int(s.head_dim * 0.25) // 2
    return 2 * 4 * rot


def named_params(s: ModelSpec) -> list[tuple[str, tuple, int]] | None:
    """Every parameter as `model.named_parameters()` names it, with its shape and where it sits:
    (name, shape, block), block -1 for the embeddings, 0..layers-1 for a block, `layers` for the
    final norm and the head (a tied head is the embedding, listed once, as named_parameters does).
    The transformers class is the one a user trains: ...ForCausalLM, or ...ForSequenceClassification
    for an encoder. Checked against the modules' own names (tests/test_freeze.py). MoE experts are
    not named: None for such a model."""
    h, i, L = s.hidden, s.intermediate, s.layers
    out: list[tuple[str, tuple, int]] = []

    def lin(name, fan_in, fan_out, bias, block, conv=False):
        out.append((f"{name}.weight", (fan_in, fan_out) if conv else (fan_out, fan_in), block))
        if bias:
            out.append((f"{name}.bias", (fan_out,), block))

    def norm(name, block, layer=s.norm == "layer"):
        out.append((f"{name}.weight", (h,), block))
        if layer:
            out.append((f"{name}.bias", (h,), block))

    if s.family == "bert":
        e = "bert.embeddings"
        out += [(f"{e}.word_embeddings.weight", (s.vocab, h), -1),
                (f"{e}.position_embeddings.weight", (s.max_positions, h), -1),
                (f"{e}.token_type_embeddings.weight", (s.type_vocab, h), -1)]
        norm(f"{e}.LayerNorm", -1)
        for b in range(L):
            p = f"bert.encoder.layer.{b}"
            for n in ("query", "key", "value"):
                lin(f"{p}.attention.self.{n}", h, h, True, b)
            lin(f"{p}.attention.output.dense", h, h, True, b)
            norm(f"{p}.attention.output.LayerNorm", b)
            lin(f"{p}.intermediate.dense", h, i, True, b)
            lin(f"{p}.output.dense", i, h, True, b)
            norm(f"{p}.output.LayerNorm", b)
        lin("bert.pooler.dense", h, h, True, L)
        lin("classifier", h, s.num_labels, True, L)
        return out
    if s.family == "gpt2":
        out += [("transformer.wte.weight", (s.vocab, h), -1), ("transformer.wpe.weight", (s.max_positions, h), -1)]
        for b in range(L):
            p = f"transformer.h.{b}"
            norm(f"{p}.ln_1", b)
            lin(f"{p}.attn.c_attn", h, 3 * h, True, b, conv=True)
            lin(f"{p}.attn.c_proj", h, h, True, b, conv=True)
            norm(f"{p}.ln_2", b)
            lin(f"{p}.mlp.c_fc", h, i, True, b, conv=True)
            lin(f"{p}.mlp.c_proj", i, h, True, b, conv=True)
        norm("transformer.ln_f", L)
        if not s.tied:
            out.append(("lm_head.weight", (s.vocab, h), L))
        return out
    if s.experts:
        return None
    fused = s.q_dim + 2 * s.kv_dim
    if s.family in ("gpt_neox", "falcon"):
        neox = s.family == "gpt_neox"
        root = "gpt_neox" if neox else "transformer"
        out.append((f"{root}.{'embed_in' if neox else 'word_embeddings'}.weight", (s.vocab, h), -1))
        for b in range(L):
            p = f"{root}.{'layers' if neox else 'h'}.{b}"
            attn = f"{p}.{'attention' if neox else 'self_attention'}"
            norm(f"{p}.input_layernorm", b)
            if neox:
                norm(f"{p}.post_attention_layernorm", b)
            lin(f"{attn}.query_key_value", h, fused, s.qkv_bias, b)
            lin(f"{attn}.dense", s.q_dim, h, s.out_bias, b)
            lin(f"{p}.mlp.dense_h_to_4h", h, i, s.mlp_bias, b)
            lin(f"{p}.mlp.dense_4h_to_h", i, h, s.mlp_bias, b)
        norm(f"{root}.{'final_layer_norm' if neox else 'ln_f'}", L)
        if not s.tied:
            out.append(("lm_head.weight", (s.vocab, h), L))
        return out
    out.append(("model.embed_tokens.weight", (s.vocab, h), -1))
    for b in range(L):
        p = f"model.layers.{b}"
        if s.model_type == "phi3":
            lin(f"{p}.self_attn.qkv_proj", h, fused, s.qkv_bias, b)
        else:
            lin(f"{p}.self_attn.q_proj", h, s.q_dim, s.qkv_bias, b)
            lin(f"{p}.self_attn.k_proj", h, s.kv_dim, s.qkv_bias, b)
            lin(f"{p}.self_attn.v_proj", h, s.kv_dim, s.qkv_bias, b)
        lin(f"{p}.self_attn.o_proj", s.q_dim, h, s.out_bias, b)
        if s.model_type == "phi3":
            lin(f"{p}.mlp.gate_up_proj", h, 2 * i, s.mlp_bias, b)
        else:
            lin(f"{p}.mlp.gate_proj", h, i, s.mlp_bias, b)
            lin(f"{p}.mlp.up_proj", h, i, s.mlp_bias, b)
        lin(f"{p}.mlp.down_proj", i, h, s.mlp_bias, b)
        norms = ("input_layernorm", "post_attention_layernorm")
        if s.norms_per_layer == 4:
            norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        for n in norms:
            norm(f"{p}.{n}", b)
    norm("model.norm", L)
    if not s.tied:
        out.append(("lm_head.weight", (s.vocab, h), L))
    return out


def owning_modules(param_names, patterns) -> set[str]:
    """The modules owning a parameter whose name one of `patterns` matches (`re.search`): what
    `unfrozen_parameters` names under LoRA, PEFT's `modules_to_save` (the estimate reads the
    names from `named_params`, the builder and the trainer from the model)."""
    import re
    pats = [re.compile(p) for p in patterns]
    return {n.rsplit(".", 1)[0] for n in param_names if any(p.search(n) for p in pats)}
