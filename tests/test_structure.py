"""The structure the code keeps: layers that point one way, and every list of choices defined once."""
import ast
from pathlib import Path

import pytest

from planner import contract
from planner.contract import Optimizer, PlanError, Precision, Settings, Strategy, check_options

ROOT = Path(__file__).resolve().parent.parent


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules it imports (function-local imports included), read from the code."""
    base = ROOT / package
    mods = {}
    for f in base.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(up + ([node.module] if node.module else []))
                else:
                    mod = node.module
                targets |= {mod} | {f"{mod}.{a.name}" for a in node.names}
        graph[name] = set()
        for t in targets:
            while t and t not in mods and not t.startswith("trainer"):
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search, as the path that closes it."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt in graph and nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_planner_imports_form_no_cycle_and_never_reach_trainer():
    graph = import_graph("planner")
    assert "planner.contract" in graph and "planner.measure.builder" in graph  # the graph was read
    assert cycles(graph) == []
    assert {m: sorted(t for t in ts if t.startswith("trainer")) for m, ts in graph.items()
            if any(t.startswith("trainer") for t in ts)} == {}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_layers_point_down_from_the_contract():
    """The contract imports nothing of planner; the formulas never import planning or measurement."""
    graph = import_graph("planner")
    assert {t for t in graph["planner.contract"] if t.startswith("planner")} == set()
    formulas = ("planner.precision", "planner.spec", "planner.memory", "planner.distributed", "planner.estimate")
    above = ("planner.recommend", "planner.speed", "planner.emit", "planner.cli", "planner.measure", "planner.launch")
    for m in formulas:
        assert not [t for t in graph[m] if t.startswith(above)], m


def test_every_list_of_choices_is_the_contracts():
    from planner.measure.builder import make_optimizer  # noqa: F401 (importable: the builder is the one place)
    from planner.precision import RECIPES
    from planner.recipe import Dataset, PlanSection, Recipe
    assert tuple(RECIPES) == Precision.values()
    assert Recipe.model_fields["optimizer"].annotation is contract.OptimizerName
    assert PlanSection.model_fields["strategy"].annotation is Strategy
    assert PlanSection.model_fields["precision"].annotation is Precision
    assert Dataset.model_fields["type"].annotation is contract.DataFormat
    assert contract.STRATEGIES == Strategy.values()
    assert set(contract.FSDP) | set(contract.ZERO) | {"ddp"} == set(Strategy.values())


@pytest.mark.parametrize("name", Optimizer.values())
def test_every_optimizer_the_estimate_counts_is_built(name):
    """The estimate's optimizers are the builder's: each one builds (lion and adamw-8bit through
    bitsandbytes), so `plan train` runs every optimizer `plan estimate` offers."""
    import torch

    from planner.measure.builder import make_optimizer
    p = torch.nn.Parameter(torch.zeros(4, 4))
    assert isinstance(make_optimizer([p], name), torch.optim.Optimizer)


def test_an_optimizer_outside_the_list_is_refused_everywhere():
    from planner.measure.builder import make_optimizer
    from planner.recipe import RecipeError, from_dict
    with pytest.raises(PlanError, match="unknown optimizer 'adam9'"):
        check_options(Settings(optimizer="adam9"))
    with pytest.raises(RecipeError, match="optimizer"):
        from_dict({"base_model": "x", "optimizer": "adam9"})
    with pytest.raises(ValueError, match="no adam9 optimizer"):
        make_optimizer([], "adam9")


def test_plan_errors_name_options_as_each_edge_does():
    from planner.recipe import RECIPE_NAMES
    with pytest.raises(PlanError) as e:
        check_options(Settings(seq_len=0))
    assert e.value.field == "seq_len"
    assert str(e.value) == "--seq-len must be at least 1, got 0"
    assert e.value.render(RECIPE_NAMES) == "sequence_len must be at least 1, got 0"


def test_the_code_is_ruff_clean():
    """ruff (configured in pyproject.toml: E, F, W, I, B at 120 columns) finds nothing."""
    import shutil
    import subprocess
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    r = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
