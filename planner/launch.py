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
from .recipe import RECIPE_NAMES, Recipe, RecipeError, load, load_config, settings

CONFIG_DIR = "launch"  # inside output_dir: the accelerate (and DeepSpeed) config of this run
ERROR_FILE = "error.json"  # the trainer's bad-input line and status, for the launcher


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


def run(recipe_path: str, num_processes: int | None = None, strict: bool = False, tolerance: float = 10.0,
        echo=print) -> int:
    recipe = load(recipe_path)
    if num_processes is not None and num_processes < 1:
        raise RecipeError(f"--num-processes must be at least 1, got {num_processes}")
    hidden = None
    if recipe.plan.strategy.startswith("zero"):
        hidden = load_config(recipe).hidden_size
    try:
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"output_dir {recipe.output_dir}: cannot create it ({e.strerror})") from None
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
        echo(f"plan train: the run failed (exit status {rc})")
        return 1
    status, line = report_status(recipe, strict, tolerance)
    echo(line)
    return status
