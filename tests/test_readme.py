"""The README's examples run as printed: every `plan ...` command in its fenced code blocks (and
its indented command lines) that does not train runs and exits 0, in a scratch directory that
holds what the README presents as the user's (examples/configs/train.jsonl, ./my-model/,
./opt-125m/, train.jsonl), so nothing in the checkout is written. Commands that cannot run here
are listed in SKIP with the reason; the slow ones (the simulator, the derived route) run in the
slow tier."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys

import pytest
from helpers import ROOT

from planner import cli
from planner.resolve import catalog

SKIP = {
    "plan validate": "reruns the whole validation matrix (about 5 minutes; tests/test_accuracy.py checks its tables)",
    "plan train": "trains, or plans a run on the user's recipe.yaml or dataset (tests/test_train.py and "
                  "tests/test_train_anywhere.py run plan train)",
}
SLOW = ("plan simulate", "--exact", "./opt-125m/", "Qwen/Qwen3-32B")


def readme_commands() -> list[str]:
    """Each `plan ...` command of the README's fenced blocks and indented lines, its comment and
    any leading `VAR=value` or `... &&` setup dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line for _, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S) for line in body.splitlines()]
    lines += [line[4:] for line in text.splitlines() if re.match(r"^    (\w+=\S+ )*plan ", line)]
    out = []
    for line in lines:
        for seg in line.split("&&"):
            m = re.match(r"\s*(?:\w+=\S+\s+)*(plan\b.*)", seg)
            if m:
                cmd = re.sub(r"\s+#.*$", "", m.group(1)).strip()
                if cmd not in out:
                    out.append(cmd)
    return out


COMMANDS = readme_commands()


def _param(cmd: str):
    reason = next((why for prefix, why in SKIP.items() if cmd.startswith(prefix)), None)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    if any(s in cmd for s in SLOW):
        marks.append(pytest.mark.slow)
    return pytest.param(cmd, id=cmd[:90], marks=marks)


def test_the_readme_has_examples():
    assert len(COMMANDS) >= 30
    assert any(c.startswith("plan estimate") for c in COMMANDS) and any(c.startswith("plan emit-config")
                                                                       for c in COMMANDS)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A working directory with the files the README's commands name."""
    (tmp_path / "examples" / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "configs" / "train.jsonl", tmp_path / "examples" / "configs" / "train.jsonl")
    shutil.copy(ROOT / "examples" / "configs" / "train.jsonl", tmp_path / "train.jsonl")
    shutil.copytree(ROOT / "examples" / "axolotl", tmp_path / "examples" / "axolotl")  # Axolotl's configs
    (tmp_path / "tables").mkdir()
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text(json.dumps(catalog()["HuggingFaceTB/SmolLM2-135M"]["config"]))
    from transformers import OPTConfig
    (tmp_path / "opt-125m").mkdir()
    (tmp_path / "opt-125m" / "config.json").write_text(OPTConfig().to_json_string())  # facebook/opt-125m's shape
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    return tmp_path


@pytest.mark.parametrize("cmd", [_param(c) for c in COMMANDS])
def test_readme_command_runs_as_printed(scratch, monkeypatch, capsys, cmd):
    monkeypatch.setattr(sys, "argv", shlex.split(cmd))
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    assert (e.value.code or 0) == 0, f"{cmd}\n{err[-2000:]}"
    assert out.strip(), cmd
