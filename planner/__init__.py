"""plan: a training-memory planner with an integrated trainer."""
import logging

# bitsandbytes 0.50, on a CPU with AVX512-BF16, warns at import that it cannot fetch an optional
# kernel from the Hub (bitsandbytes/backends/cpu/ops.py:252) and runs its own CPU path instead:
# not something a user of plan can act on, and it would break the one-line error contract
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
