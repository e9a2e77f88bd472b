"""The shipped recipes, installed as the package data `badam_hf.recipes.shipped` (see pyproject.toml)."""
