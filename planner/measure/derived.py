"""The derived route: an exact estimate for a model_type without a hand-written formula, from
coefficients measured on the real transformers module.

The simulator (planner/measure/simulate.py, fake tensors, MemTracker) runs the model reduced to
1 and 2 layers at full width, at a few token counts, once per *settings class* (precision,
optimizer, LoRA rank/dropout/targets, checkpointing, attention). Each phase peak is then a
function of the layer count L and the batch b x sequence s:

    bytes = (u0 + v0 L) + b s (u1 + v1 L) [+ b s^2 (u2 + v2 L): tokens-dominated line only]

A phase's peak sits where the constants dominate (inside the last block's backward, with the
head's weight gradient), where the tokens do (at the loss, over the logits), or between (inside
a MoE layer): the maximum of three such lines. Each line is solved exactly from its own points:
two short sequences at batch 1, batch 1 and 2 at 1024 tokens, two large batches and a shorter
sequence (the seq^2 term: eager attention's scores, sliding-window masks, CPU attention kernels
that keep seq x seq weights). Gradient
accumulation and DDP's buckets are added from the measured gradient bytes. Layers of different
kinds (a MoE model's dense first layers, Gemma 3's sliding and full attention layers) are
measured from a base with one layer of each kind plus one more layer of each kind, and summed
by their counts.

The coefficients are cached on disk, keyed by the config, the settings class and the library
versions (`cache_dir()`), so that a second call (and `plan recommend`'s bisection) is fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from ..contract import COMPONENTS, UNMEASURED_TE, PlanError, Settings
from ..estimate import Estimate, phase_table
from ..memory import CUBLAS_WORKSPACE_BYTES, RECIPES
from ..spec import ModelSpec, ParamCount, SpecError

VERSION = 8
SHORT_SEQS = (64, 128)  # batch 1: the line where the constants dominate
MID_BATCHES = (1, 2)  # at MID_SEQ: between them (a MoE layer's peak, DeepSeek-V3's at 2048 tokens)
MID_SEQ = 1024
LONG_BATCHES = (16, 32)  # at LONG_SEQ: the line where the tokens dominate
LONG_SEQ = 512
S2_TOLERANCE = 1e-4  # a b*s^2 term is fitted where the line in b*s misses by more than this
PHASES = ("model", "forward", "backward", "optimizer_step")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def cache_dir() -> Path:
    """Where derived coefficients live: $XDG_CACHE_HOME/plan/derived (~/.cache/plan/derived)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "plan" / "derived"


SAME_BYTES = {"fp16-amp": "bf16-amp"}
"""Recipes measured as another: fp16 autocast keeps what bf16 autocast keeps (fp32 weights,
gradients and AdamW states, 16-bit activations: planner/precision.py), and the CPU simulator runs
it as bf16 autocast. torchao's FP8 (fp8-ao) is measured as itself: the builder converts the model."""


def settings_class(st: Settings) -> Settings:
    """The settings that change the coefficients; batch, sequence, accumulation, GPUs and the
    LoRA alpha do not (they are applied from the fit, or change no tensor)."""
    return Settings(precision=SAME_BYTES.get(st.precision, st.precision), optimizer=st.optimizer,
                    lora_rank=st.lora_rank, lora_dropout=st.lora_dropout if st.lora else 0.0,
                    lora_targets=st.lora_targets if st.lora else "all-linear",
                    grad_checkpointing=st.grad_checkpointing, attn="eager" if st.attn == "eager" else "sdpa",
                    quant=st.quant, kernels="cpu")


def layer_count(cfg: dict) -> int:
    """The config's number of transformer blocks."""
    for k in _LAYER_KEYS:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    raise PlanError(f"the config has no layer count ({', '.join(_LAYER_KEYS)})")


