"""The house rules, checked: the library imports light, the import graph has no cycle, and the
pytest plugin is inert in a test suite that never asks for it."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "sae_acceptance": REPO / "sae_acceptance",
    "pytest_sae_acceptance": REPO / "plugins" / "pytest_sae_acceptance",
}
# Function-level imports of project modules that are lazy on purpose; each says why at the import.
LAZY_ON_PURPOSE = {
    ("pytest_sae_acceptance.items", "pytest_sae_acceptance.session"),  # torch only once an SAE item runs
    ("pytest_sae_acceptance.plugin", "pytest_sae_acceptance.scheduling"),  # pytest-xdist is optional
    ("pytest_sae_acceptance.plugin", "pytest_sae_acceptance.outputs"),  # the gate's writers only once there is a gate
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for file in root.rglob("*.py"):
            parts = file.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = file
    return found


def _project_imports(module: str, file: Path) -> tuple[set[str], set[str]]:
    """(module-level, function-level) imports of project modules, as module names."""
    known = _modules()
    top, nested = set(), set()
    tree = ast.parse(file.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        targets = {n for n in names if n in known and n != module}
        if _for_type_checking(node, parents):
            continue  # never runs: annotations only
        owner = parents.get(node)
        while owner is not None and not isinstance(owner, ast.FunctionDef | ast.AsyncFunctionDef):
            owner = parents.get(owner)
        (nested if owner is not None else top).update(targets)
    return top, nested


def _for_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether `node` sits under `if TYPE_CHECKING:`."""
    owner = parents.get(node)
    while owner is not None:
        if isinstance(owner, ast.If) and isinstance(owner.test, ast.Name) and owner.test.id == "TYPE_CHECKING":
            return True
        owner = parents.get(owner)
    return False


def test_importing_the_config_and_errors_loads_neither_torch_nor_pytest():
    code = "import sys, sae_acceptance.config, sae_acceptance.errors; print(sorted({'torch', 'pytest'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_import_graph_has_no_cycle_and_no_hidden_lazy_import():
    modules = _modules()
    graph, lazy = {}, set()
    for name, file in modules.items():
        top, nested = _project_imports(name, file)
        graph[name] = top
        lazy |= {(name, target) for target in nested if not target.startswith(f"{name}.")}
    assert {
        pair
        for pair in lazy
        if "backends" not in pair[0] + pair[1] or not pair[1].startswith("sae_acceptance.sources.backends")
    } <= LAZY_ON_PURPOSE
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            parent = nxt.rsplit(".", 1)[0]
            if nxt.startswith(node + ".") or node.startswith(nxt + ".") and nxt == parent:
                continue  # a package and its own submodules
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [nxt])}")
            if state.get(nxt) is None:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_plugin_is_inert_in_an_unrelated_suite(pytester, monkeypatch, tmp_path):
    """-n 2, a fake nvidia-smi reporting two GPUs: workers keep CUDA_VISIBLE_DEVICES and the
    default scheduling, and never import torch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\necho 'GPU 1: Fake (UUID: GPU-1)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    out = tmp_path / "seen"
    out.mkdir()
    pytester.makepyfile(
        test_unrelated=textwrap.dedent(
            f"""
            import os, sys, pytest

            @pytest.mark.parametrize("i", range(4))
            def test_env(i, request):
                worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
                line = f"{{os.environ.get('CUDA_VISIBLE_DEVICES')}} {{'torch' in sys.modules}} {{request.config.option.dist}}"
                open({str(out)!r} + f"/{{worker}}-{{i}}", "w").write(line)
            """
        )
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    seen = {p.read_text() for p in out.iterdir()}
    assert seen == {"5,7 False no"}  # a worker's own dist is "no"; nothing of ours changed it


def _settings_defaults() -> dict[str, object]:
    """Every settings field's default, by field name (the one home of each default)."""
    from sae_acceptance.config import CanyonSettings, EvalSettings
    from sae_acceptance.train.settings import TrainSettings

    found: dict[str, object] = {}
    for model in (EvalSettings, CanyonSettings, TrainSettings):
        for name, info in model.model_fields.items():
            if not info.is_required() and info.default is not None and not isinstance(info.default, bool):
                found.setdefault(name, info.default)
    return found


# A parameter may share a setting's name and its neutral value: skipping 0 sequences is not the setting restated.
NEUTRAL = {("skip", 0)}


def _restated(tree: ast.AST, defaults: dict[str, object]) -> list[tuple[int, str]]:
    """Where a settings default is written again: a parameter of the setting's name defaulting to
    it, `.get("<setting>", <it>)`, or `add_argument("--<setting>", default=<it>)`."""
    found = []

    def literal(node: ast.AST | None) -> object:
        return node.value if isinstance(node, ast.Constant) else None

    def check(name: str, node: ast.AST | None, line: int) -> None:
        value = literal(node)
        if name in defaults and value is not None and value == defaults[name] and (name, value) not in NEUTRAL:
            found.append((line, f"{name} = {value!r}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = args.posonlyargs + args.args
            for arg, default in zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True):
                check(arg.arg, default, node.lineno)
            for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                check(arg.arg, default, node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "get" and len(node.args) == 2 and isinstance(literal(node.args[0]), str):
                check(str(literal(node.args[0])), node.args[1], node.lineno)
            if node.func.attr == "add_argument" and node.args and isinstance(literal(node.args[0]), str):
                flag = str(literal(node.args[0])).removeprefix("--").replace("-", "_")
                for keyword in node.keywords:
                    if keyword.arg == "default":
                        check(flag, keyword.value, node.lineno)
    return found


def test_no_settings_default_is_written_outside_its_settings_model():
    """Eval, canyon and training defaults live in their settings models alone; code that needs
    one asks for it (`config.eval_default`) or takes it from the caller."""
    defaults = _settings_defaults()
    homes = {REPO / "sae_acceptance" / "config.py", REPO / "sae_acceptance" / "train" / "settings.py"}
    restated = [
        f"{file.relative_to(REPO)}:{line}: {what}"
        for file in _modules().values()
        if file not in homes
        for line, what in _restated(ast.parse(file.read_text()), defaults)
    ]
    assert restated == []
    planted = ast.parse("def run(batch_size=8, device='cpu'):\n    return {}.get('dense_threshold', 0.1)\n")
    assert [what for _, what in _restated(planted, defaults)] == ["batch_size = 8", "dense_threshold = 0.1"]
