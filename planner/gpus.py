"""The GPU catalog (tables/gpus.csv) and the local GPUs as NVML sees them.

The catalog holds, per GPU: the memory NVML reports (`memory_mib`, from an `nvidia-smi` listing
where one is cited, else the datasheet's decimal GB, which is lower than what NVML reports and so
on the safe side), dense (no 2:4 sparsity) tensor TFLOPs for bf16, fp16 and fp8 as the datasheets
and architecture whitepapers give them (0: no such tensor path), memory bandwidth and the links
between GPUs and to the host. Every row names its source.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

CATALOG = Path(__file__).resolve().parent.parent / "tables" / "gpus.csv"


class GPUError(ValueError):
    """An unknown GPU name, or `auto` where NVML sees none: one line naming what to do."""


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bf16_tflops: float
    fp16_tflops: float
    fp8_tflops: float
    mem_bw_gbs: float
    nvlink_gbs: float   # GPU-to-GPU, both directions together, as datasheets quote it; 0 = none
    pcie_gbs: float     # host link, one direction (x16)
    interconnect: str = ""
    nvml_names: tuple = ()
    count: int = 1      # how many NVML sees (auto); 1 for a catalog entry
    source: str = ""
    cpu: bool = False   # this machine's CPU and RAM (`host_machine`): no GPU to plan for
    cores: int = 0      # physical cores, for a CPU

    @property
    def bf16(self) -> bool:
        return self.bf16_tflops > 0

    @property
    def peak_tflops(self) -> float:
        """The 16-bit tensor peak a mixed-precision step runs at: bf16 where the GPU has it,
        else fp16 (V100, T4)."""
        return self.bf16_tflops or self.fp16_tflops

    def computes_in(self, precision: str) -> bool:
        """Whether the GPU has tensor cores for the recipe's dtype: bf16 recipes need bf16 (not the
        T4 or V100), fp8 and MS-AMP need fp8 (Ada, Hopper, Blackwell, MI300X); fp32 and fp16 run
        everywhere. The catalog's TFLOPs columns say which (0: none)."""
        if precision.startswith("bf16"):
            return self.bf16
        if precision.startswith(("fp8", "msamp")):
            return self.fp8_tflops > 0
        return True

    @property
    def link_gbs(self) -> float:
        """GPU-to-GPU bandwidth one way: half the NVLink figure, or the PCIe link."""
        return self.nvlink_gbs / 2 if self.nvlink_gbs else self.pcie_gbs


def _key(name: str) -> str:
    """Names compared without case, vendor words or punctuation: `RTX-4090`, `rtx 4090` and
    NVML's `NVIDIA GeForce RTX 4090` are the same GPU."""
    s = name.lower()
    for word in ("nvidia", "geforce", "tesla", "amd", "instinct", "generation"):
        s = s.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", s)