def layer_kinds(cfg: dict) -> tuple[list[str], dict, object]:
    """The kinds of block whose memory differs, in the model's layer order: (each layer's kind,
    {kind: count}, a function turning a list of kinds into config overrides). MoE models with
    dense layers (DeepSeek-V3's `first_k_dense_replace`, Qwen-MoE's `mlp_only_layers` and
    `decoder_sparse_step`, Llama 4's `moe_layers`); attention layer types (`layer_types`: Gemma
    3's sliding and full layers, gpt-oss's: each type builds its own mask, and the CPU kernels keep
    different tensors for a masked and a causal layer). One kind for every other model."""
    n = layer_count(cfg)
    mt = cfg.get("model_type")
    if mt in ("deepseek_v3", "deepseek_v2") and cfg.get("first_k_dense_replace"):
        k = min(n, int(cfg["first_k_dense_replace"]))
        kinds = ["dense"] * k + ["moe"] * (n - k)

        def to(lst):  # dense layers come first, whatever the list's order
            return {"first_k_dense_replace": lst.count("dense")}
    elif mt in ("qwen3_moe", "qwen2_moe"):
        only, step = set(cfg.get("mlp_only_layers") or ()), int(cfg.get("decoder_sparse_step") or 1)
        kinds = ["dense" if i in only or (i + 1) % step else "moe" for i in range(n)]

        def to(lst):
            return {"mlp_only_layers": [i for i, t in enumerate(lst) if t == "dense"], "decoder_sparse_step": 1}
    elif mt == "llama4_text":
        step = int(cfg.get("interleave_moe_layer_step") or 1)
        moe = cfg.get("moe_layers")
        moe = set(range(step - 1, n, step) if moe is None else moe)
        kinds = ["moe" if i in moe else "dense" for i in range(n)]

        def to(lst):
            return {"moe_layers": [i for i, t in enumerate(lst) if t == "moe"], "interleave_moe_layer_step": 1}
    else:
        types = cfg.get("layer_types") or _config_attr(cfg, "layer_types")
        kinds = [str(t) for t in types] if isinstance(types, list) and len(types) == n else ["layer"] * n

        def to(lst):
            return {"layer_types": list(lst)} if lst[0] != "layer" else {}
    counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
    if len(counts) == 1:
        return kinds, counts, lambda lst: {}
    return kinds, counts, to


def layer_plans(cfg: dict) -> tuple[list[str], dict]:
    """The reduced models the derivation measures, as lists of layer kinds: a base with one layer
    of each kind, the model's last layer's kind last (the block whose recompute and gradients
    can make the backward peak), and the base with one more layer of each kind in front.
    {kind: plan} for the latter. One kind: [k] and [k, k]."""
    kinds, counts, _ = layer_kinds(cfg)
    last = kinds[-1]
    base = [k for k in counts if k != last] + [last]
    return base, {k: [k] + base for k in counts}


def _config_attr(cfg: dict, name: str):
    """An attribute of the transformers config class built from `cfg` (Gemma 3 derives its
    `layer_types` from `sliding_window_pattern`), None where it cannot be built."""
    from transformers import AutoConfig
    try:
        c = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    except Exception:  # noqa: BLE001 (any config transformers refuses: the derivation says why)
        return None
    return getattr(c, name, None)


def reduced(cfg: dict, layers: int, overrides: dict) -> dict:
    """The config cut to `layers` blocks at full width: the layer count, and every per-layer list
    (layer_types, no_rope_layers, ...) cut to its first `layers` entries."""
    n = layer_count(cfg)
    out = {k: (v[:layers] if isinstance(v, list) and len(v) == n and k not in ("architectures",) else v)
           for k, v in cfg.items()}
    for k in _LAYER_KEYS:
        if k in out:
            out[k] = layers
    out.update(overrides)
    if "layer_types" in overrides:
        out["layer_types"] = overrides["layer_types"][:layers]
    return out


def eager(cfg: dict, st: Settings) -> bool:
    """Whether the step runs eager attention (a seq x seq score matrix per head)."""
    from transformers import AutoConfig

    from .builder import attention_kernel
    c = {k: v for k, v in cfg.items() if k != "model_type"}
    return attention_kernel(AutoConfig.for_model(cfg["model_type"], **c), st) == "eager"


# ---------------------------------------------------------------- the fit

@dataclass
class Line:
    """Per quantity (each phase's total and its components): `u[j] + v[j] * L` is the
    coefficient of feature j, the features being 1, b*s and (the tokens-dominated line) b*s^2."""
    u: dict
    v: dict

    def at(self, layers: float, batch: int, seq: int) -> dict:
        feats = (1.0, batch * seq, batch * seq * seq)
        return {q: sum((self.u[q][j] + self.v[q][j] * layers) * feats[j] for j in range(len(self.u[q])))
                for q in self.u}


