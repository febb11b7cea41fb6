"""What a run shows, and where the rest goes.

The screen gets `plan`'s own lines (what it trains, the predicted-against-measured table, a
stop's reason) and one progress bar. Everything the libraries write to stderr (Python
warnings, transformers' and DeepSpeed's log lines, the loading progress bars of GGUF
dequantisation and safetensors, C++ warnings) goes to `train.log` in the run's output
directory: `to_log_file` points file descriptor 2 at it, and plan's lines are written to a
duplicate of the terminal's descriptor (`screen`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOG_FILE = "train.log"

_screen = None  # the terminal's stderr, once fd 2 goes to the log file


def screen():
    """Where plan's own lines go: the terminal's stderr (sys.stderr until `to_log_file`)."""
    return _screen if _screen is not None else sys.stderr


def console():
    """A rich Console on `screen()`."""
    from rich.console import Console
    return Console(file=screen(), stderr=True)


def to_log_file(out: Path) -> Path | None:
    """Send stderr and stdout (file descriptors 2 and 1: every library's writes, Python's and
    native) to `out/train.log`, appended; plan's lines keep the terminal's stderr. None when the log file cannot be
    opened (then nothing changes)."""
    global _screen
    if _screen is not None or os.environ.get("PLAN_TRAIN_LOG") == "off":
        return None
    path = out / LOG_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None
    sys.stderr.flush()
    sys.stdout.flush()
    _screen = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(fd, 2)
    os.dup2(fd, 1)  # DeepSpeed logs to stdout ("Setting accelerator to CPU"); plan's trainer prints nothing there
    os.close(fd)
    return path
