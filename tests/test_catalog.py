"""The built-in catalog (tables/models.json): every config is one transformers accepts, its recorded
parameter count is the count of the model plan trains, each new entry's count is within 1% of the
figure its publisher gives, and names resolve as users type them (renamed repos, any case, without
the org), with unknown names answered by the entries whose names read most alike, each once."""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import assert_one_clear_line, run_plan

from planner import resolve as resolve_m
from planner.resolve import ResolveError, catalog, catalog_lookup, hub_source, resolve, suggestions
from planner.spec import FAMILIES, ModelSpec, count_params

PUBLISHED = sorted(k for k, e in catalog().items() if "published" in e)


def _model(cls, conf):
    import torch
    with torch.device("meta"):
        return cls.from_config(conf) if hasattr(cls, "from_config") else cls(conf)


def meta_count(cfg: dict, vision: dict | None = None) -> int:
    """sum(p.numel()) of the model plan trains, built from `cfg` on the meta device: the simulator's
    class (causal LM; sequence classification for BERT and ModernBERT), else the config's own
    architecture. With `vision`, the multimodal model the published figure counts."""
    import transformers

    from planner.measure.builder import model_class
    cfg = dict(cfg)
    mt = cfg.pop("model_type")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conf = transformers.AutoConfig.for_model(mt, **cfg)
        if vision is not None:  # Llama 4: the text config inside the published multimodal config
            text = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
            full = transformers.Llama4Config(text_config=text, vision_config=vision)
            return sum(p.numel() for p in _model(transformers.Llama4ForConditionalGeneration, full).parameters())
        try:
            cls = model_class(conf)
        except ValueError:
            cls = getattr(transformers, cfg["architectures"][0])
        return sum(p.numel() for p in _model(cls, conf).parameters())


def test_the_catalog_covers_the_current_families():
    ids = set(catalog())
    assert len(ids) >= 80
    for must in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "Qwen/Qwen3-14B",
                 "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B", "google/gemma-3-1b-pt",
                 "google/gemma-3-4b-pt", "google/gemma-3-12b-pt", "google/gemma-3-27b-pt",
                 "meta-llama/Llama-3.3-70B-Instruct", "meta-llama/Llama-4-Scout-17B-16E",
                 "meta-llama/Llama-4-Maverick-17B-128E", "openai/gpt-oss-20b", "openai/gpt-oss-120b",
                 "deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                 "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "microsoft/phi-4", "microsoft/phi-2",
                 "microsoft/phi-1_5", "HuggingFaceTB/SmolLM3-3B", "allenai/OLMo-2-1124-7B",
                 "allenai/OLMo-2-1124-13B", "mistralai/Ministral-8B-Instruct-2410",
                 "mistralai/Mistral-Small-24B-Base-2501", "answerdotai/ModernBERT-base",
                 "answerdotai/ModernBERT-large", "google/gemma-2b", "google/gemma-7b",
                 "google-bert/bert-base-uncased"):
        assert must in ids, must
    types = {e["config"]["model_type"] for e in catalog().values()}
    assert {"qwen3", "qwen3_moe", "gemma3_text", "llama4_text", "gpt_oss", "deepseek_v3", "phi", "gemma", "olmo2",
            "smollm3", "modernbert"} <= types


def test_every_entry_has_its_source_and_names_point_to_one_entry():
    owner = {}
    for key, e in catalog().items():
        assert e["source"] == hub_source(key), key
        assert isinstance(e["params"], int) and e["params"] > 0
        for name in [key, *e["aliases"]]:
            assert owner.setdefault(name.lower(), key) == key, f"{name} names {owner[name.lower()]} and {key}"


