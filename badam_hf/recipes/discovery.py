"""Where recipes come from: `resolve` turns a file path or a shipped recipe's name into a file.

The shipped YAML files live in the repository's top-level `recipes/` folder, which pyproject.toml ships
as the package `badam_hf.recipes.shipped` (package data), so an installed wheel has them too. Searched in
this order, the first file of a name winning:

1. `$BADAM_HF_RECIPES`, a folder of the user's own recipes;
2. the shipped recipes: the checkout's own `recipes/` folder when this code runs from a source checkout
   (`PYTHONPATH` or an editable install), otherwise the installed package `badam_hf.recipes.shipped`
   (`importlib.resources`). A checkout asks for its own folder by path first, so that another checkout's
   editable install in the same environment cannot lend it its recipes.

Imports nothing else of `badam_hf.recipes`.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import yaml

from ..core.errors import RecipeError

ENV_RECIPES_DIR = "BADAM_HF_RECIPES"  # optional extra folder searched first
SHIPPED_PACKAGE = "badam_hf.recipes.shipped"  # the top-level recipes/ folder, as package data


def shipped_dir() -> Path | None:
    """The folder of the shipped recipes, or None when neither the checkout's nor the installed one exists."""
    root = Path(__file__).resolve().parents[2]
    checkout = root / "recipes"
    if (root / "pyproject.toml").is_file() and (checkout / "__init__.py").is_file():
        return checkout
    try:
        found = importlib.resources.files(SHIPPED_PACKAGE)
    except ModuleNotFoundError:
        return None
    # A package installed as files (wheels, editable installs) is a plain path; a zipped one is not usable here.
    return found if isinstance(found, Path) and found.is_dir() else None


def recipe_dirs() -> list[Path]:
    """The folders searched for recipes, in order (`$BADAM_HF_RECIPES` first)."""
    dirs = [Path(os.environ[ENV_RECIPES_DIR]).expanduser()] if os.environ.get(ENV_RECIPES_DIR) else []
    shipped = shipped_dir()
    return dirs + ([shipped] if shipped is not None else [])


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every shipped recipe (`$BADAM_HF_RECIPES` first, then the shipped `recipes/`)."""
    out: dict[str, Path] = {}
    for d in recipe_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                out.setdefault(p.stem, p)
    return dict(sorted(out.items()))


def describe(path: Path) -> str:
    """The recipe's one-line description: its `description:` key, else the header comment's first line."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("description"), str):
        return data["description"].strip().splitlines()[0]
    for line in text.splitlines():
        if line.startswith("#"):
            stripped = line.lstrip("#").strip()
            if stripped:
                return stripped
        elif line.strip():
            break
    return ""


def resolve(name_or_path: str) -> Path:
    """A recipe file path, or a shipped recipe's name (with or without `.yaml`)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = shipped_recipes()
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if os.sep not in name_or_path and stem in shipped:
        return shipped[stem]
    searched = ", ".join(map(str, recipe_dirs())) or f"no folder: no package {SHIPPED_PACKAGE}, no ${ENV_RECIPES_DIR}"
    raise RecipeError(
        f"no recipe file {name_or_path!r} and no shipped recipe of that name; shipped recipes: "
        f"{', '.join(shipped) or '(none found in ' + searched + ')'}."
    )
