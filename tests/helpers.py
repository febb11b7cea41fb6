"""The one way the tests run the real `plan` command: `python -m planner ARGS` in a subprocess,
offline (HF_HUB_OFFLINE=1), with text output captured."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plan_env(env: dict | None = None) -> dict:
    """This process's environment, offline, with `env` on top; a value of None removes the variable."""
    merged = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return {k: v for k, v in merged.items() if v is not None}


def plan_argv(*args) -> list[str]:
    return [sys.executable, "-m", "planner", *map(str, args)]


def run_plan(*args, env: dict | None = None, cwd=ROOT, timeout: float = 600, **popen_kw) -> subprocess.CompletedProcess:
    """Run `plan ARGS` in the repository root to completion; stdout and stderr captured as text."""
    return subprocess.run(plan_argv(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False,
                          env=plan_env(env), **popen_kw)


def start_plan(*args, env: dict | None = None, cwd=ROOT, **popen_kw) -> subprocess.Popen:
    """Start `plan ARGS` in the background (stdout and stderr piped, as text) and return the process."""
    return subprocess.Popen(plan_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=plan_env(env), **popen_kw)


def assert_one_clear_line(r: subprocess.CompletedProcess, mention: str = "") -> None:
    """Bad input's contract: exit 2, nothing on stdout, one line on stderr (naming `mention`), no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, f"status {r.returncode}; stderr: {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{r.stderr[-2000:]}"
    assert mention.lower() in lines[0].lower(), lines[0]
    assert r.stdout.strip() == "", r.stdout[-2000:]


def no_space(limit: int):
    """A child whose files cannot grow past `limit` bytes: writes fail with EFBIG, as on a full disk."""
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def alpaca(path: Path, rows: int = 32) -> Path:
    """A small alpaca file of sums (the data the trainer tests fine-tune on)."""
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                "output": f"The sum is {2 * i + 1}."}) + "\n")
    return path
