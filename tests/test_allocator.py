"""The caching-allocator model (planner/allocator.py): its rules on small sequences whose answer
is worked out by hand from c10/cuda/CUDACachingAllocator.cpp, and its replay of the allocator
traces recorded on a GPU (tables/gpu/) against the reserved peak torch reported there."""

import csv
from pathlib import Path

import pytest

from planner.allocator import LARGE_BUFFER, SMALL_BUFFER, Allocator, allocation_size, replay, round_size

MiB = 2**20
GPU = Path(__file__).resolve().parent.parent / "tables" / "gpu"


def test_round_size_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert allocation_size(8) == SMALL_BUFFER
    assert allocation_size(MiB) == SMALL_BUFFER
    assert allocation_size(MiB + 512) == LARGE_BUFFER
    assert allocation_size(30 * MiB + 1) == 32 * MiB


def test_small_and_large_pools_map_their_own_pages():
    a = Allocator(expandable=True)
    a.malloc("s", 100)
    assert a.reserved == SMALL_BUFFER
    a.malloc("l", 3 * MiB)
    assert a.reserved == SMALL_BUFFER + LARGE_BUFFER
    a.malloc("l2", 16 * MiB)  # the rest of the first large page is 17 MiB: it fits there
    assert a.reserved == SMALL_BUFFER + LARGE_BUFFER


def test_a_freed_hole_is_reused_by_a_request_that_fits_and_not_by_one_that_does_not():
    a = Allocator(expandable=True)
    for k in "abc":
        a.malloc(k, 100 * MiB)
    assert a.reserved == 300 * MiB
    a.free("b")
    a.malloc("d", 60 * MiB)           # best fit: the 100 MiB hole
    assert a.reserved == 300 * MiB
    a.malloc("e", 50 * MiB)           # the hole has 40 MiB left: the end grows by 60 MiB (3 pages)
    assert a.reserved == 360 * MiB
    assert a.peak_allocated == 310 * MiB


def test_a_free_block_at_the_end_is_extended_rather_than_left_behind():
    a = Allocator(expandable=True)
    a.malloc("a", 100 * MiB)
    a.malloc("b", 100 * MiB)
    a.free("b")
    a.malloc("c", 150 * MiB)  # the free 100 MiB at the end plus 60 MiB mapped: 260 reserved
    assert a.reserved == 260 * MiB


def test_freed_neighbours_merge():
    a = Allocator(expandable=True)
    for k in "abc":
        a.malloc(k, 100 * MiB)
    a.free("a")
    a.free("b")
    a.malloc("d", 200 * MiB)  # fits the merged 200 MiB
    assert a.reserved == 300 * MiB


def test_without_expandable_segments_blocks_do_not_merge_across_segments():
    a = Allocator(expandable=False)
    a.malloc("a", 100 * MiB)
    a.malloc("b", 100 * MiB)
    a.free("a")
    a.free("b")
    a.malloc("c", 200 * MiB)  # two free 100 MiB segments, neither fits: a third
    assert a.reserved == 400 * MiB
    a.malloc("d", 5 * MiB)    # best fit among free blocks: a freed 100 MiB segment, split
    assert a.reserved == 400 * MiB
    b = Allocator(expandable=False)
    b.malloc("d", 5 * MiB)    # a mid-size request gets a 20 MiB segment; its rest serves the next
    b.malloc("e", 5 * MiB)
    assert b.reserved == 20 * MiB


def _gpu_runs():
    runs = []
    for name, expandable in (("expandable", True), ("default", False)):
        traces, rows = GPU / f"traces_{name}.npz", GPU / f"validation_gpu{'_expandable' if expandable else ''}.csv"
        if traces.exists() and rows.exists():
            runs.append((traces, rows, expandable))
    return runs


