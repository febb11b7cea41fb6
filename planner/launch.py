"""`plan train`: write the accelerate config for a recipe and run
`accelerate launch --config_file CONFIG -m trainer RECIPE.yaml` as a child process.

SIGINT and SIGTERM are passed on to the child (accelerate forwards them to its ranks), and the
child's status is returned: 0, 2 for bad input (the trainer's one-line errors), 1 for a run that
failed. With `strict`, a run whose measured peak is further from the prediction than
`tolerance` percent is a failed run too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .contract import ZERO, PlanError, world_size
from .data import DataError, check_records, read_records
from .emit import accelerate_config, deepspeed_config, write_files
from .recipe import RECIPE_NAMES, Recipe, RecipeError, dump, from_dict, load_config, read, resume_hash, settings

CONFIG_DIR = "launch"  # inside output_dir: the accelerate (and DeepSpeed) config of this run
ERROR_FILE = "error.json"  # the trainer's bad-input line and status, for the launcher
LOCK_FILE = ".plan-train.lock"  # in output_dir: held (flock) by the plan train writing into it
RUN_FILES = ("final", "metrics.jsonl", "run_report.json")  # with checkpoint-*: what a finished run left


def lock_output(out: Path):
    """An exclusive lock on `out` for this run's life (flock on LOCK_FILE: released by the kernel
    when the process ends, however it ends); a second run into the same directory is one line."""
    import fcntl
    f = open(out / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held until the run ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RecipeError(f"output_dir {out}: another plan train ({holder}) is writing into it; wait for it to end "
                          "or use another output_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def finished_run(recipe: Recipe, force: bool, echo) -> bool:
    """Whether output_dir holds a finished run that this recipe would only repeat: the same
    recipe (but its length) asking for no more steps, or another recipe's. Then True, after one
    line, unless `force`: the old run's files move to `previous-TIME/` and the run starts again.
    A recipe asking for more steps of the same run (a larger max_steps) trains on from its
    last checkpoint."""
    out = Path(recipe.output_dir)
    try:
        rep = json.loads((out / "run_report.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(rep, dict) or not rep.get("finished"):
        return False
    same = rep.get("resume_hash") == resume_hash(recipe)
    if same and recipe.max_steps is not None and recipe.max_steps > int(rep.get("steps", 0)):
        return False  # more steps of the same run
    if not force:
        what = (f"finished (step {rep.get('steps')} of {rep.get('total_steps', rep.get('steps'))}, saved in "
                f"{rep.get('saved', out / 'final')})" if same else "a finished run of another recipe")
        echo(f"plan train: {out} holds {what}; --force trains again from the start (the old run moves to "
             "previous-*/), a larger max_steps trains on")
        return True
    import shutil
    import time
    aside = out / time.strftime("previous-%Y%m%dT%H%M%S", time.gmtime())
    aside.mkdir()
    for p in [*(out / n for n in RUN_FILES), *out.glob("checkpoint-*")]:
        if p.exists():
            shutil.move(str(p), str(aside / p.name))
    echo(f"plan train: --force: the finished run moved to {aside}")
    return False


def preflight(recipe: Recipe) -> None:
    """What can be checked before starting processes: every dataset file reads and has the
    fields its format needs, the model's config loads. The same errors the trainer would give,
    without a launcher in between."""
    if not recipe.datasets:
        raise RecipeError("datasets: the recipe names no dataset to train on")
    for d in recipe.datasets:
        try:
            records, _ = read_records(d.path, skip_bad_lines=recipe.skip_bad_lines)
            check_records(records, d.type, d.path, d.field, d.label_field)
        except DataError as e:
            raise RecipeError(str(e)) from None
    load_config(recipe)


def cpu_threads(local_processes: int) -> int:
    """Threads per process: the machine's physical cores shared by the processes on it.
    accelerate launch otherwise sets OMP_NUM_THREADS=1 unless the config says `use_cpu` (a GPU
    plan run on a CPU machine does not): one core of two measured 0.59x HF Trainer's speed on
    the same job (benchmarks/train_vs_hf.py)."""
    import psutil
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores // max(1, local_processes))


def _trainer_ranks(pid: int) -> list[int] | None:
    """The processes below `pid` that run `-m trainer` (Linux /proc); None where there is no /proc."""
    proc = Path("/proc")
    if not (proc / str(pid)).exists():
        return None
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    ranks, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            try:
                if b"-m\x00trainer\x00" in (proc / str(c) / "cmdline").read_bytes():
                    ranks.append(c)
            except OSError:
                continue
    return ranks


def _wait_group(pgid: int, timeout: float = 600.0) -> None:
    """Until no process of the group is left (a trainer writing its last checkpoint)."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)


def write_config(recipe: Recipe, num_processes: int | None, hidden: int | None = None) -> Path:
    """output_dir/launch/accelerate.yaml (and deepspeed.json for ZeRO), written atomically."""
    import yaml

    st = settings(recipe, num_processes)
    out = Path(recipe.output_dir) / CONFIG_DIR
    files, ds = {}, None
    if st.strategy in ZERO:
        if hidden is None:
            raise RecipeError(f"plan.strategy {st.strategy}: the DeepSpeed config needs the model's hidden size")
        ds = str((out / "deepspeed.json").resolve())
        files["deepspeed.json"] = json.dumps(deepspeed_config(st, hidden, world_size(st),
                                                              recipe.gradient_accumulation_steps,
                                                              recipe.max_grad_norm), indent=2) + "\n"
    # the trainer checkpoints through transformers (recipe.gradient_checkpointing): FSDP's own
    # activation checkpointing as well would recompute every block twice
    files["accelerate.yaml"] = yaml.safe_dump(accelerate_config(st, ds, activation_checkpointing=False).to_dict())
    write_files(str(out), files, force=True)
    return out / "accelerate.yaml"