@dataclass
class Fit:
    """The derived coefficients of one settings class: the lines (constants-dominated and
    tokens-dominated) whose maximum is each phase's peak, and the parameter counts as `a + b L`."""
    lines: list
    params: tuple
    trainable: tuple
    layers: int
    notes: list

    def to_json(self) -> dict:
        return {"lines": [[ln.u, ln.v] for ln in self.lines], "params": self.params, "trainable": self.trainable,
                "layers": self.layers, "notes": self.notes}

    @classmethod
    def from_json(cls, d: dict) -> "Fit":
        return cls(lines=[Line(*ln) for ln in d["lines"]], params=tuple(d["params"]),
                   trainable=tuple(d["trainable"]), layers=d["layers"], notes=list(d["notes"]))


def _quantities(m) -> dict:
    """A measurement as flat quantities: each phase's total and its components."""
    out = {}
    for ph in PHASES:
        out[ph] = float(m.phases[ph])
        comps = m.categories.get(ph, {})
        for c in COMPONENTS:
            out[f"{ph}.{c}"] = float(comps.get(c, 0))
    return out


def _solve(points: list[tuple[int, int]], values: list[dict]) -> dict:
    """Exact coefficients of the features (1, b*s, b*s^2) through the points, per quantity. Two
    points: the line in b*s. Three (the third a shorter sequence): the b*s^2 term only where the
    line through the first two misses the third by more than S2_TOLERANCE of it, so that no
    spurious curvature is extrapolated to long sequences."""
    import numpy as np
    a = np.array([[1.0, b * s, b * s * s] for b, s in points])
    out = {}
    for q in values[0]:
        y = np.array([v[q] for v in values])
        c = [float(x) for x in np.linalg.solve(a[:2, :2], y[:2])] + [0.0]
        if len(points) == 3 and abs(c[0] + c[1] * a[2, 1] - y[2]) > S2_TOLERANCE * abs(y[2]):
            c = [float(x) for x in np.linalg.solve(a, y)]
        out[q] = c
    return out


def derive(cfg: dict, st: Settings) -> Fit:
    """Measure the settings class `st` on the reduced models of `layer_plans` (1 and 2 layers for
    a model of one kind), at the short and long token points, and fit the two lines (see the
    module docstring).
    transformers' and torch's warnings (deprecations, a reduced config's) are kept off stderr."""
    import warnings

    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _derive(cfg, st)
    except PlanError:
        raise
    except Exception as e:  # transformers or torch refusing this config: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise PlanError(f"the derived route cannot run {cfg.get('model_type')} on fake tensors "
                        f"({type(e).__name__}: {first})") from None
    finally:
        hf_logging.set_verbosity(level)


