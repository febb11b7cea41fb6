"""What activation offloading moves to host RAM, measured on a real CPU step.

TRL's `OffloadActivations` (trl/models/activation_offloading.py), the class Axolotl's
`activation_offloading: true` and torchtune's `enable_activation_offloading` run, cannot run on
a CPU: it creates CUDA streams when it is built (`torch.cuda.default_stream()`, :160; torchtune
_activation_offloading.py:93, which asserts "Torch not compiled with CUDA enabled" here) and
keeps every tensor that is not on a GPU where it is (:236-238). So the GPU-side bytes of an
offloaded step are not measured here (contract.UNMEASURED_OFFLOAD).

What can be measured faithfully is what it would move: which tensors autograd saves in the
real step of the real transformers model (the transformers module, PEFT, torch's non-reentrant
checkpoint), their sizes, storages and whether they are parameters. A recording pack hook sits
where the library's sits (a `saved_tensors_hooks` around the forward and loss, the output head
under a no-op hook as `get_act_offloading_ctx_manager` puts it, :713-760), and applies the
library's rule to each tensor as it is packed: at least `min_offload_size` bytes (:241), not a
parameter's storage (:245-270, `update_model_params`), not a storage already offloaded and still
in the forward stash (:228-233, the stash released `max_fwd_stash_size` tensors later,
:276-283). The bytes it would copy to host are the sum of those tensors' sizes (`empty_like` of
each, :333). Nothing is moved: on one CPU, host and device memory are the same.
"""

from __future__ import annotations

import contextlib

from ..contract import Settings
from ..memory import OFFLOAD_MIN_BYTES, OFFLOAD_STASH
from ..precision import RECIPES


def measure_offload(cfg: dict, st: Settings) -> dict:
    """Run one real forward and backward of the model `cfg` with settings `st` on CPU tensors,
    recording every tensor autograd saves outside the output head. Returns the bytes the
    library's rule moves to host (`host_bytes`), those it leaves on the GPU (`kept_bytes`), and
    the counts of each."""
    import torch

    from .builder import build_model, grouped_mm_any_dtype, is_encoder, unpacked_sequences

    torch.manual_seed(0)
    with unpacked_sequences(), grouped_mm_any_dtype():
        model, config = build_model(cfg, st)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        stash: dict[int, tuple] = {}     # tensor id -> storage key, offloaded and still on the GPU
        tracked: dict[tuple, int] = {}   # storage key -> tensor id
        tally = {"host_bytes": 0, "kept_bytes": 0, "moved": 0, "kept": 0, "head_saved": 0}
        counter = [0]

        def pack(t):
            counter[0] += 1
            n = counter[0]
            nbytes = t.element_size() * t.nelement()
            key = (t.untyped_storage().data_ptr() + t.storage_offset(), t.dtype)
            for old in [i for i in stash if i <= n - OFFLOAD_STASH]:
                k = stash.pop(old)
                if tracked.get(k) == old:
                    del tracked[k]
            if key in tracked or nbytes < OFFLOAD_MIN_BYTES or isinstance(t, torch.nn.Parameter) \
                    or t.untyped_storage().data_ptr() in params:
                tally["kept_bytes"] += nbytes
                tally["kept"] += 1
            else:
                tally["host_bytes"] += nbytes
                tally["moved"] += 1
                stash[n] = key
                tracked[key] = n
            return t

        def count_head(t):
            tally["head_saved"] += t.element_size() * t.nelement()
            return t

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        noop = torch.autograd.graph.saved_tensors_hooks(count_head, lambda t: t)
        handles = []
        if head is not None:
            handles.append(head.register_forward_pre_hook(lambda *a: noop.__enter__()))
            handles.append(head.register_forward_hook(lambda *a: noop.__exit__(None, None, None), always_call=True))
        ids = torch.randint(0, config.vocab_size, (st.batch_size, st.seq_len))
        labels = torch.zeros(st.batch_size, dtype=torch.long) if is_encoder(config) else ids
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if RECIPES[st.precision].autocast \
            else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with amp:
                loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        for h in handles:
            h.remove()
    return tally
