"""A few training steps of a tiny Llama under `accelerate launch --config_file EMITTED.yaml`.

Writes OUT_DIR/rank{N}.json with what the run was: distributed type, world size, how the model
was wrapped (DDP, or FSDP2 DTensor shards) and the losses. On CPU, accelerate (1.15) runs gloo
ranks as MULTI_CPU and enables FSDP only on GPU backends, so an FSDP config is applied the way
`plan train` applies it: the plugin accelerate builds from the environment the launcher set
from the YAML, through accelerate's own fsdp2_prepare_model.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    out = sys.argv[1]
    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    plugin = None
    if fsdp and acc.distributed_type != "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin

        from planner.measure.builder import device_mesh, fsdp2_shard
        plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* as accelerate launch set them
        replicate = int(os.environ.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1"))
        model = fsdp2_shard(model, plugin, acc.mixed_precision, *device_mesh(acc.num_processes, replicate))
        opt = acc.prepare(torch.optim.AdamW(model.parameters(), lr=1e-3))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, opt = acc.prepare(model, opt)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 32), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    from torch.distributed.tensor import DTensor
    params = list(model.parameters())
    report = {"rank": acc.process_index, "world": acc.num_processes, "distributed_type": str(acc.distributed_type),
              "ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel),
              "dtensor": all(isinstance(p, DTensor) for p in params),
              "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
              "total_numel": total, "losses": losses, "mixed_precision": acc.mixed_precision,
              "reshard_after_forward": getattr(plugin, "reshard_after_forward", None)}
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as f:
        json.dump(report, f)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
