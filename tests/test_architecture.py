"""The package's shape: no import cycles, data flowing one way between sub-packages, the output format decided
only in `eagle/io/`, and reading results or artifact metadata without loading torch or Ray (read from the source
with `ast`, so it holds for lazy imports too); stages that set exactly the columns they declare, each described;
a config whose every setting is."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

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


OUTPUT_FORMATS = {"parquet", "iceberg"}


def _is_format(node: ast.AST) -> bool:
    """`node` names an output format: ``"iceberg"``, a tuple of such names, or ``<...>output.format``."""
    if isinstance(node, ast.Constant):
        return node.value in OUTPUT_FORMATS
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_format(e) for e in node.elts)
    return isinstance(node, ast.Attribute) and node.attr == "format" and ast.unparse(node.value).endswith("output")


def _format_branches(source: str) -> list[int]:
    """Lines that branch on the output format: a comparison or `match` on it, or a lookup keyed by it."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hit = any(_is_format(n) for n in (node.left, *node.comparators))
        elif isinstance(node, ast.Match):
            hit = _is_format(node.subject) or any(
                isinstance(p, ast.MatchValue) and _is_format(p.value) for c in node.cases for p in ast.walk(c.pattern))
        elif isinstance(node, ast.Subscript):
            hit = isinstance(node.slice, ast.Attribute) and _is_format(node.slice)
        else:
            continue
        if hit:
            lines.append(node.lineno)
    return sorted(lines)


def test_only_io_branches_on_the_output_format():
    """One result store per format (`eagle.io.results.result_store`): nothing else asks which it is."""
    found = {mod: lines for mod, path in MODULES.items() if not mod.startswith("eagle.io")
             and (lines := _format_branches(path.read_text()))}
    assert not found, f"branches on output.format outside eagle/io/ (use eagle.io.results.ResultStore): {found}"


def test_format_branch_check_bites():
    assert _format_branches("if cfg.output.format == 'iceberg': pass\nx = out.format != 'parquet'\n"
                            "match cfg.output.format:\n    case _: pass\ny = {}[self.cfg.output.format]\n"
                            "z = fmt in ('parquet', 'iceberg')") == [1, 2, 3, 5, 6]
    assert _format_branches("f(format='parquet')\nif uri.endswith('.parquet'): pass\nif a.format == b: pass") == []


def test_reading_results_and_artifact_metadata_loads_neither_torch_nor_ray():
    code = ("import sys\n"
            "import eagle.io.runs, eagle.io.latest_view, eagle.io.results, eagle.io.schema, eagle.expert.artifact\n"
            "import eagle.config\n"
            "import eagle.evaluation.scorecard, eagle.evaluation.report\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------------------------------------- stage contracts
def _stages() -> list[type]:
    """Every Stage subclass of eagle.pipeline.stages."""
    import eagle.pipeline.stages as package
    from eagle.pipeline.stages.base import Stage

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return [c for c in Stage.__subclasses__() if c.__module__.startswith(package.__name__ + ".")]


def test_stage_declarations_are_described_sized_and_flow():
    from eagle.config import Resources
    from eagle.io.schema import COLUMN_NAMES
    from eagle.pipeline.stages.base import COLUMNS
    from eagle.pipeline.stages.decode_stage import DecodeStage
    from eagle.pipeline.stages.expert_stage import ExpertStage
    from eagle.pipeline.stages.finish_stage import FinishStage
    from eagle.pipeline.stages.mllm_stage import MLLMStage
    from eagle.pipeline.stages.stamp_stage import StampStage

    stages = _stages()
    # the order rows flow in; the MLLM's rows come from the finish stage and go back to it (same columns)
    flow = [DecodeStage, ExpertStage, MLLMStage, FinishStage, StampStage]
    assert sorted(stages, key=str) == sorted(flow, key=str), "a new stage: add it to the flow here"
    available = set(DecodeStage.requires)  # the listing's columns
    for stage in flow:
        for kind in ("requires", "produces", "drops"):
            undescribed = [c for c in getattr(stage, kind) if c not in COLUMNS]
            assert not undescribed, f"{stage.__name__}.{kind}: {undescribed} not described in stages.base.COLUMNS"
        assert stage.sized_by in Resources.model_fields, f"{stage.__name__}.sized_by: no resources.{stage.sized_by}"
        assert set(stage.defaults) <= set(stage.produces), f"{stage.__name__}: defaults for undeclared columns"
        assert set(stage.requires) <= available, f"{stage.__name__} requires {set(stage.requires) - available}, " \
                                                 f"which no stage before it produces"
        assert set(stage.drops) <= available | set(stage.produces), f"{stage.__name__} drops columns it never sees"
        available = (available | set(stage.produces)) - set(stage.drops)
    assert available == set(COLUMN_NAMES), "what the stages leave must be the output table: " \
        f"missing {set(COLUMN_NAMES) - available}, not dropped {available - set(COLUMN_NAMES)}"


class _Recorder(dict):
    """A row that notes which columns are set on it."""

    def __init__(self, row: dict, into: set[str]) -> None:
        super().__init__(row)
        self.into = into

    def __setitem__(self, key: str, value: Any) -> None:
        self.into.add(key)
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        new = dict(*args, **kwargs)
        self.into.update(new)
        super().update(new)


def test_every_stage_sets_exactly_the_columns_it_declares(tmp_path, monkeypatch):
    """Each stage's `process` on `stages_at_work`'s batches (every path of every stage, tests/test_stages.py):
    the columns it sets, with its defaults, are its `produces`."""
    from test_stages import stages_at_work

    assigned: dict[type, set[str]] = {}

    def recording(process, into):
        def run(self, rows):
            recorders = [_Recorder(r, into) for r in rows]
            process(self, recorders)
            for row, recorder in zip(rows, recorders, strict=True):
                row.update(recorder)
        return run

    for stage in _stages():
        monkeypatch.setattr(stage, "process", recording(stage.process, assigned.setdefault(stage, set())))
    for stage, batch in stages_at_work(tmp_path):
        stage(batch)
    for stage, columns in assigned.items():
        declared, done = set(stage.produces), columns | set(stage.defaults)
        assert done == declared, f"{stage.__name__} sets {sorted(done - declared)} without declaring them and " \
                                 f"declares {sorted(declared - done)} it never sets"


# ---------------------------------------------------------------------------------------------- config
def _settings(model: type[BaseModel], prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _settings(field.annotation, f"{prefix}{name}.")


def test_every_setting_is_described():
    """A setting's description is its field's; a section's may be its class docstring (what --print-config shows)."""
    from eagle.config import JobConfig
    from eagle.config.loading import description

    settings = dict(_settings(JobConfig))
    assert len(settings) > 150
    missing = [path for path, field in settings.items() if not description(field)]
    assert not missing, f"settings without a description: {missing}"


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
