"""OpenTelemetry traces and metrics, Prometheus text and alert sinks, made from the ledger's call records.

`Telemetry` (exporters/telemetry.py) is the entry point for traces and metrics; it is imported
lazily here, so modules that need none of it (alerts) do not load the protobuf classes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import TelemetrySettings, load_settings, tracing_enabled
    from .telemetry import Telemetry

__all__ = ["Telemetry", "TelemetrySettings", "load_settings", "tracing_enabled"]


def __getattr__(name: str) -> Any:
    if name == "Telemetry":
        from .telemetry import Telemetry

        return Telemetry
    if name in ("TelemetrySettings", "load_settings", "tracing_enabled"):
        from . import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
