"""The shape of the code: types, lint, the module tables, the wings' layering, the old module names.

* ``python -m mypy`` (``sci_node/``) and ``python -m ruff check`` pass (both configured in pyproject.toml);
* docs/architecture.md's module tables name every module of ``sci_node/`` and ``trainer/``, and nothing else;
* every import (lazy ones too) follows the layering rules of docs/architecture.md;
* every old module name of ``sci_node.moved`` / ``trainer.moved`` imports as its new module, nothing in the
  repository imports an old name, and the documented ``python -m`` commands resolve;
* every training config loads.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = {"__init__", "config", "errors", "logs", "terminal", "moved"}

#: wing -> what it may import of ours besides the core ("dicom.geometry": that module only)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "nets": set(),
    "imaging": set(),
    "store": set(),
    "routing": {"imaging"},
    "dicom": {"store"},
    "models": {"nets", "imaging", "routing"},
    "pipeline": {"nets", "imaging", "routing", "models", "dicom.geometry"},
    "corrections": {"store", "dicom.geometry", "pipeline"},
    "engine": {"store", "models", "pipeline", "dicom.query"},
    "app": {"nets", "imaging", "store", "dicom", "routing", "models", "pipeline", "corrections", "engine"},
    "cli": {"nets", "imaging", "store", "dicom", "routing", "models", "pipeline", "corrections", "engine", "app"},
}
_DICOM_NET = {"pynetdicom"}
_TORCH = {"torch", "monai", "torchvision"}
_CELERY = {"celery", "redis"}
#: wing -> third-party top-level packages it must not import
BANNED: dict[str, set[str]] = {
    "core": _TORCH | _DICOM_NET | _CELERY | {"pydicom", "highdicom", "SimpleITK"},
    "nets": _DICOM_NET | _CELERY | {"pydicom", "highdicom", "SimpleITK"},
    "imaging": _TORCH | _DICOM_NET | _CELERY | {"pydicom", "highdicom"},
    "store": _TORCH | _DICOM_NET | _CELERY | {"highdicom", "SimpleITK"},
    "routing": _TORCH | _DICOM_NET | _CELERY | {"pydicom", "highdicom"},
    "dicom": _TORCH | _CELERY | {"highdicom", "SimpleITK"},
    "models": _DICOM_NET | _CELERY | {"pydicom", "highdicom"},
    "pipeline": _DICOM_NET | _CELERY,
    "corrections": _TORCH | _DICOM_NET | _CELERY | {"highdicom"},
    "engine": _TORCH | _DICOM_NET,
    "app": _TORCH,
    "cli": _TORCH,
}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=1800)


def test_mypy_passes() -> None:
    proc = _run("mypy")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_ruff_passes() -> None:
    proc = _run("ruff", "check", "--no-cache")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_py_typed_ships() -> None:
    assert (REPO / "sci_node" / "py.typed").is_file()
    assert "sci_node = py.typed" in (REPO / "setup.cfg").read_text()


# -- docs/architecture.md's module tables ---------------------------------------------------

def _table_modules(doc: str, heading: str) -> set[str]:
    """Backticked ``*.py`` names in the first cell of each row of the table under ``heading``."""
    section = doc.split(heading, 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            names.update(re.findall(r"`([\w/]+\.py)`", line.split("|")[1]))
    return names


def _package_modules(package: str) -> tuple[set[str], set[str]]:
    """(modules that need a row: all but ``__init__.py``, every module) of ``package``, relative paths."""
    every = {str(p.relative_to(REPO / package)) for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts}
    return {m for m in every if not m.endswith("__init__.py")}, every


@pytest.mark.parametrize(("package", "heading", "prefix"), [
    ("sci_node", "## Package map (`sci_node/`)", ""),
    ("trainer", "## Trainer map (`trainer/`)", "trainer/"),
])
def test_architecture_table_matches_the_tree(package: str, heading: str, prefix: str) -> None:
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = {n.removeprefix(prefix) for n in _table_modules(doc, heading)}
    required, every = _package_modules(package)
    assert not named - every, f"docs/architecture.md names modules that do not exist: {sorted(named - every)}"
    assert not required - named, f"docs/architecture.md's table misses modules: {sorted(required - named)}"


def test_architecture_names_every_wing() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = doc.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for package in ("sci_node", "trainer"):
        wings = {p.parent.name for p in (REPO / package).glob("*/__init__.py")}
        missing = [w for w in sorted(wings) if not re.search(rf"^\s+{w}/\s", layout, re.M)]
        assert not missing, f"docs/architecture.md's layout misses the wings {missing} of {package}/"


# -- layering --------------------------------------------------------------------------------

def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import of ``path``, lazy ones included: ``import X`` gives ``X``; ``from X import y``
    gives ``X.y`` when that is one of our modules or packages, else ``X``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = REPO.joinpath(*node.module.split("."), a.name)
                ours = sub.is_dir() or sub.with_suffix(".py").is_file()
                out.append((node.lineno, f"{node.module}.{a.name}" if ours else node.module))
    return out


def _wing_of(parts: tuple[str, ...]) -> str:
    """``("sci_node", "dicom", "scp")`` -> ``dicom``; the core's modules -> ``core``."""
    return "core" if len(parts) < 3 and (len(parts) < 2 or parts[1] in CORE) else parts[1]


