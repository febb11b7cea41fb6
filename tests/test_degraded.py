"""Degraded environments: no NVIDIA driver, NVML without permission, no network, a read-only
Hugging Face cache. `plan` keeps working and says what it could not do."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import run_plan


class _Pynvml:
    """A pynvml whose nvmlInit fails as the real one does, with `message`."""

    class NVMLError(Exception):
        pass

    def __init__(self, message: str):
        self.message = message

    def nvmlInit(self):
        raise self.NVMLError(self.message)


@pytest.mark.parametrize("message, says", [
    ("NVML Shared Library Not Found", "no NVIDIA driver found"),
    ("Driver Not Loaded", "no NVIDIA driver found"),
    ("Insufficient Permissions", "not permitted"),
    ("No Permission", "not permitted"),
])
def test_nvml_failures_become_a_note(monkeypatch, message, says):
    from planner import gpus
    monkeypatch.setitem(sys.modules, "pynvml", _Pynvml(message))
    found, note = gpus.detect()
    assert found == [] and says in note and message in note
    with pytest.raises(gpus.GPUError, match="name a GPU instead"):
        gpus.resolve_gpu("auto")


def test_gpu_run_without_nvml_measures_with_the_allocator_and_says_so(monkeypatch):
    """The trainer's meter on a GPU whose NVML refuses: a note, no exception (the allocator
    figures are read from torch, which this CPU machine cannot exercise)."""
    from trainer.measure import Meter
    monkeypatch.setitem(sys.modules, "pynvml", _Pynvml("Insufficient Permissions"))
    m = Meter(cuda=True)
    assert m.nvml is None and any("NVML not measured" in n for n in m.notes)


def test_plan_gpus_without_a_driver_still_lists_the_catalog():
    r = run_plan("gpus", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["catalog"]) > 10
    if not out["local"]:  # this machine: no driver
        assert out["local_note"]


def test_no_network_falls_back_to_the_catalog_with_a_note(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: a catalog model is planned from the catalog, and
    the note says where the config came from; JSON on stdout stays one object."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = run_plan("estimate", "meta-llama/Meta-Llama-3-8B", "--dtype", "bf16", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"] == 8030261248
    assert "built-in catalog" in r.stderr and "offline or unreachable" in r.stderr


def test_unreachable_hub_is_not_waited_on(tmp_path):
    """No HF_HUB_OFFLINE, but the Hub endpoint refuses connections: the same fallback."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": None}
    r = run_plan("estimate", "meta-llama/Meta-Llama-3-8B", "--dtype", "bf16", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "built-in catalog" in r.stderr


def test_read_only_hf_cache_is_not_needed(tmp_path):
    """HF_HOME where nothing can be written (under a regular file, which even root cannot
    create directories in): planning a catalog model and a local config both work."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"HF_HOME": str(blocker / "hf"), "HF_HUB_OFFLINE": "1"}
    r = run_plan("recommend", "meta-llama/Meta-Llama-3-8B", "--gpu", "a100-80gb", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plans"]
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 1000, "max_position_embeddings": 512}))
    r = run_plan("estimate", str(cfg), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert "catalog" not in r.stderr


def test_unknown_model_offline_is_one_line_naming_the_closest():
    r = run_plan("estimate", "meta-llama/Meta-Llama-3-8X", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "closest catalog entries" in lines[0] and "Llama-3-8B" in lines[0]
