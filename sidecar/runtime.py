"""The running forwarder's shared objects, handed to every request handler."""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ledger.journal import Journal
from ledger.pricing import Pricer
from sinks.link import Link

from .adapters import anthropic, eachlabs, gemini, openai
from .config import Config
from .guard import Guard
from .upstream import Pool

ADAPTER_MODULES: dict[str, ModuleType] = {"openai": openai, "anthropic": anthropic, "gemini": gemini,
                                          "eachlabs": eachlabs}

log = logging.getLogger("meterline.anomaly")


@dataclass(slots=True)
class Runtime:
    config: Config
    journal: Journal  # this forwarder's: every call's lines, read by the sinks process
    link: Link  # to the sinks process: SQL, metrics, health, budget storage
    pricer: Pricer
    guard: Guard
    salt: bytes = b""  # of API-key fingerprints (`<ledger>.salt`, made by the sinks process)
    pool: Pool | None = None  # forwarded calls
    anomalies: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0
    tracing: bool = False  # spans are exported, so upstream requests carry the call's span context
    capture_content: bool = False  # prompts and completions go on spans (opt-in)
    # routes by name with their circuits (sidecar/routes/attempts.table); empty: no call pays for routes
    routes: dict[str, Any] = field(default_factory=dict)

    def anomaly(self, kind: str, detail: str) -> None:
        """A metering fault: counted and logged, never raised into the call."""
        self.anomalies[kind] += 1
        log.warning("metering anomaly %s: %s", kind, detail)
