"""Find a model's config: local path, `.gguf` file, Hugging Face cache, the Hub, the built-in catalog.

I/O lives here; everything returns a plain `config.json`-style dict.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CATALOG_PATH = Path(__file__).resolve().parent.parent / "tables" / "models.json"


class ResolveError(ValueError):
    """The model could not be found or read: one line for the user."""


@dataclass
class Resolved:
    name: str
    config: dict
    source: str  # "local", "gguf", "cache", "hub", "catalog"


@lru_cache(maxsize=1)
def catalog() -> dict:
    """The built-in catalog: id -> {"aliases", "source", "config"} (tables/models.json)."""
    with open(CATALOG_PATH, encoding="utf-8") as f:
        return json.load(f)


def _catalog_index() -> dict:
    """Every id and alias, lower-cased -> its catalog id."""
    idx = {}
    for key, entry in catalog().items():
        for name in [key, *entry.get("aliases", [])]:
            idx[name.lower()] = key
    return idx


def _bare(name: str) -> str:
    """A repo id without its org, lower-cased: `meta-llama/Meta-Llama-3-8B` -> `meta-llama-3-8b`."""
    return name.rsplit("/", 1)[-1].lower()


def catalog_lookup(model: str) -> str | None:
    """The catalog id `model` names: an id or alias in any case, or one without its org
    (`Meta-Llama-3-8B`). A bare name that two orgs' entries carry is refused in one line."""
    idx = _catalog_index()
    key = idx.get(model.lower())
    if key is not None or "/" in model:
        return key
    bare = model.lower()
    keys = sorted({key for name, key in idx.items() if _bare(name) == bare}, key=str.lower)
    if len(keys) > 1:
        raise ResolveError(f"'{model}' names {len(keys)} catalog entries: {', '.join(keys)}; pass the full id")
    return keys[0] if keys else None


def _tokens(name: str) -> set:
    import re
    return set(re.findall(r"[a-z]+|\d+(?:\.\d+)?", name.lower()))


def _similarity(query: str, name: str) -> float:
    """How alike two repo names read: the characters of the names without their orgs
    (difflib's ratio) and the words and numbers they share, plus a little for the same org."""
    ratio = difflib.SequenceMatcher(None, _bare(query), _bare(name)).ratio()
    q, n = _tokens(_bare(query)), _tokens(_bare(name))
    shared = len(q & n) / len(q | n) if q | n else 0.0
    same_org = "/" in query and "/" in name and query.split("/")[0].lower() == name.split("/")[0].lower()
    return 0.5 * ratio + 0.4 * shared + 0.1 * same_org


def suggestions(model: str, n: int = 3, cutoff: float = 0.3) -> list[str]:
    """Up to `n` catalog ids whose id or alias reads most like `model`, best first, each once."""
    best: dict[str, float] = {}
    for key, entry in catalog().items():
        best[key] = max(_similarity(model, name) for name in [key, *entry.get("aliases", [])])
    ranked = sorted((k for k in best if best[k] >= cutoff), key=lambda k: (-best[k], k.lower()))
    return ranked[:n]


def hub_source(model_id: str) -> str:
    """Where a catalog entry's config.json is published, unless the entry says otherwise."""
    return f"https://huggingface.co/{model_id}/blob/main/config.json"


def _natural(name: str) -> list:
    """Sort key that reads numbers as numbers: Qwen3-4B before Qwen3-14B."""
    import re
    return [(0, float(part), "") if part[0].isdigit() else (1, 0.0, part)
            for part in re.findall(r"\d+(?:\.\d+)?|[^\d]+", name.lower())]


