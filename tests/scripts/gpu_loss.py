"""The loss option on a GPU (issue 17): Liger's fused linear cross-entropy and Cut Cross-Entropy
are Triton kernels, unmeasured on CPU. On a CUDA machine with liger-kernel and cut-cross-entropy
installed, this measures each loss as planner.measure.gpu measures every case (a warm-up step,
then per-phase torch.cuda.max_memory_allocated against the estimate's peak), one JSON row per
case to stdout and to OUT.jsonl:

    python tests/scripts/gpu_loss.py OUT.jsonl

Not yet run: this branch's session could not send its worktree to the GPU machine.
"""
import json
import sys

from planner.measure.gpu import measure_case

BASE = "meta-llama/Llama-3.2-1B"
CASES = [(BASE, dict(precision="bf16-pure", batch_size=4, seq_len=2048, lora_rank=16, loss=loss))
         for loss in ("standard", "liger-flce", "cce", "chunked")] + \
        [(BASE, dict(precision="bf16-amp", batch_size=4, seq_len=2048, loss=loss))
         for loss in ("standard", "liger-flce", "cce", "chunked")]


def main(out: str) -> None:
    with open(out, "a") as f:
        for model_id, kw in CASES:
            try:
                row, _ = measure_case(model_id, kw)
                row["loss"] = kw["loss"]
            except Exception as e:  # a missing library or kernel: the row says which
                row = {"case": f"{model_id}/{kw}", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            line = json.dumps(row)
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()


if __name__ == "__main__":
    main(sys.argv[1])
