"""torch's MemTracker as every measurement here uses it, and one recorder of per-phase peaks.

MemTracker (torch/distributed/_tools/mem_tracker.py) counts live tensor bytes by category
(parameters, buffers, gradients, optimizer state, activations, temporaries) on real or fake
tensors. The simulator, the per-rank measurement and the trainer's CPU meter share this class
and this recorder.
"""

from __future__ import annotations

from torch.distributed._tools.mem_tracker import MemTracker

from ..contract import COMPONENTS

# MemTracker's reference types -> the contract's components (logits are activations to it)
_CATEGORY = {"Parameter": "weights", "Buffer": "weights", "Gradient": "gradients", "Optstate": "optimizer",
             "Activation": "activations", "Temp": "other", "Other": "other"}


class Tracker(MemTracker):
    """MemTracker that accepts frozen parameters (LoRA bases) and keeps the global peak only.

    torch's version registers a gradient hook on every parameter, which raises for one
    without requires_grad. Modules holding frozen parameters get no gradient hooks; their
    gradients are still counted in the total, only under another category."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        ok = all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and ok)

    def _update_peak_stats(self, peak_state) -> None:
        """Only the global peak: torch's version also walks every module on every op to keep
        per-module peaks, which nothing here reads (minutes for a LoRA model with thousands of
        modules)."""
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


def phase_peak(tracker: MemTracker, dev=None) -> tuple:
    """(device, the peak snapshot since the last call) for the tracked device, then restart the
    peak from the live bytes now, so that each phase of a step reports its own peak."""
    s = tracker.get_tracker_snapshot("peak")
    dev = dev or next(iter(s))
    peak = dict(s.get(dev, {"Total": 0}))
    cur = tracker.get_tracker_snapshot("current")
    tracker._peak_mem[dev] = cur[dev]["Total"]
    tracker._peak_mem_snap[dev] = dict(cur[dev])
    return dev, peak


def components(snapshot: dict) -> dict:
    """A MemTracker snapshot in the contract's components."""
    out = {k: 0 for k in COMPONENTS}
    for k, v in snapshot.items():
        if k != "Total":
            out[_CATEGORY.get(getattr(k, "value", str(k)), "other")] += int(v)
    return out


class PhaseRecorder:
    """Called with a phase name at the end of each phase of a step: keeps that phase's peak
    (the largest where a phase repeats, as micro-steps do) and its components.

    `reset_modules_after`: phases after which MemTracker's per-module state is cleared (it
    refuses a module's second forward in one window, which gradient accumulation makes).
    `phases`, `categories`: dicts to record into, where the caller keeps them across windows."""

    def __init__(self, tracker: MemTracker, reset_modules_after: tuple[str, ...] = (),
                 phases: dict | None = None, categories: dict | None = None):
        self.tracker = tracker
        self.reset_modules_after = reset_modules_after
        self.dev = None
        self.phases: dict[str, int] = {} if phases is None else phases
        self.categories: dict[str, dict] = {} if categories is None else categories

    def __call__(self, phase: str) -> None:
        self.dev, s = phase_peak(self.tracker, self.dev)
        total = int(s["Total"])
        if total >= self.phases.get(phase, 0):
            self.phases[phase] = total
            self.categories[phase] = components(s)
        if phase in self.reset_modules_after:
            self.tracker.reset_mod_stats()

    def clear(self) -> None:
        self.phases.clear()
        self.categories.clear()


class AllocationRecorder:
    """Every storage a run creates, from its first tensor, and its release, in order: the
    allocation sequence a caching allocator sees over a whole process (planner/allocator.py
    replays it). A dispatch mode that keeps only weak references, so that, unlike a MemTracker
    entered before the warm-up, it changes no tensor's lifetime.

    `workspaces`: the blocks cuBLAS takes from the caching allocator and keeps, one per thread
    that runs a matmul: the first at the forward's first matmul, the second at the backward's
    (autograd runs a CUDA backward on its own device thread, with its own cuBLAS handle). Where
    the second lands matters: on the H200 it split the freed logits' region of a
    checkpointed Llama-3.2-3B LoRA step (tables/gpu/traces_expandable.npz, event 7076)."""

    MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_grouped_mm")

    def __init__(self, workspaces: tuple[int, ...] = ()) -> None:
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary

        self.events: list[tuple[bool, object, int]] = []
        seen = WeakIdKeyDictionary()
        events = self.events
        counter = iter(range(1 << 62))
        pending = {False: workspaces[:1], True: workspaces[1:2]}  # forward thread, backward thread

        def note(t) -> None:
            st = t.untyped_storage()
            if st in seen or st.nbytes() == 0:
                return
            key = next(counter)
            seen[st] = key
            events.append((True, key, st.nbytes()))
            weakref.finalize(st, events.append, (False, key, 0))

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.__name__.split(".")[0] in AllocationRecorder.MATMULS:
                    backward = torch._C._current_autograd_node() is not None
                    for size in pending[backward]:
                        events.append((True, ("cublas", backward), size))
                    pending[backward] = ()
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and not t.is_meta:
                        note(t)
                return out

        self.note = note
        self.mode = _Mode()

    def track_external(self, *tensors) -> None:
        """Tensors made outside the recorder (before it was entered), in this order."""
        for t in tensors:
            self.note(t)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
