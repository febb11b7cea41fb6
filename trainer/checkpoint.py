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

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from planner.recipe import Recipe, RecipeError, resume_hash

from .resilience import RunStopped
from .state import RunState

STATE_FILE = "trainer_state.json"  # written last, before the rename


EMA_FILE = "ema.pt"  # a checkpoint's AveragedModel state (averaged parameters, n_averaged)
EMA_WEIGHTS = "ema.safetensors"  # final/: the EMA of the trainable parameters, by parameter name

def recipe_hash(recipe: Recipe) -> str:
    """The recipe's identity: a checkpoint resumes only the recipe that wrote it."""
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def disk_error(what: str, e: Exception) -> RunStopped:
    """A write that failed (a full disk, a file-size limit, no permission) as the one line a
    failed run prints. torch's zip writer reports a short write as a RuntimeError
    ("unexpected pos", "PytorchStreamWriter failed writing file")."""
    if isinstance(e, OSError):
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        why = e.strerror or type(e).__name__
    else:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        full = any(m in str(e) for m in ("unexpected pos", "failed writing", "No space left"))
        why = f"{type(e).__name__}: {first}"
    return RunStopped(f"{what}: cannot be written ({why}"
                      + ("; the disk is full or the file-size limit reached" if full else "") + ")")


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


def check_resumable(ck: Path, fields: dict, expected_hash: str, world: int, digest: str | None = None,
                    expected_resume: str | None = None) -> None:
    """Refuse a checkpoint of another recipe (one that differs only in its length, LENGTH_KEYS,
    is the same run asked to go on), of another number of processes (its shards and data
    positions are per rank), or of another model (its trainable parameters' names and shapes;
    checkpoints written before the digest existed are not checked for it)."""
    longer = expected_resume is not None and fields.get("resume_hash") == expected_resume
    if fields["recipe_hash"] != expected_hash and not longer:
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
        self.resume = resume_hash(recipe)
        self.fsdp = fsdp
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote
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
        """`checkpoint-{state.step}`: written to a temporary directory, renamed when complete. A
        write that fails (a full disk) leaves no partial checkpoint and stops the run in one line."""
        tmp = self.out / f".tmp-checkpoint-{state.step}"
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name
        try:
            self._save(state, model, opt, sched, tmp)
        except (OSError, RuntimeError, CheckpointException) as e:  # RuntimeError: torch's writer, short of space
            shutil.rmtree(tmp, ignore_errors=True)  # its space back; the complete checkpoints stay
            if isinstance(e, CheckpointException):  # DCP's wrapper of a rank's own error: (exception, trace)
                inner = next(iter(e.failures.values()), (None, None))[0]
                e = inner if isinstance(inner, Exception) else RuntimeError(str(e))
            raise disk_error(f"checkpoint-{state.step} in {self.out}", e) from None
        self.saved_step = state.step

    def _save(self, state: RunState, model, opt, sched, tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp
        final = self.out / f"checkpoint-{state.step}"
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
            fields["resume_hash"] = self.resume
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
        check_resumable(ck, fields, self.hash, self.acc.num_processes, model_digest(self._model(model)), self.resume)
        try:
            self._load(ck, model, opt, sched)
        except Exception as e:  # damaged, tampered with, or not this run's: pickled code included
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise RecipeError(f"{ck}: cannot be resumed ({type(e).__name__}: {first}); "
                              "use a new output_dir or delete the checkpoint") from None
        self.saved_step = fields["step"]
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
            try:
                with dequantised(unwrapped):
                    unwrapped.save_pretrained(tmp, safe_serialization=True,
                                              **({"state_dict": sd} if sd is not None else {}))
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
            except (OSError, RuntimeError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise disk_error(f"{final}", e) from None
        self.acc.wait_for_everyone()
        return final


@contextlib.contextmanager
def dequantised(model):
    """A full fine-tune of a quantised base saved as plain safetensors that `from_pretrained`
    loads. transformers refuses to save a model whose quantizer is not serialisable (a GGUF
    base: "The model is quantized with gguf and is not serializable") although GGUF weights are
    dequantised when loaded: then the quantizer is set aside for the save and put back. A base
    whose weights are still packed is dequantised first (`PreTrainedModel.dequantize`). PEFT
    models save their adapter only, and are left alone."""
    q = getattr(model, "hf_quantizer", None)
    if q is None or getattr(model, "_hf_peft_config_loaded", False) or q.is_serializable():
        yield model
        return
    if any(not p.is_floating_point() for p in model.parameters()):
        model.dequantize()
        yield model
        return
    cfg = model.config
    had = hasattr(cfg, "quantization_config")
    qc = getattr(cfg, "quantization_config", None)
    model.hf_quantizer = None
    if had:
        del cfg.quantization_config
    try:
        yield model
    finally:
        model.hf_quantizer = q
        if had:
            cfg.quantization_config = qc