@pytest.mark.parametrize("traces,rows,expandable", _gpu_runs(), ids=lambda v: getattr(v, "name", str(v)))
def test_replaying_gpu_traces_gives_the_reserved_peak_torch_reported(traces, rows, expandable):
    np = pytest.importorskip("numpy")
    from planner.measure.replay import gpu_events
    reported = {r["case"]: int(r["reserved_peak"]) for r in csv.DictReader(open(rows))}
    z = np.load(traces)
    errors = {}
    for i in sorted({k.split(".")[0] for k in z.files}, key=int):
        case = str(z[f"{i}.case"])
        got = replay(gpu_events(z, i), expandable).peak_reserved
        errors[case] = 100 * (got - reported[case]) / reported[case]
    # exact on every case but the 8B QLoRA one (-1.1%: bitsandbytes' kernels)
    assert errors and all(abs(e) <= 1.5 for e in errors.values()), errors
    assert sum(abs(e) < 0.1 for e in errors.values()) >= len(errors) - 1, errors


@pytest.mark.slow
@pytest.mark.parametrize("case", ["meta-llama/Llama-3.2-1B/bf16-amp/full/none/ckpt/b4s2048/adamw",
                                  "meta-llama/Llama-3.2-3B/bf16-pure/lora16/none/ckpt/b8s2048/adamw"])
def test_the_simulators_whole_run_replays_to_the_reserved_peak_the_h200_reported(case):
    """The simulator's allocation sequence from the model's first tensor (with cuBLAS's second
    workspace at the backward's first matmul) gives the reserved peak torch reported on the H200:
    from the measured step's live set alone these were -3.3% and -8.7%."""
    from planner.margin import suite_case
    from planner.measure.simulate import measure
    from planner.resolve import catalog
    reported = {r["case"]: int(r["reserved_peak"]) for r in csv.DictReader(open(GPU / "validation_gpu_expandable.csv"))}
    model_id, st = suite_case(case)
    got = measure(catalog()[model_id]["config"], st, fake=True).reserved_bytes
    assert abs(got - reported[case]) / reported[case] < 0.01, (got, reported[case])


def _scored(rows):
    from planner.estimate import estimate
    from planner.margin import suite_case
    from planner.resolve import catalog
    from planner.spec import ModelSpec
    for r in rows:
        model_id, st = suite_case(r["case"])
        yield r, estimate(ModelSpec.from_config(catalog()[model_id]["config"]), st)


def test_the_device_figure_is_within_5_percent_of_what_nvml_showed_on_the_h200():
    """Every case of the H200 suite (tables/gpu): the estimate's device figure (the allocator's
    high-water mark plus the CUDA context) against NVML's per-process figure, scored against
    today's formulas."""
    errors = {r["case"]: 100 * (e.device_bytes - int(r["nvml"])) / int(r["nvml"])
              for r, e in _scored(csv.DictReader(open(GPU / "validation_gpu_expandable.csv")))}
    assert len(errors) >= 14 and all(abs(v) <= 5 for v in errors.values()), errors


def test_the_allocator_slack_against_the_grid_of_whole_run_replays():
    """tables/allocator_grid.csv (`python -m planner.measure.replay --grid`): the simulator's whole
    runs replayed through the allocator model. The estimate's high-water mark never falls more
    than 3% under a replay; GPT-2, whose LoRA checkpointed runs do not keep twice their logits,
    is over-counted by up to 16% (README, allocator)."""
    from planner.memory import CUDA_CONTEXT_BYTES
    rows = list(csv.DictReader(open(GPU.parent / "allocator_grid.csv")))
    errors = {r["case"]: 100 * (e.device_bytes - CUDA_CONTEXT_BYTES - int(r["replayed"])) / int(r["replayed"])
              for r, e in _scored(rows)}
    assert len(errors) >= 30 and min(errors.values()) >= -3, errors
    assert max(v for k, v in errors.items() if "gpt2" not in k) <= 5, errors
    assert max(errors.values()) <= 16, errors
