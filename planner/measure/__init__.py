"""Measurement: the ground truth the formulas are checked against.

- `tracker`: torch's MemTracker as the project uses it, and one recorder of per-phase peaks;
- `builder`: the model, adapters, optimizer and FSDP2 sharding a run uses, built once for the
  simulator, the per-rank and GPU measurements and the trainer, so the trainer trains exactly
  what the simulator measures;
- `simulate`: a training step on fake tensors (any size) or real CPU tensors;
- `distributed`: per-rank peaks on real gloo ranks or a fake world;
- `gpu`: the estimate against a real GPU; `validate`: the validation matrix; `plot`.
"""