def report_status(recipe: Recipe, strict: bool, tolerance: float) -> tuple[int, str]:
    """(status, line) from run_report.json after a successful child."""
    path = Path(recipe.output_dir) / "run_report.json"
    if not path.exists():
        return (1 if strict else 0), f"no {path}: nothing was measured"
    rep = json.loads(path.read_text())
    err = rep.get("total_error_pct")
    if err is None:
        return (1 if strict else 0), "no prediction to check the run against: " + "; ".join(rep.get("notes", []))
    ok = abs(err) <= tolerance
    line = f"peak memory: predicted {rep['predicted']['peak_bytes'] / 2**20:,.1f} MiB, measured " \
           f"{rep['measured']['peak_bytes'] / 2**20:,.1f} MiB ({err:+.1f}%, tolerance {tolerance:g}%)"
    return (0 if ok or not strict else 1), line + ("" if ok else ": OUTSIDE the tolerance")


def bf16_here() -> bool:
    """Whether this machine trains in bf16 where a config says `bf16: auto` (Axolotl's
    `is_torch_bf16_gpu_available`): a CUDA GPU with bf16."""
    import torch
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def axolotl_recipe(path: str, data, echo) -> Recipe:
    """An Axolotl config as the recipe the trainer runs (what the config left out first, one
    line each); `run` writes it as OUTPUT_DIR/launch/recipe.yaml once it holds the lock."""
    from .axolotl import translate
    t = translate(data, path, bf16_device=bf16_here(), training=True, base_dir=Path(path).parent)
    for note in t.notes():
        echo(f"plan train: {path}: {note}")
    return t.recipe


def run(recipe_path: str, num_processes: int | None = None, strict: bool = False, tolerance: float = 10.0,
        echo=print, force: bool = False) -> int:
    from .axolotl import is_axolotl
    data = read(recipe_path)
    axolotl = isinstance(data, dict) and is_axolotl(data)
    recipe = axolotl_recipe(recipe_path, data, echo) if axolotl else from_dict(data, recipe_path)
    if num_processes is not None and num_processes < 1:
        raise RecipeError(f"--num-processes must be at least 1, got {num_processes}")
    hidden = None
    if recipe.plan.strategy.startswith("zero"):
        hidden = load_config(recipe).hidden_size
    try:
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"output_dir {recipe.output_dir}: cannot create it ({e.strerror})") from None
    lock = lock_output(Path(recipe.output_dir))
    try:
        if finished_run(recipe, force, echo):
            return 0
        if axolotl:  # the recipe the trainer runs, beside the launch config
            config_path = recipe_path
            recipe_path = str(Path(recipe.output_dir) / CONFIG_DIR / "recipe.yaml")
            write_files(str(Path(recipe_path).parent), {"recipe.yaml": dump(recipe)}, force=True)
            echo(f"plan train: {config_path} read as an Axolotl config; the recipe it runs: {recipe_path}")
        return _launch(recipe, recipe_path, num_processes, strict, tolerance, echo, hidden)
    finally:
        lock.close()


def _launch(recipe: Recipe, recipe_path: str, num_processes: int | None, strict: bool, tolerance: float, echo,
            hidden: int | None) -> int:
    try:
        config = write_config(recipe, num_processes, hidden)
    except PlanError as e:
        raise RecipeError(e.render(RECIPE_NAMES)) from None
    preflight(recipe)
    error_file = Path(recipe.output_dir) / CONFIG_DIR / ERROR_FILE
    error_file.unlink(missing_ok=True)
    threads = [] if os.environ.get("OMP_NUM_THREADS") else \
        ["--num_cpu_threads_per_process", str(cpu_threads(num_processes or recipe.plan.gpus))]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(config), *threads,
           "-m", "trainer", str(Path(recipe_path).resolve())]
    echo(f"launching: accelerate launch --config_file {config} -m trainer {recipe_path}")
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # The child leads its own process group (a terminal's Ctrl-C reaches this process only), and
    # a signal goes to the trainer's ranks themselves: accelerate's one-process launcher does
    # not pass SIGTERM on, and torch's elastic agent would pass it on a second time (the ranks
    # take a second signal as "stop at once") and kill them 30 s later, checkpoint or not.
    child = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(sig, _frame):
        ranks = _trainer_ranks(child.pid)
        try:
            if ranks is None:  # no /proc: the whole group
                os.killpg(child.pid, sig)
            for pid in ranks or []:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = child.wait()
        _wait_group(child.pid)  # the trainer may outlive a launcher that died of the signal
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc != 0 and error_file.exists():  # the trainer's own one-line error, already printed
        return int(json.loads(error_file.read_text()).get("status", 1))
    if rc != 0:
        log = Path(recipe.output_dir) / "train.log"
        echo(f"plan train: the run failed (exit status {rc})" + (f"; messages in {log}" if log.exists() else ""))
        return 1
    status, line = report_status(recipe, strict, tolerance)
    echo(line)
    return status