def catalog_entries(query: str = "") -> list[dict]:
    """The catalog as rows for `plan models`, sorted by id: id, model_type, params (the exact
    count of the model plan trains, from tables/models.json), source, aliases and the published
    figure where the entry records one. `query` keeps the entries whose id, aliases or model_type
    contain each of its words, in any case; numbers in ids sort as numbers."""
    words = query.lower().split()
    rows = []
    for key, entry in sorted(catalog().items(), key=lambda kv: _natural(kv[0])):
        mt = entry["config"].get("model_type", "")
        text = " ".join([key, *entry.get("aliases", []), mt]).lower()
        if all(w in text for w in words):
            row = {"id": key, "model_type": mt, "params": entry.get("params"), "source": entry["source"],
                   "aliases": list(entry.get("aliases", []))}
            if "published" in entry:
                row["published"] = {k: v for k, v in entry["published"].items() if k != "vision_config"}
            rows.append(row)
    return rows


MAX_CONFIG_BYTES = 16 * 2**20
"""A config.json is a few KB (Llama-4's, the largest in the catalog, is 5 KB); past this, one line."""


def _read_json(path: Path) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ResolveError(f"{path}: {size:,} bytes is not a model config (at most "
                               f"{MAX_CONFIG_BYTES // 2**20} MiB)")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ResolveError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise ResolveError(f"{path}: not a model config (nested too deeply)") from None
    except UnicodeDecodeError:
        raise ResolveError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ResolveError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ResolveError(f"{path}: a config must be a JSON object")
    return data


def resolve(model: str) -> Resolved:
    """Resolution order of the contract: local path, HF cache, Hub (unless HF_HUB_OFFLINE), catalog."""
    if not model or not model.strip():
        raise ResolveError("no model given: pass a Hugging Face id, a directory with config.json, "
                           "a config.json or a .gguf file")
    try:
        return _resolve(model)
    except OSError as e:  # a name the file system refuses (too long, a device, no permission)
        raise ResolveError(f"{model[:200]}: cannot read ({e.strerror or type(e).__name__})") from None


MODEL_FILES = "a directory with config.json, a config.json or a .gguf file"


def looks_like_path(model: str) -> bool:
    """Whether `model` can only be a local path: a Hugging Face repo id (`org/name`) never starts
    with `/`, `.` or `~`, never ends with `/` and has at most one `/`."""
    return model.startswith(("/", ".", "~")) or model.endswith(("/", os.sep)) or model.count("/") > 1


def _resolve(model: str) -> Resolved:
    path = Path(model).expanduser()
    if path.exists() and path.is_file() and path.suffix not in (".json", ".gguf"):
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ResolveError(f"{model}: not a model file; pass {MODEL_FILES}")
    if path.suffix == ".gguf" or (path.exists() and path.is_file() and path.suffix != ".json"):
        if not path.exists():
            raise ResolveError(f"{model}: no such file")
        return Resolved(path.name, gguf_config(path), "gguf")
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return Resolved(path.name, gguf_config(ggufs[0]), "gguf")
            raise ResolveError(f"{model}: directory has no config.json")
        return Resolved(path.name, _read_json(cfg), "local")
    if path.suffix == ".json":
        if not path.exists():
            raise ResolveError(f"{model}: no such file")
        return Resolved(path.parent.name or path.name, _read_json(path), "local")
    if looks_like_path(model) and not path.exists():
        raise ResolveError(f"{model}: no such file or directory (a local model is {MODEL_FILES})")
    for finder in (_from_cache, _from_hub):
        found = finder(model)
        if found is not None:
            return found
    key = catalog_lookup(model)
    if key is not None:
        return Resolved(key, dict(catalog()[key]["config"]), "catalog")
    names = ", ".join(suggestions(model)) or "none"
    raise ResolveError(f"unknown model '{model[:200]}' (not local, not cached, Hub unreachable or offline); "
                       f"closest catalog entries: {names}; or pass a directory or config.json path")


def _from_cache(model: str) -> Resolved | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        hit = try_to_load_from_cache(model, "config.json")
    except Exception:  # an id that is not a valid repo name
        return None
    if isinstance(hit, str) and os.path.exists(hit):
        return Resolved(model, _read_json(Path(hit)), "cache")
    return None


