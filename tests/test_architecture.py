"""The package's shape: no import cycles, data flowing one way between sub-packages, and reading results or
artifact metadata without loading torch or Ray. Read from the source with `ast`, so it holds for lazy imports
too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eagle"

# What each part of the package may import from the rest of it (the data flow: io → expert → mllm → pipeline;
# evaluation reads results; testing and cli sit on top). A prefix allows its sub-modules.
ALLOWED: dict[str, tuple[str, ...]] = {
    "eagle": (),
    "eagle.findings": (),
    "eagle.io.storage": ("eagle.io.s3_client",),
    "eagle.io.s3_client": (),
    "eagle.logs": ("eagle.io.storage",),
    "eagle.config": ("eagle.config", "eagle.io.storage"),
    "eagle.io": ("eagle.io", "eagle.config", "eagle.findings"),
    "eagle.expert": ("eagle.expert", "eagle.io", "eagle.config", "eagle.findings"),
    "eagle.mllm": ("eagle.mllm", "eagle.io", "eagle.config", "eagle.findings"),
    "eagle.pipeline": ("eagle.pipeline", "eagle.expert", "eagle.mllm", "eagle.io", "eagle.config",
                       "eagle.findings", "eagle.logs", "eagle"),
    "eagle.evaluation": ("eagle.evaluation", "eagle.expert", "eagle.io", "eagle.config", "eagle.findings"),
    "eagle.testing": ("eagle.testing", "eagle.pipeline", "eagle.expert", "eagle.mllm", "eagle.io", "eagle.config",
                      "eagle.findings", "eagle.logs"),
    "eagle.cli": ("eagle",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(imports at module level, all imports) of eagle modules; `if TYPE_CHECKING:` blocks left out."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    every: set[str] = set()

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            found = {n for n in names if n == "eagle" or n.startswith("eagle.")}
            every.update(found)
            if at_top:
                top.update(found)
            nested = at_top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, nested)

    visit(tree, True)
    return top, every


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The eagle module an imported name refers to (``eagle.io.storage.join`` → ``eagle.io.storage``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph(which: int) -> dict[str, set[str]]:
    graph = {}
    for mod, path in MODULES.items():
        targets = {_resolve(n) for n in _imports(path)[which]} - {None, mod}
        # importing a sub-module runs its package's __init__ first, unless the importer is inside that package
        parents = {t.rpartition(".")[0] for t in targets if t.count(".") > 1}
        graph[mod] = targets | {p for p in parents if not mod.startswith(p + ".")} - {mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if not state.get(nxt) and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (found := dfs(node)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle(_graph(0)) is None, f"import cycle at module level: {' -> '.join(_cycle(_graph(0)))}"
    assert _cycle(_graph(1)) is None, f"import cycle (counting lazy imports): {' -> '.join(_cycle(_graph(1)))}"


def test_cycle_check_bites():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _rule(module: str) -> tuple[str, ...]:
    key = max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len, default=None)
    assert key is not None, f"{module} has no layering rule in tests/test_architecture.py"
    return ALLOWED[key]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependencies_flow_one_way(module: str):
    allowed = _rule(module)
    used = {_resolve(n) for n in _imports(MODULES[module])[1]} - {None}
    bad = sorted(u for u in used if u != "eagle" and not any(u == a or u.startswith(a + ".") for a in allowed)
                 and u != module)
    assert not bad, f"{module} imports {bad}; allowed: {allowed}"


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for mod in MODULES:
        leaf = mod.rpartition(".")[2]
        if not MODULES[mod].name == "__init__.py":
            names.setdefault(leaf, []).append(mod)
    jobs = {p.stem: f"jobs.{p.stem}" for p in (ROOT / "jobs").glob("*.py")}
    for leaf, job in jobs.items():
        names.setdefault(leaf, []).append(job)
    packages = {mod.rpartition(".")[2] for mod, p in MODULES.items() if p.name == "__init__.py"}
    clashes = {k: v for k, v in names.items() if len(v) > 1 or k in packages}
    assert not clashes, clashes


def test_reading_results_and_artifact_metadata_loads_neither_torch_nor_ray():
    code = ("import sys\n"
            "import eagle.io.runs, eagle.io.history, eagle.io.schema, eagle.expert.artifact, eagle.config\n"
            "import eagle.evaluation.scorecard, eagle.evaluation.report\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def _tiny_expert():
    from eagle.config import ExpertConfig

    return ExpertConfig(backbone="resnet18", layers=["layer1"], weights="random", resize=32, crop=32)


def _unimplemented(model: object, interface: type) -> list[str]:
    """The members of a Protocol that `model` lacks, or whose methods take other parameters."""
    import inspect

    members = {**{name: None for name in interface.__annotations__},
               **{name: value for name, value in vars(interface).items() if not name.startswith("_")}}
    def parameters(method: object) -> tuple[str, ...]:
        return tuple(p for p in inspect.signature(method).parameters if p not in ("self", "cls"))

    missing = []
    for name, declared in members.items():
        if getattr(model, name, None) is None:
            missing.append(name)
        elif inspect.isfunction(declared) or isinstance(declared, classmethod):
            have, wanted = parameters(getattr(model, name)), parameters(getattr(interface, name))
            if have != wanted:
                missing.append(f"{name}{have} (wanted {wanted})")
    return missing


def test_every_registered_expert_model_implements_the_interface():
    from torch import nn

    from eagle.config.sections import EXPERT_MODELS
    from eagle.expert.experts import ExpertModel, model_class

    for name in EXPERT_MODELS:
        cls = model_class(name)
        model = cls.from_config(_tiny_expert())
        assert cls.name == name and isinstance(model, nn.Module), f"eagle.expert.{name}.MODEL is not model {name}"
        assert not (gaps := _unimplemented(model, ExpertModel)), f"expert model {name} lacks {gaps}"
        assert isinstance(model, ExpertModel)


def test_interface_check_bites():
    from eagle.expert.experts import ExpertModel
    from eagle.expert.padim import Padim

    class NoTensors(Padim):
        tensors = None  # as if the method were missing

    class OtherPredict(Padim):
        def predict(self, batch):
            return batch

    assert _unimplemented(NoTensors.from_config(_tiny_expert()), ExpertModel) == ["tensors"]
    assert _unimplemented(OtherPredict.from_config(_tiny_expert()), ExpertModel) == [
        "predict('batch',) (wanted ('batch', 'sizes'))"]
    assert "fit" in _unimplemented(object(), ExpertModel)
