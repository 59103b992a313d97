"""Every public class, function and method of the library and the plugin says what it is for, and
every settings field a user sets has a description (its docstring, or `Field(description=...)`)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

from pydantic import BaseModel

from sae_acceptance.config import StrictModel

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "sae_acceptance": REPO / "sae_acceptance",
    "pytest_sae_acceptance": REPO / "plugins" / "pytest_sae_acceptance",
}


def _public_modules() -> dict[str, Path]:
    """Module name -> file, leaving out private modules (a `_name` part)."""
    found = {}
    for package, root in PACKAGES.items():
        for file in sorted(root.rglob("*.py")):
            parts = file.relative_to(root).with_suffix("").parts
            if any(p.startswith("_") and p != "__init__" for p in parts):
                continue
            found[".".join((package, *parts)).removesuffix(".__init__")] = file
    return found


def _public(name: str) -> bool:
    return not name.startswith("_")


def _inherits_doc(cls: type, name: str) -> bool:
    """An override of a documented method of a base class (pytest's `collect`, `runtest`, ...)
    keeps the base's meaning, and `inspect.getdoc` shows the base's docstring for it."""
    return any(name in vars(base) and inspect.getdoc(vars(base)[name]) for base in cls.__mro__[1:])


def _undocumented(module_name: str, file: Path) -> list[str]:
    """`module:line name` of each public class, function and method without a docstring."""
    module = importlib.import_module(module_name)
    missing = []
    for node in ast.parse(file.read_text()).body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or not _public(node.name):
            continue
        if ast.get_docstring(node) is None:
            missing.append(f"{module_name}:{node.lineno} {node.name}")
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, node.name)
        for item in node.body:
            if (
                isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                and _public(item.name)
                and ast.get_docstring(item) is None
                and not _inherits_doc(cls, item.name)
            ):
                missing.append(f"{module_name}:{item.lineno} {node.name}.{item.name}")
    return missing


def _settings_models() -> list[type[BaseModel]]:
    """The settings a user writes (thresholds files, sweep profiles): every `StrictModel`."""
    for name in _public_modules():
        importlib.import_module(name)
    found, todo = [], [StrictModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.split(".")[0] in PACKAGES:
                found.append(sub)
            todo.append(sub)
    return found


def test_every_public_class_function_and_method_has_a_docstring():
    missing = [entry for name, file in _public_modules().items() for entry in _undocumented(name, file)]
    assert not missing, f"{len(missing)} without a docstring:\n" + "\n".join(missing)


def test_every_settings_field_has_a_description():
    models = _settings_models()
    assert {"Thresholds", "EvalSettings", "SAEEntry", "TrainSettings", "Profile"} <= {m.__name__ for m in models}
    missing = [
        f"{model.__module__}.{model.__name__}.{name}"
        for model in models
        for name, field in model.model_fields.items()
        if name in vars(model).get("__annotations__", {}) and not field.description
    ]
    assert not missing, f"{len(missing)} settings fields without a description:\n" + "\n".join(missing)


def test_the_checks_see_what_they_check(tmp_path, monkeypatch):
    """A public function and method without a docstring are listed; an override of a documented
    base method and a private name are not; a field without a docstring has no description."""
    source = '''
class Base:
    """Documented."""

    def run(self):
        """What running means."""


class Child(Base):
    """Documented."""

    def run(self):
        pass

    def extra(self):
        pass

    def _hidden(self):
        pass


def bare():
    pass
'''
    (tmp_path / "docless_probe.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _undocumented("docless_probe", tmp_path / "docless_probe.py") == [
        "docless_probe:15 Child.extra",
        "docless_probe:22 bare",
    ]

    class Probe(StrictModel):
        described: int = 1
        """with a description"""
        bare: int = 2

    assert Probe.model_fields["described"].description == "with a description"
    assert Probe.model_fields["bare"].description is None