def catalog() -> list[GPU]:
    with open(CATALOG, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [GPU(name=r["name"], memory_bytes=int(r["memory_mib"]) * 2**20, bf16_tflops=float(r["bf16_tflops"]),
                fp16_tflops=float(r["fp16_tflops"]), fp8_tflops=float(r["fp8_tflops"]),
                mem_bw_gbs=float(r["mem_bw_gbs"]), nvlink_gbs=float(r["nvlink_gbs"]), pcie_gbs=float(r["pcie_gbs"]),
                interconnect=r["interconnect"], nvml_names=tuple(n for n in r["nvml_names"].split(";") if n),
                source=r["source"]) for r in rows]


def lookup(name: str) -> GPU:
    """A catalog GPU by its name or NVML name, forgiving case, vendor words and dashes; a name
    that matches one entry's prefix (`H100` is not one: it is ambiguous) is taken too."""
    gpus = catalog()
    k = _key(name)
    for g in gpus:
        if k == _key(g.name) or k in (_key(n) for n in g.nvml_names):
            return g
    partial = [g for g in gpus if _key(g.name).startswith(k) or any(_key(n).startswith(k) for n in g.nvml_names)]
    if len(partial) == 1 and k:
        return partial[0]
    names = ", ".join(g.name for g in (partial or gpus))
    raise GPUError(f"unknown GPU '{name}'" + (" (ambiguous)" if len(partial) > 1 else "")
                   + f"; choose one of {names}, or --gpu auto to read the local GPUs")


def from_nvml(nvml_name: str, memory_bytes: int, count: int) -> GPU:
    """A detected GPU: its catalog entry (for the TFLOPs and links) with the memory NVML reports.
    A GPU the catalog lacks gets the memory only, and no speed figures to rank by."""
    try:
        g = lookup(nvml_name)
        return GPU(**{**g.__dict__, "memory_bytes": memory_bytes, "count": count})
    except GPUError:
        return GPU(name=nvml_name, memory_bytes=memory_bytes, bf16_tflops=0, fp16_tflops=0, fp8_tflops=0,
                   mem_bw_gbs=0, nvlink_gbs=0, pcie_gbs=16, count=count, source="NVML; not in the catalog")


def detect() -> tuple[list[dict], str]:
    """The GPUs NVML sees, as [{index, name, memory_bytes, uuid}], and a note: empty when NVML
    answered, else what it could not do (no driver, no permission)."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed: cannot read local GPUs"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        msg = str(e)
        if "Driver Not Loaded" in msg or "Library Not Found" in msg or "not found" in msg.lower():
            return [], f"no NVIDIA driver found (NVML: {msg})"
        if "Permission" in msg or "No Permission" in msg:
            return [], f"NVML present but not permitted to read the GPUs (NVML: {msg})"
        return [], f"NVML could not start: {msg}"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                        "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid})
        return out, "" if out else "NVML sees no GPU"
    except pynvml.NVMLError as e:
        return [], f"NVML could not read the GPUs: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def local_host_ram() -> int | None:
    """This machine's physical memory in bytes (the host RAM offload can use), None if unknown."""
    import os
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def host_machine() -> GPU:
    """This machine as the device a plan is fitted to when it has no GPU: its RAM (what is
    available now, so a busy machine is not over-planned) and its physical cores. A CPU has no
    speed figures in the catalog, so plans for it rank by memory and method alone."""
    import os

    import psutil
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    ram = int(psutil.virtual_memory().available)
    return GPU(name=f"this machine's CPU ({cores} cores, {ram / 2**30:,.1f} GiB RAM available)", memory_bytes=ram,
               bf16_tflops=0, fp16_tflops=0, fp8_tflops=0, mem_bw_gbs=0, nvlink_gbs=0, pcie_gbs=16,
               source="psutil", cpu=True, cores=cores)


def resolve_gpu(name: str) -> GPU:
    """`--gpu NAME` from the catalog, or `auto`: the local GPUs through NVML (the first kind if
    several kinds are installed, with the count of that kind)."""
    if name != "auto":
        return lookup(name)
    found, note = detect()
    if not found:
        raise GPUError(f"--gpu auto: {note}; name a GPU instead (plan gpus lists them)")
    first = found[0]["name"]
    same = [d for d in found if d["name"] == first]
    return from_nvml(first, min(d["memory_bytes"] for d in same), len(same))


class NvmlSampler:
    """Per-process GPU memory as NVML sees it, sampled in a background thread.

    The device is found by UUID (torch's `get_device_properties(i).uuid` against NVML's), so
    `CUDA_VISIBLE_DEVICES` renumbering cannot mismatch them. NVML lists the processes using a
    device with their memory; inside a container the PID namespace can hide this process, and
    then the sampler falls back to the device's used memory minus a baseline taken at start
    (before this process touched the GPU, if started before CUDA is initialised).
    `peak` is the largest sample; `method` says which of the two it is.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.05):
        import os
        import threading

        import pynvml
        self._nvml = pynvml
        self.interval_s = interval_s
        self.pid = os.getpid()
        pynvml.nvmlInit()
        self.handle = self._handle(device_index)
        self.baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        self.peak = 0
        self.method = "process"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _handle(self, index: int):
        nv = self._nvml
        try:
            import torch
            if torch.cuda.is_available():
                uuid = str(torch.cuda.get_device_properties(index).uuid)
                return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:  # older torch without .uuid, or a MIG UUID NVML does not take: by index
            pass
        return nv.nvmlDeviceGetHandleByIndex(index)

    def sample(self) -> int:
        nv = self._nvml
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except nv.NVMLError:
            procs = []
        mine = [p.usedGpuMemory for p in procs if p.pid == self.pid and p.usedGpuMemory is not None]
        if mine:
            self.method = "process"
            value = int(sum(mine))
        else:
            self.method = "device-minus-baseline"
            value = int(nv.nvmlDeviceGetMemoryInfo(self.handle).used) - self.baseline
        self.peak = max(self.peak, value)
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "NvmlSampler":
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak
