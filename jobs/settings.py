"""The config's `jobs:` section: when unfinished jobs become `unknown`, how the sinks process polls, idempotency, unit fields."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_KEYS = ("unknown_after_s", "poll_s", "max_poll_s", "idempotency_s", "sync_s", "fields")
_UNITS = ("seconds", "images", "resolution")


class JobsConfigError(ValueError):
    """A `jobs:` value is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class JobsConfig:
    unknown_after_s: float = 86_400.0  # a job with no terminal state this long after submit: `unknown`, at its estimate
    poll_s: float = 5.0  # the sinks process's first poll of an unfinished job, after this long
    max_poll_s: float = 300.0  # its polls back off, doubling, up to this interval
    idempotency_s: float = 600.0  # a repeated submit with the same Idempotency-Key this soon is replayed
    sync_s: float = 2.0  # how often a forwarder holding job reservations asks the ledger for settlements
    # (model glob, {unit: dotted path into the request body}): where other models keep their units
    fields: tuple[tuple[str, dict[str, str]], ...] = field(default_factory=tuple)


def parse(doc: Any) -> JobsConfig:
    if doc is None:
        return JobsConfig()
    if not isinstance(doc, dict):
        raise JobsConfigError("config key 'jobs': expected a mapping")
    unknown = set(doc) - set(_KEYS)
    if unknown:
        raise JobsConfigError(f"unknown config key 'jobs.{sorted(map(str, unknown))[0]}' (known: {', '.join(_KEYS)})")
    values: dict[str, Any] = {}
    for key in _KEYS[:-1]:
        if key in doc:
            v = doc[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise JobsConfigError(f"config key 'jobs.{key}': expected a positive number of seconds, got {v!r}")
            values[key] = float(v)
    fields_doc = doc.get("fields") or {}
    if not isinstance(fields_doc, dict):
        raise JobsConfigError("config key 'jobs.fields': expected a mapping of model globs to {seconds|images|resolution: path}")
    fields = []
    for glob, paths in fields_doc.items():
        where = f"jobs.fields.{glob}"
        if not isinstance(glob, str) or not isinstance(paths, dict) or not paths:
            raise JobsConfigError(f"config key {where!r}: expected a mapping such as {{seconds: input.length}}")
        for unit, path in paths.items():
            if unit not in _UNITS:
                raise JobsConfigError(f"config key '{where}.{unit}': unknown unit (known: {', '.join(_UNITS)})")
            if not isinstance(path, str) or not path:
                raise JobsConfigError(f"config key '{where}.{unit}': expected a dotted path into the body, e.g. input.duration")
        fields.append((glob, dict(paths)))
    cfg = JobsConfig(**values, fields=tuple(fields))
    if cfg.max_poll_s < cfg.poll_s:
        raise JobsConfigError("config key 'jobs.max_poll_s': must be at least jobs.poll_s")
    return cfg
