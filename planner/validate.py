"""The accuracy matrix: each case estimated analytically and measured with MemTracker.

`python -m planner.validate` rewrites tables/accuracy.csv and prints median / p90 / max |error|.
Small configs run as fake-tensor steps (MemTracker on FakeTensorMode); they use the estimator's
CPU kernel policy (`kernels="cpu"`), because the measurement runs CPU kernels.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

from .memory import Settings, estimate
from .spec import ModelSpec

SMALL = {
    "llama": dict(model_type="llama", vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", vocab_size=3000, hidden_size=224, intermediate_size=608, num_hidden_layers=3,
                  num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                   max_position_embeddings=1024, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   sliding_window=128),
    "gpt2": dict(model_type="gpt2", vocab_size=2000, n_embd=256, n_layer=3, n_head=4, n_positions=1024,
                 bos_token_id=0, eos_token_id=0),
    "bert": dict(model_type="bert", vocab_size=2000, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=512),
}


@dataclass(frozen=True)
class Case:
    arch: str
    settings: Settings

    @property
    def name(self) -> str:
        st = self.settings
        return (f"{self.arch}/{st.precision}/{'lora' + str(st.lora_rank) if st.lora else 'full'}/"
                f"{'ckpt' if st.grad_checkpointing else 'nockpt'}/b{st.batch_size}s{st.seq_len}/{st.optimizer}")


def matrix() -> list[Case]:
    """Every architecture x precision x full/LoRA x checkpointing, batch 2 x 256 tokens."""
    cases = []
    for arch, prec, rank, ckpt in itertools.product(SMALL, ("fp32", "bf16-pure", "bf16-amp"), (0, 8), (False, True)):
        st = Settings(precision=prec, batch_size=2, seq_len=256, lora_rank=rank, grad_checkpointing=ckpt, kernels="cpu")
        cases.append(Case(arch, st))
    return cases


def run_case(case: Case) -> dict:
    from .simulate import measure

    cfg = SMALL[case.arch]
    est = estimate(ModelSpec.from_config(cfg), case.settings)
    m = measure(cfg, case.settings, fake=True)
    err = 100.0 * (est.peak_bytes - m.peak_bytes) / m.peak_bytes
    return {"case": case.name, "predicted": est.peak_bytes, "measured": m.peak_bytes, "error_pct": round(err, 2),
            "method": "memtracker-fake-cpu"}


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    out = (argv or sys.argv[1:] or ["tables/accuracy.csv"])[0]
    rows = []
    for case in matrix():
        r = run_case(case)
        rows.append(r)
        print(f"{r['case']:45s} predicted {r['predicted']:>12,d} measured {r['measured']:>12,d} error {r['error_pct']:+6.2f}%",
              flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out, index=False)
    a = df["error_pct"].abs()
    print(f"{len(df)} cases: median |error| {a.median():.2f}%, p90 {a.quantile(0.9):.2f}%, max {a.max():.2f}%; "
          f"within 5%: {(a <= 5).sum()}/{len(df)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