@pytest.mark.parametrize("model_id", sorted(catalog()))
def test_transformers_accepts_every_config(model_id):
    from transformers import AutoConfig
    cfg = dict(catalog()[model_id]["config"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    for k in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if k in cfg:
            assert getattr(conf, k) == cfg[k]


@pytest.mark.parametrize("model_id", sorted(catalog()))
def test_recorded_params_are_the_count_from_the_config(model_id):
    """`params` (what `plan models` lists) is the planner's own count where a formula exists, and
    transformers' count on the meta device for every entry."""
    e = catalog()[model_id]
    if e["config"]["model_type"] in FAMILIES:
        assert count_params(ModelSpec.from_config(e["config"])).total == e["params"]
    assert meta_count(e["config"]) == e["params"]


@pytest.mark.parametrize("model_id", PUBLISHED)
def test_params_within_1_percent_of_the_published_figure(model_id):
    e = catalog()[model_id]
    pub = e["published"]
    assert pub["where"] and ("params" in pub or "non_embedding_params" in pub)
    if "params" in pub:
        total = meta_count(e["config"], pub.get("vision_config")) if "vision_config" in pub else e["params"]
        assert abs(total / pub["params"] - 1) <= 0.01, (total, pub)
    if "non_embedding_params" in pub:  # Qwen's convention: less the input embedding and an untied head
        cfg = e["config"]
        embedding = cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg["tie_word_embeddings"] else 2)
        assert abs((e["params"] - embedding) / pub["non_embedding_params"] - 1) <= 0.01


# ---------------------------------------------------------------- names


@pytest.fixture
def offline(monkeypatch):
    """Resolution as on a machine with no cache and no Hub: the catalog answers."""
    monkeypatch.setattr(resolve_m, "_from_cache", lambda model: None)
    monkeypatch.setattr(resolve_m, "_from_hub", lambda model: None)


@pytest.mark.parametrize("name, key", [
    ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B"),
    ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B"),
    ("google/gemma-3-4b-it", "google/gemma-3-4b-pt"),
    ("meta-llama/Llama-4-Scout-17B-16E", "meta-llama/Llama-4-Scout-17B-16E"),
    ("openai/gpt-oss-20b", "openai/gpt-oss-20b"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
    ("microsoft/phi-4", "microsoft/phi-4"),
    ("HuggingFaceTB/SmolLM3-3B", "HuggingFaceTB/SmolLM3-3B"),
    ("allenai/OLMo-2-1124-7B", "allenai/OLMo-2-1124-7B"),
    ("google-bert/bert-base-uncased", "google-bert/bert-base-uncased"),
    ("bert-base-uncased", "google-bert/bert-base-uncased"),          # the pre-2024 name
    ("google-bert/bert-base-cased", "bert-base-cased"),              # the canonical name of an older entry
    ("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),     # renamed repos
    ("meta-llama/Meta-Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-70B"),
    ("META-LLAMA/meta-llama-3-8b", "meta-llama/Meta-Llama-3-8B"),    # any case
    ("Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B"),               # without the org
    ("qwen3-30b-a3b-base", "Qwen/Qwen3-30B-A3B"),                   # an alias without its org
    ("gpt2", "openai-community/gpt2"),
])
def test_names_resolve_to_their_entry(offline, name, key):
    res = resolve(name)
    assert (res.name, res.source) == (key, "catalog")
    assert res.config == catalog()[key]["config"]


def test_a_bare_name_two_orgs_carry_is_refused_naming_both(monkeypatch, offline):
    cat = dict(catalog())
    cat["unsloth/Qwen3-8B"] = {"aliases": [], "source": hub_source("unsloth/Qwen3-8B"), "params": 1,
                               "config": cat["Qwen/Qwen3-8B"]["config"]}
    monkeypatch.setattr(resolve_m, "catalog", lambda: cat)
    with pytest.raises(ResolveError) as e:
        resolve("Qwen3-8B")
    msg = str(e.value)
    assert "\n" not in msg and "Qwen/Qwen3-8B, unsloth/Qwen3-8B" in msg and "full id" in msg
    assert resolve("unsloth/Qwen3-8B").name == "unsloth/Qwen3-8B"  # the full id still works
    assert catalog_lookup("qwen/qwen3-8b") == "Qwen/Qwen3-8B"


@pytest.mark.parametrize("name, first", [
    ("allenai/OLMo-2-1124-8B", "allenai/OLMo-2-1124-7B"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-9B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
    ("meta-llama/Meta-Llama-3-8X", "meta-llama/Meta-Llama-3-8B"),
    ("Qwen/Qwen3-30B", "Qwen/Qwen3-30B-A3B"),
    ("mistralai/Ministral-8B", "mistralai/Ministral-8B-Instruct-2410"),
    ("HuggingFaceTB/SmolLM3-3B-Instruct", "HuggingFaceTB/SmolLM3-3B"),
    ("meta-llama/Llama-4-Scout", "meta-llama/Llama-4-Scout-17B-16E"),
])
def test_suggestions_rank_by_name_and_never_repeat(name, first):
    got = suggestions(name)
    assert got[0] == first, got
    assert len(got) == len(set(got))
    for key in got:
        assert key in catalog()


def test_suggestions_for_olmo_name_olmo_entries_only():
    """Before: `google/gemma-2-27b, google/gemma-2-27b` (an entry and its alias, by characters)."""
    got = suggestions("allenai/OLMo-2-1124-7B-SFT")
    assert got and all(k.startswith("allenai/OLMo-2") for k in got), got
    assert all("pythia" not in k for k in suggestions("deepseek-ai/DeepSeek-R1-Distill-Llama-8B-GGUF"))


def test_unknown_name_is_one_line_with_the_closest_entries(offline):
    with pytest.raises(ResolveError) as e:
        resolve("allenai/OLMo-2-1124-8B")
    msg = str(e.value)
    assert "\n" not in msg
    assert "closest catalog entries: allenai/OLMo-2-1124-7B, allenai/OLMo-2-1124-13B" in msg
    with pytest.raises(ResolveError, match="closest catalog entries: none"):
        resolve("zzzzzzzz")


# ---------------------------------------------------------------- plan models


def test_plan_models_lists_the_catalog():
    r = run_plan("models", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert f"{len(catalog())} configs" in r.stdout
    for line in r.stdout.splitlines():
        assert len(line) <= 80, line
    assert "…" not in r.stdout
    assert "│ Qwen/Qwen3-8B " in r.stdout and "8.19B" in r.stdout and "qwen3 " in r.stdout
    assert "source: https://huggingface.co/<id>/blob/main/config.json" in r.stdout
    wide = run_plan("models", "gpt-oss", env={"COLUMNS": "200"})
    assert wide.returncode == 0 and hub_source("openai/gpt-oss-20b") in wide.stdout
    assert "2 of" in wide.stdout and "20.91B" in wide.stdout and "116.83B" in wide.stdout


def test_plan_models_query_and_json():
    r = run_plan("models", "QWEN3", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["id"] for x in rows] == ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B",
                                       "Qwen/Qwen3-14B", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-32B",
                                       "Qwen/Qwen3-235B-A22B"]
    row = rows[3]
    assert row["model_type"] == "qwen3" and row["params"] == 8_190_735_360
    assert row["source"] == "https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json"
    assert row["aliases"] == ["Qwen/Qwen3-8B-Base"] and row["published"]["params"] == 8_190_000_000
    both = json.loads(run_plan("models", "llama 70b", "--json").stdout)  # every word must match
    assert both and all("70b" in x["id"].lower() and "llama" in x["id"].lower() for x in both)
    moe = json.loads(run_plan("models", "qwen3_moe", "--json").stdout)  # the model_type matches too
    assert [x["id"] for x in moe] == ["Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B"]


@pytest.mark.parametrize("args", [("no-such-model",), ("a" * 300,), ("qwen\x07",)])
def test_plan_models_bad_query_is_one_line_status_2(args):
    r = run_plan("models", *args)
    assert_one_clear_line(r)