def _derive(cfg: dict, st: Settings) -> Fit:
    from .simulate import measure

    n = layer_count(cfg)
    maxpos = cfg.get("max_position_embeddings") or cfg.get("n_positions") or LONG_SEQ
    short = [(1, min(s, maxpos)) for s in SHORT_SEQS]
    if short[0] == short[1]:
        short[0] = (1, max(1, short[1][1] // 2))
    mid = [(b, min(MID_SEQ, maxpos)) for b in MID_BATCHES]
    s_long = min(LONG_SEQ, maxpos)
    long = [(b, s_long) for b in LONG_BATCHES]
    is_eager = eager(cfg, st)
    kinds, counts, to = layer_kinds(cfg)
    # a third long point for a b x s^2 term: eager attention's scores, sliding-window masks under
    # SDPA, and CPU attention kernels that keep seq x seq weights (MLA's unequal head sizes)
    sliding = any("sliding" in k for k in counts)
    window = _config_attr(cfg, "sliding_window") if sliding else None
    if isinstance(window, int) and window > 0:  # past the window, where a sliding mask starts to cut
        s_long = min(maxpos, max(s_long, 2 * window))
        long = [(b, s_long) for b in LONG_BATCHES]
    long.append((LONG_BATCHES[0], s_long // 2))
    base, plus = layer_plans(cfg)
    coef, counted = {}, {}  # plan -> {line: coefficients}, plan -> (params, trainable)
    for plan in [base, *plus.values()]:
        c = reduced(cfg, len(plan), to(plan))
        coef[tuple(plan)] = {}
        for name, pts in (("short", short), ("mid", mid), ("long", long)):
            vals = []
            for b, s in pts:
                m = measure(c, replace(st, batch_size=b, seq_len=s, kernels="cpu"), fake=True)
                vals.append(_quantities(m))
                counted[tuple(plan)] = (m.params, m.trainable_params)
            coef[tuple(plan)][name] = _solve(pts, vals)
    b0 = tuple(base)
    # per layer of kind k: (base + k) - base; the rest: base less one layer of each kind
    per = {k: {name: {q: [x - y for x, y in zip(coef[tuple(p)][name][q], coef[b0][name][q], strict=True)]
                      for q in coef[b0][name]} for name in ("short", "mid", "long")} for k, p in plus.items()}
    lines = []
    for name in ("short", "mid", "long"):
        u = {q: [coef[b0][name][q][j] - sum(per[k][name][q][j] for k in counts) for j in range(len(v0))]
             for q, v0 in coef[b0][name].items()}
        v = {q: [sum(counts[k] * per[k][name][q][j] for k in counts) / n for j in range(len(v0))]
             for q, v0 in coef[b0][name].items()}
        lines.append(Line(u, v))
    pc = {}
    for i in (0, 1):
        each = {k: counted[tuple(p)][i] - counted[b0][i] for k, p in plus.items()}
        pc[i] = (counted[b0][i] - sum(each.values()), sum(counts[k] * each[k] for k in counts) / n)
    notes = ["derived: coefficients measured on the transformers module (1 and 2 layers at full width, fake "
             "tensors, CPU kernels) and scaled to the layer count"]
    if is_eager:
        notes.append("eager attention: its seq x seq scores fitted as a batch x seq^2 term")
    if st.quant == "nf4":
        notes.append("NF4 base: transformers' bitsandbytes quantizer and bitsandbytes' Linear4bit forward and "
                     "backward on fake tensors (packed weights and double-quantised absmax as bitsandbytes stores "
                     "them)")
    if len(counts) > 1:
        notes.append("layer kinds measured separately: " + ", ".join(f"{c} {k}" for k, c in counts.items()))
    return Fit(lines=lines, params=pc[0], trainable=pc[1], layers=n, notes=notes)


# ---------------------------------------------------------------- the route

def buildable(cfg: dict) -> None:
    """A model_type transformers knows, else one line."""
    from transformers import CONFIG_MAPPING
    mt = cfg.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise PlanError(f"unknown model_type '{mt}': neither plan's formulas nor transformers know it")


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x


@lru_cache(maxsize=2)
def library_versions(packages: tuple[str, ...] = ("torch", "transformers", "peft")) -> tuple[str, ...]:
    """The versions of the libraries that measure the coefficients, part of the cache key: read
    once per process (importlib.metadata scans every installed distribution, 6 ms a call, and
    recommend's bisection asks for a key hundreds of times)."""
    from importlib.metadata import version
    return tuple(version(p) for p in packages)


class Derived:
    """The derived route for one config: fits per settings class, from memory, the disk cache,
    or a derivation; `estimate(st)` is then arithmetic."""

    def __init__(self, cfg: dict, names: frozenset | None = None):
        self.cfg = cfg
        self._fits: dict = {}
        self._names = names
        self._pc: ParamCount | None = None
        self._persistent = 0
        self.spec: ModelSpec | None = None  # the proxy spec standing for this config (proxy_spec sets it)

    def key(self, cls: Settings | None = None) -> str:
        """The cache file's name: the model_type, a hash of the config and the versions that
        measure it, and a hash of the settings class (without one: the config's prefix)."""
        def h(x) -> str:
            return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()[:16]
        model = h([VERSION, self.cfg, *library_versions()])
        # an NF4 class runs bitsandbytes' own forward and backward: its version is part of the class
        measured = [cls.__dict__, *library_versions(("bitsandbytes",))] if cls is not None and cls.quant != "none" \
            else (cls.__dict__ if cls is not None else None)
        return f"{self.cfg.get('model_type', 'model')}-{model}" + (f"-{h(measured)}" if cls is not None else "")

    def derived_before(self) -> bool:
        """Whether the cache holds coefficients of this config (any settings class)."""
        return any(not p.name.endswith("-module.json") for p in cache_dir().glob(f"{self.key()}-*.json"))

    def fit(self, st: Settings) -> Fit:
        """The settings class's coefficients: memory, then disk, then `derive` (and save)."""
        cls = settings_class(st)
        k = self.key(cls)
        if k in self._fits:
            f = self._fits[k]
            if isinstance(f, PlanError):
                raise f
            return f
        path = cache_dir() / f"{k}.json"
        try:
            f = Fit.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            try:
                buildable(self.cfg)
                f = derive(self.cfg, cls)
            except PlanError as e:
                self._fits[k] = e
                raise
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(f.to_json()))
                tmp.replace(path)
            except OSError:
                pass  # a read-only cache: derive again next time
        self._fits[k] = f
        return f

    def linear_names(self) -> frozenset:
        """The last name components of the block linears (PEFT's target names), read from the
        model built with one layer on the meta device."""
        if self._names is None:
            import torch

            from .builder import build_model
            with torch.device("meta"):
                model, _ = build_model(reduced(self.cfg, 1, {}), Settings(precision="bf16-pure"), meta=True)
            names = set()
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                    names.add(name.split(".")[-1])
                for pname, p in mod.named_parameters(recurse=False):
                    if p.dim() == 3:  # MoE experts stored as 3-D parameters
                        names.add(pname)
            self._names = frozenset(names)
        return self._names

    def check(self, st: Settings) -> None:
        """What the derived route cannot measure, refused in one line each."""
        if st.quant == "int8":
            raise PlanError(f"{{quant}} int8: model_type '{self.cfg.get('model_type')}' has no formula, and LLM.int8 "
                            "picks its outlier columns from the activations' values, which the derived route's fake "
                            "tensors do not have; use {quant} nf4 (QLoRA)", "quant")
        if st.quant != "none" and (st.strategy != "ddp" or st.offload != "none"):
            raise PlanError(f"{{quant}} {st.quant} under {{strategy}} {st.strategy}"
                            + (f" with {{offload}} {st.offload}" if st.offload != "none" else "")
                            + f": model_type '{self.cfg.get('model_type')}' has no formula, and the derived route "
                            "measures an NF4 base on one GPU or DDP; use {strategy} ddp", "quant")
        if st.quant != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise PlanError(f"{{quant}} {st.quant}: model_type '{self.cfg.get('model_type')}' has no formula, and the "
                            "derived route measures bitsandbytes' modules: pip install bitsandbytes", "quant")
        if st.loss != "standard":
            raise PlanError(f"{{loss}} {st.loss}: model_type '{self.cfg.get('model_type')}' has no formula, and the "
                            "derived route measures transformers' own loss; use {loss} standard", "loss")
        if st.precision == "fp8-te":
            raise PlanError(f"{{precision}} fp8-te: model_type '{self.cfg.get('model_type')}' has no formula, and "
                            f"the derived route measures its modules: {UNMEASURED_TE}; use fp8-ao", "precision")
        if st.precision == "fp8-ao" and importlib.util.find_spec("torchao") is None:
            raise PlanError(f"{{precision}} fp8-ao: model_type '{self.cfg.get('model_type')}' has no formula, and the "
                            "derived route measures torchao's modules: pip install --no-deps 'torchao>=0.10'",
                            "precision")
        if st.precision.startswith("msamp"):
            raise PlanError(f"{{precision}} {st.precision}: MS-AMP's FP8 gradients and states need a formula, which "
                            f"model_type '{self.cfg.get('model_type')}' does not have; use bf16-amp or bf16-pure",
                            "precision")
        if st.optimizer == "adamw-8bit":
            raise PlanError("{optimizer} adamw-8bit: its step reads values, which the fake tensors the derived route "
                            "measures on do not have; use adamw", "optimizer")
        if st.lora and (st.strategy != "ddp" or st.offload != "none") and RECIPES[st.precision].autocast:
            raise PlanError(f"{{precision}} {st.precision} with LoRA under {st.strategy}: the engine casts the "
                            "adapters to 16 bits, a step the derived route does not measure for model_type "
                            f"'{self.cfg.get('model_type')}'; use {{precision}} bf16-pure (a 16-bit base, as plan "
                            "recommend plans LoRA)", "precision")
        if st.lora and st.lora_targets != "all-linear":
            wanted = {t.strip().split(".")[-1] for t in st.lora_targets.split(",") if t.strip()}
            if not wanted & self.linear_names():
                raise PlanError(f"{{lora_targets}} '{st.lora_targets}' matches no linear layer of "
                                f"{self.cfg.get('model_type')} (its block linears: "
                                f"{', '.join(sorted(self.linear_names()))})", "lora_targets")

    def _single(self, st: Settings) -> tuple[dict, dict, float, Fit]:
        """One GPU's phases and their components for `st` from its class's fit: the largest of the
        lines per phase, then gradient accumulation (every gradient alive in forward and
        backward). Also the gradient bytes, and the fit."""
        f = self.fit(st)
        at = [ln.at(f.layers, st.batch_size, st.seq_len) for ln in f.lines]
        grads = max(a["optimizer_step.gradients"] for a in at)
        phases, comps = {}, {}
        for ph in PHASES:
            src = max(at, key=lambda a: a[ph])
            phases[ph] = src[ph]
            comps[ph] = {c: src[f"{ph}.{c}"] for c in COMPONENTS}
        # MemTracker files the optimizer step's temporaries as optimizer state; the estimate files
        # the state kept (forward's) as `optimizer` and the temporaries as `other`, as the formulas do
        temp = comps["optimizer_step"]["optimizer"] - comps["forward"]["optimizer"]
        if temp > 0:
            comps["optimizer_step"]["optimizer"] -= temp
            comps["optimizer_step"]["other"] += temp
        if st.accumulation > 1:
            for ph in ("forward", "backward"):
                add = grads - comps[ph]["gradients"]
                phases[ph] += add
                comps[ph]["gradients"] += add
        return phases, comps, grads, f

    def estimate(self, st: Settings) -> Estimate:
        """Phases for `st`: one GPU or DDP from its class's fit (`_single`; DDP's buckets added
        from the measured gradients), a sharded strategy or offload by the sharding formulas over
        the measured parts (`sharded`)."""
        self.check(st)
        if st.strategy != "ddp" or st.offload != "none":
            return self.sharded(st)
        phases, comps, grads, f = self._single(st)
        notes = list(f.notes)
        if st.head_tokens:
            notes.append("head_tokens: the derived route measured the head at every position, an upper bound")
        if st.gpus * st.nodes > 1:
            notes.append("DDP gradient buckets: one extra copy of the gradients, in every phase")
            for ph in PHASES:
                phases[ph] += grads
                comps[ph]["other"] += grads
        return self._estimate(st, f, phases, comps, notes)

    def _estimate(self, st: Settings, f: Fit, phases: dict, comps: dict, notes: list, cpu: float = 0,
                  nvme: float = 0) -> Estimate:
        """The Estimate of phases in bytes: the cuBLAS workspace on CUDA kernels, the peak, and
        the parameters as the formulas count them."""
        if st.kernels == "cuda":  # as estimate() adds it: allocator memory from the first matmul on
            for ph in PHASES[1:]:
                phases[ph] += CUBLAS_WORKSPACE_BYTES
                comps[ph]["other"] += CUBLAS_WORKSPACE_BYTES
        # whole bytes per component, each phase their exact sum (the table's rows add up)
        comps = {ph: {c: int(round(v)) for c, v in d.items()} for ph, d in comps.items()}
        phases = {ph: sum(d.values()) for ph, d in comps.items()}
        peak_phase = max(phases, key=phases.get)
        peak = phases[peak_phase]
        train = int(round(f.trainable[0] + f.trainable[1] * f.layers))
        # the model's parameters as the formulas count them: PEFT's adapters are not the model's
        total = int(round(f.params[0] + f.params[1] * f.layers)) - (train if st.lora else 0)
        # device_bytes and needed_bytes: estimate() adds the allocator's figures from the spec's widths
        return Estimate(params=total, trainable_params=train, peak_bytes=peak, device_bytes=0,
                        components=comps[peak_phase], phases=phases, phase_components=comps, notes=notes,
                        cpu_bytes=int(cpu), nvme_bytes=int(nvme), route="derived")

    def param_count(self) -> ParamCount:
        """The parameters as the sharding formulas read them, counted on the module built on the
        meta device with one block of each kind (`layer_plans`' base), blocks scaled by their
        counts: embeddings, head (untied), the rest outside the blocks, the largest block, and
        buffers. Also sets the parameters ZeRO-3 keeps whole (`_persistent`: tensors under its
        persistence threshold, 10 x hidden)."""
        if self._pc is None and not self._cached_param_count():
            import torch

            from ..distributed import DS_PERSISTENCE_FACTOR
            from .builder import build_model
            base, _ = layer_plans(self.cfg)
            _, counts, to = layer_kinds(self.cfg)
            with torch.device("meta"):
                model, _ = build_model(reduced(self.cfg, len(base), to(base)), Settings(precision="bf16-pure"),
                                       meta=True)
            blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=[])
            if len(blocks) != len(base):
                raise PlanError(f"{{strategy}}: model_type '{self.cfg.get('model_type')}' has no formula and its "
                                "blocks cannot be told apart in the module, so the sharding formulas cannot place "
                                "them; use {strategy} ddp", "strategy")
            per = {k: sum(p.numel() for p in blk.parameters()) for k, blk in zip(base, blocks, strict=True)}
            total = sum(p.numel() for p in model.parameters())
            emb_w = model.get_input_embeddings().weight
            out = model.get_output_embeddings()
            tied = out is not None and out.weight is emb_w
            head = out.weight.numel() if out is not None and not tied else 0
            limit = DS_PERSISTENCE_FACTOR * int(self.cfg.get("hidden_size") or self.cfg.get("n_embd") or 0)
            small = {k: sum(p.numel() for p in blk.parameters() if p.numel() < limit)
                     for k, blk in zip(base, blocks, strict=True)}
            in_blocks = {id(p) for blk in blocks for p in blk.parameters()}
            small_rest = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks and p.numel() < limit)
            self._pc = ParamCount(embeddings=emb_w.numel(), attention=0, mlp=sum(counts[k] * per[k] for k in counts),
                                  norms=total - sum(per.values()) - emb_w.numel() - head, head=head, tied=tied,
                                  buffers_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
                                  largest_layer=max(per.values()), linear_shapes=())
            self._persistent = sum(counts[k] * small[k] for k in counts) + small_rest
            self._save_param_count()
        return self._pc

    def _facts_path(self) -> Path:
        return cache_dir() / f"{self.key()}-module.json"

    def _facts(self) -> dict:
        """What was read once from the transformers module of this config (`encoder`, the
        parameter counts), cached beside the coefficients: building it takes transformers'
        import, seconds, where a cached fit takes milliseconds."""
        try:
            return json.loads(self._facts_path().read_text())
        except (OSError, ValueError):
            return {}

    def _save_facts(self, **facts) -> None:
        try:
            path = self._facts_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**self._facts(), **facts}))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache: read the module again next time

    def _cached_param_count(self) -> bool:
        d = self._facts()
        try:
            tuples = {k: _tuples(v) for k, v in d["count"].items()}  # JSON's lists: the shapes' tuples
            self._pc, self._persistent = ParamCount(**tuples), int(d["persistent"])
        except (KeyError, TypeError, AttributeError, ValueError):
            return False
        return True

    def _save_param_count(self) -> None:
        from dataclasses import asdict
        self._save_facts(count=asdict(self._pc), persistent=self._persistent)

    def encoder(self) -> bool:
        """Whether the model trains as an encoder with a sequence-classification head, as the
        simulator builds it (`builder.is_encoder`: ModernBERT, which has no causal-LM class);
        False where transformers cannot build the config (the derivation then says why)."""
        d = self._facts()
        if isinstance(d.get("encoder"), bool):
            return d["encoder"]
        from transformers import AutoConfig

        from .builder import is_encoder
        try:
            enc = bool(is_encoder(AutoConfig.for_model(self.cfg["model_type"],
                                                       **{k: v for k, v in self.cfg.items() if k != "model_type"})))
        except Exception:  # noqa: BLE001 (a config transformers refuses: not known to be an encoder)
            return False
        self._save_facts(encoder=enc)
        return enc

    def sharded(self, st: Settings) -> Estimate:
        """A sharded strategy (FSDP, ZeRO) or offload: the sharding formulas of
        planner/distributed.py over measured single-GPU parts (`MeasuredStep`).

        The model states come from the fit of the storage recipe (`st` on one GPU). The
        activation side of each phase (its peak less the weights, gradients and optimizer state
        measured in it) comes from the fit of the recipe the engine computes in: FSDP's mixed
        precision all-gathers 16-bit parameters and DeepSpeed casts the module, so a 16-bit
        recipe computes as pure bf16 does (planner/memory.py `_ctx`). Backward peaks inside the
        last block where gradients are alive at its measured peak; under checkpointing the
        forward is taken inside a block (one more block gathered, the safe side)."""
        from ..distributed import MeasuredStep, sharded_phases
        from ..memory import ActivationPhases
        one = replace(st, strategy="ddp", offload="none", gpus=1, nodes=1, accumulation=1)
        ph_own, own, _, f = self._single(one)
        engine = replace(one, precision="bf16-pure") if RECIPES[st.precision].compute == 2 else one
        ph_eng, eng, _, _ = self._single(engine)
        side = {}
        for ph in ("forward", "backward"):
            c = eng[ph]
            act = ph_eng[ph] - c["weights"] - c["gradients"] - c["optimizer"]
            side[ph] = {"activations": max(0.0, act - c["logits"]), "logits": c["logits"]}
        acts = ActivationPhases(forward=side["forward"], backward=side["backward"],
                                fwd_in_block=st.grad_checkpointing, bwd_in_block=eng["backward"]["gradients"] > 0)
        s = own["optimizer_step"]
        states = own["forward"]["optimizer"]  # MemTracker counts the step's temporary as state: forward's is the state
        train = f.trainable[0] + f.trainable[1] * f.layers
        # AdamW-like state and its step temporary are in the parameter's dtype: on ZeRO's fp32
        # master they take 4 bytes per element, for the measured bytes per gradient element
        per_grad = s["gradients"] / train if train else 4.0
        master = 4.0 / per_grad if per_grad else 1.0
        temp = ph_own["optimizer_step"] - s["weights"] - s["gradients"] - states
        pc = self.param_count()
        m = MeasuredStep(weights=s["weights"], grads=s["gradients"], optimizer=states, opt_temp=temp,
                         acts=acts, trainable=int(round(train)), master_optimizer=states * master,
                         master_opt_temp=temp * master, persistent=self._persistent)
        notes = list(f.notes) + ["sharded: planner/distributed.py's formulas over the measured parts (the "
                                 "storage recipe's model states, the activations as the engine computes)"]
        spec = self.spec if self.spec is not None else proxy_spec(self.cfg, self)
        phase_comp, end_bw, cpu, nvme = sharded_phases(spec, pc, st, notes, m)
        comps = phase_table(phase_comp, end_bw, cuda=False)  # the workspace: _estimate adds it
        phases = {ph: sum(comps[ph].values()) for ph in PHASES}
        return self._estimate(st, f, phases, comps, notes, cpu, nvme)


