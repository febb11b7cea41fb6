"""Build the function-name task from Python's own standard library (code no one here wrote).

Each example is one function of the stdlib: its source with the name (and any call of it by
name) replaced by `<fn>` and its docstring removed; the answer is the real name as JSON,
`{"name": "..."}`. Functions of a module go either to training or to held-out evaluation (split
by a hash of the module path), so held-out functions come from modules never seen in training.

    python make_data.py OUT_DIR [--train N] [--eval N]
writes OUT_DIR/train.jsonl (chat format) and OUT_DIR/heldout.jsonl.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sysconfig
from pathlib import Path

QUESTION = "What is the name of this Python function? Answer with JSON: {{\"name\": \"...\"}}\n\n```python\n{code}\n```"


def examples(stdlib: Path):
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if "test" in rel or "site-packages" in rel or "idlelib" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or len(node.name) < 4:
                continue
            name = node.name
            body = node.body
            if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                body = body[1:]
            if not body:
                continue
            fn = ast.FunctionDef(name="PLACEHOLDER", args=node.args, body=body, decorator_list=[], returns=node.returns,
                                 type_comment=None, type_params=[])
            ast.copy_location(fn, node)
            code = ast.unparse(ast.fix_missing_locations(fn))
            code = code.replace("PLACEHOLDER", "<fn>").replace(f"{name}(", "<fn>(").replace(f".{name}", ".<fn>")
            if name in code or not 120 <= len(code) <= 600:
                continue
            yield rel, name, code


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--eval", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for rel, name, code in examples(stdlib):
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 10
        (held if bucket == 0 else train).append((rel, name, code))
    rng = random.Random(a.seed)
    rng.shuffle(train)
    rng.shuffle(held)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for rel, name, code in train[:a.train]:
            f.write(json.dumps({"messages": [{"role": "user", "content": QUESTION.format(code=code)},
                                             {"role": "assistant", "content": json.dumps({"name": name})}],
                                "module": rel}) + "\n")
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        for rel, name, code in held[:a.eval]:
            f.write(json.dumps({"question": QUESTION.format(code=code), "name": name, "module": rel}) + "\n")
    print(f"{min(len(train), a.train)} training and {min(len(held), a.eval)} held-out functions from {stdlib} "
          f"({len(train)} and {len(held)} available)")


if __name__ == "__main__":
    main()
