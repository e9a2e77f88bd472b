"""Every third-party module the code imports is covered by a distribution pyproject.toml declares.

A package that is only installed by hand (or pulled in by chance as someone else's dependency) passes CI
on a prepared machine and fails every new user; this scan catches it from the source. Scopes:
- `badam_hf/`: module-level imports need a core dependency; imports inside functions (optional engines)
  may come from an extra as well.
- `benchmarks/`: core dependencies and the `reference` extra (the authors' package); imports inside functions
  may also come from the `trl` extra (the TRL comparisons of chunked_loss_memory.py and dpo_rounding.py).
- `tests/`: core dependencies and the `test` extra (with the extras it names).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core distributions, extra -> distributions), self-references like badam_hf[a,b] expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    me = _norm(project["name"])
    raw = project.get("optional-dependencies", {})

    def expand(specs, seen=()):
        names = set()
        for spec in specs:
            name = _requirement_name(spec)
            if name != me:
                names.add(name)
                continue
            for extra in re.search(r"\[(.*)\]", spec).group(1).split(","):
                extra = extra.strip()
                if extra not in seen:
                    names |= expand(raw[extra], (*seen, extra))
        return names

    return {_requirement_name(s) for s in project["dependencies"]}, {k: expand(v, (k,)) for k, v in raw.items()}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, inside a function) for each absolute import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def local_modules(folder: Path) -> set[str]:
    """Modules that are files of the project itself (test helpers imported by name, scripts)."""
    names = {"badam_hf"}
    for p in folder.rglob("*.py"):
        names.add(p.stem)
    return names


def uncovered(folder: Path, allowed_top: set[str], allowed_nested: set[str]) -> list[str]:
    module_dists = importlib.metadata.packages_distributions()
    local = local_modules(folder)
    problems = []
    for path in sorted(folder.rglob("*.py")):
        for module, line, nested in imports(path):
            if module in sys.stdlib_module_names or module in local:
                continue
            dists = {_norm(d) for d in module_dists.get(module, [])}
            allowed = allowed_nested if nested else allowed_top
            if not dists & allowed:
                where = f"{path.relative_to(folder.parent)}:{line}"
                got = ", ".join(sorted(dists)) or "no installed distribution"
                problems.append(f"{where}: import {module} (from {got}) is not declared for this scope")
    return problems


def _scopes():
    core, extras = declared()
    every_extra = set().union(*extras.values())
    return {
        "badam_hf": (core, core | every_extra),
        "benchmarks": (core | extras["reference"], core | extras["reference"] | extras["trl"]),
        "tests": (core | extras["test"], core | extras["test"]),
    }


@pytest.mark.parametrize("folder", ["badam_hf", "benchmarks", "tests"])
def test_every_third_party_import_is_declared(folder):
    top, nested = _scopes()[folder]
    problems = uncovered(ROOT / folder, top, nested)
    assert not problems, "\n".join(problems)


def test_the_scan_catches_a_planted_import(tmp_path):
    # The check itself can fail: an undeclared module-level import of an installed package, an import of a
    # package nobody installed, and an extra's package imported at module level in the core are all caught.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "import os\nimport torch\nimport pytest\nimport surely_not_a_module_xyz\nimport deepspeed\n"
        "def f():\n    import deepspeed\n"
    )
    core, extras = declared()
    problems = uncovered(pkg, core, core | extras["deepspeed"])
    flagged = sorted(p.split(": import ")[1].split(" ")[0] for p in problems)
    assert flagged == ["deepspeed", "pytest", "surely_not_a_module_xyz"], problems
    assert any("mod.py:5" in p for p in problems) and not any("mod.py:7" in p for p in problems)


def test_extras_expand_to_what_the_tests_need():
    _, extras = declared()
    assert {"trl", "deepspeed", "badam", "pytest"} <= extras["test"]
