"""Checkpoints of a run, and its final save.

`checkpoint-N/` holds torch.distributed.checkpoint (DCP) shards of the trainable parameters and
the optimizer (`get_state_dict` with `ignore_frozen_params`: a LoRA checkpoint holds the
adapters only), `scheduler.pt`, one `rng-R.pt` per rank and `trainer_state.json`
(`RunState.checkpoint_fields`). It is written under `.tmp-checkpoint-N` and renamed once
complete, so a run killed mid-save leaves no `checkpoint-N` to resume from (torchtune's
DistributedCheckpointer writes DCP the same way; HF Trainer picks the newest by number,
`transformers.trainer_utils.get_last_checkpoint`). `final/` is the adapter or the model in
safetensors, with the tokenizer (`save_pretrained`), also renamed from a temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from planner.recipe import Recipe, RecipeError

from .state import RunState

STATE_FILE = "trainer_state.json"  # written last, before the rename


EMA_FILE = "ema.pt"  # a checkpoint's AveragedModel state (averaged parameters, n_averaged)
EMA_WEIGHTS = "ema.safetensors"  # final/: the EMA of the trainable parameters, by parameter name

def recipe_hash(recipe: Recipe) -> str:
    """The recipe's identity: a checkpoint resumes only the recipe that wrote it."""
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _number(path: Path) -> int | None:
    tail = path.name.split("-")[-1]
    return int(tail) if tail.isdigit() else None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: `checkpoint-N` directories only exist once renamed from
    their temporary name, and hold `trainer_state.json`, written last before the rename."""
    done = [p for p in out.glob("checkpoint-*") if _number(p) is not None and (p / STATE_FILE).exists()]
    return max(done, key=_number, default=None)


def model_digest(model) -> str:
    """The trained model's identity: the names and shapes of its trainable parameters (global
    shapes under FSDP), hashed. A checkpoint resumes only into the same trainable tensors."""
    shapes = sorted(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters() if p.requires_grad)
    return hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16]


def check_resumable(ck: Path, fields: dict, expected_hash: str, world: int, digest: str | None = None) -> None:
    """Refuse a checkpoint of another recipe, of another number of processes (its shards and
    data positions are per rank), or of another model (its trainable parameters' names and
    shapes; checkpoints written before the digest existed are not checked for it)."""
    if fields["recipe_hash"] != expected_hash:
        raise RecipeError(f"{ck}: written by a different recipe; use a new output_dir or delete the checkpoints")
    if fields["world_size"] != world:
        raise RecipeError(f"{ck}: written by {fields['world_size']} processes, resuming with {world}")
    if digest is not None and fields.get("model_digest", digest) != digest:
        raise RecipeError(f"{ck}: written for another model (its trainable parameters' names or shapes differ); "
                          "use a new output_dir or delete the checkpoints")


def read_state(ck: Path) -> dict:
    """`trainer_state.json`, or one line when it is not the JSON object a checkpoint writes."""
    try:
        fields = json.loads((ck / STATE_FILE).read_text())
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        for key in ("step", "epoch", "batch_in_epoch", "recipe_hash", "world_size"):
            if key not in fields:
                raise ValueError(f"no '{key}'")
    except (OSError, ValueError) as e:
        raise RecipeError(f"{ck / STATE_FILE}: not a checkpoint's state ({e})") from None
    return fields


class Checkpointer:
    """Saves and loads a run's checkpoints in `out`, on every rank (DCP is collective); rank 0
    writes the shared files and renames."""

    def __init__(self, acc, out: Path, recipe: Recipe, fsdp: bool, cuda: bool):
        self.acc = acc
        self.out = out
        self.hash = recipe_hash(recipe)
        self.fsdp = fsdp
        self.cuda = cuda
        self.ema = None  # the trainer's make_ema (AveragedModel, live parameters, names), saved with each checkpoint

    def _state_dicts(self, model, opt) -> dict:
        """The trainable parameters' and the optimizer's state dicts, as DCP saves and loads them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        msd, osd = get_state_dict(self._model(model), self._optimizer(opt),
                                  options=StateDictOptions(ignore_frozen_params=True))
        return {"model": msd, "optim": osd}

    def _model(self, model):
        return self.acc.unwrap_model(model) if not self.fsdp else model

    @staticmethod
    def _optimizer(opt):
        return opt.optimizer if hasattr(opt, "optimizer") else opt  # accelerate's wrapper

    # ------------------------------------------------------------ save
    def save(self, state: RunState, model, opt, sched) -> None:
        """`checkpoint-{state.step}`: written to a temporary directory, renamed when complete."""
        import torch.distributed.checkpoint as dcp
        final = self.out / f"checkpoint-{state.step}"
        tmp = self.out / f".tmp-checkpoint-{state.step}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        dcp.save(self._state_dicts(model, opt), checkpoint_id=str(tmp))
        self._save_rng(tmp)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            import torch
            torch.save(sched.state_dict(), tmp / "scheduler.pt")
            if self.ema is not None:
                torch.save(self.ema[0].state_dict(), tmp / EMA_FILE)
            fields = state.checkpoint_fields(self.hash, self.acc.num_processes)
            fields["model_digest"] = model_digest(self._model(model))
            (tmp / STATE_FILE).write_text(json.dumps(fields))
            os.replace(tmp, final)
        self.acc.wait_for_everyone()

    def _save_rng(self, directory: Path) -> None:
        import torch
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.cuda else None}
        torch.save(rng, directory / f"rng-{self.acc.process_index}.pt")

    # ------------------------------------------------------------ load
    def load_latest(self, model, opt, sched) -> tuple[Path, RunState] | None:
        """The newest complete checkpoint loaded into the model, optimizer, scheduler and RNG,
        with its run state; None when there is none. Nothing in it runs code: the scheduler and
        RNG states load weights-only (torch.load's safe unpickler: tensors and plain values), and
        a checkpoint that does not load is one line, never a traceback."""
        ck = latest_checkpoint(self.out) if self.out.exists() else None
        if ck is None:
            return None
        fields = read_state(ck)
        check_resumable(ck, fields, self.hash, self.acc.num_processes, model_digest(self._model(model)))
        try:
            self._load(ck, model, opt, sched)
        except Exception as e:  # damaged, tampered with, or not this run's: pickled code included
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise RecipeError(f"{ck}: cannot be resumed ({type(e).__name__}: {first}); "
                              "use a new output_dir or delete the checkpoint") from None
        return ck, RunState.from_checkpoint(fields)

    def _load(self, ck: Path, model, opt, sched) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        sd = self._state_dicts(model, opt)
        dcp.load(sd, checkpoint_id=str(ck))
        set_state_dict(self._model(model), self._optimizer(opt), model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
        sched.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True))
        if self.ema is not None:
            self.ema[0].load_state_dict(torch.load(ck / EMA_FILE, weights_only=True))
        self._load_rng(ck)

    def _load_rng(self, ck: Path) -> None:
        import torch
        rng_file = ck / f"rng-{self.acc.process_index}.pt"
        if not rng_file.exists():
            return
        rng = torch.load(rng_file, weights_only=True)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if self.cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------ final
    def save_final(self, model, tok, classes: list | None) -> Path:
        """The adapter (PEFT) or the whole model, in safetensors, with the tokenizer (and the
        class names of a classifier); under FSDP the full state dict is gathered on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        final = self.out / "final"
        sd = None
        if self.fsdp:
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        unwrapped = self.acc.unwrap_model(model)
        if self.acc.is_main_process:
            tmp = self.out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(tmp, safe_serialization=True, **({"state_dict": sd} if sd is not None else {}))
            tok.save_pretrained(tmp)
            if classes is not None:
                (tmp / "labels.json").write_text(json.dumps(classes))
            if self.ema is not None:  # the EMA of the trainable parameters, by their names, beside the model
                from safetensors.torch import save_file
                averaged, _, names = self.ema
                save_file({n: p.detach().contiguous().cpu() for n, p in zip(names, averaged.module, strict=True)},
                          str(tmp / EMA_WEIGHTS))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.acc.wait_for_everyone()
        return final