def proxy_spec(cfg: dict, derived: Derived | None = None) -> ModelSpec:
    """A ModelSpec that stands in for a model_type without a formula: its widths, depth and
    maximum positions read from the config as a llama (or, with experts, mixtral) block, for the
    option checks and the step-time model; `extra['derived']` carries the derived route, which
    `estimate()` then uses for the memory."""
    g = cfg.get
    if not isinstance(g("model_type"), str):
        raise PlanError(f"'model_type' must be a string, got {g('model_type')!r}")
    experts = g("num_local_experts") or g("num_experts") or g("n_routed_experts") or 0
    hidden = g("hidden_size") or g("n_embd") or g("d_model")
    heads = g("num_attention_heads") or g("n_head") or g("num_heads")
    norm = {
        "model_type": "mixtral" if experts else "llama", "vocab_size": g("vocab_size"), "hidden_size": hidden,
        "num_hidden_layers": layer_count(cfg), "num_attention_heads": heads,
        "num_key_value_heads": g("num_key_value_heads") or heads,
        "head_dim": g("head_dim") if isinstance(g("head_dim"), int) else None,
        "intermediate_size": (g("moe_intermediate_size") if experts else None) or g("intermediate_size")
        or g("n_inner") or g("ffn_dim") or 4 * (hidden or 0),
        "max_position_embeddings": g("max_position_embeddings") or g("n_positions") or 2048,
        "tie_word_embeddings": g("tie_word_embeddings", False),
        "num_local_experts": experts, "num_experts_per_tok": g("num_experts_per_tok") or 0,
    }
    try:
        spec = ModelSpec.from_config(norm)
    except SpecError as e:
        buildable(cfg)
        raise PlanError(f"model_type '{cfg.get('model_type')}': the config's widths cannot be read ({e})") from None
    derived = derived if derived is not None else Derived(cfg)
    spec = replace(spec, model_type=str(cfg.get("model_type")), encoder=derived.encoder(),
                   extra={**spec.extra, "derived": derived})
    derived.spec = spec
    return spec
