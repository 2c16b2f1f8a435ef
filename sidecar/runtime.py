"""The running sidecar's shared objects, handed to every request handler."""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from types import ModuleType

from exporters.telemetry import Telemetry
from ledger.pricing import Pricer
from ledger.writer import LedgerWriter

from .adapters import anthropic, gemini, openai
from .config import Config
from .guard import Guard
from .upstream import Pool

ADAPTER_MODULES: dict[str, ModuleType] = {"openai": openai, "anthropic": anthropic, "gemini": gemini}

log = logging.getLogger("meterline.anomaly")


@dataclass(slots=True)
class Runtime:
    config: Config
    writer: LedgerWriter
    pricer: Pricer
    guard: Guard
    pool: Pool | None = None  # forwarded calls
    anomalies: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0
    telemetry: Telemetry | None = None
    tracing: bool = False  # spans are exported, so upstream requests carry the call's span context
    capture_content: bool = False  # prompts and completions go on spans (opt-in)

    def anomaly(self, kind: str, detail: str) -> None:
        """A metering fault: counted and logged, never raised into the call."""
        self.anomalies[kind] += 1
        log.warning("metering anomaly %s: %s", kind, detail)