def _sci_node_modules() -> list[tuple[Path, tuple[str, ...]]]:
    out = []
    for p in sorted((REPO / "sci_node").rglob("*.py")):
        parts = tuple(p.relative_to(REPO).with_suffix("").parts)
        out.append((p, parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_every_sci_node_module_is_in_a_wing_or_the_core() -> None:
    stray = [str(p.relative_to(REPO)) for p in sorted((REPO / "sci_node").glob("*.py")) if p.stem not in CORE]
    assert not stray, f"modules outside the wings (put each into one, docs/architecture.md): {stray}"


def test_wings_import_only_what_the_layering_allows() -> None:
    moved = set(importlib.import_module("sci_node.moved").MOVED)
    problems = []
    for path, parts in _sci_node_modules():
        wing = _wing_of(parts)
        allowed = ALLOWED[wing]
        for line, name in _imports(path):
            where = f"{path.relative_to(REPO)}:{line} imports {name}"
            top = name.split(".")[0]
            if top == "trainer":
                problems.append(f"{where}: sci_node never imports the trainer")
            elif top in BANNED[wing]:
                problems.append(f"{where}: {wing}/ must not import {top}")
            elif top == "sci_node" and name not in moved:
                target = name.split(".")
                if len(target) < 2 or not (REPO / "sci_node" / target[1]).is_dir():
                    continue  # the core (a stray top-level module fails the test above)
                other = target[1]
                if other != wing and other not in allowed and ".".join(target[1:3]) not in allowed:
                    problems.append(f"{where}: {wing}/ may not import {other}/")
    assert not problems, "\n".join(problems)


def test_trainer_wings_do_not_import_each_other() -> None:
    problems = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if len(parts) < 3:
            continue
        wing = parts[1]
        for line, name in _imports(path):
            target = name.split(".")
            if target[0] == "trainer" and len(target) > 1 and target[1] in ("classify", "segment", "studies", "cli") \
                    and target[1] != wing and wing in ("classify", "segment"):
                problems.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not problems, "\n".join(problems)


# -- old module names ------------------------------------------------------------------------

def _moved_tables() -> dict[str, str]:
    import trainer.moved

    return {**importlib.import_module("sci_node.moved").MOVED, **trainer.moved.MOVED}


def test_old_module_names_are_the_new_modules() -> None:
    for old, new in _moved_tables().items():
        assert not (REPO / (old.replace(".", "/") + ".py")).exists(), f"a file at the old path of {old}"
        assert importlib.import_module(old) is importlib.import_module(new), old


def test_no_code_imports_an_old_module_name() -> None:
    moved = _moved_tables()
    hits = []
    for folder in ("sci_node", "trainer", "tests", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "test_static_checks.py":
                continue
            hits += [f"{path.relative_to(REPO)}:{line} imports {name} (now {moved[name]})"
                     for line, name in _imports(path) if name in moved]
    assert not hits, "\n".join(hits)


def _documented_modules() -> set[str]:
    """Module names after ``python -m`` in the README, docs/, the training configs and the model cards."""
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "trainer" / "configs").glob("*.toml")), *sorted((REPO / "models").glob("*/*/card.json"))]
    pattern = r"python -m ((?:sci_node|trainer)(?:\.[a-z_0-9]+)+)"
    return {m for t in texts for m in re.findall(pattern, t.read_text(encoding="utf-8"))}


def test_documented_python_m_commands_resolve() -> None:
    modules = _documented_modules()
    assert "trainer.seg_recalibrate" in modules
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:  # a package runs its __main__
            name = f"{name}.__main__"
            spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None, name
        assert hasattr(spec.loader, "get_code") and spec.loader.get_code(spec.name) is not None, name


def test_python_m_runs_an_old_name() -> None:
    proc = subprocess.run([sys.executable, "-m", "trainer.seg_recalibrate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "python -m trainer.seg_recalibrate" in proc.stdout, proc.stderr[-2000:]


def test_every_training_config_loads() -> None:
    from trainer import read_toml_config

    configs = sorted((REPO / "trainer" / "configs").glob("*.toml"))
    assert len(configs) >= 20
    for path in configs:
        assert read_toml_config(path), path
