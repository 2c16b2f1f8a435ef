"""Where a job request keeps its units: dotted paths into the body, per provider module, overridable per model in the config."""
from __future__ import annotations

import fnmatch
from typing import Any


def dig(doc: Any, path: str) -> Any:
    """doc["a"]["b"] for "a.b" (a number in the path indexes a list); None where any step is missing."""
    for key in path.split("."):
        if isinstance(doc, list) and key.isdigit() and int(key) < len(doc):
            doc = doc[int(key)]
        elif isinstance(doc, dict):
            doc = doc.get(key)
        else:
            return None
    return doc


def number(value: Any) -> float | int | None:
    """A count or duration as the request gives it: a JSON number or a numeric string ("8", "5s")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if value >= 0 else None
    if isinstance(value, str):
        text = value.strip().removesuffix("s")
        try:
            n = float(text)
        except ValueError:
            return None
        if n >= 0:
            return int(n) if n.is_integer() else n
    return None


def override(fields: list[tuple[str, dict[str, str]]], model: str | None) -> dict[str, str]:
    """The config's `jobs.fields` entry for this model (the first glob that matches), else {}."""
    for glob, paths in fields:
        if model is not None and fnmatch.fnmatchcase(model, glob):
            return paths
    return {}


def read_units(body: Any, defaults: dict[str, str], paths: dict[str, str]) -> dict[str, Any]:
    """seconds, images and resolution of a request, from the configured paths, else the module's."""
    units: dict[str, Any] = {}
    for unit in ("seconds", "images", "resolution"):
        path = paths.get(unit) or defaults.get(unit)
        if not path:
            continue
        value = dig(body, path)
        if unit == "resolution":
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                units[unit] = str(value)
        elif (n := number(value)) is not None:
            units[unit] = n
    return units
