"""Command-line overrides: `section.key=value`, the value read as YAML (`training.learning_rate=2e-5`).

Imports nothing else of `badam_hf.recipes`.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from ..core.errors import RecipeError


def parse_override(item: str, source: str = "command line") -> tuple[list[str], Any]:
    """`training.learning_rate=2e-5` -> (['training', 'learning_rate'], 2e-05); the value is YAML."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} on the {source} is not section.key=value.")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise RecipeError(f"override {item!r} on the {source}: the key must be dotted, e.g. training.learning_rate=1e-5.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {item!r}: cannot read the value as YAML ({e}).") from None
    return parts, value


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """A copy of `recipe` with each override set (sections created as needed).

    Every override that cannot be applied is reported at once: one `RecipeError` lists them all. A key given
    twice (`training.max_steps=3 training.max_steps=4`) is refused: which one wins would be a guess."""
    recipe = copy.deepcopy(recipe)
    problems: list[str] = []
    seen: dict[str, str] = {}
    for item in overrides:
        try:
            parts, value = parse_override(item)
            key = ".".join(parts)
            if key in seen:
                raise RecipeError(f"override key {key} is given twice ({seen[key]!r} and {item!r}); give it once.")
            seen[key] = item
            _apply(recipe, item, parts, value)
        except RecipeError as e:
            problems.extend(e.problems)
    if problems:
        raise RecipeError("\n".join(problems), problems)
    return recipe


def _apply(recipe: dict, item: str, parts: list[str], value: Any) -> None:
    node = recipe
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section.")
        node = child
    node[parts[-1]] = value
