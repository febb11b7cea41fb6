#!/usr/bin/env bash
# plan train on a GPU, predicted against measured (allocator and NVML), and the estimate's
# calibration cases under expandable segments. Run from the repo root on a CUDA machine:
#   benchmarks/gpu_train.sh TOKENIZER_DIR OUT_DIR
# TOKENIZER_DIR: a tokenizer with a chat template (SmolLM2's, saved with save_pretrained).
# The model is SmolLM2-1.7B's architecture with random weights (memory does not depend on them).
set -euo pipefail
TOK=$1; OUT=$2; WORK=${WORK:-/tmp/gpu-train}
mkdir -p "$OUT" "$WORK"
python3 - "$TOK" "$WORK/model" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from planner.resolve import catalog
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = dict(catalog()["HuggingFaceTB/SmolLM2-1.7B"]["config"]); cfg.pop("model_type")
with torch.device("cuda"):
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
PY
python3 examples/smollm2-function-names/make_data.py "$WORK/data" --train 3000 --eval 50
common="base_model: $WORK/model
datasets: [{path: $WORK/data/train.jsonl, type: chat}]
sequence_len: 1024
sample_packing: true
max_steps: 30
logging_steps: 5
learning_rate: 0.0001"
printf '%s\nmicro_batch_size: 4\noutput_dir: %s\n' "$common" "$WORK/full" > "$WORK/full.yaml"
printf '%s\nmicro_batch_size: 8\nadapter: lora\nlora_r: 16\nlora_alpha: 32\ngradient_checkpointing: true\noutput_dir: %s\n' \
  "$common" "$WORK/lora" > "$WORK/lora.yaml"
for r in full lora; do
  python3 -m planner train "$WORK/$r.yaml" 2>&1 | tee "$OUT/train_$r.log" || true
  cp "$WORK/$r/run_report.json" "$OUT/run_report_$r.json" || true
done
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m planner.measure.gpu "$OUT/validation_gpu_expandable.csv" \
  2>&1 | tee "$OUT/gpumeasure_expandable.log"