def _from_hub(model: str) -> Resolved | None:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or "/" not in model:
        return None
    if not _hub_reachable():
        return None
    try:
        import logging

        from huggingface_hub import hf_hub_download
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        hit = hf_hub_download(model, "config.json", etag_timeout=3)
    except Exception:  # network failure, gated repo, missing repo: fall through to the catalog
        return None
    return Resolved(model, _read_json(Path(hit)), "hub")


def _hub_reachable(timeout: float = 2.0) -> bool:
    """One quick TCP connect to the Hub endpoint, so an offline machine does not sit through
    huggingface_hub's retry back-off before falling through to the catalog."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# GGUF metadata keys (llama.cpp's convention: "{arch}.{field}") -> config.json fields
_GGUF_FIELDS = {
    "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size", "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings", "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "expert_count": "num_local_experts",
    "expert_used_count": "num_experts_per_tok", "attention.key_length": "head_dim",
}
_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "phi3": "phi3", "gpt2": "gpt2",
              "falcon": "falcon"}


# GGUF value types (gguf-py's GGUFValueType) -> bytes of one value; 8 string, 9 array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_gguf_layout(path: Path) -> None:
    """Walk a GGUF file's header and metadata (GGUF v2/v3: counts and lengths are uint64) without
    building any value, and refuse one whose counts or lengths the file cannot hold: the `gguf`
    reader materialises every metadata element, so a corrupt count of 10^8 exhausts memory."""
    import struct
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ResolveError(f"{path}: not a readable GGUF file (no GGUF header)")
        version, tensors, kvs = struct.unpack("<IQQ", head[4:])
        if version < 2 or tensors > size // 24 or kvs > size // 13:
            raise ResolveError(f"{path}: not a readable GGUF file (version {version}, {tensors} tensors and {kvs} "
                               f"metadata entries in {size:,} bytes)")

        def take(n: int) -> bytes:
            if n > size - f.tell():
                raise ResolveError(f"{path}: not a readable GGUF file (a length of {n:,} past the end of the file)")
            return f.read(n)

        def skip_value(kind: int) -> None:
            if kind == 8:
                take(struct.unpack("<Q", take(8))[0])
            elif kind == 9:
                elem, count = struct.unpack("<IQ", take(12))
                least = 8 if elem == 8 else _GGUF_SIZES.get(elem)
                if least is None or count * least > size - f.tell():
                    raise ResolveError(f"{path}: not a readable GGUF file (an array of {count:,} values of type "
                                       f"{elem} past the end of the file)")
                if elem == 8:
                    for _ in range(count):
                        skip_value(8)
                else:
                    take(count * least)
            elif kind in _GGUF_SIZES:
                take(_GGUF_SIZES[kind])
            else:
                raise ResolveError(f"{path}: not a readable GGUF file (unknown value type {kind})")

        for _ in range(kvs):
            take(struct.unpack("<Q", take(8))[0])  # the key
            skip_value(struct.unpack("<I", take(4))[0])


def gguf_config(path: Path) -> dict:
    """A config dict from a GGUF file's metadata, read with the `gguf` package (no tensor data)
    once `check_gguf_layout` has bounded what it will read."""
    check_gguf_layout(path)
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path), "r")
    except Exception as e:
        raise ResolveError(f"{path}: not a readable GGUF file ({type(e).__name__})") from None

    def value(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v

    arch = value("general.architecture")
    if arch not in _GGUF_ARCH:
        raise ResolveError(f"{path}: GGUF architecture '{arch}' has no config mapping")
    cfg = {"model_type": _GGUF_ARCH[arch]}
    for k, field_name in _GGUF_FIELDS.items():
        v = value(f"{arch}.{k}")
        if v is not None:
            cfg[field_name] = v
    tokens = value("tokenizer.ggml.tokens")
    vocab = value(f"{arch}.vocab_size")
    cfg["vocab_size"] = int(vocab) if vocab is not None else (len(tokens) if tokens is not None else None)
    names = {t.name for t in reader.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    if cfg["model_type"] == "llama" and "head_dim" in cfg and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        if cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]:
            cfg.pop("head_dim")
    return cfg
