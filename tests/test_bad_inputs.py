"""The bad-input catalogue: every case runs the real `plan` command in a subprocess and must
answer with exit status 2, exactly one line on stderr naming what to fix, no traceback, nothing
on stdout, and no output a later run could take for a complete one (no plan files, no
checkpoint, no final model, no run report)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import assert_one_clear_line, no_space, run_plan

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """A workspace: a tiny Llama config (+ a WordLevel tokenizer, no download), datasets good
    and bad, recipes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("bad")
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text(json.dumps(TINY))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(200)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="[EOS]").save_pretrained(d / "model")
    (d / "config.json").write_text(json.dumps(TINY))
    good = json.dumps({"instruction": "w1 w2", "output": "w3"}) + "\n"
    (d / "good.jsonl").write_text(good * 8)
    (d / "empty.jsonl").write_text("")
    latin1 = json.dumps({"instruction": "caf\u00e9", "output": "x"}, ensure_ascii=False).encode("latin-1")
    (d / "latin1.jsonl").write_bytes(latin1 + b"\n")
    (d / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    (d / "nofield.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" +
                                     json.dumps({"instruction": "c"}) + "\n")
    (d / "chat-bad.jsonl").write_text(json.dumps({"messages": "hello"}) + "\n")
    (d / "nolabel.jsonl").write_text(json.dumps({"text": "w1"}) + "\n")
    (d / "data.txt").write_text("w1 w2\n")
    (d / "list.json").write_text(json.dumps([1, 2]))
    (d / "a-file").write_text("not a directory")
    (d / "notjson.json").write_text("{not json")
    (d / "list-config.json").write_text("[1, 2]")
    (d / "missing-fields.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (d / "negative.json").write_text(json.dumps({**TINY, "num_hidden_layers": -2}))
    (d / "unsupported.json").write_text(json.dumps({"model_type": "no-such-architecture", "hidden_size": 64}))
    (d / "fake.gguf").write_bytes(b"this is not gguf")
    # found by bounded-work review and tests/test_fuzz.py
    (d / "ten-million-layers.json").write_text(json.dumps({
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 10_000_000, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960}))
    (d / "model-type-a-list.json").write_text(json.dumps({**TINY, "model_type": ["llama"]}))
    (d / "huge.json").write_bytes(b" " * (17 * 2**20) + b"{}")
    key = b"tokenizer.ggml.tokens"
    (d / "huge-count.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                                        + struct.pack("<I", 9) + struct.pack("<IQ", 0, 10**8))
    (d / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                                 "base_model: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n")
    return d


def recipe(w: Path, name: str, **kw) -> str:
    """A recipe that would train (base, data, output dir in the workspace) with `kw` changed."""
    import yaml
    r = {"base_model": str(w / "model"), "datasets": [{"path": str(w / "good.jsonl"), "type": "alpaca"}],
         "sequence_len": 32, "micro_batch_size": 2, "max_steps": 2, "bf16": False, "output_dir": str(w / f"out-{name}")}
    r.update(kw)
    r = {k: v for k, v in r.items() if v is not None}
    path = w / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


# (id, argv with {w} for the workspace, what the line must mention)
CASES = [
    # plan estimate: the model
    ("unknown-model", ["estimate", "no-such-org/no-such-model"], "unknown model"),
    ("missing-path", ["estimate", "{w}/nope/config.json"], "nope"),
    ("config-not-json", ["estimate", "{w}/notjson.json"], "notjson.json"),
    ("config-a-list", ["estimate", "{w}/list-config.json"], "list-config.json"),
    ("config-missing-fields", ["estimate", "{w}/missing-fields.json"], "missing"),
    ("config-negative-field", ["estimate", "{w}/negative.json"], "num_hidden_layers"),
    ("unsupported-architecture", ["estimate", "{w}/unsupported.json"], "no-such-architecture"),
    ("gguf-not-gguf", ["estimate", "{w}/fake.gguf"], "fake.gguf"),
    # a data file given as the model: not "not a readable GGUF file"; a path: not "Hub unreachable"
    ("model-a-data-file", ["estimate", "{w}/good.jsonl"], "good.jsonl: not a model file"),
    ("model-a-text-file", ["estimate", "{w}/a-file"], "a-file: not a model file"),
    ("model-dir-missing", ["estimate", "{w}/nonexistent/"], "nonexistent/: no such file or directory"),
    ("model-relative-dir-missing", ["estimate", "./nonexistent/"], "./nonexistent/: no such file or directory"),
    ("model-relative-path-missing", ["estimate", "../no-such-model"], "no such file or directory"),
    ("gguf-metadata-count-past-the-file", ["estimate", "{w}/huge-count.gguf"], "past the end"),
    ("config-ten-million-layers-no-formula", ["estimate", "{w}/ten-million-layers.json", "--exact"], "--sim-seconds"),
    ("config-model-type-a-list", ["estimate", "{w}/model-type-a-list.json"], "model_type"),
    ("config-over-16-mib", ["estimate", "{w}/huge.json"], "not a model config"),
    ("model-name-too-long", ["estimate", "x" * 300], "cannot read"),
    # plan estimate: the options
    ("batch-zero", ["estimate", "{w}/config.json", "--batch-size", "0"], "--batch-size"),
    ("batch-negative", ["estimate", "{w}/config.json", "--batch-size", "-3"], "--batch-size"),
    ("batch-not-a-number", ["estimate", "{w}/config.json", "--batch-size", "four"], "--batch-size"),
    ("seq-zero", ["estimate", "{w}/config.json", "--seq-len", "0"], "--seq-len"),
    ("seq-negative", ["estimate", "{w}/config.json", "--seq-len", "-1"], "--seq-len"),
    ("gpus-zero", ["estimate", "{w}/config.json", "--gpus", "0"], "--gpus"),
    ("nodes-zero", ["estimate", "{w}/config.json", "--nodes", "0"], "--nodes"),
    ("unknown-dtype", ["estimate", "{w}/config.json", "--dtype", "fp64"], "--dtype"),
    ("unknown-precision", ["estimate", "{w}/config.json", "--precision", "fp7"], "precision"),
    ("unknown-optimizer", ["estimate", "{w}/config.json", "--optimizer", "adamq"], "optimizer"),
    ("unknown-strategy", ["estimate", "{w}/config.json", "--strategy", "zero4"], "strategy"),
    ("unknown-offload", ["estimate", "{w}/config.json", "--offload", "tape"], "offload"),
    ("unknown-option", ["estimate", "{w}/config.json", "--batchsize", "2"], "--batchsize"),
    ("lora-rank-larger-than-layer", ["estimate", "{w}/config.json", "--lora-rank", "4096"], "--lora-rank"),
    ("lora-targets-match-nothing", ["estimate", "{w}/config.json", "--lora-rank", "8", "--lora-targets", "nothing"],
     "--lora-targets"),
    ("lora-dropout-out-of-range", ["estimate", "{w}/config.json", "--lora-rank", "8", "--lora-dropout", "1.5"],
     "--lora-dropout"),
    ("lora-alpha-negative", ["estimate", "{w}/config.json", "--lora-rank", "8", "--lora-alpha", "-16"], "--lora-alpha"),
    ("quant-without-adapter", ["estimate", "{w}/config.json", "--quant", "nf4"], "--quant"),
    ("offload-params-with-ddp", ["estimate", "{w}/config.json", "--gpus", "2", "--strategy", "ddp", "--offload",
                                 "params"], "--offload"),
    ("fsdp-version-3", ["estimate", "{w}/config.json", "--fsdp-version", "3"], "--fsdp-version"),
    ("unknown-command", ["estmate", "{w}/config.json"], "estmate"),
    ("unknown-loss", ["estimate", "{w}/config.json", "--loss", "fused"], "--loss"),
    ("loss-chunks-zero", ["estimate", "{w}/config.json", "--loss", "chunked", "--loss-chunks", "0"], "--loss-chunks"),
    ("simulate-fused-loss-needs-cuda", ["simulate", "{w}/config.json", "--loss", "cce"], "needs CUDA"),
    ("recommend-loss-chunks-zero", ["recommend", "{w}/config.json", "--gpu", "a100-80gb", "--loss-chunks", "0"],
     "--loss-chunks"),
    # plan recommend
    ("recommend-unknown-gpu", ["recommend", "{w}/config.json", "--gpu", "rtx-9999"], "rtx-9999"),
    ("recommend-gpus-zero", ["recommend", "{w}/config.json", "--gpu", "a100-80gb", "--gpus", "0"], "--gpus"),
    ("recommend-global-batch-zero", ["recommend", "{w}/config.json", "--gpu", "a100-80gb", "--global-batch", "0"],
     "--global-batch"),
    ("recommend-unknown-method", ["recommend", "{w}/config.json", "--gpu", "a100-80gb", "--method", "magic"],
     "--method"),
    ("recommend-margin-out-of-range", ["recommend", "{w}/config.json", "--gpu", "a100-80gb", "--margin", "1.5"],
     "--margin"),
    ("recommend-unknown-model", ["recommend", "no-such-org/no-such-model", "--gpu", "a100-80gb"], "unknown model"),
    ("recommend-host-ram-nan", ["recommend", "{w}/config.json", "--gpu", "a100-80gb", "--host-ram", "nan"],
     "--host-ram"),
    ("recommend-host-ram-negative", ["recommend", "{w}/config.json", "--gpu", "a100-80gb", "--host-ram", "-5"],
     "--host-ram"),
    ("lora-alpha-infinite", ["estimate", "{w}/config.json", "--lora-rank", "8", "--lora-alpha", "inf"],
     "--lora-alpha"),
    ("unfrozen-not-a-regex", ["estimate", "{w}/config.json", "--unfrozen-parameters", "("], "--unfrozen-parameters"),
    ("unfrozen-matches-nothing", ["estimate", "{w}/config.json", "--unfrozen-parameters", "no_such_module"],
     "--unfrozen-parameters"),
    ("unfrozen-in-a-block-with-lora", ["estimate", "{w}/config.json", "--unfrozen-parameters", r"layers\.0\.mlp",
                                       "--lora-rank", "8"], "--unfrozen-parameters"),
    ("unfrozen-fsdp1", ["estimate", "{w}/config.json", "--unfrozen-parameters", "lm_head", "--gpus", "2",
                        "--strategy", "fsdp", "--fsdp-version", "1"], "--unfrozen-parameters"),
    ("lbfgs-history-zero", ["estimate", "{w}/config.json", "--optimizer", "lbfgs", "--lbfgs-history", "0"],
     "--lbfgs-history"),
    ("lbfgs-sharded", ["estimate", "{w}/config.json", "--optimizer", "lbfgs", "--gpus", "2", "--strategy", "fsdp"],
     "lbfgs"),
    ("ema-sharded", ["estimate", "{w}/config.json", "--ema", "--gpus", "2", "--strategy", "zero3"], "--ema"),
    # plan emit-config
    ("emit-out-is-a-file", ["emit-config", "{w}/config.json", "--gpu", "a100-80gb", "--out", "{w}/a-file"], "a-file"),
    ("emit-out-under-a-file", ["emit-config", "{w}/config.json", "--gpu", "a100-80gb", "--out", "{w}/a-file/plan"],
     "a-file"),
    ("emit-impossible-strategy", ["emit-config", "{w}/config.json", "--gpus", "2", "--strategy", "ddp", "--offload",
                                  "params", "--out", "{w}/emit-impossible"], "--offload"),
    ("emit-explicit-option-with-from-recommendation", ["emit-config", "{w}/config.json", "--gpu", "a100-80gb",
                                                       "--from-recommendation", "--batch-size", "64",
                                                       "--out", "{w}/emit-conflict"], "--batch-size"),
    ("emit-data-missing", ["emit-config", "{w}/config.json", "--data", "{w}/no-such.jsonl", "--out", "{w}/emit-nodata"],
     "no such dataset file"),
    ("emit-bf16-on-t4", ["emit-config", "{w}/config.json", "--gpu", "t4", "--dtype", "bf16", "--out", "{w}/emit-t4"],
     "no bf16"),
    ("emit-nothing-fits", ["emit-config", "meta-llama/Llama-3.1-405B", "--gpu", "t4", "--out", "{w}/emit-huge"],
     "nothing fits"),
    ("recommend-nothing-fits", ["recommend", "meta-llama/Llama-3.1-405B", "--gpu", "t4", "--method", "full"],
     "nothing fits"),
    # plan train: the recipe
    ("recipe-missing", ["train", "{w}/no-such-recipe.yaml"], "no such recipe"),
    ("recipe-yaml-aliases", ["train", "{w}/bomb.yaml"], "aliases"),
    ("recipe-not-yaml", ["train", "@recipe:not-yaml"], "not valid YAML"),
    ("recipe-a-list", ["train", "@recipe:a-list"], "mapping"),
    ("recipe-unknown-key", ["train", "@recipe:unknown-key"], "learning_rat"),
    ("recipe-wrong-type", ["train", "@recipe:wrong-type"], "micro_batch_size"),
    ("recipe-batch-zero", ["train", "@recipe:batch-zero"], "micro_batch_size"),
    ("recipe-seq-negative", ["train", "@recipe:seq-negative"], "sequence_len"),
    ("recipe-bf16-and-fp16", ["train", "@recipe:bf16-and-fp16"], "fp16"),
    ("recipe-qlora-without-4bit", ["train", "@recipe:qlora-without-4bit"], "load_in_4bit"),
    ("recipe-two-losses", ["train", "@recipe:two-losses"], "choose one loss"),
    ("recipe-loss-chunks-zero", ["train", "@recipe:loss-chunks-zero"], "chunked_cross_entropy_num_chunks"),
    ("recipe-optimizer-lbfgs", ["train", "@recipe:optimizer-lbfgs"], "lbfgs"),
    ("recipe-ema-decay-out-of-range", ["train", "@recipe:ema-decay-out-of-range"], "ema_decay"),
    ("recipe-unfrozen-not-a-regex", ["train", "@recipe:unfrozen-not-a-regex"], "unfrozen_parameters"),
    ("recipe-unknown-model", ["train", "@recipe:unknown-model"], "base_model"),
    ("recipe-unknown-dataset-type", ["train", "@recipe:unknown-dataset-type"], "type"),
    ("recipe-no-dataset", ["train", "@recipe:no-dataset"], "datasets"),
    ("train-num-processes-zero", ["train", "@recipe:ok", "--num-processes", "0"], "--num-processes"),
    # plan train: the data
    ("data-missing", ["train", "@recipe:data-missing"], "no such dataset"),
    ("data-empty", ["train", "@recipe:data-empty"], "no records"),
    ("data-not-utf8", ["train", "@recipe:data-not-utf8"], "UTF-8"),
    ("data-malformed-line", ["train", "@recipe:data-malformed-line"], "line 2"),
    ("data-lacks-field", ["train", "@recipe:data-lacks-field"], "record 2 has no 'output'"),
    ("data-chat-not-messages", ["train", "@recipe:data-chat-not-messages"], "messages"),
    ("data-classification-no-label", ["train", "@recipe:data-no-label"], "label"),
    ("data-unknown-suffix", ["train", "@recipe:data-unknown-suffix"], ".txt"),
    ("data-json-not-records", ["train", "@recipe:data-json-not-records"], "list of objects"),
    # plan train: the output directory
    ("output-dir-under-a-file", ["train", "@recipe:output-under-file"], "output_dir"),
    ("train-auto-unknown-model", ["train", "--auto", "no-such-org/no-such-model", "--data", "{w}/good.jsonl",
                                  "--gpu", "a100-80gb", "--out", "{w}/auto-unknown"], "unknown model"),
    ("train-auto-missing-data", ["train", "--auto", "{w}/model", "--data", "{w}/none.jsonl", "--gpu", "a100-80gb",
                                 "--out", "{w}/auto-missing"], "none.jsonl"),
]

RECIPES = {
    "ok": {},
    "unknown-key": {"learning_rat": 0.1},
    "wrong-type": {"micro_batch_size": "four"},
    "batch-zero": {"micro_batch_size": 0},
    "seq-negative": {"sequence_len": -8},
    "bf16-and-fp16": {"bf16": True, "fp16": True},
    "qlora-without-4bit": {"adapter": "qlora"},
    "two-losses": {"liger_fused_linear_cross_entropy": True, "cut_cross_entropy": True},
    "loss-chunks-zero": {"chunked_cross_entropy": True, "chunked_cross_entropy_num_chunks": 0},
    "ema-decay-out-of-range": {"ema_decay": 1.5},
    "optimizer-lbfgs": {"optimizer": "lbfgs"},
    "unfrozen-not-a-regex": {"unfrozen_parameters": ["layers.("]},
    "unknown-model": {"base_model": "{w}/no-such-model-dir"},
    "unknown-dataset-type": {"datasets": [{"path": "{w}/good.jsonl", "type": "sharegpt-v9"}]},
    "no-dataset": {"datasets": []},
    "data-missing": {"datasets": [{"path": "{w}/none.jsonl"}]},
    "data-empty": {"datasets": [{"path": "{w}/empty.jsonl"}]},
    "data-not-utf8": {"datasets": [{"path": "{w}/latin1.jsonl"}]},
    "data-malformed-line": {"datasets": [{"path": "{w}/broken.jsonl"}]},
    "data-lacks-field": {"datasets": [{"path": "{w}/nofield.jsonl"}]},
    "data-chat-not-messages": {"datasets": [{"path": "{w}/chat-bad.jsonl", "type": "chat"}]},
    "data-no-label": {"datasets": [{"path": "{w}/nolabel.jsonl", "type": "classification"}]},
    "data-unknown-suffix": {"datasets": [{"path": "{w}/data.txt"}]},
    "data-json-not-records": {"datasets": [{"path": "{w}/list.json"}]},
    "output-under-file": {"output_dir": "{w}/a-file/run"},
}


def _fill(v, w: Path):
    if isinstance(v, str):
        return v.replace("{w}", str(w))
    if isinstance(v, list):
        return [_fill(x, w) for x in v]
    if isinstance(v, dict):
        return {k: _fill(x, w) for k, x in v.items()}
    return v


def _argv(args: list[str], w: Path) -> list[str]:
    out = []
    for a in args:
        if a == "@recipe:not-yaml":
            (w / "not-yaml.yaml").write_text("base_model: [unclosed\n")
            out.append(str(w / "not-yaml.yaml"))
        elif a == "@recipe:a-list":
            (w / "a-list.yaml").write_text("- base_model: x\n")
            out.append(str(w / "a-list.yaml"))
        elif a.startswith("@recipe:"):
            name = a.split(":", 1)[1]
            out.append(recipe(w, name, **_fill(RECIPES[name], w)))
        else:
            out.append(_fill(a, w))
    return out


def complete_outputs(w: Path) -> list[str]:
    """Anything under the workspace a later run could take for a finished one."""
    names = ("PLAN.md", "recipe.yaml", "accelerate.yaml", "run_report.json", "final")
    found = []
    for p in w.rglob("*"):
        rel = p.relative_to(w)
        if rel.parts[0] == "launch" or "launch" in rel.parts:  # the launcher's own config, rewritten per run
            continue
        if p.name in names and rel.parts[0] != "model" or p.name.startswith("checkpoint-"):
            found.append(str(rel))
    return found


# measured over ~2 s each (they load a tokenizer or build a model, or emit a plan): the slow tier
SLOW_CASES = {"unsupported-architecture", "emit-out-is-a-file", "emit-out-under-a-file", "recipe-unknown-model",
              "recipe-no-dataset", "data-missing", "data-empty", "data-not-utf8", "data-malformed-line",
              "data-lacks-field", "data-chat-not-messages", "data-classification-no-label", "data-unknown-suffix",
              "data-json-not-records"}
assert SLOW_CASES <= {c[0] for c in CASES}, SLOW_CASES - {c[0] for c in CASES}


@pytest.mark.parametrize("case, args, mention", [
    pytest.param(*c, id=c[0], marks=pytest.mark.slow if c[0] in SLOW_CASES else ()) for c in CASES])
def test_bad_input_is_one_line_status_2_and_leaves_nothing(w, case, args, mention):
    before = set(complete_outputs(w))
    r = run_plan(*_argv(args, w), timeout=300)
    assert_one_clear_line(r, mention)
    assert set(complete_outputs(w)) == before, f"left behind: {set(complete_outputs(w)) - before}"


def test_catalogue_is_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.slow
def test_full_disk_on_emit_config_is_one_line_and_no_partial_plan(w):
    out = w / "emit-full"
    r = run_plan("emit-config", w / "config.json", "--gpu", "a100-80gb", "--out", out, timeout=300,
                 preexec_fn=no_space(64))
    assert_one_clear_line(r, str(out))
    assert not out.exists() or not any(p.name in ("PLAN.md", "recipe.yaml", "accelerate.yaml") for p in out.iterdir())
